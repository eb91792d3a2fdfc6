"""What the benchmarks share: the checkout on sys.path, the CLIP shapes they time, and the
command line of the side-by-side benchmarks (cocoop.py, figure3.py, predict.py).

Every script of this folder is run as `python benchmarks/NAME.py`, so this folder is on sys.path
and `from common import ...` finds this file; nothing here imports another benchmark.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without installing

# ViT-B/16's shape, and a smaller ViT with the same layout for --quick runs
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
               vision_patch_size=16, transformer_width=512, transformer_layers=12)
SMALL = dict(embed_dim=256, image_resolution=96, vision_layers=6, vision_width=384,
             vision_patch_size=16, transformer_width=256, transformer_layers=4)
# The other backbone families, same text tower: CLIP's RN50 and a small ResNet
RN50 = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
            transformer_width=512, transformer_layers=12)
SMALL_RN = dict(embed_dim=256, image_resolution=96, vision_layers=(1, 1, 1, 1), vision_width=32,
                transformer_width=256, transformer_layers=4)
SHAPES = {"vit_b16": VIT_B16, "small": SMALL}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_parser(doc: str, name: str, quick_help: str, classes: int, batch_size: str,
                 repeats: str) -> argparse.ArgumentParser:
    """The flags every side-by-side benchmark takes; `name` names its results file
    (benchmarks/results_NAME.json, with --quick results_NAME_quick.json). The help texts of
    --batch-size and --repeats say their defaults, which `bench_args` fills in."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--classes", type=int, default=classes, help=f"class count (default {classes})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per batch ({batch_size})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed rounds ({repeats})")
    p.add_argument("--device", default=default_device())
    p.add_argument("--json", default=None, help=f"results file (default benchmarks/results_{name}"
                   f".json, quick: results_{name}_quick.json)")
    p.set_defaults(results_name=name)
    return p


def bench_args(parser: argparse.ArgumentParser, argv, batch_size: tuple, repeats: tuple):
    """Parsed flags with the shape and the defaults that depend on --quick filled in:
    `batch_size` and `repeats` are (full, quick) pairs."""
    args = parser.parse_args(argv)
    args.shape = "small" if args.quick else "vit_b16"
    args.batch_size = args.batch_size or batch_size[args.quick]
    args.repeats = args.repeats or repeats[args.quick]
    suffix = "_quick" if args.quick else ""
    args.json = args.json or os.path.join(ROOT, "benchmarks",
                                          f"results_{args.results_name}{suffix}.json")
    return args


def save_results(results: dict, path: str) -> None:
    """The benchmark's results as JSON at `path` (its --json), and where they went."""
    import json

    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {path}")
