"""Contrastive pretraining of the demo's tiny CLIP on procedurally drawn, captioned images.

The world: every (colour, shape) pair of `textrefiner.data.synthetic`, drawn in a "pretraining"
style (plain background, an object of varied size and position), and captions that name the
colour and shape among other words (size, position, phrasing). The downstream demo dataset draws
the same objects in another style (striped background, clutter, smaller objects, dimmer light),
so zero-shot transfer is imperfect and prompt learning has something to adapt to.

Training is CLIP's: the stock `clip.model.CLIP` class, CLIP's tokenizer, the symmetric InfoNCE
loss over a batch, Adam. Each batch holds every (colour, shape) pair once, so no two captions of
a batch describe the same class. Everything is drawn from seeded generators and torch runs on one
thread, so a seed gives the same weights on a machine.
"""
import random
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..clip_backbone import build_random_clip, tokenize
from ..data.synthetic import COLORS, SHAPES, draw_shape

# The tiny CLIP: 32 px images in 4 x 4 patches of 8 px, 3-layer ViT and text transformer.
TINY_CLIP = dict(embed_dim=64, image_resolution=32, vision_layers=3, vision_width=128,
                 vision_patch_size=8, transformer_width=64, transformer_layers=3)
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as the demo configs use
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

SIZES = {"small": (0.40, 0.60), "large": (0.65, 0.95)}  # object side as a fraction of the image
POSITIONS = ("center", "left", "right", "top", "bottom")
TEMPLATES = (
    "a photo of a {color} {shape}.",
    "a {color} {shape}.",
    "a {size} {color} {shape}.",
    "a photo of a {size} {color} {shape}.",
    "a {color} {shape} on the {position}.",
    "a {size} {color} {shape} in the {position}.",
    "a drawing of a {color} {shape}.",
    "a {shape} coloured {color}.",
    "there is a {color} {shape} here.",
    "{color} {shape}",
)


def world_classes():
    """Every (colour, shape) pair of the synthetic world, in a fixed order."""
    return [(color, shape) for color in COLORS for shape in SHAPES]


def _place(position, side, image_size, rng):
    """Top-left corner of a `side`-pixel object at `position` (with some jitter)."""
    free = image_size - side
    low, mid, high = (0, free // 4), (free // 4, (3 * free) // 4), ((3 * free) // 4, free)
    spans = {"center": (mid, mid), "left": (low, mid), "right": (high, mid),
             "top": (mid, low), "bottom": (mid, high)}[position]
    return tuple(rng.randint(*span) for span in spans)


def render_pretraining_image(color, shape, size, position, image_size, rng):
    """One pretraining-style image: plain background, one object of the given size/position."""
    background = tuple(rng.randint(60, 230) for _ in range(3))
    img = Image.new("RGB", (image_size, image_size), background)
    low, high = SIZES[size]
    side = max(4, int(image_size * rng.uniform(low, high)))
    x0, y0 = _place(position, side, image_size, rng)
    jitter = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])
    draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), jitter)
    return img


def to_tensor(images):
    """PIL images -> [N, 3, H, W] normalised with CLIP's mean and std."""
    data = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                        .view(im.size[1], im.size[0], 3) for im in images])
    data = data.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (data - mean) / std


def render_pool(variants, image_size, rng):
    """`variants` images per class: images [K, V, 3, H, W] and their (size, position) words."""
    images, words = [], []
    for color, shape in world_classes():
        attrs = [(rng.choice(list(SIZES)), rng.choice(POSITIONS)) for _ in range(variants)]
        pics = [render_pretraining_image(color, shape, s, p, image_size, rng) for s, p in attrs]
        images.append(to_tensor(pics))
        words.append(attrs)
    return torch.stack(images), words


def caption(color, shape, size, position, rng):
    template = rng.choice(TEMPLATES)
    return template.format(color=color, shape=shape, size=size, position=position)


def clip_loss(model, images, tokens):
    """CLIP's symmetric InfoNCE: matching pairs sit on the diagonal."""
    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * image_features @ text_features.t()
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def pretrain_tiny_clip(seed=0, steps=400, lr=1e-3, variants=64, log_every=250, log=print):
    """Pretrain the tiny CLIP; returns the model (float32, eval mode)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order, bit for bit
    try:
        return _pretrain(seed, steps, lr, variants, log_every, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(seed, steps, lr, variants, log_every, log):
    start = time.time()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_random_clip(**TINY_CLIP, seed=seed).float().train()
    pool, words = render_pool(variants, TINY_CLIP["image_resolution"], rng)
    classes = world_classes()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    rows = torch.arange(len(classes))
    for step in range(1, steps + 1):
        picks = torch.randint(variants, (len(classes),), generator=generator)
        images = pool[rows, picks]
        texts = [caption(color, shape, *words[k][int(picks[k])], rng)
                 for k, (color, shape) in enumerate(classes)]
        loss = clip_loss(model, images, tokenize(texts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # ln(100), as CLIP clamps it
        if log and (step % log_every == 0 or step == steps):
            log(f"pretrain step {step}/{steps}  loss {loss.item():.4f}  "
                f"({time.time() - start:.0f} s)")
    return model.eval()
