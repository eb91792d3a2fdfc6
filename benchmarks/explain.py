"""textrefiner-explain's cost: its one pass over the images against one evaluation pass, side by
side, and the drawing on top.

    python benchmarks/explain.py --quick             # small CLIP, 2,000 images of 96 px
    python benchmarks/explain.py --images 64         # ViT-B/16 shape (224 px)

A random-weight CLIP of the given shape, CoOp + TextRefiner on 100 classes, saved as a run and
loaded through `Predictor.from_run` (as benchmarks/predict.py). The images are the demo's
synthetic drawings written as PNG files at the CLIP's resolution. Timed, alternating, the order
reversed every other round, the median of per-round ratios: the evaluation pass
(`Predictor.predict_files`: read, transform, the evaluator's logits; what textrefiner-predict
runs) and `explain_images` over the same files (read, transform, one forward with the local
tokens, both classifiers, the cache's nearest patches). The report's drawing (`write_report`:
the PNGs and index.html) is timed once after. Target: explain <= 1.5 x the evaluation pass.
CPU time of the process on a CPU device (the shared machine's load does not count), synchronised
wall time on CUDA; the drawing runs on the CPU either way and is timed as CPU time.
"""
import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: CPU time counts work

import torch  # noqa: E402

from common import ROOT, SHAPES, save_results  # noqa: E402  (the checkout on sys.path)

from textrefiner.data.synthetic import synthetic_classnames, write_image_folder  # noqa: E402
from textrefiner.explain import explain_images  # noqa: E402
from textrefiner.explain import write_report  # noqa: E402
from textrefiner.predict import Predictor, image_files  # noqa: E402

from predict import saved_run, side_by_side, timer  # noqa: E402

TARGET = 1.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small CLIP shape (96 px)")
    p.add_argument("--images", type=int, default=2000, help="images per pass (default 2000)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="results file (default benchmarks/"
                   "results_explain.json, quick: results_explain_quick.json)")
    args = p.parse_args(argv)
    args.shape = "small" if args.quick else "vit_b16"
    name = "results_explain_quick.json" if args.quick else "results_explain.json"
    args.json = args.json or os.path.join(ROOT, "benchmarks", name)
    return args


def write_images(folder, count, size):
    """`count` demo drawings of `size` px, as files spread over the 30 colour x shape classes."""
    names = synthetic_classnames(30)
    write_image_folder(folder, names, per_class=-(-count // len(names)), image_size=size)
    return image_files([folder])[:count]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    timed = timer(device)
    results = {"shape": args.shape, "images": args.images, "classes": args.classes,
               "batch_size": args.batch_size, "threads": args.threads, "device": str(device),
               "repeats": args.repeats, "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as folder:
        run = saved_run(folder, shape, args.classes)
        predictor = Predictor.from_run(run, device=device, batch_size=args.batch_size)
        paths = write_images(os.path.join(folder, "images"), args.images,
                             shape["image_resolution"])
        kept = {}

        def evaluation_pass():
            for _ in predictor.predict_files(paths):
                pass

        def explain_pass():
            kept["explanation"] = explain_images(predictor, paths)

        compared = side_by_side({"evaluation": evaluation_pass, "explain": explain_pass},
                                args.repeats, timed)
        start = time.process_time()
        write_report(kept["explanation"], os.path.join(folder, "report"))
        drawing = time.process_time() - start
    seconds = compared["seconds"]
    ratio = compared["ratios"]["explain"]
    results.update({"evaluation_s": seconds["evaluation"], "explain_s": seconds["explain"],
                    "explain_over_evaluation": ratio, "drawing_cpu_s": drawing,
                    "report_over_evaluation": (seconds["explain"] + drawing)
                    / seconds["evaluation"], "target": TARGET,
                    "pass": ratio <= TARGET})
    print(f"{args.images} images, {args.shape} shape, {args.classes} classes, {device}")
    print(f"  evaluation pass          {seconds['evaluation']:9.2f} s")
    print(f"  explain_images           {seconds['explain']:9.2f} s   "
          f"{ratio:.3f}x the evaluation (median of per-round ratios); target <= {TARGET}: "
          f"{'PASS' if ratio <= TARGET else 'MISS'}")
    print(f"  drawing the report       {drawing:9.2f} s   (CPU time, once)")
    print(f"  whole report             {results['report_over_evaluation']:.3f}x the evaluation")
    save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
