"""Prediction speed: textrefiner-predict's model path against the image encoder alone, and ONNX
Runtime against PyTorch on the CPU, side by side in one run.

    python benchmarks/predict.py --quick   # a smaller CLIP, batch 16 (about a minute)
    python benchmarks/predict.py           # ViT-B/16 shape, batch 32

A random-weight CLIP of the given shape, CoOp + TextRefiner on 100 classes, saved as a run and
loaded through `Predictor.from_run` (what textrefiner-predict runs). On the same preprocessed
batches, in one process, alternating, the order reversed every other round, median of per-round
ratios (as benchmarks/run.py): images per second of `Predictor.logits` and of the plain image
encoder (`encode_image`, the floor any classifier pays), and of the exported ONNX model in ONNX
Runtime against `Predictor.logits` on the CPU with the same thread count. CPU time of the process
on a CPU device (the shared machine's load does not count), synchronised wall time on CUDA.
"""
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: CPU time counts work

import torch  # noqa: E402

from common import SHAPES, bench_args, bench_parser, save_results  # noqa: E402  (benchmarks/common.py)
from textrefiner.checkpoint import checkpoint_path, save_method_checkpoint  # noqa: E402
from textrefiner.clip_backbone import encode_image, save_random_clip  # noqa: E402
from textrefiner.config import load_cfg  # noqa: E402
from textrefiner.methods import CoOp  # noqa: E402
from textrefiner.clip_backbone import load_clip  # noqa: E402
from textrefiner.predict import Predictor  # noqa: E402


def parse_args(argv=None):
    parser = bench_parser(__doc__, "predict", "the small CLIP shape, batch 16", classes=100,
                          batch_size="default 32; quick 16", repeats="default 7")
    parser.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    return bench_args(parser, argv, batch_size=(32, 16), repeats=(7, 7))


def saved_run(folder, shape, n_classes):
    """A CoOp + TextRefiner run folder (config and class names in its checkpoint), as training
    leaves it, over a random-weight CLIP file of `shape`."""
    clip_file = save_random_clip(os.path.join(folder, "clip.pt"), **shape)
    size = shape["image_resolution"]
    cfg = load_cfg(opts=["INPUT.SIZE", f"({size}, {size})", "TRAINER.COOP.PREC", "fp32",
                         "TRAINER.NAME", "CoOp", "TRAINER.REFINER.ENABLED", "True",
                         "MODEL.BACKBONE.PATH", clip_file, "TRAINER.COOP.CTX_INIT",
                         "a photo of a"])
    classnames = [f"category {i}" for i in range(n_classes)]
    model = CoOp(cfg, classnames, load_clip(clip_file, "fp32"))
    path = checkpoint_path(folder, CoOp.checkpoint_name, 1)
    save_method_checkpoint(model, path, 0, classnames=classnames, config=cfg.dump())
    return folder


def timer(device):
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start
    return timed


def side_by_side(passes: dict, rounds: int, timed) -> dict:
    """Seconds per pass of each callable, alternating, the order reversed every other round;
    and the median of per-round ratios of the first to each other."""
    names = list(passes)
    for fn in passes.values():  # warm-up
        fn()
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds[name].append(timed(passes[name]))
    first = names[0]
    ratios = {name: statistics.median(a / b for a, b in zip(seconds[name], seconds[first]))
              for name in names[1:]}
    return {"seconds": {n: statistics.median(s) for n, s in seconds.items()}, "ratios": ratios}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    timed = timer(device)
    results = {"shape": args.shape, "classes": args.classes, "batch_size": args.batch_size,
               "batches": args.batches, "threads": args.threads, "device": str(device),
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as folder:
        run = saved_run(folder, shape, args.classes)
        predictor = Predictor.from_run(run, device=device, batch_size=args.batch_size)
        size = shape["image_resolution"]
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(args.batch_size, 3, size, size, generator=gen).to(device)
                   for _ in range(args.batches)]
        images = args.batch_size * args.batches
        encoder = predictor.model.image_encoder

        def predict_pass():
            for batch in batches:
                predictor.logits(batch)

        def encoder_pass():
            with torch.no_grad():
                for batch in batches:
                    encode_image(encoder, batch)

        model = side_by_side({"encoder": encoder_pass, "predict": predict_pass}, args.repeats,
                             timed)
        results["model_path"] = {
            "encoder_images_per_s": images / model["seconds"]["encoder"],
            "predict_images_per_s": images / model["seconds"]["predict"],
            "predict_over_encoder_speed": 1 / model["ratios"]["predict"]}
        print(f"{'':28s}{'images/s':>10s}")
        print(f"{'image encoder alone':28s}{results['model_path']['encoder_images_per_s']:10.1f}")
        print(f"{'textrefiner-predict model':28s}"
              f"{results['model_path']['predict_images_per_s']:10.1f}   "
              f"speed {results['model_path']['predict_over_encoder_speed']:.3f}x the encoder's")
        if not args.no_onnx:
            results["onnx_cpu"] = onnx_against_pytorch(args, run, folder, batches, images)
    save_results(results, args.json)
    return results


def onnx_against_pytorch(args, run, folder, batches, images):
    import onnxruntime as ort

    cpu = torch.device("cpu")
    predictor = Predictor.from_run(run, device=cpu, batch_size=args.batch_size)
    path = os.path.join(folder, "model.onnx")
    # Exported by textrefiner-export in a process of its own: tracing leaves this process's
    # PyTorch CPU path up to 2x slower afterwards (measured here), which would favour ONNX.
    subprocess.run([sys.executable, "-m", "textrefiner.export", "--model-dir", run, "--output",
                    path], check=True, stderr=subprocess.DEVNULL)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    # Idle threads sleep (as OMP_WAIT_POLICY PASSIVE for torch): a spinning ORT pool would bill
    # its wait to the PyTorch passes timed beside it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    arrays = [batch.cpu().numpy() for batch in batches]
    cpu_batches = [batch.cpu() for batch in batches]
    timed_cpu = timer(cpu)

    def pytorch_pass():
        for batch in cpu_batches:
            predictor.logits(batch)

    def onnx_pass():
        for array in arrays:
            session.run(None, {"image": array})

    compared = side_by_side({"pytorch": pytorch_pass, "onnxruntime": onnx_pass}, args.repeats,
                            timed_cpu)
    out = {"pytorch_images_per_s": images / compared["seconds"]["pytorch"],
           "onnxruntime_images_per_s": images / compared["seconds"]["onnxruntime"],
           "onnxruntime_over_pytorch_speed": 1 / compared["ratios"]["onnxruntime"]}
    print(f"{'PyTorch, CPU':28s}{out['pytorch_images_per_s']:10.1f}")
    print(f"{'ONNX Runtime, CPU':28s}{out['onnxruntime_images_per_s']:10.1f}   "
          f"speed {out['onnxruntime_over_pytorch_speed']:.3f}x PyTorch's")
    return out


if __name__ == "__main__":
    main()
