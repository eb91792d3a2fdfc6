"""The offline demo: a synthetic dataset in CoOp's layout and the tiny CLIP that goes with it.

    python -m textrefiner.demo prepare DIR        # DIR/data/synthetic_shapes + DIR/clip_tiny.pt
    python -m textrefiner.demo prepare DIR --weights FILE  # the same, FILE's pretrained CLIP
    python -m textrefiner.demo pretrain FILE      # pretrain a tiny CLIP here, into FILE
    python -m textrefiner.demo prepare DIR --random   # DIR/clip_random.pt: random weights
    python -m textrefiner.demo images DIR         # DIR/<class>/*.png: a plain folder of images
    python -m textrefiner.demo images DIR --classes "red circle" "blue ring"  # chosen classes

Two CLIPs, for two jobs:
* the tiny *pretrained* CLIP learned colours and shapes contrastively
  (`textrefiner.demo.pretrain`), so zero-shot works and prompt learning has something to improve:
  `scripts/demo.sh` and tests/test_demo_learns.py use it. It ships with the package
  (`textrefiner.demo.weights`): pretraining again gives other weights on another CPU;
* the *random-weight* CLIP (`prepare_random`, instant) is for the fast unit tests, which check
  the pipeline and the equations, not learning.
"""
import argparse
import os
import sys

import torch

from ..clip_backbone import save_random_clip
from ..data.synthetic import synthetic_classnames, write_image_folder, write_synthetic_dataset
from .pretrain import TINY_CLIP, pretrain_tiny_clip
from .weights import (SHIPPED_FILE, SHIPPED_SHA256, demo_vocabulary, pack, read_packed,
                      write_packed)

RANDOM_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128,
                   vision_patch_size=8, transformer_width=64, transformer_layers=3)
# 12 classes: base = the first 6 (every colour and every shape), novel = 6 other pairings of them
DEMO_CLASSES = 12
PRETRAIN_SEED = 1  # the shipped file's seed


def prepare_random(folder: str) -> dict:
    """A 10-class synthetic dataset and a random-weight CLIP for fast tests: {"root", "clip"}."""
    data = os.path.join(folder, "data")
    clip_file = os.path.join(folder, "clip_random.pt")
    if not os.path.isdir(os.path.join(data, "synthetic_shapes")):
        write_synthetic_dataset(data, num_classes=10, image_size=32, seed=0)
    if not os.path.isfile(clip_file):
        save_random_clip(clip_file, **RANDOM_CLIP)
    return {"root": data, "clip": clip_file}


prepare = prepare_random  # the name the unit tests import


def save_pretrained_clip(path: str, seed: int = PRETRAIN_SEED, log=print) -> str:
    """Pretrain the tiny CLIP here and write it packed (the shipped file's format)."""
    model = pretrain_tiny_clip(seed=seed, log=log)
    return write_packed(path, pack(model.state_dict(), demo_vocabulary()))


def prepare_pretrained(folder: str, weights: str = SHIPPED_FILE, log=print) -> dict:
    """The demo's 12-class dataset and pretrained tiny CLIP: {"root", "clip"}.

    `weights` is a packed file (by default the shipped one, whose sha256 is checked); DIR/clip_tiny.pt
    is written from it as a plain CLIP state dict, which `load_clip` and MODEL.BACKBONE.PATH read.
    """
    data = os.path.join(folder, "data")
    if not os.path.isdir(os.path.join(data, "synthetic_shapes")):
        write_synthetic_dataset(data, num_classes=DEMO_CLASSES, per_class_test=30,
                                image_size=32, seed=0)
    sha256 = SHIPPED_SHA256 if os.path.abspath(weights) == SHIPPED_FILE else None
    state_dict = read_packed(weights, sha256)
    clip_file = os.path.join(folder, "clip_tiny.pt")
    partial = f"{clip_file}.{os.getpid()}.partial"
    torch.save(state_dict, partial)
    os.replace(partial, clip_file)  # rewritten each time: never a stale or half-written CLIP
    if log:
        log(f"tiny CLIP: {weights}")
    return {"root": data, "clip": clip_file}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the demo dataset and CLIP under a folder")
    prep.add_argument("folder")
    prep.add_argument("--random", action="store_true",
                      help="a random-weight CLIP (fast tests) instead of the pretrained one")
    prep.add_argument("--weights", default=SHIPPED_FILE,
                      help="a packed tiny CLIP written by `pretrain` (default: the shipped one)")
    pre = commands.add_parser(
        "pretrain", help="pretrain a tiny CLIP into FILE (the weights depend on the CPU kernels)")
    pre.add_argument("file")
    pre.add_argument("--seed", type=int, default=PRETRAIN_SEED)
    img = commands.add_parser(
        "images", help="write synthetic shapes as a plain class-folder tree, DIR/<class>/*.png")
    img.add_argument("folder")
    img.add_argument("--classes", nargs="+", metavar="NAME",
                     help="'<colour> <shape>' class names (default: the demo's "
                          f"{DEMO_CLASSES} classes)")
    img.add_argument("--per-class", type=int, default=20, help="images per class (default 20)")
    img.add_argument("--image-size", type=int, default=32, help="pixels (default 32)")
    img.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "images":
        try:
            folder = write_image_folder(args.folder, args.classes or synthetic_classnames(
                DEMO_CLASSES), args.per_class, args.image_size, args.seed)
        except ValueError as err:
            parser.error(str(err))
        print(f"images: {folder}")
        return 0
    if args.command == "pretrain":
        print(f"clip: {save_pretrained_clip(args.file, args.seed)}")
        return 0
    if args.random:
        paths = prepare_random(args.folder)
    else:
        paths = prepare_pretrained(args.folder, args.weights, log=None)
    print(f"data: {paths['root']}\nclip: {paths['clip']}")
    return 0


__all__ = ["TINY_CLIP", "prepare", "prepare_random", "prepare_pretrained", "save_pretrained_clip",
           "pretrain_tiny_clip", "main"]
