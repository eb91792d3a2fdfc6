"""The paper's Figure 3 measured here: inference images per second of CoCoOp, LLaMP and PromptKD +
TextRefiner, with the image encoder alone as the floor, on the same batches in one process.

    python benchmarks/figure3.py --quick   # a smaller CLIP and LLM layer (about a minute)
    python benchmarks/figure3.py           # ViT-B/16 sizes, LLaMA-2-7B's decoder-layer size

Random weights at the stated sizes, eval mode, each method as it evaluates: CoCoOp encodes all
B x C prompts of each batch (its prompts depend on the image); LLaMP and PromptKD compute their
classifier once per evaluation (LLaMP: its LLM decoder layer over the cached keys and values and
CLIP's text encoder, for 11 templates; PromptKD: the teacher's text features, refined once by
TextRefiner), then run their prompted image encoder per batch. Measured as benchmarks/cocoop.py:
alternating rounds, order reversed every other round, medians; CPU time of the process on a CPU
device, synchronised wall time on CUDA. CoCoOp's cost grows with the class count C, the others'
hardly does, so CoCoOp is also measured at half the classes ("_half") and its per-image time
extrapolated to --paper-classes (ImageNet's 1000, Figure 3's dataset) as a + b C. "cocoop" runs
this package's text encoder (each prompt trimmed to its longest's tokens), "cocoop_full" all 77
positions, as CoCoOp's released code does (benchmarks/run.py's full-length encoder).
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from cocoop import seconds  # benchmarks/cocoop.py (this folder is on sys.path)
from common import SHAPES, bench_args, bench_parser
from run import text_encoder  # benchmarks/run.py: the codebases' full-length text encoder

import torch  # noqa: E402

from textrefiner.clip_backbone import build_random_clip  # noqa: E402
from textrefiner.config import load_cfg  # noqa: E402
from textrefiner.methods import CoCoOp, LLaMP, PromptKD  # noqa: E402
from textrefiner.methods.llamp import CLIP_EMBEDDINGS_FILE, PAST_KEY_VALUES_FILE  # noqa: E402
from textrefiner.methods.promptkd import IVLPTeacher  # noqa: E402

PAPER_FPS = {"cocoop": 20.45, "llamp": 1473.46, "promptkd_tr": 12793.26}  # one A800, ImageNet
VARIANTS = ("image_encoder", "cocoop", "cocoop_half", "cocoop_full", "cocoop_full_half", "llamp",
            "promptkd_tr")
# LLaMA-2-7B's decoder layer (LLaMP's LLM); "quick": a small one. Only the last layer is built.
LLM_SIZES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                        num_key_value_heads=32, num_hidden_layers=32),
             "small": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4,
                           num_key_value_heads=4, num_hidden_layers=2)}
CACHED_TOKENS = 96  # tokens per class in LLaMP's cached keys and values (question + phrases)
TEMPLATES = 11
# PromptKD's teacher is a ViT-L/14 PromptSRC: only its text features (dim 768, computed once)
# reach inference, so a small tower with ViT-L/14's output dim stands in for it.
TEACHER = dict(embed_dim=768, image_resolution=32, vision_layers=1, vision_width=64,
               vision_patch_size=16, transformer_width=128, transformer_layers=1)


def parse_args(argv=None):
    parser = bench_parser(__doc__, "figure3", "small CLIP and LLM layer, 5 rounds", classes=10,
                          batch_size="default 8", repeats="default 3; quick 5")
    parser.add_argument("--paper-classes", type=int, default=1000,
                        help="class count CoCoOp is extrapolated to (ImageNet: 1000)")
    args = bench_args(parser, argv, batch_size=(8, 8), repeats=(3, 5))
    args.llm = "small" if args.quick else "7b"
    return args


def write_llm_tail(folder, size):
    """A LLaMA config of `size` and random weights of its last decoder layer and final norm,
    saved where LLaMP's loader reads them (it reads only those)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
    config = LlamaConfig(**LLM_SIZES[size])
    last = config.num_hidden_layers - 1
    state = {f"model.layers.{last}.{k}": v.contiguous()
             for k, v in LlamaDecoderLayer(config, layer_idx=last).state_dict().items()}
    state.update({f"model.norm.{k}": v for k, v in
                  LlamaRMSNorm(config.hidden_size).state_dict().items()})
    config.save_pretrained(folder)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return config


def write_llamp_files(folder, config, classes, embed_dim):
    """Random keys and values and CLIP embeddings in LLaMP's file layout (textrefiner-llamp-cache
    writes the real ones)."""
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    entry = {"past_key_values": torch.randn(1, 2, classes, heads, CACHED_TOKENS, head_dim,
                                            generator=gen),
             "attn_mask": torch.ones(classes, CACHED_TOKENS, dtype=torch.long),
             "text_predictions": [""] * classes}
    torch.save({"base": [entry] * TEMPLATES, "new": [entry] * TEMPLATES},
               os.path.join(folder, PAST_KEY_VALUES_FILE))
    avg = torch.randn(classes, embed_dim, generator=gen)
    torch.save({split: {"avg": avg, "all": avg[None]} for split in ("base", "new")},
               os.path.join(folder, CLIP_EMBEDDINGS_FILE))


def method_cfg(args, folder, refiner=False):
    shape = SHAPES[args.shape]
    size, vision, text = shape["image_resolution"], shape["vision_layers"], \
        shape["transformer_layers"]
    depth = min(9, vision, text)
    return load_cfg(opts=[
        "INPUT.SIZE", f"({size}, {size})", "DATASET.SUBSAMPLE_CLASSES", "base",
        "TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", "a photo of a",
        "TRAINER.PROMPTKD.PREC", "fp32", "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", str(depth),
        "TRAINER.LLAMP.PREC", "fp32", "TRAINER.LLAMP.LLM", folder,
        "TRAINER.LLAMP.FILES_DIR", folder, "TRAINER.LLAMP.LLM_PROMPT_DEPTH", str(depth),
        "TRAINER.LLAMP.TEXT_PROMPT_DEPTH", str(depth),
        "TRAINER.LLAMP.VISUAL_PROMPT_DEPTH", str(min(6, vision)),
        "TRAINER.LLAMP.V_LORA_START", str(vision // 2), "TRAINER.LLAMP.V_LORA_END", str(vision),
        "TRAINER.REFINER.ENABLED", str(refiner)])


def teacher_for(names):
    clip_model = build_random_clip(**TEACHER, seed=1)
    gen = torch.Generator().manual_seed(7)
    prompts = {"prompt_learner.ctx": 0.02 * torch.randn(4, TEACHER["transformer_width"],
                                                        generator=gen)}
    return IVLPTeacher(names, clip_model, prompts).eval()


def build_models(args, classes, device, folder):
    clip_model = build_random_clip(**SHAPES[args.shape]).to(device)
    names = [f"category {i}" for i in range(classes)]
    config = write_llm_tail(folder, args.llm)
    write_llamp_files(folder, config, classes, SHAPES[args.shape]["embed_dim"])
    models = {"cocoop": CoCoOp(method_cfg(args, folder), names, clip_model),
              "cocoop_half": CoCoOp(method_cfg(args, folder), names[:classes // 2], clip_model),
              "llamp": LLaMP(method_cfg(args, folder), names, clip_model),
              "promptkd_tr": PromptKD(method_cfg(args, folder, refiner=True), names, clip_model,
                                      teacher=teacher_for(names))}
    for model in models.values():
        model.to(device).eval()
    models["image_encoder"] = clip_model.encode_image
    return models


def call(models, name, images):
    """A variant's forward; "_full": CoCoOp with the codebases' full-length text encoder."""
    full = name.startswith("cocoop_full")
    with text_encoder("full" if full else "trimmed"):
        return models[name.replace("_full", "")](images)


@torch.no_grad()
def measure(args, classes, variants):
    """{variant: [seconds per batch, one per round]}, and LLaMP's once-per-evaluation classifier
    time."""
    device = torch.device(args.device)
    size = SHAPES[args.shape]["image_resolution"]
    images = torch.randn(args.batch_size, 3, size, size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    with tempfile.TemporaryDirectory() as folder:
        models = build_models(args, classes, device, folder)
        llamp_classifier = seconds(models["llamp"].class_embeddings, device)
        models["promptkd_tr"].class_embeddings()
        for name in variants:
            call(models, name, images)  # warm-up
        times = {name: [] for name in variants}
        for r in range(args.repeats):
            for name in (variants if r % 2 == 0 else variants[::-1]):
                times[name].append(seconds(lambda: call(models, name, images), device))
            print(f"  {classes} classes, round {r + 1}: "
                  + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in variants), flush=True)
    return times, llamp_classifier


def summarise(args, times, classifier_s):
    batch = args.batch_size
    per_image = {n: statistics.median(t) / batch for n, t in times.items()}
    c, paper_c = args.classes, args.paper_classes
    fps, slopes = {}, {}
    for name in ("cocoop", "cocoop_full"):  # per image = a + b C, from its two class counts
        half = per_image.pop(f"{name}_half")
        slopes[name] = (per_image[name] - half) / (c - c // 2)
        at_paper = per_image[name] + slopes[name] * (paper_c - c)
        fps[f"fps_{name}@{paper_c}_extrapolated"] = 1 / at_paper
    fps.update({f"fps_{n}@{c}": 1 / s for n, s in per_image.items()})
    ours = {"cocoop": fps[f"fps_cocoop_full@{paper_c}_extrapolated"],
            "llamp": fps[f"fps_llamp@{c}"], "promptkd_tr": fps[f"fps_promptkd_tr@{c}"]}
    return {**fps,
            "cocoop_ms_per_class_per_image": 1000 * slopes["cocoop"],
            "cocoop_full_ms_per_class_per_image": 1000 * slopes["cocoop_full"],
            "llamp_classifier_s_once": classifier_s,
            "llamp_classifier_ms_per_class": 1000 * classifier_s / c,
            "ratio_ours": {n: v / ours["cocoop"] for n, v in ours.items()},
            "ratio_paper": {n: v / PAPER_FPS["cocoop"] for n, v in PAPER_FPS.items()},
            "llamp_vs_image_encoder": per_image["image_encoder"] / per_image["llamp"],
            "promptkd_tr_vs_image_encoder": per_image["image_encoder"] / per_image["promptkd_tr"],
            "promptkd_tr_vs_llamp": per_image["llamp"] / per_image["promptkd_tr"]}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    started = time.time()
    times, classifier_s = measure(args, args.classes, VARIANTS)
    results = summarise(args, times, classifier_s)
    setting = {"shape": args.shape, "llm_layer": args.llm, "cached_tokens": CACHED_TOKENS,
               "classes": args.classes, "paper_classes": args.paper_classes,
               "batch_size": args.batch_size, "repeats": args.repeats, "device": args.device,
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.machine(), "wall_s": round(time.time() - started, 1)}
    print(f"\n{setting}")
    for key, value in results.items():
        if not isinstance(value, dict):
            print(f"  {key:<40}{value:12.4f}")
    print(f"  CoCoOp (full-length, {args.paper_classes} classes) : LLaMP : PromptKD + TR "
          "(images per second, CoCoOp = 1)")
    for who in ("ours", "paper"):
        r = results[f"ratio_{who}"]
        print(f"    {who:<6}1 : {r['llamp']:.1f} : {r['promptkd_tr']:.1f}")
    with open(args.json, "w") as f:
        json.dump({"setting": setting, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
