"""The feature store on a real sweep: `scripts/base2new.sh` for zero-shot CLIP, CoOp and CoOp + TR
over seeds 1 2 3, without and with FEATURE_STORE, on a fixture dataset and a ViT-B/16-shaped
random-weight CLIP. (`benchmarks/run.py --sections store` runs it; so does this file alone.)

Every `python -m textrefiner.train` the script starts goes through a stand-in interpreter that
counts the images the image encoder sees in eval mode (`PromptMethod.encode_images`) and times
every evaluation (`test()` of either engine: wall and process CPU time), then writes one JSON line
per run. Reported: image-encoder forward passes per test image, the sweep's evaluation time with /
without the store, the whole sweep's wall time, and the store's disk per image. The two sweeps run
one after the other in this process's lifetime, the store sweep starting from an empty store.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from textrefiner.clip_backbone import build_random_clip, clip_dims  # noqa: E402
from textrefiner.data import write_synthetic_dataset  # noqa: E402

METHODS = (("ZeroshotCLIP", False), ("CoOp", False), ("CoOp", True))

# Stands in for `python`: `-m textrefiner.train ARGS` runs in-process with the probes below.
PROBE = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
if args[:2] != ["-m", "textrefiner.train"]:
    os.execv({python!r}, [{python!r}] + args)
sys.path.insert(0, {root!r})
from textrefiner.methods.base import PromptMethod
import textrefiner.engine.standalone as standalone
import textrefiner.train as train
probe = {{"argv": args[2:], "eval_images": 0, "eval_wall_s": 0.0, "eval_cpu_s": 0.0}}
encode = PromptMethod.encode_images
def counted(self, images, return_tokens=False):
    if not self.training:
        probe["eval_images"] += images.shape[0]
    return encode(self, images, return_tokens)
PromptMethod.encode_images = counted  # same object for every method that does not override it
def timed(test):
    def wrapper(*a, **k):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return test(*a, **k)
        finally:
            probe["eval_wall_s"] += time.perf_counter() - wall
            probe["eval_cpu_s"] += time.process_time() - cpu
    return wrapper
standalone.StandaloneTrainer.test = timed(standalone.StandaloneTrainer.test)
try:
    import trainers.base as dassl_layer
    dassl_layer.MethodTrainer.test = timed(dassl_layer.MethodTrainer.test)
except ImportError:
    pass
started = time.perf_counter()
code = train.main(args[2:])
probe["wall_s"] = time.perf_counter() - started
with open(os.environ["STORE_PROBE"], "a") as f:
    f.write(json.dumps(probe) + "\\n")
sys.exit(code)
"""


def prepare(work, shape, classes, per_class_test):
    """The fixture dataset and the random CLIP file (saved in fp16, as OpenAI's are)."""
    data = os.path.join(work, "data")
    write_synthetic_dataset(data, num_classes=classes, per_class_train=2, per_class_val=1,
                            per_class_test=per_class_test, image_size=64, seed=0)
    clip_file = os.path.join(work, "clip_vit.pt")
    model = build_random_clip(**shape)
    dims = clip_dims(model)
    torch.save(model.to(torch.float16).state_dict(), clip_file)
    probe = os.path.join(work, "python_probe")
    with open(probe, "w") as f:
        f.write(PROBE.format(python=sys.executable, root=ROOT))
    os.chmod(probe, 0o755)
    return data, clip_file, probe, dims


def run_sweep(work, name, data, clip_file, probe, seeds, store, precision, size, log):
    out = os.path.join(work, name)
    record = os.path.join(work, f"{name}.jsonl")
    env = dict(os.environ, PYTHON=probe, STORE_PROBE=record)
    env.pop("FEATURE_STORE", None)
    if store:
        env["FEATURE_STORE"] = store
    started = time.perf_counter()
    for trainer, refiner in METHODS:
        cmd = ["bash", "scripts/base2new.sh", trainer, "synthetic_shapes", "--seeds", seeds,
               "--root", data, "--out", out, "--shots", "0" if trainer == "ZeroshotCLIP" else "2",
               "MODEL.BACKBONE.PATH", clip_file, "OPTIM.MAX_EPOCH", "1",
               "DATALOADER.NUM_WORKERS", "0", "TEST.FINAL_MODEL", "last_step",
               "TRAINER.COOP.PREC", precision, "INPUT.SIZE", f"({size}, {size})"]
        if refiner:
            cmd.insert(4, "--refiner")
        log(f"{name}: {' '.join(cmd[2:5])}")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
    wall = time.perf_counter() - started
    with open(record) as f:
        runs = [json.loads(line) for line in f]
    return {"wall_s": wall, "runs": len(runs),
            "eval_images": sum(r["eval_images"] for r in runs),
            "eval_wall_s": sum(r["eval_wall_s"] for r in runs),
            "eval_cpu_s": sum(r["eval_cpu_s"] for r in runs)}


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def local_token_cost(dims, itemsize, train_images=16_000, epochs=10):
    """Bytes a training view's local tokens and CLS attention take at this shape, and what one
    seed of ImageNet's CoOp + TR recipe (16 shots x 1000 classes, 10 epochs) would store."""
    per_view = ((1 + dims["num_patches"]) * dims["embed_dim"] + dims["num_patches"]) * itemsize
    return {"token_bytes_per_view": per_view,
            "imagenet_seed_gib": per_view * train_images * epochs / 2 ** 30}


def token_read_seconds(dims, work, views=64, rounds=5):
    """Seconds to read one training view's local tokens and attention (fp16) back from a
    FeatureStore (files just written, so likely from the page cache: a lower bound)."""
    from textrefiner.feature_store import FeatureStore

    store = FeatureStore(os.path.join(work, "tokens"), {"benchmark": "tokens"})
    width = (1 + dims["num_patches"]) * dims["embed_dim"] + dims["num_patches"]
    keys = [f"view{i}" for i in range(views)]
    store.write("views", keys, torch.randn(views, width).to(torch.float16))
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        store.read("views", keys)
        times.append((time.perf_counter() - started) / views)
    return sorted(times)[rounds // 2]


def store_section(shape, precision="fp32", seeds="1 2 3", classes=10, per_class_test=3,
                  keep=None, log=print):
    """Both sweeps and the figures of the store section (a dict for results.json)."""
    work = keep or tempfile.mkdtemp(prefix="store_bench_")
    try:
        data, clip_file, probe, dims = prepare(work, shape, classes, per_class_test)
        test_images = classes * per_class_test
        size = dims["image_size"]
        plain = run_sweep(work, "plain", data, clip_file, probe, seeds, None, precision, size,
                          log)
        store = os.path.join(work, "store")
        stored = run_sweep(work, "stored", data, clip_file, probe, seeds, store, precision, size,
                           log)
        disk = folder_bytes(store)
        itemsize = 2 if precision == "fp16" else 4
        result = {
            "store_test_images": test_images,
            "store_runs": plain["runs"],
            "store_forwards_per_image_plain": plain["eval_images"] / test_images,
            "store_forwards_per_image_stored": stored["eval_images"] / test_images,
            "store_eval_wall_s_plain": plain["eval_wall_s"],
            "store_eval_wall_s_stored": stored["eval_wall_s"],
            "store_eval_wall_ratio": stored["eval_wall_s"] / plain["eval_wall_s"],
            "store_eval_cpu_ratio": stored["eval_cpu_s"] / plain["eval_cpu_s"],
            "store_sweep_wall_s_plain": plain["wall_s"],
            "store_sweep_wall_s_stored": stored["wall_s"],
            "store_sweep_wall_ratio": stored["wall_s"] / plain["wall_s"],
            "store_disk_bytes_per_image": disk / test_images,
            "store_feature_bytes_per_image": dims["embed_dim"] * itemsize,
            "store_forward_s_per_image": plain["eval_cpu_s"] / max(plain["eval_images"], 1),
        }
        result.update({f"store_{k}": v for k, v in local_token_cost(dims, 2).items()})
        result["store_token_read_s_per_view"] = token_read_seconds(dims, work)
        return result
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def print_store_table(r, log=print):
    r = dict(r, store_forward_ms_per_image=1000 * r["store_forward_s_per_image"],
             store_token_read_ms_per_view=1000 * r.get("store_token_read_s_per_view", float("nan")))
    rows = [  # (label, key, format, goal)
        ("image-encoder forward passes per test image, without store",
         "store_forwards_per_image_plain", "{:.2f}", ""),
        ("image-encoder forward passes per test image, with store",
         "store_forwards_per_image_stored", "{:.2f}", "1.0"),
        ("sweep's evaluation wall time, with / without store", "store_eval_wall_ratio",
         "{:.3f}", "<= 0.25"),
        ("sweep's evaluation CPU time, with / without store", "store_eval_cpu_ratio", "{:.3f}",
         ""),
        ("whole sweep wall time, with / without store", "store_sweep_wall_ratio", "{:.3f}", ""),
        ("store disk per test image (bytes)", "store_disk_bytes_per_image", "{:.0f}", ""),
        ("evaluation CPU time per image, without store (ms)", "store_forward_ms_per_image",
         "{:.1f}", ""),
        ("local tokens + attention per training view, fp16 (bytes)",
         "store_token_bytes_per_view", "{:.0f}", ""),
        ("  ... one seed of ImageNet CoOp + TR, 16 shots x 10 epochs (GiB)",
         "store_imagenet_seed_gib", "{:.1f}", ""),
        ("  ... reading one view's tokens back from the store (ms)",
         "store_token_read_ms_per_view", "{:.2f}", ""),
    ]
    log(f"feature store: {r['store_runs']} runs per sweep, {r['store_test_images']} test images; "
        f"evaluation {r['store_eval_wall_s_plain']:.1f} s -> {r['store_eval_wall_s_stored']:.1f} s "
        f"wall; sweep {r['store_sweep_wall_s_plain']:.0f} s -> "
        f"{r['store_sweep_wall_s_stored']:.0f} s")
    log("| quantity | measured | goal |\n|---|---:|---:|")
    for label, key, fmt, goal in rows:
        log(f"| {label} | {fmt.format(r[key])} | {goal} |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small CLIP instead of ViT-B/16")
    parser.add_argument("--precision", default="fp16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    from common import SMALL, VIT_B16  # noqa: E402

    figures = store_section(SMALL if args.quick else VIT_B16, args.precision)
    print_store_table(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
