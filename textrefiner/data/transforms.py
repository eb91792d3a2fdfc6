"""Image transforms from cfg.INPUT, with Dassl's meaning of its keys."""

import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from textrefiner.errors import UserError

INTERPOLATION_MODES = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
# "center_crop" is a no-op in training, as in Dassl (testing always crops)
TRANSFORM_CHOICES = (
    "random_resized_crop", "random_flip", "random_crop", "center_crop", "normalize"
)


def interpolation_mode(cfg):
    name = cfg.INPUT.INTERPOLATION
    if name not in INTERPOLATION_MODES:
        raise UserError(
            f"Unknown INPUT.INTERPOLATION {name!r}; choose one of {list(INTERPOLATION_MODES)}"
        )
    return INTERPOLATION_MODES[name]


def check_choices(choices):
    unknown = [c for c in choices if c not in TRANSFORM_CHOICES]
    if unknown:
        raise UserError(
            f"Unknown INPUT.TRANSFORMS {unknown}; supported: {list(TRANSFORM_CHOICES)}"
        )


def build_transform(cfg, is_train, choices=None):
    """Train: [resize | random crop | random resized crop], [flip], to tensor, [normalize].
    Test: resize the shorter side to max(INPUT.SIZE), center crop INPUT.SIZE, to tensor,
    [normalize]. `choices` overrides INPUT.TRANSFORMS. INPUT.NO_TRANSFORM gives None.
    """
    if cfg.INPUT.get("NO_TRANSFORM", False):
        return None
    choices = list(cfg.INPUT.TRANSFORMS if choices is None else choices)
    check_choices(choices)
    size = tuple(cfg.INPUT.SIZE)
    interp = interpolation_mode(cfg)
    if is_train:
        steps = train_steps(cfg, choices, size, interp)
    else:
        steps = [T.Resize(max(size), interpolation=interp), T.CenterCrop(size)]
    steps.append(T.ToTensor())
    if "normalize" in choices:
        steps.append(T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD))
    return T.Compose(steps)


def train_steps(cfg, choices, size, interp):
    steps = []
    if "random_crop" not in choices and "random_resized_crop" not in choices:
        steps.append(T.Resize(size, interpolation=interp))
    if "random_crop" in choices:
        steps.append(T.RandomCrop(size, padding=cfg.INPUT.get("CROP_PADDING", 4)))
    if "random_resized_crop" in choices:
        scale = tuple(cfg.INPUT.get("RRCROP_SCALE", (0.08, 1.0)))
        steps.append(T.RandomResizedCrop(size, scale=scale, interpolation=interp))
    if "random_flip" in choices:
        steps.append(T.RandomHorizontalFlip())
    return steps


def replay_draws(transform, size):
    """Make the random draws `transform` (a build_transform result) makes for an image of `size`
    (width, height), on a blank stand-in. The draws of the TRANSFORM_CHOICES depend on the image's
    size alone; only the steps before ToTensor (where all of them sit) run."""
    image = Image.new("L", size)
    for step in transform.transforms:
        if isinstance(step, T.ToTensor):
            return
        image = step(image)
