"""Speed and memory of TextRefiner next to the methods it plugs into, on random-weight CLIPs.

    python benchmarks/run.py            # ViT-B/16 shape, batch 32
    python benchmarks/run.py --quick    # a smaller CLIP and batch, for a fast check

Variants are measured in one process, alternating (A B A B ...), and every figure reported is the
median of the per-round ratios, because the machine may be shared and noisy. How each quantity is
measured is printed with the table and written in benchmarks/README.md.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Idle OpenMP threads sleep instead of spinning, so the CPU-time clock counts work rather than
# waiting on a busy machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import RN50, ROOT, SMALL, SMALL_RN, VIT_B16  # noqa: E402  (benchmarks/common.py)

import textrefiner.clip_backbone as backbone  # noqa: E402
from textrefiner.clip_backbone import build_random_clip, clip_dims  # noqa: E402
from textrefiner.config import load_cfg  # noqa: E402
from textrefiner.losses import (regularization_loss, select_semantic_tokens,  # noqa: E402
                                semantic_loss)
from textrefiner.methods import CoOp, MaPLe, ZeroshotCLIP  # noqa: E402

def openclip_config(shape):
    """open_clip's CLIP config for a ViT shape of this file (OpenCLIP ViT-B-16 for VIT_B16)."""
    vision = {"image_size": shape["image_resolution"], "width": shape["vision_width"],
              "layers": shape["vision_layers"], "patch_size": shape["vision_patch_size"]}
    text = {"width": shape["transformer_width"], "heads": shape["transformer_width"] // 64,
            "layers": shape["transformer_layers"]}
    return {"embed_dim": shape["embed_dim"], "vision_cfg": vision, "text_cfg": text}


def hf_config(shape):
    """transformers' CLIPConfig values (text, vision, projection_dim) for a ViT shape of this
    file (openai/clip-vit-base-patch16 for VIT_B16)."""
    text = {"hidden_size": shape["transformer_width"], "num_hidden_layers":
            shape["transformer_layers"], "num_attention_heads": shape["transformer_width"] // 64,
            "intermediate_size": 4 * shape["transformer_width"]}
    vision = {"hidden_size": shape["vision_width"], "num_hidden_layers": shape["vision_layers"],
              "num_attention_heads": shape["vision_width"] // 64, "intermediate_size":
              4 * shape["vision_width"], "image_size": shape["image_resolution"],
              "patch_size": shape["vision_patch_size"]}
    return text, vision, shape["embed_dim"]


class TransformersCLIP(torch.nn.Module):
    """transformers' CLIPModel under the plain models' encode_image / encode_text / logit_scale."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logit_scale = model.logit_scale

    def encode_image(self, images):
        out = self.model.get_image_features(pixel_values=images)
        return getattr(out, "pooler_output", out)  # transformers 5 returns an output object

    def encode_text(self, tokens):
        out = self.model.get_text_features(input_ids=tokens)
        return getattr(out, "pooler_output", out)

# (result key, comparison, limit, what it means)
TARGETS = [
    ("train_time_trim_vs_full_coop_tr@50", "<=", 0.55,
     "CoOp+TR step time, trimmed / full-length text encoder, 50 classes"),
    ("train_time_trim_vs_full_coop_tr@500", "<=", 0.30,
     "CoOp+TR step time, trimmed / full-length text encoder, 500 classes"),
    ("train_mem_trim_vs_full_coop_tr@500", "<=", 0.35,
     "CoOp+TR peak memory, trimmed / full-length text encoder, 500 classes"),
    ("train_total_gib_coop_tr_checkpointing@1000", "<=", 3.0,
     "CoOp+TR peak memory with --text-checkpointing, 1000 classes (GiB, fp32)"),
    ("train_time_trim_vs_full_maple_tr@50", "<=", 0.6,
     "MaPLe+TR step time, trimmed / full-length text encoder, 50 classes"),
    ("infer_tr_vs_zs@{c}", ">=", 0.98, "CoOp+TR inference throughput / zero-shot CLIP's"),
    ("train_time_coop_tr_vs_coop", "<=", 1.05, "CoOp+TR train step time / CoOp's"),
    ("train_mem_coop_tr_vs_coop", "<=", 1.15, "CoOp+TR train step peak memory / CoOp's"),
    ("refiner_share_coop_tr", "<=", 0.05, "refiner's own work / CoOp+TR step time"),
    ("text_time_trim_vs_plain_{f}@{c}", "<=", 0.5,
     "trimmed text encoder time / the plain backbone's encode_text"),
    ("infer_tr_vs_plain_{f}@{c}", ">=", 0.98,
     "CoOp+TR inference throughput / the plain backbone's encode_image + classifier"),
    ("store_forwards_per_image_stored", "<=", 1.0,
     "base2new.sh sweep (ZS, CoOp, CoOp+TR, 3 seeds) with the feature store: image-encoder "
     "forward passes per test image"),
    ("store_eval_wall_ratio", "<=", 0.25,
     "that sweep's evaluation wall time, with / without the feature store"),
    ("sweep_wall_ratio", "<=", 0.35,
     "the demo sweep's wall time, textrefiner-sweep --jobs 2 / one process per run in turn"),
    ("sweep_startup_s_per_run_tool", "<=", 0.3,
     "textrefiner-sweep: a run's wall time minus its own training and evaluation (s)"),
    ("sweep_same_accuracies", ">=", 1.0,
     "every demo run's accuracy the same through textrefiner-sweep as in its own process"),
]
FAMILIES = ("openai_vit", "openai_resnet", "openclip_vit", "hf_vit")

METHOD_NOTES = """\
How it is measured
- Clock: on a CPU device, the CPU time of this process (all its threads), because other
  processes on a shared machine inflate wall time far more; OMP_WAIT_POLICY=PASSIVE (unless
  set) keeps idle threads from spinning into that time. On CUDA, synchronised wall time.
- Throughput: eval mode, no_grad; each model's class embeddings are computed and cached before
  timing (see --encode-text), then rounds time one batch per variant, order reversed every other
  round; ratio per round = zero-shot time / variant time.
  infer_zs_vs_zs_noise times the same zero-shot model twice per round: an A/A control whose
  distance from 1 is the noise floor of these ratios on this machine.
- Train step: zero_grad + forward_train + backward + SGD(momentum 0.9) step; the first step of
  each variant is the warm-up (and the memory measurement); then pairs base/TR, order alternating.
- Refiner's own work: the refiner's inputs of a real step (last-block tokens, the text features E)
  are captured with forward hooks; a copy of the refiner then runs, on those tensors, alignment,
  cache read, aggregation, the semantic and regularisation losses, their backward (to the refiner,
  E and, for MaPLe, the tokens) and the cache write; median of 3 runs, divided by the TR step
  time of the same round. The attention used to pick the top-k patches is random (same shape).
  "other TR overhead" = (TR step - base step - refiner work) / base step: mostly the encoder's
  extra output (all tokens through ln_post/proj, last block's attention weights).
- Peak memory: CUDA: torch.cuda.max_memory_allocated during the step minus the memory allocated
  before it. CPU: the allocation events of the step recorded by torch.profiler
  (profile_memory=True), summed in time order; the peak of that running sum (tensor bytes, the
  CPU counterpart of max_memory_allocated; not RSS). "total" adds the model's parameters and
  buffers (unique storages), so it is what the process needs for that model; the target uses it.
- Backbones: per family (OpenAI ViT, OpenAI ResNet RN50, OpenCLIP ViT, transformers' CLIPModel
  read through hf:<folder>), random weights, eval, no_grad, alternating rounds. Text: the
  project's trimmed encoder on the class prompts against the plain model's own encode_text
  (clip's, open_clip's, or transformers' get_text_features, 77 positions). Inference: CoOp+TR's
  forward (classifier computed once before timing) against the plain model's encode_image and a
  product with its normalised zero-shot text features.
- Distributed (dist_*): benchmarks/distributed.py under torchrun, 2 CPU ranks (gloo), batch/2 per
  rank, wall time, alternating rounds. Step: CoOp + TR train step with DISTRIBUTED.EXACT's global
  BatchNorm and no per-step buffer broadcast vs plain DDP (local BatchNorm, buffers broadcast).
  Loader: one epoch of decoded images, the rank's share of the global batches with the other
  ranks' augmentation draws replayed vs DistributedSampler.
"""


# ------------------------------------------------------------------------------------ setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=METHOD_NOTES)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch for inference and CoOp training (default 32; quick 8)")
    p.add_argument("--maple-batch-size", type=int, default=None,
                   help="MaPLe training batch (default 4, MaPLe's published batch; quick 4)")
    p.add_argument("--classes", default="50,500",
                   help="comma-separated class counts for inference (default 50,500)")
    p.add_argument("--train-classes", type=int, default=None,
                   help="class count for the training steps (default 50; quick 10)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per comparison (default 3; quick 9)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=sorted(CLOCK), default=None,
                   help="wall: elapsed time; cpu: CPU time of this process, all threads (default "
                        "cpu on a CPU device, which other processes on a shared machine disturb "
                        "far less; wall on CUDA)")
    p.add_argument("--quick", action="store_true", help="smaller CLIP and batch (about 1 minute)")
    p.add_argument("--skip-maple", action="store_true", help="leave out MaPLe's training steps")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated parts to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--trim-classes", default=None,
                   help="class counts for trimmed vs full-length steps (default 50,500; quick "
                        "10,100)")
    p.add_argument("--memory-classes", type=int, default=None,
                   help="class count for the --text-checkpointing memory (default 1000; quick "
                        "200)")
    p.add_argument("--encode-text", action="store_true",
                   help="let every model encode its own class prompts at warm-up (slow at 500 "
                        "classes on a CPU); by default zero-shot CLIP's text features are handed "
                        "to the CoOp models' cached classifier, which does not change the timed "
                        "image path")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results.json"),
                   help="where to write the results (default benchmarks/results.json)")
    args = p.parse_args(argv)
    args.shape = SMALL if args.quick else VIT_B16
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    args.maple_batch_size = args.maple_batch_size or 4
    args.repeats = args.repeats or (9 if args.quick else 3)
    args.train_classes = args.train_classes or (10 if args.quick else 50)
    args.clock = args.clock or ("cpu" if args.device.startswith("cpu") else "wall")
    args.class_counts = [int(c) for c in args.classes.split(",") if c.strip()]
    args.trim_counts = [int(c) for c in (args.trim_classes or ("10,100" if args.quick else
                                                                "50,500")).split(",")]
    args.memory_classes = args.memory_classes or (200 if args.quick else 1000)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --sections {sorted(unknown)}: choose from {','.join(SECTIONS)}")
    return args


SECTIONS = ("inference", "training", "trimming", "memory", "backbones", "distributed",
            "store", "sweep")


def make_cfg(args, refiner: bool, *extra):
    r = args.shape["image_resolution"]
    depth = min(9, args.shape["vision_layers"], args.shape["transformer_layers"])
    opts = ["INPUT.SIZE", f"({r}, {r})", "TRAINER.COOP.PREC", "fp32", "TRAINER.MAPLE.PREC", "fp32",
            "TRAINER.COOP.CTX_INIT", "a photo of a", "TRAINER.MAPLE.PROMPT_DEPTH", str(depth),
            "TRAINER.REFINER.ENABLED", str(refiner)]
    return load_cfg(opts=opts + list(extra))


def class_names(n):
    return [f"category {i}" for i in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def timed(fn, device) -> float:
    """Seconds `fn()` takes on the chosen clock (set by `main`)."""
    sync(device)
    start = _clock()
    fn()
    sync(device)
    return _clock() - start


def median(values):
    return statistics.median(values) if values else float("nan")


def log(msg):
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ memory
def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def step_peak_bytes(step, device) -> int:
    """Peak of tensor memory allocated during `step()` above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


# ------------------------------------------------------------------------------------ inference
def prime_classifier(model, text_features):
    """Fill the model's eval-mode classifier cache from given text features E."""
    model.text_features = lambda: text_features  # instance attribute, removed below
    try:
        model.class_embeddings()
    finally:
        del model.text_features


def bench_inference(clip_model, args, device, n_classes, images):
    names = class_names(n_classes)
    log(f"[inference @{n_classes} classes] building models and class embeddings ...")
    variants = {
        "zs": ZeroshotCLIP(make_cfg(args, False), names, clip_model),
        "coop": CoOp(make_cfg(args, False), names, clip_model),
        "coop_tr": CoOp(make_cfg(args, True), names, clip_model),
    }
    with torch.no_grad():
        for name, model in variants.items():
            model.to(device).eval()
            if name != "zs" and not args.encode_text:
                prime_classifier(model, variants["zs"].text_features())
            model.class_embeddings()
        variants["zs"](images)  # warm-up of the shared image path
        # Zero-shot timed twice per round: the A/A ratio shows the noise floor.
        variants["zs_again"] = variants["zs"]
        times = {name: [] for name in variants}
        order = list(variants)
        for r in range(args.repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                model = variants[name]
                times[name].append(timed(lambda: model(images), device))
            log(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in order))
    batch = images.shape[0]
    out = {f"throughput_{n}@{n_classes}": batch / median(times[n])
           for n in ("zs", "coop", "coop_tr")}
    for name, key in (("zs_again", "infer_zs_vs_zs_noise"), ("coop", "infer_coop_vs_zs"),
                      ("coop_tr", "infer_tr_vs_zs")):
        ratios = [z / t for z, t in zip(times["zs"], times[name])]
        out[f"{key}@{n_classes}"] = median(ratios)
    return out


# ------------------------------------------------------------------------------------ training
class RefinerInputs:
    """Forward hooks that keep the refiner's inputs of one training step."""

    def __init__(self, refiner):
        self.tokens = self.text = None
        self.handles = [refiner.aligner.register_forward_hook(self._tokens),
                        refiner.aggregator.register_forward_hook(self._text)]

    def _tokens(self, module, inputs, output):
        self.tokens = inputs[0]

    def _text(self, module, inputs, output):
        self.text = inputs[0]

    def remove(self):
        for h in self.handles:
            h.remove()


def refiner_work_seconds(model, captured, labels, device, runs=3) -> float:
    """Time of the refiner's own work (forward, backward, cache write) on a real step's inputs."""
    refiner = copy.deepcopy(model.refiner)
    tokens = captured.tokens.detach().requires_grad_(captured.tokens.requires_grad)
    text = captured.text.detach().requires_grad_(True)
    n_patches = tokens.shape[1] - 1
    attention = torch.rand(tokens.shape[0], n_patches, device=tokens.device)
    scale = model.logit_scale.exp().detach()

    def work():
        for t in [tokens, text] + list(refiner.parameters()):
            t.grad = None
        aligned = refiner.align(tokens)
        refined = refiner.refine(text)
        semantic = select_semantic_tokens(aligned, attention, refiner.topk)
        loss = (model.sem_weight * semantic_loss(semantic, text, labels, scale)
                + model.reg_weight * regularization_loss(refined, text))
        loss.backward()
        refiner.update(aligned)

    work()  # warm-up
    return median([timed(work, device) for _ in range(runs)])


def bench_training(clip_model, args, device, method_cls, batch):
    label = method_cls.__name__
    names = class_names(args.train_classes)
    log(f"[training {label} @{args.train_classes} classes, batch {batch}] building models ...")
    models = {"base": method_cls(make_cfg(args, False), names, clip_model).to(device),
              "tr": method_cls(make_cfg(args, True), names, clip_model).to(device)}
    optims = {k: torch.optim.SGD(list(m.trainable_parameters().values()), lr=0.002, momentum=0.9)
              for k, m in models.items()}
    res = args.shape["image_resolution"]
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, res, res, generator=gen).to(device)
    labels = torch.randint(0, args.train_classes, (batch,), generator=gen).to(device)

    def step(key):
        model, optim = models[key], optims[key]
        model.train()
        optim.zero_grad(set_to_none=True)
        loss, _ = model.forward_train(images, labels)
        loss.backward()
        optim.step()

    peaks = {}
    for key in models:  # first step: warm-up and memory
        peaks[key] = step_peak_bytes(lambda: step(key), device)
        log(f"  warm-up {key}: step peak {peaks[key] / 2**20:.0f} MiB")
    times = {"base": [], "tr": []}
    shares, refiner_times = [], []
    captured = RefinerInputs(models["tr"].refiner)
    for r in range(args.repeats):
        for key in (("base", "tr") if r % 2 == 0 else ("tr", "base")):
            times[key].append(timed(lambda: step(key), device))
        captured.remove()
        refiner_times.append(refiner_work_seconds(models["tr"], captured, labels, device))
        shares.append(refiner_times[-1] / times["tr"][-1])
        log(f"  round {r + 1}: base {times['base'][-1]:.2f}s, tr {times['tr'][-1]:.2f}s, "
            f"refiner work {refiner_times[-1] * 1000:.0f} ms")
    key = label.lower()
    totals = {k: peaks[k] + model_bytes(m) for k, m in models.items()}
    time_ratios = [t / b for b, t in zip(times["base"], times["tr"])]
    other = [(t - b - w) / b for b, t, w in zip(times["base"], times["tr"], refiner_times)]
    return {
        f"train_step_s_{key}": median(times["base"]),
        f"train_step_s_{key}_tr": median(times["tr"]),
        f"train_time_{key}_tr_vs_{key}": median(time_ratios),
        f"refiner_work_s_{key}_tr": median(refiner_times),
        f"refiner_share_{key}_tr": median(shares),
        f"other_tr_overhead_{key}": median(other),
        f"train_step_peak_mib_{key}": peaks["base"] / 2**20,
        f"train_step_peak_mib_{key}_tr": peaks["tr"] / 2**20,
        f"train_total_mib_{key}": totals["base"] / 2**20,
        f"train_total_mib_{key}_tr": totals["tr"] / 2**20,
        f"train_mem_{key}_tr_vs_{key}": totals["tr"] / totals["base"],
        f"train_step_mem_{key}_tr_vs_{key}": peaks["tr"] / max(peaks["base"], 1),
    }


# ------------------------------------------------------------------------------------ trimming
def full_length_encode_text(clip_model, embeddings, eot_indices, deep_prompts=None, **_):
    """What the original codebases run: all 77 positions of every prompt through the stock
    blocks (the reference the trimmed `encode_text` is measured against; not a library option)."""
    dtype = clip_model.dtype
    x = (embeddings.to(dtype) + clip_model.positional_embedding.to(dtype)).permute(1, 0, 2)
    deep = list(deep_prompts or [])
    for i, block in enumerate(clip_model.transformer.resblocks):
        if 0 < i <= len(deep):
            ctx = deep[i - 1].to(dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x[:1], ctx, x[1 + ctx.shape[0]:]])
        x = block(x)
    x = clip_model.ln_final(x.permute(1, 0, 2)).to(dtype)
    return x[torch.arange(x.shape[0]), eot_indices] @ clip_model.text_projection


@contextlib.contextmanager
def text_encoder(kind):
    """Within the block every text encoding runs trimmed (the library) or full-length."""
    trimmed = backbone.encode_text
    if kind == "full":
        backbone.encode_text = full_length_encode_text
    try:
        yield
    finally:
        backbone.encode_text = trimmed


def training_step(model, batch, n_classes, device, seed=1):
    """A closure running one SGD training step of `model` on a fixed random batch."""
    res = model.dims["image_size"]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, res, res, generator=gen).to(device)
    labels = torch.randint(0, n_classes, (batch,), generator=gen).to(device)
    optim = torch.optim.SGD(list(model.trainable_parameters().values()), lr=0.002, momentum=0.9)

    def step():
        model.train()
        optim.zero_grad(set_to_none=True)
        loss, _ = model.forward_train(images, labels)
        loss.backward()
        optim.step()

    return step


def bench_trimming(clip_model, args, device, method_cls, batch, n_classes):
    """The same TR model's training step with the trimmed and the full-length text encoder."""
    key = f"{method_cls.__name__.lower()}_tr@{n_classes}"
    log(f"[trimmed vs full-length text encoder, {method_cls.__name__}+TR @{n_classes} classes, "
        f"batch {batch}] building the model ...")
    model = method_cls(make_cfg(args, True), class_names(n_classes), clip_model).to(device)
    step = training_step(model, batch, n_classes, device)
    peaks, times = {}, {"trim": [], "full": []}
    for kind in times:  # first step: warm-up and memory
        with text_encoder(kind):
            peaks[kind] = step_peak_bytes(step, device)
        log(f"  warm-up {kind}: step peak {peaks[kind] / 2**20:.0f} MiB")
    for r in range(args.repeats):
        for kind in (("trim", "full") if r % 2 == 0 else ("full", "trim")):
            with text_encoder(kind):
                times[kind].append(timed(step, device))
        log(f"  round {r + 1}: trimmed {times['trim'][-1]:.2f}s, full {times['full'][-1]:.2f}s")
    params = model_bytes(model)
    return {
        f"train_step_s_trim_{key}": median(times["trim"]),
        f"train_step_s_full_{key}": median(times["full"]),
        f"train_time_trim_vs_full_{key}": median(
            [t / f for t, f in zip(times["trim"], times["full"])]),
        f"train_total_mib_trim_{key}": (peaks["trim"] + params) / 2**20,
        f"train_total_mib_full_{key}": (peaks["full"] + params) / 2**20,
        f"train_mem_trim_vs_full_{key}": (peaks["trim"] + params) / (peaks["full"] + params),
        f"train_step_mem_trim_vs_full_{key}": peaks["trim"] / max(peaks["full"], 1),
    }


def bench_memory_option(clip_model, args, device, batch, n_classes):
    """Peak memory of a CoOp+TR step with TRAINER.TEXT_ENCODER.CHECKPOINTING at many classes."""
    log(f"[--text-checkpointing, CoOp+TR @{n_classes} classes, batch {batch}] building ...")
    cfg = make_cfg(args, True, "TRAINER.TEXT_ENCODER.CHECKPOINTING", "True")
    model = CoOp(cfg, class_names(n_classes), clip_model).to(device)
    step = training_step(model, batch, n_classes, device)
    peak = step_peak_bytes(step, device)
    total = peak + model_bytes(model)
    log(f"  step peak {peak / 2**20:.0f} MiB, with the model {total / 2**30:.2f} GiB")
    return {f"train_total_gib_coop_tr_checkpointing@{n_classes}": total / 2**30,
            f"train_step_peak_mib_coop_tr_checkpointing@{n_classes}": peak / 2**20}


# ------------------------------------------------------------------------------------ backbones
def backbone_families(args, device):
    """[(family, the project's CLIP, the plain model whose encode_image/encode_text it is
    compared with)]; the OpenCLIP row needs open_clip_torch, the transformers row transformers."""
    vit = build_random_clip(**args.shape).float()
    resnet = build_random_clip(**(SMALL_RN if args.quick else RN50)).float()
    families = [("openai_vit", vit, vit), ("openai_resnet", resnet, resnet)]
    try:
        import open_clip
        from textrefiner.openclip_models import OpenCLIP
        torch.manual_seed(0)
        plain = open_clip.model.CLIP(**openclip_config(args.shape)).eval()
        families.append(("openclip_vit", OpenCLIP(plain, "benchmark"), plain))
    except ImportError:
        log("open_clip_torch is not installed: no OpenCLIP row")
    try:
        import transformers
        from textrefiner.hf_models import save_random_hf_clip
        with tempfile.TemporaryDirectory() as folder:
            save_random_hf_clip(folder, *hf_config(args.shape))
            ours = backbone.load_clip(f"hf:{folder}")
            plain = transformers.CLIPModel.from_pretrained(folder).eval()
        families.append(("hf_vit", ours, TransformersCLIP(plain)))
    except ImportError:
        log("transformers is not installed: no transformers row")
    return [(f, ours.to(device).eval(), plain.to(device).eval()) for f, ours, plain in families]


def bench_backbone(family, clip_model, plain, args, device, n_classes):
    names = class_names(n_classes)
    log(f"[backbone {family} @{n_classes} classes, batch {args.batch_size}] building ...")
    res = clip_dims(clip_model)["image_size"]
    images = torch.randn(args.batch_size, 3, res, res,
                         generator=torch.Generator().manual_seed(0)).to(device)
    tokens = backbone.tokenize([f"a photo of a {n}." for n in names], device)
    model = CoOp(make_cfg(args, True), names, clip_model).to(device).eval()
    with torch.no_grad():
        zero_shot = torch.nn.functional.normalize(plain.encode_text(tokens), dim=-1)
        scale = plain.logit_scale.exp()
        model.class_embeddings()
        model(images)  # warm-up

        def plain_forward():
            features = torch.nn.functional.normalize(plain.encode_image(images), dim=-1)
            return scale * features @ zero_shot.t()

        work = {"text_trim": lambda: backbone.encode_text_tokens(clip_model, tokens),
                "text_plain": lambda: plain.encode_text(tokens),
                "infer_tr": lambda: model(images), "infer_plain": plain_forward}
        times = {k: [] for k in work}
        for r in range(args.repeats):
            for k in (list(work) if r % 2 == 0 else list(work)[::-1]):
                times[k].append(timed(work[k], device))
            log(f"  round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in work))
    key = f"{family}@{n_classes}"
    return {
        f"text_s_trim_{key}": median(times["text_trim"]),
        f"text_s_plain_{key}": median(times["text_plain"]),
        f"text_time_trim_vs_plain_{key}": median(
            [t / p for t, p in zip(times["text_trim"], times["text_plain"])]),
        f"infer_tr_vs_plain_{key}": median(
            [p / t for t, p in zip(times["infer_tr"], times["infer_plain"])]),
    }


# ------------------------------------------------------------------------------------ distributed
def bench_distributed(args):
    """Exact vs plain DDP at 2 CPU ranks (gloo), global batch `batch_size`: training step and
    data loading, measured by benchmarks/distributed.py under torchrun."""
    from textrefiner.data import write_synthetic_dataset
    from textrefiner.data.synthetic import MAX_CLASSES
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_synthetic_dataset(data, num_classes=min(args.train_classes, MAX_CLASSES),
                                per_class_train=8, per_class_val=1, per_class_test=1,
                                image_size=args.shape["image_resolution"])
        out = os.path.join(tmp, "results.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", os.path.join(ROOT, "benchmarks", "distributed.py"),
                   "--shape", json.dumps(args.shape), "--batch-size",
                   str(max(args.batch_size // 2, 1)), "--classes", str(args.train_classes),
                   "--repeats", str(args.repeats), "--data", data, "--json", out]
        threads = str(max(1, torch.get_num_threads() // 2))
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=threads))
        with open(out) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------ report
def target_rows(results, class_counts):
    rows = []
    for key, op, limit, what in TARGETS:
        keys = [key.format(c=c, f=f) for c in class_counts for f in FAMILIES] \
            if "{c}" in key else [key]
        keys = list(dict.fromkeys(keys))
        for k in keys:
            if k not in results:
                continue
            value = results[k]
            ok = value >= limit if op == ">=" else value <= limit
            rows.append({"key": k, "what": what, "value": value, "target": f"{op} {limit}",
                         "status": "PASS" if ok else "MISS"})
    return rows


def print_table(results, rows, args):
    log("\n" + METHOD_NOTES)
    log("Ratios (median over rounds)")
    for k, v in results.items():
        if any(s in k for s in ("_vs_", "share", "overhead")) and not k.startswith("store_"):
            log(f"  {k:<36} {v:8.3f}")
    log("Absolute values (median)")
    for k, v in results.items():
        if not any(s in k for s in ("_vs_", "share", "overhead", "store_", "sweep_")):
            unit = "img/s" if k.startswith("throughput") else (
                "s" if "_s_" in k else ("GiB" if "_gib_" in k else "MiB"))
            log(f"  {k:<36} {v:10.2f} {unit}")
    log("Targets")
    for row in rows:
        log(f"  {row['key']:<36} {row['value']:8.3f}  {row['target']:<8} {row['status']}"
            f"   ({row['what']})")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    global _clock
    _clock = CLOCK[args.clock]
    torch.manual_seed(0)
    setup = {"shape": args.shape, "batch_size": args.batch_size,
             "maple_batch_size": args.maple_batch_size, "classes": args.class_counts,
             "train_classes": args.train_classes, "repeats": args.repeats, "clock": args.clock,
             "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": platform.python_version(), "quick": args.quick,
             "encode_text": args.encode_text, "sections": args.sections,
             "trim_classes": args.trim_counts, "memory_classes": args.memory_classes}
    log(f"setup: {json.dumps(setup)}")
    start = time.perf_counter()
    clip_model = build_random_clip(**args.shape).float().to(device)
    dims = clip_dims(clip_model)
    res = dims["image_size"]
    images = torch.randn(args.batch_size, 3, res, res,
                         generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    if "inference" in args.sections:
        for n in args.class_counts:
            results.update(bench_inference(clip_model, args, device, n, images))
    if "training" in args.sections:
        results.update(bench_training(clip_model, args, device, CoOp, args.batch_size))
        if not args.skip_maple:
            results.update(bench_training(clip_model, args, device, MaPLe, args.maple_batch_size))
    if "trimming" in args.sections:
        for n in args.trim_counts:
            results.update(bench_trimming(clip_model, args, device, CoOp, args.batch_size, n))
        if not args.skip_maple:
            results.update(bench_trimming(clip_model, args, device, MaPLe, args.maple_batch_size,
                                          args.trim_counts[0]))
    if "backbones" in args.sections:
        for family, ours, plain in backbone_families(args, device):
            results.update(bench_backbone(family, ours, plain, args, device,
                                          args.class_counts[0]))
    if "memory" in args.sections:
        results.update(bench_memory_option(clip_model, args, device, args.batch_size,
                                           args.memory_classes))
    if "distributed" in args.sections:
        results.update(bench_distributed(args))
    if "store" in args.sections:  # scripts/base2new.sh without / with FEATURE_STORE
        from store_sweep import print_store_table, store_section
        results.update(store_section(args.shape, "fp16" if device.type == "cuda" else "fp32",
                                     log=log))
        print_store_table(results, log)
    if "sweep" in args.sections:  # the demo: textrefiner-sweep --jobs 2 vs a process per run
        from sweep_bench import print_sweep_table, sweep_section
        results.update(sweep_section(log=log))
        print_sweep_table(results, log)
    rows = target_rows(results, args.class_counts)
    setup["wall_s"] = time.perf_counter() - start
    print_table(results, rows, args)
    log(f"wall time {setup['wall_s']:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "results": results, "targets": rows}, f, indent=2)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
