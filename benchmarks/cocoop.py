"""What TextRefiner costs at inference on CoCoOp, whose classifier is computed per image.

    python benchmarks/cocoop.py --quick   # a smaller CLIP, 10 classes, batch 8 (about a minute)
    python benchmarks/cocoop.py           # ViT-B/16 shape, 10 classes, batch 8

CoCoOp conditions its prompts on every image, so at evaluation the text encoder runs on all
B x C prompts of each batch, and with TextRefiner the cache read and the aggregation run on each
image's E_b too (CoOp + TR computes its refined classifier once per evaluation). Compared, in eval
mode on random-weight CLIPs: zero-shot CLIP (classifier cached), CoCoOp, CoCoOp + TR. The methods
are measured as in benchmarks/run.py: in one process, alternating, order reversed every other
round, median of per-round ratios; CPU time of the process on a CPU device, synchronised wall
time on CUDA. "cocoop_vs_cocoop_noise" times CoCoOp twice per round: its distance from 1 is the
noise floor. "refine_share" times the refiner's inference work alone (cache read + aggregation on
a batch's E [B, C, d]) against the CoCoOp + TR forward of that batch.
"""
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: CPU time counts work

import torch  # noqa: E402

from common import SHAPES, bench_args, bench_parser  # noqa: E402  (benchmarks/common.py)
from textrefiner.clip_backbone import build_random_clip  # noqa: E402
from textrefiner.config import load_cfg  # noqa: E402
from textrefiner.methods import CoCoOp, ZeroshotCLIP  # noqa: E402

VARIANTS = ("zs", "cocoop", "cocoop_tr", "cocoop_again")  # cocoop_again: the A/A control


def parse_args(argv=None):
    parser = bench_parser(__doc__, "cocoop", "the small CLIP shape, 9 rounds", classes=10,
                          batch_size="default 8", repeats="default 5; quick 9")
    return bench_args(parser, argv, batch_size=(8, 8), repeats=(5, 9))


def build_models(args, device):
    clip_model = build_random_clip(**SHAPES[args.shape]).to(device)
    size = SHAPES[args.shape]["image_resolution"]
    names = [f"category {i}" for i in range(args.classes)]

    def cfg(refiner):
        return load_cfg(opts=["INPUT.SIZE", f"({size}, {size})", "TRAINER.COOP.PREC", "fp32",
                              "TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT",
                              "a photo of a", "TRAINER.REFINER.ENABLED", str(refiner)])

    models = {"zs": ZeroshotCLIP(cfg(False), names, clip_model),
              "cocoop": CoCoOp(cfg(False), names, clip_model),
              "cocoop_tr": CoCoOp(cfg(True), names, clip_model)}
    for model in models.values():
        model.to(device).eval()
    models["cocoop_again"] = models["cocoop"]
    return models


REFINE_CALLS = 10  # the refiner's work is short: timed over several calls, then divided


def refine_many(model, text):
    for _ in range(REFINE_CALLS):
        model.refiner.refine(text)


def seconds(fn, device) -> float:
    """CPU time of this process on a CPU device, synchronised wall time on CUDA."""
    if device.type != "cuda":
        start = time.process_time()
        fn()
        return time.process_time() - start
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure(args):
    device = torch.device(args.device)
    models = build_models(args, device)
    size = SHAPES[args.shape]["image_resolution"]
    images = torch.randn(args.batch_size, 3, size, size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    models["zs"].class_embeddings()  # computed once per evaluation, as in a real one
    for name in ("zs", "cocoop", "cocoop_tr"):
        models[name](images)  # warm-up
    refined = models["cocoop_tr"]
    per_image_text = refined.batch_text_features(
        torch.nn.functional.normalize(refined.encode_images(images).features, dim=-1))
    times = {name: [] for name in VARIANTS + ("refine",)}
    for r in range(args.repeats):
        for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            times[name].append(seconds(lambda: models[name](images), device))
        times["refine"].append(seconds(lambda: refine_many(refined, per_image_text), device)
                               / REFINE_CALLS)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in times),
              flush=True)
    return summarise(times, args.batch_size)


def summarise(times, batch):
    def ratio(numerator, denominator):
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

    out = {f"throughput_{n}": batch / statistics.median(times[n]) for n in VARIANTS[:3]}
    # ratios of throughputs = inverse ratios of times, per round
    out.update({"cocoop_vs_cocoop_noise": ratio("cocoop", "cocoop_again"),
                "cocoop_tr_vs_cocoop": ratio("cocoop", "cocoop_tr"),
                "cocoop_vs_zs": ratio("zs", "cocoop"),
                "cocoop_tr_vs_zs": ratio("zs", "cocoop_tr"),
                "refine_share": ratio("refine", "cocoop_tr"),
                "refine_ms_per_image": 1000 * statistics.median(times["refine"]) / batch})
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    started = time.time()
    results = measure(args)
    setting = {"shape": args.shape, "classes": args.classes, "batch_size": args.batch_size,
               "repeats": args.repeats, "device": args.device, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.machine(),
               "wall_s": round(time.time() - started, 1)}
    print(f"\n{setting}")
    for key, value in results.items():
        unit = " img/s" if key.startswith("throughput") else ""
        print(f"  {key:<28}{value:10.4f}{unit}")
    with open(args.json, "w") as f:
        json.dump({"setting": setting, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
