"""Material for the offline demo: a synthetic dataset in CoOp's layout and a small random CLIP.

    python -m textrefiner.demo DIR     # writes DIR/data/synthetic_shapes and DIR/clip_random.pt

Random weights give chance-level accuracy: the demo shows the pipeline working end to end, not
the method's benefit.
"""
import argparse
import os
import sys

from .clip_backbone import save_random_clip
from .data.synthetic import write_synthetic_dataset

DEMO_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128,
                 vision_patch_size=8, transformer_width=64, transformer_layers=3)


def prepare(folder: str) -> dict:
    data = os.path.join(folder, "data")
    clip_file = os.path.join(folder, "clip_random.pt")
    if not os.path.isdir(os.path.join(data, "synthetic_shapes")):
        write_synthetic_dataset(data, num_classes=10, image_size=32, seed=0)
    if not os.path.isfile(clip_file):
        save_random_clip(clip_file, **DEMO_CLIP)
    return {"root": data, "clip": clip_file}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the demo data and CLIP checkpoint")
    args = parser.parse_args(argv)
    paths = prepare(args.folder)
    print(f"data: {paths['root']}\nclip: {paths['clip']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
