"""`textrefiner-explain`: a trained run's report folder (index.html + PNGs) from the command line."""
import argparse
import os
import sys
from typing import Sequence

from ..errors import UserError, run_command
from ..predict import Predictor, add_run_args, image_files
from .numbers import NEAREST, explain_images
from .report import write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-explain",
        description="Pictures of what a trained run's TextRefiner learned: its cache's entries, "
                    "which entries each class reads, per-image attention and semantic patches, "
                    "and what refinement changed; one folder with index.html.")
    parser.add_argument("images", nargs="*", help="image files or folders (default: the run's "
                                                  "test split); a folder named like a class "
                                                  "labels its images")
    add_run_args(parser)
    parser.add_argument("--output-dir", default="",
                        help="the report folder (default: MODEL_DIR/explain)")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="the run's split to explain when no images are given")
    parser.add_argument("--nearest", type=int, default=NEAREST, help="patches shown per entry")
    parser.add_argument("--per-image", type=int, default=12,
                        help="images drawn in the per-image section (spread over classes)")
    parser.add_argument("--changed", type=int, default=8,
                        help="changed images drawn per direction (right->wrong, wrong->right)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--workers", type=int, default=0, help="image-reading processes")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: the GPU "
                                                     "when there is one)")
    return parser


def split_images(cfg, split: str, classnames: Sequence[str]):
    """(paths, labels) of the run's dataset split, labels by class name (-1: not a class of
    `classnames`)."""
    from ..data import build_dataset

    if not cfg.DATASET.NAME or not cfg.DATASET.ROOT:
        raise UserError("The run names no dataset (DATASET.NAME, DATASET.ROOT): give image files "
                        "or folders to explain.")
    splits = build_dataset(cfg, log=lambda *a, **k: None)
    items = {"test": splits.test, "val": splits.val, "train": splits.train_x}[split]
    if not items:
        raise UserError(f"The run's {split} split is empty: give image files or folders.")
    index = {name: i for i, name in enumerate(classnames)}
    return [d.impath for d in items], [index.get(d.classname, -1) for d in items]


def run(args) -> int:
    if args.batch_size < 1 or args.nearest < 1:
        raise UserError("--batch-size and --nearest must be at least 1.")
    predictor = Predictor.from_args(args, device=args.device or None, batch_size=args.batch_size)
    if args.images:
        paths, labels = image_files(args.images), None
    else:
        paths, labels = split_images(predictor.cfg, args.split, predictor.classnames)
    output = args.output_dir or os.path.join(args.model_dir or ".", "explain")
    print(f"textrefiner-explain: {len(paths)} images", file=sys.stderr)
    explanation = explain_images(predictor, paths, labels, nearest=args.nearest,
                                 workers=args.workers, progress=True)
    if not explanation.has_refiner:
        print("textrefiner-explain: this run has no TextRefiner: the report has the per-image "
              "pictures; the cache atlas, class reads and what refinement changed need a run "
              "trained with --refiner.", file=sys.stderr)
    index = write_report(explanation, output, title=args.model_dir or "run",
                         per_image=args.per_image, changed=args.changed, progress=True)
    print(f"textrefiner-explain: report written to {index}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_command("textrefiner-explain", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
