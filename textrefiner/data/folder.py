"""A plain folder of images as a dataset (DATASET.NAME "ImageFolder").

Two layouts, class names from the folder names (`_` read as a space) or from a `classnames.txt`
beside the class folders ("<folder> <class name>" lines, as ImageNet's):

    FOLDER/<class>/*.jpg                      split once per class with CoOp's rule (DTD's
                                              read_and_split_data: half train, a fifth val, the
                                              rest test), seeded
    FOLDER/{train,val,test}/<class>/*.jpg     the user's split; without val/, a fifth of each
                                              class's train images (CoOp's split_trainval);
                                              without test/, val/ is the test split too

The split is written once as a split file in CoOp's format (`read_split_json`) and read from then
on, so every run, machine and engine sees the same split. A read-only FOLDER keeps it (and the
few-shot draws) in a cache folder instead (`split_home`); the run's log says where.
"""

import hashlib
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, List

from PIL import Image

from textrefiner.checkpoint import atomic_write
from textrefiner.data.base import Datum, read_split_json, split_json_text
from textrefiner.errors import OutputError, UserError

FOLDER_DATASET = "ImageFolder"
SPLIT_FILE = "split_textrefiner_ImageFolder.json"
CLASSNAMES_FILE = "classnames.txt"
FEWSHOT_FOLDER = "split_fewshot"  # the few-shot draws' cache (base.fewshot_cache_path), no class
SPLIT_FOLDERS = ("train", "val", "test")
SPLIT_SEED = 1  # the split does not depend on the run's seed: every run sees the same one
P_TRAIN, P_VAL = 0.5, 0.2  # CoOp's read_and_split_data; split_trainval takes P_VAL of train
MIN_IMAGES = 4  # fewest images a class needs for non-empty train, val and test under that rule
MIN_TRAIN_FOR_VAL = 3  # fewest train images split_trainval draws a val image from
CACHE_ENV = "TEXTREFINER_CACHE"  # where read-only folders keep their split (default ~/.cache)
# What counts as an image, by extension (any case): torchvision's ImageFolder's, plus .gif and
# .jfif. Anything else beside the images (notes, Thumbs.db, .xmp sidecars) is skipped and counted,
# not refused: photo folders routinely hold such files.
IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                              ".tiff", ".webp", ".gif"))


def resolve_folder(root, folder):
    """The dataset folder: DATASET.FOLDER, absolute or relative to DATASET.ROOT; DATASET.ROOT
    itself when DATASET.FOLDER is empty."""
    if not folder and not root:
        raise UserError(f"{FOLDER_DATASET}: no folder given. Set DATASET.FOLDER to your folder of "
                        "class subfolders (FOLDER/<class>/*.jpg), or pass it as --root.")
    if not folder:  # a relative --root is relative to the working folder, not to itself
        return os.path.abspath(os.path.expanduser(root))
    return os.path.abspath(os.path.join(os.path.expanduser(root), os.path.expanduser(folder)))


def cache_home(folder):
    """The cache folder that keeps a read-only dataset folder's split and few-shot draws."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "textrefiner")
    digest = hashlib.sha256(folder.encode("utf-8")).hexdigest()[:12]
    return os.path.join(base, "folders", f"{os.path.basename(folder) or 'root'}-{digest}")


def split_home(folder):
    """Where `folder`'s split file lives: the folder itself, or the cache folder when the split
    was written there (the folder being read-only)."""
    cached = cache_home(folder)
    if not os.path.isfile(os.path.join(folder, SPLIT_FILE)) and os.path.isfile(
            os.path.join(cached, SPLIT_FILE)):
        return cached
    return folder


def fewshot_home(folder):
    """Where the few-shot draws are cached: beside the split, unless that folder has become
    read-only since (then the cache folder)."""
    home = split_home(folder)
    return home if os.access(home, os.W_OK) else cache_home(folder)


# ------------------------------------------------------------------------------ listing


@dataclass
class Listing:
    """What is on disk: per split folder ("" for the one-level layout), the images of each
    class folder; the class names by folder; the files skipped."""

    splits: Dict[str, Dict[str, List[str]]]
    classnames: Dict[str, str]
    skipped: List[str]


def visible_entries(folder):
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                  key=lambda e: e.name)


def is_image_file(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_class_images(folder):
    """{class folder: sorted image paths} under `folder`, and the files that are not images."""
    classes, skipped = {}, []
    for entry in visible_entries(folder):
        if entry.name == FEWSHOT_FOLDER:
            continue
        if not entry.is_dir():
            if entry.name != CLASSNAMES_FILE and entry.name != SPLIT_FILE:
                skipped.append(entry.path)
            continue
        images = []
        for item in visible_entries(entry.path):
            (images if item.is_file() and is_image_file(item.name) else skipped).append(item.path)
        classes[entry.name] = images
    return classes, skipped


def split_layout(folder):
    """The split folders present when `folder` holds train/ and test/ or val/, else None."""
    names = [e.name for e in visible_entries(folder) if e.is_dir() and e.name != FEWSHOT_FOLDER]
    present = [s for s in SPLIT_FOLDERS if s in names]
    if not present:
        return None
    if "train" not in present or len(present) < 2:
        raise UserError(f"{folder} holds {'/ and '.join(present)}/ without "
                        f"{'test/ or val/' if 'train' in present else 'train/'} beside it: add "
                        "the missing split folder, or rename the folder if it is a class.")
    others = sorted(set(names) - set(SPLIT_FOLDERS))
    if others:
        raise UserError(f"{folder} holds {'/, '.join(present)}/ beside other folders "
                        f"({', '.join(others)}): move the class folders into "
                        f"{'/ and '.join(present)}/, or the split folders out.")
    return present


def check_classes(folder, classes):
    """The one-line errors of a split folder's class folders."""
    if not classes:
        raise UserError(f"{folder} has no class folders: put each class's images in a subfolder "
                        f"named after the class ({folder}/<class>/*.jpg).")
    if len(classes) == 1:
        only = next(iter(classes))
        raise UserError(f"{folder} has one class folder ({only}): a classifier needs at least two "
                        "classes; add a folder per class.")
    for name, images in classes.items():
        if not images:
            raise UserError(f"{os.path.join(folder, name)} holds no images (files such as .jpg "
                            "or .png): add images or remove the folder.")


def check_same_classes(folder, splits):
    reference = set(splits["train"])
    for split, classes in splits.items():
        if set(classes) != reference:
            only_train = sorted(reference - set(classes))
            only_other = sorted(set(classes) - reference)
            raise UserError(
                f"{folder}/train and {folder}/{split} have different class folders (only in "
                f"train: {', '.join(only_train) or '-'}; only in {split}: "
                f"{', '.join(only_other) or '-'}): give both the same class folders.")


def read_classnames_file(folder, class_folders):
    """{class folder: class name}: `classnames.txt` when there is one, else the folder names
    with `_` read as a space."""
    path = os.path.join(folder, CLASSNAMES_FILE)
    if not os.path.isfile(path):
        return {name: name.replace("_", " ").strip() for name in class_folders}
    named = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, classname = line.strip().partition(" ")
            if key:
                named[key] = classname.strip()
    for name in class_folders:
        if not named.get(name):
            raise UserError(f"{path} gives no class name for the folder {name!r}: add a line "
                            f"'{name} <class name>', or delete the file to use the folder names.")
    return {name: named[name] for name in class_folders}


def check_distinct_names(folder, classnames):
    """Two folders must not give the same class name. CLIP's tokenizer lowercases and collapses
    whitespace, so "Cat" and "cat" would be one prompt for two labels."""
    seen = {}
    for name, classname in classnames.items():
        key = " ".join(classname.lower().split())
        if key in seen:
            raise UserError(f"{os.path.join(folder, seen[key])} and {os.path.join(folder, name)} "
                            f"both give the class name {classname!r}: rename one folder (or give "
                            f"distinct names in {CLASSNAMES_FILE}).")
        seen[key] = name


def list_folder(folder):
    """The `Listing` of a dataset folder, after every check that needs no image to be opened."""
    if not os.path.isdir(folder):
        raise UserError(f"{FOLDER_DATASET}: folder not found: {folder}. Point DATASET.FOLDER (or "
                        "--root) at a folder of class subfolders (FOLDER/<class>/*.jpg).")
    present = split_layout(folder)
    splits, skipped = {}, []
    for split in present or [""]:
        split_dir = os.path.join(folder, split) if split else folder
        classes, split_skipped = list_class_images(split_dir)
        check_classes(split_dir, classes)
        splits[split] = classes
        skipped += split_skipped
    if present:
        check_same_classes(folder, splits)
    class_folders = sorted(next(iter(splits.values())))
    classnames = read_classnames_file(folder, class_folders)
    check_distinct_names(folder, classnames)
    return Listing(splits, classnames, skipped)


def listed_rows(listing, folder):
    """Every listed image as a (path relative to `folder`, label, class name) row, sorted."""
    labels = {name: label for label, name in enumerate(sorted(listing.classnames))}
    return sorted(
        (os.path.relpath(path, folder), labels[name], listing.classnames[name])
        for classes in listing.splits.values() for name, paths in classes.items() for path in paths)


# ------------------------------------------------------------------------------ splitting


def check_readable(folder, listing):
    """Refuse a file that has an image's extension but is not a readable image: the split would
    otherwise hold a file that stops training when first read."""
    unreadable = []
    for classes in listing.splits.values():
        for paths in classes.values():
            for path in paths:
                try:
                    with Image.open(path) as img:
                        img.size  # noqa: B018 - the header is read; the pixels are not
                except OSError as err:
                    unreadable.append((path, err))
    if unreadable:
        path, err = unreadable[0]
        more = f" ({len(unreadable)} such files under {folder})" if len(unreadable) > 1 else ""
        raise UserError(f"{path} is not a readable image ({err}){more}: delete or replace it, "
                        "then run again.")


def split_class(paths, rng, folder, name):
    """CoOp's read_and_split_data on one class: shuffled, round(n / 2) train, round(n / 5) val,
    the rest test."""
    if len(paths) < MIN_IMAGES:
        raise UserError(
            f"{os.path.join(folder, name)} holds {len(paths)} image(s); splitting it into train, "
            f"val and test (half, a fifth, the rest) needs at least {MIN_IMAGES}: add images, or "
            "give the folder train/ and test/ subfolders.")
    paths = list(paths)
    rng.shuffle(paths)
    n_train, n_val = round(len(paths) * P_TRAIN), round(len(paths) * P_VAL)
    return paths[:n_train], paths[n_train:n_train + n_val], paths[n_train + n_val:]


def split_trainval(paths, rng, folder, name):
    """CoOp's split_trainval on one class: round(n / 5) shuffled images to val, the rest train."""
    if len(paths) < MIN_TRAIN_FOR_VAL:
        raise UserError(
            f"{os.path.join(folder, 'train', name)} holds {len(paths)} image(s); drawing a fifth "
            f"of them as validation images needs at least {MIN_TRAIN_FOR_VAL}: add images, or "
            f"give the folder a val/ subfolder.")
    indices = list(range(len(paths)))
    rng.shuffle(indices)
    n_val = round(len(paths) * P_VAL)
    return ([paths[i] for i in sorted(indices[n_val:])], [paths[i] for i in indices[:n_val]])


def make_split(folder, listing):
    """(train, val, test) lists of `Datum` from a listing, with the seeded random parts."""
    rng = random.Random(SPLIT_SEED)
    out = {"train": [], "val": [], "test": []}
    for label, name in enumerate(sorted(listing.classnames)):
        classname = listing.classnames[name]
        if "" in listing.splits:
            parts = split_class(listing.splits[""][name], rng, folder, name)
        else:
            given = {split: classes[name] for split, classes in listing.splits.items()}
            if "val" not in given:
                given["train"], given["val"] = split_trainval(given["train"], rng, folder, name)
            given.setdefault("test", given["val"])
            parts = (given["train"], given["val"], given["test"])
        for split, paths in zip(out, parts):
            out[split] += [Datum(impath=p, label=label, classname=classname) for p in paths]
    return out["train"], out["val"], out["test"]


def describe_split(folder, listing):
    if "" in listing.splits:
        return (f"{folder}: split each class into {P_TRAIN:.0%} train, {P_VAL:.0%} val and "
                f"{1 - P_TRAIN - P_VAL:.0%} test (CoOp's rule, seed {SPLIT_SEED})")
    given = [s for s in SPLIT_FOLDERS if s in listing.splits]
    text = f"{folder}: the split of its {'/, '.join(given)}/ folders"
    if "val" not in given:
        text += f"; val = {P_VAL:.0%} of each class's train images (seed {SPLIT_SEED})"
    if "test" not in given:
        text += "; no test/: val/ is the test split too"
    return text


def write_split(folder, train, val, test, log=print):
    """Write the split file into `folder`, or into its cache folder when `folder` is read-only.
    Returns where it went."""
    for home in (folder, cache_home(folder)):
        path = os.path.join(home, SPLIT_FILE)
        try:
            atomic_write(path, lambda f: f.write(split_json_text(train, val, test, folder)), "w")
        except OutputError:
            if home != folder:
                raise
            continue
        if home != folder:
            log(f"{folder} is not writable: its split file is kept in {path}")
        return path


def check_unchanged(folder, listing, path, train, val, test):
    """The split file must list what is on disk: images added or removed since it was written
    would be silently ignored or fail later."""
    on_disk = set(listed_rows(listing, folder))
    in_file = {(os.path.relpath(d.impath, folder), d.label, d.classname)
               for d in train + val + test}
    if on_disk != in_file:
        added, gone = sorted(on_disk - in_file), sorted(in_file - on_disk)
        example = (added or gone)[0][0]
        raise UserError(
            f"{folder} changed since its split file {path} was written ({len(added)} image(s) or "
            f"class name(s) new, {len(gone)} gone, e.g. {example}): delete {path} to split the "
            "folder again (runs before and after then saw different splits).")


def read_image_folder(folder, log=print):
    """(train, val, test) of a folder of class folders, split once and read from its split file
    from then on. `log` gets what the run's log should say (where the split is, what was
    skipped)."""
    folder = os.path.abspath(folder)
    listing = list_folder(folder)
    if listing.skipped:
        log(f"{folder}: skipped {len(listing.skipped)} file(s) that are not images by their "
            f"extension, e.g. {listing.skipped[0]} (an image needs one of "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))}, any case)")
    path = os.path.join(split_home(folder), SPLIT_FILE)
    if os.path.isfile(path):
        train, val, test = read_split_json(path, folder)
        check_unchanged(folder, listing, path, train, val, test)
        log(f"{folder}: reading the split in {path}")
        return train, val, test
    check_readable(folder, listing)
    train, val, test = make_split(folder, listing)
    log(describe_split(folder, listing))
    log(f"{folder}: split file written to {write_split(folder, train, val, test, log)}")
    return train, val, test


def check_shots(folder, train, num_shots):
    """Refuse a few-shot draw that a class cannot fill (CoOp would quietly take fewer)."""
    if num_shots < 1:
        return
    counts, first = {}, {}
    for item in train:
        counts[item.classname] = counts.get(item.classname, 0) + 1
        first.setdefault(item.classname, item.impath)
    for classname, count in counts.items():
        if count < num_shots:
            raise UserError(
                f"Class {classname!r} ({os.path.dirname(first[classname])}) has {count} training "
                f"image(s), fewer than DATASET.NUM_SHOTS {num_shots}: add images (a folder "
                "without train/ trains on half of each class), or lower DATASET.NUM_SHOTS.")


def summarize_folder(folder, log=print):
    """Check and split `folder` (as a run would), then log one line per class: its label, name,
    folder and train / val / test counts (`textrefiner-data ImageFolder --root FOLDER`)."""
    train, val, test = read_image_folder(folder, log)
    counts = {}
    for split, items in enumerate((train, val, test)):
        for item in items:
            row = counts.setdefault(item.label, [item.classname, item.impath, 0, 0, 0])
            row[2 + split] += 1
    log(f"{'label':>5}  {'train':>5} {'val':>5} {'test':>5}  class (folder)")
    for label, (classname, impath, *numbers) in sorted(counts.items()):
        folder_name = os.path.basename(os.path.dirname(impath))
        log(f"{label:>5}  {numbers[0]:>5} {numbers[1]:>5} {numbers[2]:>5}  {classname} "
            f"({folder_name})")
    log(f"{len(counts)} classes; train {len(train)}, val {len(val)}, test {len(test)} images")
