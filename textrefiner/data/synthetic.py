"""A small procedural dataset ("red circle", "green square", ...) in CoOp's layout, for tests
and smoke runs: root/synthetic_shapes/images/<class>/*.png + split_zhou_SyntheticShapes.json;
or as a plain folder of class folders, FOLDER/<class>/*.png (`write_image_folder`), as a user's
own photos would be.
"""

import os
import random

from PIL import Image, ImageDraw

from textrefiner.data.base import Datum, write_split_json

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
# 6 colours and 5 shapes are coprime, so class i = (colour i % 6, shape i % 5) are all distinct
MAX_CLASSES = len(COLORS) * len(SHAPES)
CLUTTER_DOTS = 4
LIGHT = (0.6, 0.9)  # the object's colour is scaled by a factor drawn from this range
FOLDER = "synthetic_shapes"
SPLIT_FILE = "split_zhou_SyntheticShapes.json"


def synthetic_classnames(num_classes):
    """Class names, e.g. ["red circle", "green square", ...]."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    colors = list(COLORS)
    return [f"{colors[i % len(colors)]} {SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]


def draw_shape(draw, shape, box, color):
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "cross":
        t = w / 6
        draw.rectangle((cx - t, y0, cx + t, y1), fill=color)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(w / 6)))


def render_image(classname, image_size, rng):
    """One image of `classname` in the downstream style: a striped background, a few small dots
    of clutter, and a smallish object under dim light (darker than the tiny CLIP's pretraining
    images, `textrefiner.demo.pretrain`, which zero-shot transfer must bridge)."""
    color_name, shape = classname.split(" ")
    background = tuple(rng.randint(90, 200) for _ in range(3))
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    stripe = rng.randint(4, 10)  # background stripes of random period and tint
    tint = tuple(max(0, c - rng.randint(10, 40)) for c in background)
    for x in range(0, image_size, 2 * stripe):
        draw.rectangle((x, 0, x + stripe - 1, image_size), fill=tint)
    for _ in range(CLUTTER_DOTS):
        side = max(2, image_size // rng.randint(8, 16))
        x0, y0 = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
        draw.ellipse((x0, y0, x0 + side, y0 + side), fill=COLORS[rng.choice(list(COLORS))])
    size = rng.randint(image_size // 4, image_size // 2)
    x0 = rng.randint(0, image_size - size)
    y0 = rng.randint(0, image_size - size)
    light = rng.uniform(*LIGHT)
    color = tuple(min(255, max(0, int(light * c) + rng.randint(-20, 20)))
                  for c in COLORS[color_name])
    draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), color)
    return img


def write_synthetic_dataset(
    root, num_classes=10, per_class_train=16, per_class_val=4, per_class_test=10,
    image_size=64, seed=0,
):
    """Write the dataset under `root`/synthetic_shapes, the same for the same seed.

    Returns the dataset folder.

    Read it with DATASET.NAME "SyntheticShapes" and DATASET.ROOT `root`.
    """
    rng = random.Random(seed)
    dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(root)), FOLDER)
    images = os.path.join(dataset_dir, "images")
    counts = {"train": per_class_train, "val": per_class_val, "test": per_class_test}
    splits = {split: [] for split in counts}
    for label, classname in enumerate(synthetic_classnames(num_classes)):
        class_dir = os.path.join(images, classname.replace(" ", "_"))
        os.makedirs(class_dir, exist_ok=True)
        for split, count in counts.items():
            for i in range(count):
                impath = os.path.join(class_dir, f"{split}_{i:03d}.png")
                render_image(classname, image_size, rng).save(impath)
                splits[split].append(Datum(impath=impath, label=label, classname=classname))
    split_path = os.path.join(dataset_dir, SPLIT_FILE)
    write_split_json(split_path, splits["train"], splits["val"], splits["test"], images)
    return dataset_dir


def check_classnames(classnames):
    """Each name must be "<colour> <shape>" of the demo's colours and shapes."""
    for classname in classnames:
        color, _, shape = classname.partition(" ")
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"{classname!r} is not a demo class: name one colour of "
                             f"{', '.join(COLORS)} and one shape of {', '.join(SHAPES)}, "
                             "e.g. 'red circle'")


def write_image_folder(folder, classnames, per_class=20, image_size=32, seed=0):
    """Write `per_class` images of each class as FOLDER/<class>/<class>_<i>.png (a space in the
    class name written as `_`), the same for the same seed; no split file. Returns the folder.

    Read it with DATASET.NAME "ImageFolder" and DATASET.FOLDER `folder`.
    """
    check_classnames(classnames)
    folder = os.path.abspath(os.path.expanduser(folder))
    for classname in classnames:
        rng = random.Random(f"{seed}-{classname}")  # a class's images do not depend on the others
        class_dir = os.path.join(folder, classname.replace(" ", "_"))
        os.makedirs(class_dir, exist_ok=True)
        for i in range(per_class):
            path = os.path.join(class_dir, f"{classname.replace(' ', '_')}_{i:03d}.png")
            render_image(classname, image_size, rng).save(path)
    return folder
