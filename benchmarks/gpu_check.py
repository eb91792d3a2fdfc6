"""The package on a GPU, checked in one command: every method trains a few steps and evaluates.

    python benchmarks/gpu_check.py                       # CUDA: ViT-B/16 sizes, 224 px, < 6 min
    python benchmarks/gpu_check.py --device cpu --small  # the same checks at toy sizes (tests)

Nothing is downloaded: the CLIPs are random-weight ones built with the stock `clip` classes at
ViT-B/16's sizes (PromptKD's teacher at ViT-L/14's), saved in fp16 as OpenAI's files are, and the
data is the demo's synthetic dataset. Every model is built, trained and evaluated through the
built-in engine (`StandaloneTrainer`, from `textrefiner-train`'s own command line), so what is
checked is the path a user's run takes. Checks (one FAIL line each that does not hold; exit 1):

- methods: zero-shot CLIP, CoOp, CoCoOp, MaPLe, PromptSRC, PromptKD (with its teacher), each with
  and without TextRefiner, in the precision of its published config (all fp16; PromptSRC + TR and
  PromptKD + TR also in amp, the GradScaler path): a few training steps, losses, gradients and
  weights finite; evaluation logits against the same trained model's fp32 CPU logits
  (max |difference| / logit scale <= --tolerance, i.e. in units of cosine similarity); the
  classifier (TextRefiner's refined one) computed once per evaluation (CoCoOp: once per batch,
  its classifier depends on the image); time per training step and evaluation images/s, each
  beside the plain image encoder on the same batches; peak GPU memory;
- feature store: the test features written on the device read back bit for bit, and the
  evaluation through the store scores as the one without it;
- sweep: the demo sweep with --jobs 2 on one device (and one run per GPU when there are more)
  gives every run the accuracy it gets one run at a time (--jobs 1);
- torchrun: 2 ranks (NCCL) against one process with the same global batch, when 2 GPUs exist.

A total time budget (--budget-s) keeps it within the device's lease: what it leaves undone is a
FAIL line. Results: benchmarks/results_gpu.json (CUDA) or --json.
"""
import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)  # run from a checkout without installing

from common import VIT_B16  # noqa: E402  (benchmarks/common.py: the ViT-B/16 shape)

from textrefiner.checkpoint import read_checkpoint  # noqa: E402
from textrefiner.clip_backbone import (amp_autocast, encode_image,  # noqa: E402
                                       save_random_clip)
from textrefiner.data import build_loader  # noqa: E402
from textrefiner.data.transforms import build_transform  # noqa: E402
from textrefiner.demo import prepare_pretrained, save_random_teacher  # noqa: E402
from textrefiner.engine.standalone import StandaloneTrainer  # noqa: E402
from textrefiner.feature_store import StoredEvaluation  # noqa: E402
from textrefiner.results import read_accuracy  # noqa: E402
from textrefiner.sweep.spec import expand, load_spec  # noqa: E402
from textrefiner.train import build_parser, setup_cfg  # noqa: E402

VIT_L14 = dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
               vision_patch_size=14, transformer_width=768, transformer_layers=12, seed=1)
# --small: a student and a teacher whose widths all differ, 64 px images, 16 patches
SMALL = dict(embed_dim=64, image_resolution=64, vision_layers=3, vision_width=128,
             vision_patch_size=16, transformer_width=128, transformer_layers=3)
SMALL_TEACHER = dict(embed_dim=96, image_resolution=64, vision_layers=2, vision_width=192,
                     vision_patch_size=16, transformer_width=128, transformer_layers=2, seed=1)

# (trainer, TextRefiner, config under configs/trainers, precision: None = the config's)
VARIANTS = [
    ("ZeroshotCLIP", False, "ZeroshotCLIP/vit_b16.yaml", None),
    ("CoOp", False, "CoOp/vit_b16_ep10_ctxv1.yaml", None),
    ("CoOp", True, "CoOp/vit_b16_ep10_ctxv1.yaml", None),
    ("CoCoOp", False, "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", None),
    ("CoCoOp", True, "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", None),
    ("MaPLe", False, "MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml", None),
    ("MaPLe", True, "MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml", None),
    ("PromptSRC", False, "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml", None),
    ("PromptSRC", True, "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml", None),
    ("PromptKD", False, "PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml", None),
    ("PromptKD", True, "PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml", None),
    ("PromptSRC", True, "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml", "amp"),
    ("PromptKD", True, "PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml", "amp"),
]
SECTIONS = {"ZeroshotCLIP": "COOP", "CoOp": "COOP", "CoCoOp": "COCOOP", "MaPLe": "MAPLE",
            "PromptSRC": "PROMPTSRC", "PromptKD": "PROMPTKD"}
# fp16 keeps 11 significant bits (unit roundoff 4.9e-4); through 12 ViT blocks and CLIP's
# projections the cosine similarities of a random-weight CLIP move by a few 1e-3 (measured on the
# CPU, --small: see benchmarks/README.md). 1e-2 of the logit scale is one logit at CLIP's scale 100.
TOLERANCE = 1e-2

REAL_STDOUT = sys.stdout
say = functools.partial(print, file=REAL_STDOUT, flush=True)


# ---------------------------------------------------------------------------------- set-up
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true", help="toy CLIPs at 64 px (the CPU test)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per method, the first a warm-up (default 8; small 3)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"fp16/amp logits vs fp32 CPU logits, max |diff| / logit scale "
                        f"(default {TOLERANCE})")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="total time budget; what is left undone then is a FAIL (default 330)")
    p.add_argument("--only", default="",
                   help="comma-separated variant names to run (e.g. CoOp+TR,MaPLe); default all")
    p.add_argument("--skip", default="",
                   help="comma-separated sections to leave out: methods,store,sweep,torchrun")
    p.add_argument("--torchrun-on-cpu", action="store_true",
                   help="run the torchrun check with 2 CPU ranks (gloo) when --device cpu")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--json", default=None,
                   help="results file (default benchmarks/results_gpu.json on CUDA, "
                        "benchmarks/results_gpu_check_cpu.json on the CPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run on a GPU machine, or pass --device cpu --small")
    args.steps = args.steps or (3 if args.small else 8)
    name = "results_gpu.json" if args.device == "cuda" else "results_gpu_check_cpu.json"
    args.json = args.json or os.path.join(BENCH, name)
    args.skip = {s for s in args.skip.split(",") if s}
    args.only = {s for s in args.only.split(",") if s}
    return args


def variant_name(trainer, refiner, precision=None):
    return trainer + ("+TR" if refiner else "") + (f" {precision}" if precision else "")


class Check:
    """The run's checks, in order: (name, ok, detail); and the time budget."""

    def __init__(self, budget_s):
        self.items, self.started, self.budget_s = [], time.perf_counter(), budget_s

    def add(self, name, ok, detail=""):
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        say(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        return ok

    def left(self):
        return self.budget_s - (time.perf_counter() - self.started)

    def within_budget(self, name, needed_s):
        if self.left() >= needed_s:
            return True
        self.add(name, False, f"not run: the time budget has {max(self.left(), 0):.0f} s left, "
                              f"it needs about {needed_s:.0f} s (--budget-s)")
        return False


def prepare(work, small, log):
    """The demo's data and tiny CLIP (for the sweep), and random-weight student/teacher CLIPs."""
    demo = prepare_pretrained(os.path.join(work, "demo"), log=None)
    student, teacher = (SMALL, SMALL_TEACHER) if small else (VIT_B16, VIT_L14)
    clip = save_random_clip(os.path.join(work, "clip_student.pt"), half=True, **student)
    teacher_clip = save_random_clip(os.path.join(work, "clip_teacher.pt"), half=True, **teacher)
    teacher_ckpt = save_random_teacher(
        os.path.join(work, "teacher", "VLPromptLearner", "model-best.pth.tar"), teacher_clip,
        clip_weights=False)
    log(f"prepared: demo data {demo['root']}, student CLIP {student['vision_layers']} layers "
        f"{student['image_resolution']} px, teacher {teacher['vision_layers']} layers")
    return {"root": demo["root"], "tiny_clip": demo["clip"], "clip": clip,
            "teacher_clip": teacher_clip, "teacher_ckpt": teacher_ckpt, "shape": student}


def run_argv(root, trainer, refiner, config, output_dir):
    """textrefiner-train's flags for a run on the demo data, seed 1."""
    return ["--root", root, "--seed", "1", "--trainer", trainer,
            "--dataset-config-file", os.path.join(ROOT, "configs", "datasets",
                                                  "synthetic_shapes.yaml"),
            "--config-file", os.path.join(ROOT, "configs", "trainers", config),
            "--output-dir", output_dir] + (["--refiner"] if refiner else [])


def train_argv(args, files, trainer, refiner, config, precision, output_dir, device, extra=()):
    """textrefiner-train's command line for one variant (sizes fitted to --small)."""
    shape = files["shape"]
    r, depth = shape["image_resolution"], min(9, shape["vision_layers"],
                                               shape["transformer_layers"])
    section = SECTIONS[trainer]
    argv = run_argv(files["root"], trainer, refiner, config, output_dir)
    opts = ["MODEL.BACKBONE.PATH", files["clip"], "DATASET.NUM_SHOTS", "16",
            "DATASET.SUBSAMPLE_CLASSES", "base", "USE_CUDA", str(device == "cuda"),
            "DATALOADER.NUM_WORKERS", "0" if device == "cpu" else "4"]
    if args.small:
        opts += ["INPUT.SIZE", f"({r}, {r})", "TRAINER.MAPLE.PROMPT_DEPTH", str(depth),
                 "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", str(depth),
                 "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", str(depth),
                 "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", str(depth),
                 "TRAINER.PROMPTKD.PROMPT_DEPTH_TEXT", str(depth)]
    if trainer == "PromptKD":
        opts += ["TRAINER.PROMPTKD.TEACHER_CKPT", files["teacher_ckpt"],
                 "TRAINER.PROMPTKD.TEACHER_PATH", files["teacher_clip"]]
    if precision:
        opts += [f"TRAINER.{section}.PREC", precision]
    return argv + list(extra) + opts


def build_trainer(argv, trainer_name):
    """The built-in engine's trainer for a textrefiner-train command line, its log silenced."""
    cfg = setup_cfg(build_parser().parse_args(argv))
    with contextlib.redirect_stdout(sys.stderr if os.environ.get("GPU_CHECK_VERBOSE") else
                                    open(os.devnull, "w")):
        trainer = StandaloneTrainer(cfg, trainer_name)
    trainer.log.enabled = False
    trainer._no_bar = True
    return trainer


# ---------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def train_batches(trainer, count):
    """`count` batches from the trainer's own train loader (epochs repeated as needed)."""
    batches, epoch = [], 0
    while len(batches) < count:
        for batch in trainer.train_loader(epoch):
            batches.append(batch)
            if len(batches) == count:
                break
        epoch += 1
    return batches


def eval_batches(trainer):
    """The test split's image batches, as the engine's evaluation loads them."""
    cfg = trainer.cfg
    loader = build_loader(trainer.splits.test, cfg, is_train=False,
                          batch_size=cfg.DATALOADER.TEST.BATCH_SIZE, shuffle=False)
    return [batch["img"] for batch in loader]


def encoder_alone(trainer, images):
    """The plain image encoder (no prompts, no tokens) on `images`, in the run's precision."""
    with torch.no_grad(), amp_autocast(trainer.precision, trainer.device):
        return encode_image(trainer.model.image_encoder, images.to(trainer.device)).features


# ---------------------------------------------------------------------------------- methods
def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def run_training(trainer, steps):
    """`steps` training steps; returns per-step records and the encoder-alone times."""
    batches = train_batches(trainer, steps)
    model, device = trainer.model, trainer.device
    params = list(model.trainable_parameters().values())
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    for batch in batches:
        scale = trainer.scaler.get_scale() if trainer.scaler is not None else None
        seconds, parts = timed(lambda: trainer.train_step(batch), device)
        skipped = scale is not None and trainer.scaler.get_scale() < scale  # amp: inf grads
        records.append({"s": seconds, "loss": parts["loss"], "skipped": skipped,
                        "grads_finite": all_finite(p.grad for p in params),
                        "weights_finite": all_finite(params)})
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    encoder = [timed(lambda: encoder_alone(trainer, b["img"]), device)[0] for b in batches]
    return records, encoder, peak


def count_calls(obj, name, counter):
    original = getattr(obj, name)

    @functools.wraps(original)
    def counted(*a, **k):
        counter[name] = counter.get(name, 0) + 1
        return original(*a, **k)

    setattr(obj, name, counted)
    return lambda: delattr(obj, name)  # the class's method again


def evaluate(trainer):
    """trainer.test() with the classifier and refine calls counted: (accuracy, counts)."""
    counts = {}
    undo = [count_calls(trainer.model, "classifier", counts)]
    if trainer.model.refiner is not None:
        undo.append(count_calls(trainer.model.refiner, "refine", counts))
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            accuracy = trainer.test()
    finally:
        for restore in undo:
            restore()
    return accuracy, counts


def throughput(trainer, batches, repeats):
    """Images/s of the model's evaluation forward and of the plain image encoder, same batches
    (the classifier computed once before timing, as evaluation does), medians of `repeats`."""
    model, device = trainer.model, trainer.device
    images = sum(b.shape[0] for b in batches)

    def model_pass():
        with torch.no_grad(), amp_autocast(trainer.precision, device):
            for b in batches:
                model(b.to(device))

    def encoder_pass():
        for b in batches:
            encoder_alone(trainer, b)

    model.eval()
    model_pass(), encoder_pass()  # warm-up, and the classifier computed
    model_s, encoder_s = [], []
    for _ in range(repeats):
        model_s.append(timed(model_pass, device)[0])
        encoder_s.append(timed(encoder_pass, device)[0])
    return images / statistics.median(model_s), images / statistics.median(encoder_s)


def reference_difference(args, files, trainer, spec, work):
    """max |logits - fp32 CPU logits| / logit scale on the first test images: the same trained
    weights loaded into the same method built in fp32 on the CPU."""
    name, refiner, config, _ = spec
    argv = train_argv(args, files, name, refiner, config, "fp32", os.path.join(work, "ref"),
                      "cpu")
    reference = build_trainer(argv, name)
    state = {k: v.detach().cpu() for k, v in trainer.model.checkpoint_state().items()}
    reference.model.load_checkpoint_state(state)
    images = eval_batches(trainer)[0][:8 if args.small else 16]
    for t in (trainer, reference):
        if hasattr(t.model, "set_eval_classes"):
            t.model.set_eval_classes("test", t.cfg.TRAINER.MODAL, t.cfg.DATASET.SUBSAMPLE_CLASSES)
        t.model.eval()
    with torch.no_grad():
        with amp_autocast(trainer.precision, trainer.device):
            logits = trainer.model(images.to(trainer.device)).float().cpu()
        expected = reference.model(images).float()
    scale = float(reference.model.logit_scale.exp())
    return float((logits - expected).abs().max()) / scale


def check_method(args, files, spec, check, work):
    name, refiner, config, precision = spec
    label = variant_name(name, refiner, precision)
    out = os.path.join(work, label.replace(" ", "_").replace("+", "_"))
    trainer = build_trainer(train_argv(args, files, name, refiner, config, precision, out,
                                       args.device), name)
    row = {"variant": label, "precision": trainer.precision}
    trains = bool(trainer.model.trainable_parameters())
    if trains:
        records, encoder_s, peak = run_training(trainer, args.steps)
        timed_steps = records[1:] or records
        row.update(steps=len(records), loss=records[-1]["loss"],
                   skipped_steps=sum(r["skipped"] for r in records),
                   step_ms=1e3 * statistics.median(r["s"] for r in timed_steps),
                   encoder_ms=1e3 * statistics.median(encoder_s[1:] or encoder_s),
                   peak_mib=peak)
        row["step_vs_encoder"] = row["step_ms"] / row["encoder_ms"]
        finite = all(math.isfinite(r["loss"]) and r["weights_finite"] for r in records) and all(
            r["grads_finite"] for r in records if not r["skipped"]) and not records[-1]["skipped"]
        check.add(f"{label} training", finite,
                  f"{len(records)} steps, last loss {records[-1]['loss']:.4g}, losses, gradients "
                  f"and weights finite" + (f" ({row['skipped_steps']} amp steps skipped by the "
                                           "loss scaler)" if row["skipped_steps"] else "")
                  if finite else f"non-finite: {records}")
    accuracy, counts = evaluate(trainer)
    n_batches = len(eval_batches(trainer))
    row.update(accuracy=accuracy, classifier_calls=counts.get("classifier", 0),
               refine_calls=counts.get("refine", 0), eval_batches=n_batches)
    if name == "CoCoOp":  # its classifier depends on the image: refined per batch
        ok = not refiner or counts.get("refine", 0) == n_batches
        what = f"refine per test batch: {counts.get('refine', 0)} calls for {n_batches} batches"
    else:
        ok = counts.get("classifier", 0) == 1 and (not refiner or counts.get("refine", 0) == 1)
        what = (f"classifier computed {counts.get('classifier', 0)} time(s)"
                + (f", refine {counts.get('refine', 0)}" if refiner else "")
                + f" in one evaluation of {n_batches} batches")
    check.add(f"{label} classifier once per evaluation", ok, what)
    row["eval_img_s"], row["encoder_img_s"] = throughput(trainer, eval_batches(trainer),
                                                         1 if args.small else 3)
    row["eval_vs_encoder"] = row["eval_img_s"] / row["encoder_img_s"]
    difference = reference_difference(args, files, trainer, spec, work)
    row["logit_difference"] = difference
    exact = args.device == "cpu" and trainer.precision == "fp32"
    limit = 1e-5 if exact else args.tolerance
    check.add(f"{label} logits vs fp32 CPU", difference <= limit,
              f"max |diff| / logit scale {difference:.2e} (limit {limit:g}, {trainer.precision} "
              f"on {args.device})")
    return row


# ---------------------------------------------------------------------------------- store
def check_feature_store(args, files, check, work):
    """CoOp + TR (fp16): the test features written on the device read back bit for bit, and the
    evaluation through the store scores as the one without it."""
    store = os.path.join(work, "feature_store")
    argv = train_argv(args, files, "CoOp", True, "CoOp/vit_b16_ep10_ctxv1.yaml", None,
                      os.path.join(work, "store_run"), args.device, ["--feature-store", store])
    trainer = build_trainer(argv, "CoOp")
    cfg, items = trainer.cfg, trainer.splits.test
    batch_size = cfg.DATALOADER.TEST.BATCH_SIZE

    def loader_of(subset):
        return build_loader(subset, cfg, is_train=False, batch_size=batch_size, shuffle=False)

    def no_loader(subset):
        raise AssertionError(f"the store missed {len(subset)} images it had written")

    trainer.model.eval()
    with torch.no_grad():
        written = trainer.stored_eval.image_features(items, cfg.DATASET.NAME, batch_size,
                                                     loader_of)
        fresh = StoredEvaluation(store, trainer.model, build_transform(cfg, is_train=False),
                                 trainer.precision, trainer.device,
                                 lambda: amp_autocast(trainer.precision, trainer.device),
                                 log=lambda line: None)
        read = fresh.image_features(items, cfg.DATASET.NAME, batch_size, no_loader)
        recomputed = torch.cat([encoder_alone(trainer, b).cpu() for b in eval_batches(trainer)])
    same = torch.equal(written, read) and written.dtype == read.dtype
    check.add("feature store read back exact", same,
              f"{len(items)} test features ({written.dtype}) written on {args.device}, read back "
              f"{'bit for bit' if same else 'DIFFERENT'}; recomputed on the device: max diff "
              f"{float((recomputed.float() - written.float()).abs().max()):.1e}")
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        stored_accuracy = trainer.test()
        trainer.stored_eval = None
        plain_accuracy = trainer.test()
    check.add("feature store evaluation", stored_accuracy == plain_accuracy,
              f"accuracy {stored_accuracy:.2f} through the store, {plain_accuracy:.2f} without")


# ---------------------------------------------------------------------------------- sweep
SMALL_SWEEP = """\
description: gpu_check --small, the demo's recipe for CoOp + TR, two seeds, one epoch
protocol: base2new
prepare: demo
root: "{out}/data"
datasets: [synthetic_shapes]
methods: [CoOp+TR]
seeds: [1, 2]
config: demo_tiny
overrides:
  MODEL.BACKBONE.PATH: "{out}/clip_tiny.pt"
  OPTIM.MAX_EPOCH: 1
"""


def python_path():
    """This checkout first, then what PYTHONPATH held (the carried wheels on a GPU machine)."""
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)


def sweep_accuracies(spec, out, jobs, devices, timeout):
    """Run the sweep; {run key: accuracy} and the wall time."""
    # As a user's shell has it: no OMP_NUM_THREADS (a forked run once hung without it)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = python_path()
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    seconds, done = timed(lambda: subprocess.run(
        [sys.executable, "-m", "textrefiner.sweep.cli", spec, "--out", out, "--jobs", str(jobs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout), torch.device("cpu"))
    if done.returncode:
        raise RuntimeError(f"sweep --jobs {jobs} exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip().splitlines()[-3:]}")
    runs = expand(load_spec(spec), out)
    return {run.key: read_accuracy(Path(run.output_dir, "log.txt")) for run in runs}, seconds


def check_sweep(args, check, work):
    if args.small:
        spec = os.path.join(work, "sweep_small.yaml")
        Path(spec).write_text(SMALL_SWEEP)
    else:
        spec = "demo"
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    first = "0" if gpus else None
    timeout = max(check.left(), 30)
    one, one_s = sweep_accuracies(spec, os.path.join(work, "sweep_jobs1"), 1, first, timeout)
    ways = [(2, first, "--jobs 2 on one " + ("GPU" if gpus else "CPU"))]
    if gpus > 1:
        ways.append((gpus, ",".join(map(str, range(gpus))), f"--jobs {gpus}, one run per GPU"))
    for jobs, devices, what in ways:
        if not check.within_budget(f"sweep {what}", one_s):
            continue
        found, seconds = sweep_accuracies(spec, os.path.join(work, f"sweep_jobs{jobs}"), jobs,
                                          devices, max(check.left(), 30))
        differ = [k for k in one if found.get(k) != one[k] or one[k] is None]
        check.add(f"sweep {what}", not differ,
                  f"{len(one)} runs, {seconds:.1f} s (--jobs 1: {one_s:.1f} s); "
                  + ("every accuracy the same as one run at a time" if not differ else
                     f"accuracies differ: {[(k, one[k], found.get(k)) for k in differ]}"))


# ---------------------------------------------------------------------------------- torchrun
def check_torchrun(args, files, check, work):
    """CoOp + TR on the demo data, 2 ranks with batch 8 against one process with batch 16."""
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus < 2:
        say(f"SKIP torchrun: {gpus} GPU on this machine, the check needs 2")
        return
    if args.device == "cpu" and not args.torchrun_on_cpu:
        say("SKIP torchrun: --device cpu (add --torchrun-on-cpu for 2 gloo ranks)")
        return
    runs = {}
    for ranks, batch in ((1, 16), (2, 8)):
        out = os.path.join(work, f"torchrun_{ranks}")
        argv = run_argv(files["root"], "CoOp", True, "CoOp/demo_tiny.yaml", out) + [
            "MODEL.BACKBONE.PATH", files["tiny_clip"], "USE_CUDA", str(args.device == "cuda"),
            "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base",
            "DATALOADER.TRAIN_X.BATCH_SIZE", str(batch), "OPTIM.MAX_EPOCH", "2"]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2"] if ranks == 2 else [sys.executable])
        env = {**os.environ, "PYTHONPATH": python_path(), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(launcher + ["-m", "textrefiner.train", "--engine", "standalone",
                                          *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=max(check.left(), 30))
        if done.returncode:
            check.add("torchrun 2 ranks vs one process", False,
                      f"{ranks} process(es) exited {done.returncode}: "
                      f"{done.stderr.strip().splitlines()[-3:]}")
            return
        state = read_checkpoint(os.path.join(out, "prompt_learner", "model.pth.tar-2"),
                                "checkpoint")["state_dict"]
        runs[ranks] = (state, read_accuracy(Path(out, "log.txt")))
    (one, one_acc), (two, two_acc) = runs[1], runs[2]
    worst = max(float((one[k].float() - two[k].float()).abs().max()
                      / one[k].float().abs().max().clamp_min(1e-12)) for k in one
                if one[k].is_floating_point())
    ok = worst <= 1e-3 and one_acc == two_acc
    check.add("torchrun 2 ranks vs one process", ok,
              f"learned tensors within {worst:.1e} of their scale (limit 1e-3), accuracy "
              f"{two_acc} vs {one_acc} ({'NCCL' if args.device == 'cuda' else 'gloo'})")


# ---------------------------------------------------------------------------------- report
COLUMNS = [("variant", "{:<17}"), ("precision", "{:<5}"), ("accuracy", "{:>6.1f}"),
           ("logit_difference", "{:>9.1e}"), ("classifier_calls", "{:>4}"),
           ("refine_calls", "{:>4}"), ("step_ms", "{:>8.1f}"), ("encoder_ms", "{:>8.1f}"),
           ("step_vs_encoder", "{:>6.2f}"), ("eval_img_s", "{:>8.0f}"),
           ("encoder_img_s", "{:>8.0f}"), ("eval_vs_encoder", "{:>6.3f}"),
           ("peak_mib", "{:>7.0f}")]
HEADER = ("variant           prec     acc  dlogit/s  clf  ref  step ms   enc ms  ratio "
          "eval im/s enc im/s  ratio peakMiB")


def table(rows):
    lines = [HEADER]
    for row in rows:
        cells = [form.format(row[key]) if row.get(key) is not None
                 else "-".rjust(int(re.search(r"(\d+)", form).group(1)))
                 for key, form in COLUMNS]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def environment(device):
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "device": device}
    if device == "cuda":
        info.update(device_name=torch.cuda.get_device_name(0),
                    gpus=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    else:
        info.update(device_name=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads())
    return info


def main(argv=None):
    args = parse_args(argv)
    check = Check(args.budget_s)
    info = environment(args.device)
    say(f"gpu_check: {info['device_name']}, torch {info['torch']}, CUDA {info['cuda']}, "
        f"{'toy' if args.small else 'ViT-B/16 (teacher ViT-L/14)'} CLIPs, budget "
        f"{args.budget_s:.0f} s")
    rows = []
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        files = prepare(work, args.small, say)
        if "methods" not in args.skip:
            per_variant = None
            for spec in VARIANTS:
                label = variant_name(spec[0], spec[1], spec[3])
                if args.only and label not in args.only:
                    continue
                if per_variant and not check.within_budget(f"{label}", per_variant):
                    continue
                started = time.perf_counter()
                try:
                    rows.append(check_method(args, files, spec, check, work))
                except Exception as exc:  # one failing method must not hide the others
                    check.add(f"{label}", False, f"{type(exc).__name__}: {exc}")
                gc.collect()  # this variant's models go before the next one's memory peak
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                seconds = time.perf_counter() - started
                per_variant = max(per_variant or 0, seconds)
                say(f"  {label}: {seconds:.1f} s")
        for section, run in (("store", lambda: check_feature_store(args, files, check, work)),
                             ("sweep", lambda: check_sweep(args, check, work)),
                             ("torchrun", lambda: check_torchrun(args, files, check, work))):
            if section in args.skip or not check.within_budget(section, 15):
                continue
            try:
                run()
            except Exception as exc:
                check.add(section, False, f"{type(exc).__name__}: {exc}")
    failed = [c for c in check.items if not c["ok"]]
    wall = time.perf_counter() - check.started
    say("\n" + table(rows))
    say(f"\ndlogit/s: max |logits - fp32 CPU logits| / logit scale (limit {args.tolerance:g}); "
        "clf/ref: classifier and refine calls in one evaluation; step/enc: a training step and "
        "the plain image encoder on the same batch; eval/enc: evaluation images/s and the "
        "encoder's, same batches")
    for item in failed:
        say(f"FAIL {item['name']}: {item['detail']}")
    say(f"{len(check.items) - len(failed)} passed, {len(failed)} failed in {wall:.0f} s")
    results = {**info, "small": args.small, "steps": args.steps, "tolerance": args.tolerance,
               "wall_s": wall, "methods": rows, "checks": check.items, "failed": len(failed)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    say(f"results: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
