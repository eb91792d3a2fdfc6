"""LLaMP (textrefiner/methods/llamp.py) on tiny models: a random-weight LLaMA saved and loaded
through the real path, LLaMP's cached files written by tests/llamp_files.py, and a small stock
CLIP (converted to transformers' layout where LLaMP's own code needs it).

Against LLaMP's code (`test_step_and_evaluation_equal_llamp_code`): needs a checkout of
zhaohengz/LLaMP in TEXTREFINER_CODEBASES and, in TEXTREFINER_LLAMP_PYTHON, an interpreter with its
pinned transformers 4.35.0, peft 0.4.0 and accelerate 0.24.1 (docs/llamp.md says how to make one).
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from conftest import HANG_TIMEOUT  # noqa: E402
from llamp_files import (LLM_SIZES, hf_clip_configs, openai_to_hf_clip,  # noqa: E402
                         save_tiny_llama, write_clip_tokenizer_files, write_llamp_files)

from textrefiner.clip_backbone import build_random_clip, encode_text_tokens, tokenize  # noqa: E402
from textrefiner.config import CONFIG_DIR, load_cfg  # noqa: E402
from textrefiner.errors import UserError  # noqa: E402
from textrefiner.methods import build_method  # noqa: E402
from textrefiner.methods.llamp import INSTALL_HINT, suffix_text_inputs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CODEBASES = [p for p in os.environ.get("TEXTREFINER_CODEBASES", "").split(os.pathsep) if p]
LLAMP_PYTHON = os.environ.get("TEXTREFINER_LLAMP_PYTHON", "")
BASE = ["cat", "blue square", "green_triangle"]
NEW = ["yellow star", "striped disc"]
# LLaMP's code writes 512-wide text prompts (ViT-B/16's text width)
CLIP_SIZES = dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=64,
                  vision_patch_size=8, transformer_width=512, transformer_layers=3)
TINY = {"NUM_TEXT_TEMPLATE": 3, "LLM_PROMPT_DEPTH": 2, "TEXT_PROMPT_DEPTH": 3,
        "VISUAL_PROMPT_DEPTH": 2, "V_LORA_START": 1, "V_LORA_END": 3, "NUM_LLM_PROMPTS": 4}
# the same recipe as LLaMP's flags: its scripts/launch/launch.sh with the sizes above
LLAMP_ARGS = ["--naive_decoding", "--num_decoder_layers", "1", "--lr", "2e-4",
              "--num_llm_prompts", "4", "--prompt_type", "suffix", "--label_smoothing", "0.0",
              "--distillation_type", "soft", "--lambda_dist", "2.5", "--llm_prompt_depth", "2",
              "--text_prompt_depth", "3", "--lora_lr", "2e-5", "--v_lora_start", "1",
              "--v_lora_end", "3", "--freeze_decoder_kv", "--freeze_decoder_ffn",
              "--visual_prompting", "--visual_prompt_depth", "2", "--num_text_template", "3",
              "--lora_dropout", "0", "--lora_rank", "8", "--lora_alpha", "16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamp")
    return {"llm": save_tiny_llama(str(root / "llm")),
            "files": write_llamp_files(str(root / "files"), len(BASE), len(NEW), 32),
            "root": root}


def make_cfg(tiny, subset="base", refiner=False, **llamp):
    opts = {f"TRAINER__LLAMP__{k}": v for k, v in {**TINY, **llamp}.items()}
    return load_cfg(TRAINER__LLAMP__LLM=tiny["llm"], TRAINER__LLAMP__FILES_DIR=tiny["files"],
                    TRAINER__LLAMP__LORA_DROPOUT=0.0, DATASET__SUBSAMPLE_CLASSES=subset, SEED=1,
                    TRAINER__REFINER__ENABLED=refiner, TRAINER__REFINER__TOPK=2, **opts)


def build(tiny, clip=None, subset="base", refiner=False, **llamp):
    clip = clip if clip is not None else build_random_clip(**CLIP_SIZES)
    names = {"base": BASE, "new": NEW, "all": BASE + NEW}[subset]
    return build_method("LLaMP", make_cfg(tiny, subset, refiner, **llamp), names, clip)


# ------------------------------------------------------------------ the two CLIP layouts
def test_converted_clip_computes_what_the_stock_clip_computes():
    from transformers import CLIPConfig, CLIPModel
    clip = build_random_clip(**CLIP_SIZES)
    hf = CLIPModel(CLIPConfig(**hf_clip_configs(clip))).eval()
    missing, unexpected = hf.load_state_dict(openai_to_hf_clip(clip.state_dict()), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["a photo of a cat", "a blue square"])
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=images).pooler_output
        text = hf.text_model(input_ids=tokens[:, :8]).last_hidden_state
        eot = tokens.argmax(-1)
        ours_text = encode_text_tokens(clip, tokens)
        ours_image = clip.encode_image(images)
    torch.testing.assert_close(hf.visual_projection(vision), ours_image, atol=1e-5, rtol=0)
    theirs_text = hf.text_projection(text[torch.arange(2), eot])
    torch.testing.assert_close(theirs_text, ours_text, atol=1e-5, rtol=0)


def test_suffix_inputs_are_transformers_padded_prompts(tmp_path):
    """Ids as transformers' CLIP tokenizer pads "a photo of a {class}" (pad = end token), plus the
    LLM prompts' slots; the key mask hides the end token and pads of shorter prompts, not the
    last original slot nor the appended ones (what LLaMP's suffix form does)."""
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(*write_clip_tokenizer_files(str(tmp_path)))
    texts = [f"a photo of a {name.replace('_', ' ')}" for name in BASE]
    theirs = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask, eos = suffix_text_inputs(BASE, 4, 77)
    length = theirs.input_ids.shape[1]
    assert torch.equal(ids[:, :length], theirs.input_ids)
    assert (ids[:, length:] == tokenizer.eos_token_id).all()
    assert torch.equal(eos, theirs.attention_mask.sum(1) - 1)
    expected = theirs.attention_mask.clone()
    expected[:, -1] = 1
    expected = torch.cat([expected, torch.ones(len(BASE), 4, dtype=torch.long)], dim=1)
    shorter = (eos != length - 1).nonzero().flatten()
    assert len(shorter) > 0
    expected[shorter, eos[shorter]] = 0
    assert torch.equal(mask, expected)


# ------------------------------------------------------------------ the LLM's layer
def test_decoder_layer_continues_the_llm_as_transformers_does(tiny):
    """The class decoder on cached keys and values gives what the LLM itself computes for the
    continuation of a prompt: the last layer's output for the new tokens (before the final norm,
    so the layer alone)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from textrefiner.methods.llamp import llama_layer
    llm = LlamaForCausalLM.from_pretrained(tiny["llm"]).eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    past_len = 6
    with torch.no_grad():
        out = llm.model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states  # embeddings, after layer 0, after layer 1 (normed)
        layer = llm.model.layers[-1]
        before_last = hidden[-2]
        attn = layer.self_attn
        x = layer.input_layernorm(before_last[:, :past_len])
        cos, sin = LlamaRotaryEmbedding(llm.config)(x, torch.arange(past_len).expand(2, -1))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        k = attn.k_proj(x).view(2, past_len, 4, 16).transpose(1, 2)
        v = attn.v_proj(x).view(2, past_len, 4, 16).transpose(1, 2)
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        new = before_last[:, past_len:]
        positions = torch.arange(past_len, 9).expand(2, -1)
        cos, sin = LlamaRotaryEmbedding(llm.config)(new, positions)
        allowed = torch.arange(9).unsqueeze(0) <= torch.arange(past_len, 9).unsqueeze(1)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        ours = llama_layer(layer, new, k, v, mask[None, None], cos, sin)
        reference = llm.model.layers[-1](before_last, position_embeddings=LlamaRotaryEmbedding(
            llm.config)(before_last, torch.arange(9).expand(2, -1)))
        reference = reference[0] if isinstance(reference, tuple) else reference
    torch.testing.assert_close(ours, reference[:, past_len:], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ against LLaMP's code
def llamp_checkout():
    found = [p for p in CODEBASES if os.path.isfile(os.path.join(p, "models", "llamp.py"))]
    if not found:
        pytest.skip("no checkout in TEXTREFINER_CODEBASES holds LLaMP's models/llamp.py")
    if not LLAMP_PYTHON:
        pytest.skip("TEXTREFINER_LLAMP_PYTHON is not set: an interpreter with LLaMP's pinned "
                    "transformers 4.35.0 / peft 0.4.0 (see docs/llamp.md)")
    return found[0]


def codebase_setup(tiny, clip, tmp_path) -> dict:
    """What LLaMP's model is built from in tests/llamp_codebase_step.py: the CLIP in transformers'
    layout, the tokenizer, the LLM, the files, the class names, its flags and seeds."""
    tokenizer_files = write_clip_tokenizer_files(str(tmp_path / "tokenizer"))
    return {"clip_config": hf_clip_configs(clip), "clip_state": openai_to_hf_clip(
        clip.state_dict()), "tokenizer_files": tokenizer_files, "llm": tiny["llm"],
        "llm_sizes": LLM_SIZES, "files": tiny["files"],
        "classnames": {"base": BASE, "new": NEW}, "args": LLAMP_ARGS, "init_seed": 3,
        "step_seed": 5}


def run_llamp_script(script, work, setup_name, setup, result_name):
    """Run tests/<script> on LLaMP's checkout in the pinned interpreter; its result file."""
    checkout = llamp_checkout()
    torch.save(setup, os.path.join(work, setup_name))
    env = {**os.environ, "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([LLAMP_PYTHON, os.path.join(HERE, script), str(work), checkout],
                          env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(os.path.join(work, result_name), weights_only=False)


def run_codebase(tiny, clip, images, labels, tmp_path):
    llamp_checkout()
    setup = {**codebase_setup(tiny, clip, tmp_path), "images": images, "labels": labels}
    return run_llamp_script("llamp_codebase_step.py", tmp_path, "setup.pt", setup, "codebase.pt")


def test_step_and_evaluation_equal_llamp_code(tiny, tmp_path):
    clip = build_random_clip(**CLIP_SIZES)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 2, 1, 2])
    theirs = run_codebase(tiny, clip, images, labels, tmp_path)
    model = build(tiny, clip)
    read = model.load_checkpoint_state({"net": theirs["initial"], "epoch": 0}, "LLaMP's state")
    assert read
    from textrefiner.methods.llamp import from_llamp_state
    mapped = from_llamp_state({n: None for n in theirs["trainable"]}, lambda name: True)
    assert sorted(mapped) == sorted(model.trainable_parameters())

    prompts = []
    encode = model.encode_with_llm_prompts
    model.encode_with_llm_prompts = lambda p: (prompts.append(p.detach()), encode(p))[1]
    model.train()
    torch.manual_seed(5)
    loss, parts = model.forward_train(images, labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.trainable_parameters().items()}
    model.load_checkpoint_state({"net": theirs["initial"]}, "LLaMP's state")
    model.eval()
    with torch.no_grad():
        text = torch.stack([model.template_text_features(t) for t in range(3)])
        scores = model(images)

    ours = {"train_prompts": prompts[0], "eval_text": text, "scores": scores,
            **{"loss_" + k: v.detach().float().reshape(1) for k, v in
               (("total", loss), ("ce", parts["loss_ce"]), ("l1", parts["loss_l1"]),
                ("dist", parts["loss_dist"]))}}
    expected = {**{k: theirs[k] for k in ("train_prompts", "eval_text", "scores")},
                **{k: v.float().reshape(1) for k, v in theirs["losses"].items()}}
    diffs = {k: float((ours[k] - expected[k]).abs().max()) for k in ours}
    their_grads = from_llamp_state(theirs["grads"], lambda name: True)
    grad_diffs = {n: float((g - their_grads[n].reshape(g.shape)).abs().max())
                  for n, g in grads.items()}
    # CE of s z with s = 100 (LLaMP's initial scale) multiplies by 100 the float32 rounding in
    # which the stock CLIP and transformers' CLIP differ (~5e-7 in the normalised features): it is
    # held to 1e-5 relative (1.5e-6 seen), everything else to 1e-5 absolute.
    ce_relative = diffs.pop("loss_ce") / float(expected["loss_ce"].abs())
    print("largest differences:", diffs, "CE relative", ce_relative,
          "gradients", max(grad_diffs.values()))
    assert max(diffs.values()) <= 1e-5, diffs
    assert ce_relative <= 1e-5
    assert max(grad_diffs.values()) <= 1e-4, grad_diffs


# ------------------------------------------------------------------ the method here
def test_without_transformers_it_is_one_clear_line(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError) as info:
        build(tiny)
    message = str(info.value)
    assert INSTALL_HINT in message and "\n" not in message


def test_losses_are_llamps_equations(tiny):
    """The loss parts recomputed from the model's own pieces by the equations of the docstring."""
    model = build(tiny)
    model.train()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    torch.manual_seed(7)
    loss, parts = model.forward_train(images, labels)
    torch.manual_seed(7)
    template = int(torch.randint(3, (1,)).item())
    with torch.no_grad():
        text = F.normalize(model.template_text_features(template), dim=-1)
        v = F.normalize(model.encode_images(images).features, dim=-1)
        from textrefiner.clip_backbone import encode_image
        v0 = F.normalize(encode_image(model.image_encoder, images,
                                      lora=model._lora_blocks()).features, dim=-1)
        g = F.normalize(model.clip_text_embeddings, dim=-1)
        s = model.logit_scale.exp()
        z, z0 = v @ text.t(), v0 @ g.t()
        ce = F.cross_entropy(s * z, labels)
        l1 = 25 * (g - text).abs().mean() + 10 * (v - v0).abs().mean()
        p0 = (s * z0).softmax(-1)
        kl = (p0 * (p0.log() - (s * z).log_softmax(-1))).sum() / z.numel() * 2.5
    torch.testing.assert_close(parts["loss_ce"], ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["loss_l1"], l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["loss_dist"], kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), ce + l1 + kl, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ both engines, the command
DATASET_CFG = "configs/datasets/synthetic_shapes.yaml"
DEMO_CFG = "configs/trainers/CoOp/demo_cpu.yaml"
CACHE_KEY = "refiner.cache.entries"


@pytest.fixture(scope="module")
def demo_files(tiny, tmp_path_factory):
    """LLaMP's files for the demo dataset's 5 base and 5 new classes (embedding size 32)."""
    return write_llamp_files(str(tmp_path_factory.mktemp("demo_files")), 5, 5, 32, seed=1)


def llamp_command(demo, tiny, files, out, engine, classes="base", refiner=False, extra=()):
    opts = []
    for key, value in TINY.items():
        opts += [f"TRAINER.LLAMP.{key}", str(value)]
    return (["--engine", engine, "--root", demo["root"], "--trainer", "LLaMP", "--seed", "1",
             "--dataset-config-file", DATASET_CFG, "--config-file", DEMO_CFG,
             "--output-dir", str(out)] + (["--refiner", "--topk", "2"] if refiner else [])
            + list(extra)
            + ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "2",
               "DATASET.SUBSAMPLE_CLASSES", classes, "OPTIM.MAX_EPOCH", "1",
               "OPTIM.NAME", "adamw", "OPTIM.LR", "0.0002", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
               "TRAINER.LLAMP.LLM", tiny["llm"], "TRAINER.LLAMP.FILES_DIR", files] + opts)


def engines():
    import importlib.util
    return ["standalone"] + (["dassl"] if importlib.util.find_spec("dassl") else [])


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("engine", engines())
def test_train_base_then_evaluate_new(demo, tiny, demo_files, tmp_path, engine, refiner):
    from textrefiner.train import main, run
    out = tmp_path / "base"
    assert main(llamp_command(demo, tiny, demo_files, out, engine, refiner=refiner)) == 0
    log = (out / "log.txt").read_text(encoding="utf-8")
    assert "* accuracy:" in log
    saved = torch.load(out / "LLaMP" / "model.pth.tar-1", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert (CACHE_KEY in saved) == refiner
    assert "vision_lora.1.q_proj.lora_B.weight" in saved and "logit_scale" in saved
    assert not any(".k_proj." in key or ".mlp." in key for key in saved)  # frozen: from the LLM
    trainer = run(llamp_command(demo, tiny, demo_files, tmp_path / "new", engine, "new", refiner,
                                ("--eval-only", "--model-dir", str(out), "--load-epoch", "1")))
    assert "* accuracy:" in (tmp_path / "new" / "log.txt").read_text(encoding="utf-8")
    reloaded = trainer.model.checkpoint_state()
    for key, value in saved.items():
        assert torch.equal(reloaded[key].cpu(), value), key


def test_command_without_transformers_is_one_line(demo, tiny, demo_files, tmp_path, capsys,
                                                  monkeypatch):
    from textrefiner.train import main
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(llamp_command(demo, tiny, demo_files, tmp_path, "standalone")) == 2
    err = capsys.readouterr().err.strip()
    assert INSTALL_HINT in err and len(err.splitlines()) == 1, err


def test_published_configs_load():
    import glob
    paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "trainers", "LLaMP", "*.yaml")))
    assert len(paths) == 11
    for path in paths:
        cfg = load_cfg(path)
        assert cfg.OPTIM.MAX_EPOCH == (10 if "imagenet" in path else 20)
        assert (cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == ("adamw",
                                                                                    2e-4, 4)
        lcfg = cfg.TRAINER.LLAMP
        assert (lcfg.NUM_LLM_PROMPTS, lcfg.LLM_PROMPT_DEPTH, lcfg.LAMBDA_DIST, lcfg.LORA_LR,
                lcfg.V_LORA_START, lcfg.V_LORA_END) == (16, 9, 2.5, 2e-5, 6, 12)


def test_llamp_checkpoint_file_loads_as_init_weights(demo, tiny, demo_files, tmp_path):
    """A file as LLaMP's code saves it ({"net": its whole state dict, "epoch": e}: frozen CLIP,
    cached files, peft's LoRA names twice) starts a run and scores: --eval-only with
    MODEL.INIT_WEIGHTS."""
    from textrefiner.train import run
    trainer = run(llamp_command(demo, tiny, demo_files, tmp_path / "a", "standalone",
                                extra=("--eval-only",)))
    ours = trainer.model.checkpoint_state()
    net = {"clip_model.logit_scale": torch.tensor(4.6), "base_embeddings": torch.zeros(5, 32),
           "class_embed_weight": torch.zeros(1)}
    generator = torch.Generator().manual_seed(0)
    for key, value in ours.items():
        value = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        if key.startswith("vision_lora."):
            _, layer, proj, ab, _ = key.split(".")
            for prefix in ("lora_model.default.model", "clip_model.vision_model"):
                net[f"{prefix}.encoder.layers.{layer}.self_attn.{proj}.{ab}.default.weight"] = value
        else:
            net[key] = value
        ours[key] = value
    path = tmp_path / "ckpt_last_1.t7"
    torch.save({"net": net, "epoch": 19}, path)
    loaded = run(llamp_command(demo, tiny, demo_files, tmp_path / "b", "standalone",
                               extra=("--eval-only",)) + ["MODEL.INIT_WEIGHTS", str(path)])
    log = (tmp_path / "b" / "log.txt").read_text(encoding="utf-8")
    assert "Initial weights" in log and "* accuracy:" in log
    for key, value in loaded.model.checkpoint_state().items():
        assert torch.equal(value.cpu(), ours[key]), key


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_half_precisions_train_and_evaluate(tiny, precision):
    """fp16 weights (the stock CLIP's own half-precision conversion) and amp (bfloat16 autocast on
    the CPU): finite losses, gradients and scores, with TextRefiner."""
    from textrefiner._compat import import_clip
    from textrefiner.clip_backbone import amp_autocast
    clip = build_random_clip(**CLIP_SIZES)
    if precision == "fp16":
        import_clip().model.convert_weights(clip)
    model = build(tiny, clip, refiner=True, PREC=precision)
    model.train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with amp_autocast(precision, torch.device("cpu")):
        loss, _ = model.forward_train(images, torch.tensor([0, 2]))
    loss.backward()
    grads = [p.grad for p in model.trainable_parameters().values() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad(), amp_autocast(precision, torch.device("cpu")):
        scores = model(images)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(-1), torch.ones(2), atol=1e-3, rtol=0)


def test_files_that_do_not_fit_are_one_clear_line(tiny, tmp_path):
    cfg = make_cfg(tiny)
    with pytest.raises(UserError, match="for 3 classes, this run has 2"):
        build_method("LLaMP", cfg, NEW, build_random_clip(**CLIP_SIZES))
    cfg.TRAINER.LLAMP.FILES_DIR = str(tmp_path)
    with pytest.raises(UserError, match="release_past_key_value.pt does not exist"):
        build_method("LLaMP", cfg, BASE, build_random_clip(**CLIP_SIZES))


# ----------------------------------------------------------------- LLaMP's schedule, clipping, bf16
def two_group_optimizer(lr=2e-4, lora_lr=2e-5):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": lora_lr}],
                             lr=lr)


def rates(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


def llamp_rates_written_out(epochs, batches, lr=2e-4, lora_lr=2e-5):
    """Each training step's group rates in train_llamp.py, written out here from its code (not
    taken from textrefiner.methods.llamp): per group its get_cosine_schedule_lambda_with_warmup(
    min_lr, base_lr, num_warmup_steps=1, num_training_steps=max(max_epochs, 20) + 1), min_lrs
    [1e-5, max(lora_lr / lr * 1e-5, 5e-6)] (one group without LoRA: lora_lr None), its LambdaLR
    stepped by `train` before batch len(trainloader) // 10 of epoch 0 and after every epoch."""
    warmup, total = 1, max(epochs, 20) + 1
    groups = [(lr, 1e-5)] + ([] if lora_lr is None else
                             [(lora_lr, max(lora_lr / lr * 1e-5, 5e-6))])

    def rate(step, base_lr, min_lr):
        if step < warmup:
            return base_lr * max(min_lr / base_lr, float(step) / float(max(1, warmup)))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return base_lr * max(min_lr / base_lr, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0
                                                                       * progress)))
    steps, step = [], 0
    for epoch in range(epochs):
        for idx in range(batches):
            if epoch == 0 and idx == batches // 10:
                step += 1
            steps.append([rate(step, base_lr, min_lr) for base_lr, min_lr in groups])
        step += 1
    return steps


def schedule_rates(epochs, batches, lr=2e-4, lora_lr=2e-5):
    """LLaMPSchedule's group rates at each step, driven as the engines drive it."""
    from textrefiner.methods.llamp import LLaMPSchedule
    optimizer = (two_group_optimizer(lr, lora_lr) if lora_lr is not None else
                 torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr))
    return driven_rates(LLaMPSchedule(optimizer, lr, epochs), optimizer, epochs, batches)


def driven_rates(schedule, optimizer, epochs, batches):
    """Each step's group rates with `schedule` driven as the engines drive it."""
    from textrefiner.engine.optim import before_batch
    seen = []
    for epoch in range(epochs):
        for batch in range(batches):
            before_batch(schedule, epoch, batch, batches)
            seen.append(rates(optimizer))
        schedule.step()
    return seen


def assert_same_rates(got, want):
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-12, abs=0), f"step {step}"


# the rates of the last epoch: 10 epochs end at 0.5 (1 + cos(0.45 pi)) = 0.578 of them; 20 at
# 0.0062 of them, below the floors, so at the floors
@pytest.mark.parametrize("epochs, last", [(10, [2e-4 * 0.5782172325201155,
                                                2e-5 * 0.5782172325201155]),
                                          (20, [1e-5, 5e-6])])
def test_schedule_at_known_points(epochs, last):
    """train_llamp.py's numbers worked out by hand: the floors (1e-5; LoRA max(2e-5 / 2e-4 * 1e-5,
    5e-6) = 5e-6) until a tenth into epoch 0, then the full rates, then epoch e at
    0.5 (1 + cos(pi e / 20)) of them, never below the floors."""
    from textrefiner.methods.llamp import LLaMPSchedule
    optimizer = two_group_optimizer()
    schedule = LLaMPSchedule(optimizer, 2e-4, epochs)
    assert schedule.horizon == 21
    assert rates(optimizer) == pytest.approx([1e-5, 5e-6], rel=1e-12)
    schedule.before_batch(0, 2, 30)          # batch 2 of 30: not yet
    schedule.before_batch(1, 3, 30)          # a tenth into epoch 1: nothing
    assert rates(optimizer) == pytest.approx([1e-5, 5e-6], rel=1e-12)
    schedule.before_batch(0, 3, 30)
    assert rates(optimizer) == pytest.approx([2e-4, 2e-5], rel=1e-12)
    schedule.step()                          # after epoch 0
    assert rates(optimizer) == pytest.approx([2e-4 * 0.9938441702975689,   # cos(pi / 20)
                                              2e-5 * 0.9938441702975689], rel=1e-12)
    for _ in range(2, epochs):
        schedule.step()
    assert rates(optimizer) == pytest.approx(last, rel=1e-12)


def test_schedule_steps_before_the_first_batch_when_an_epoch_has_fewer_than_ten():
    from textrefiner.methods.llamp import LLaMPSchedule
    optimizer = two_group_optimizer()
    schedule = LLaMPSchedule(optimizer, 2e-4, 20)
    schedule.before_batch(0, 0, 3)
    assert rates(optimizer) == pytest.approx([2e-4, 2e-5], rel=1e-12)
    schedule.step()
    assert rates(optimizer)[0] == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi / 20)))


# (epochs, batches an epoch, LoRA rate): ImageNet's 10 and the others' 20 epochs; fewer than 10
# batches (the extra step before batch 0); more than 20 epochs (a longer horizon); a LoRA rate
# whose floor is above 5e-6; no LoRA group
WRITTEN_OUT = [(10, 25, 2e-5), (20, 25, 2e-5), (20, 7, 2e-5), (25, 12, 2e-5), (3, 30, 1e-3),
               (4, 10, None)]


@pytest.mark.parametrize("epochs, batches, lora_lr", WRITTEN_OUT)
def test_schedule_equals_llamps_formula_at_every_step(epochs, batches, lora_lr):
    """Every step of whole runs, each group: the rate of train_llamp.py's formula written out in
    this test (llamp_rates_written_out)."""
    want = llamp_rates_written_out(epochs, batches, lora_lr=lora_lr)
    assert_same_rates(schedule_rates(epochs, batches, lora_lr=lora_lr), want)
    # the reading of it, as a check of this one: the floors until a tenth into epoch 0
    groups = len(want[0])
    assert want[batches // 10] == pytest.approx([2e-4, lora_lr][:groups], rel=1e-12)
    if batches >= 10:
        floors = [1e-5, max((lora_lr or 0) / 2e-4 * 1e-5, 5e-6)][:groups]
        assert want[batches // 10 - 1] == pytest.approx(floors, rel=1e-12)


def test_schedule_choice(tiny):
    from textrefiner.methods.llamp import LLaMPSchedule
    model = build(tiny)
    cfg = make_cfg(tiny)
    optimizer = two_group_optimizer()
    cfg.OPTIM.LR_SCHEDULER = "cosine"
    assert isinstance(model.lr_scheduler(optimizer, cfg.OPTIM), LLaMPSchedule)
    cfg.OPTIM.LR_SCHEDULER = "single_step"
    assert model.lr_scheduler(optimizer, cfg.OPTIM) is None      # Dassl's
    cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.WARMUP_EPOCH = "cosine", 1
    with pytest.raises(UserError, match="OPTIM.WARMUP_EPOCH 0"):
        model.lr_scheduler(optimizer, cfg.OPTIM)
    assert model.max_grad_norm == 1.0


def test_other_methods_keep_dassls_schedule_and_no_clipping():
    from textrefiner.methods import METHODS
    from textrefiner.methods.base import PromptMethod
    for name, cls in METHODS.items():
        if name != "LLaMP":
            assert cls.max_grad_norm is None, name
            assert cls.lr_scheduler is PromptMethod.lr_scheduler, name   # None: Dassl's


def test_backward_and_step_clips_the_norm_over_all_groups():
    """Both groups' gradients together scaled to norm 1 (deepspeed's gradient_clipping), then
    the step; a norm below 1 is left alone."""
    from textrefiner.engine.optim import backward_and_step
    for scale, clipped in ((10.0, True), (0.01, False)):
        a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        b = torch.nn.Parameter(torch.tensor([3.0]))
        optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=1.0)
        loss = scale * (a.sum() + 2 * b.sum())          # gradients scale * [1, 1] and scale * [2]
        backward_and_step(loss, optimizer, max_grad_norm=1.0)
        grad = scale * torch.tensor([1.0, 1.0, 2.0])
        if clipped:
            grad = grad / (grad.norm() + 1e-6)
        torch.testing.assert_close(a.detach(), torch.tensor([1.0, 2.0]) - grad[:2])
        torch.testing.assert_close(b.detach(), torch.tensor([3.0]) - 0.5 * grad[2:])


def test_bf16_where_the_device_has_it(monkeypatch):
    from textrefiner.clip_backbone import amp_autocast, autocast_dtype, compute_note
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("bf16", cpu) is None
    with amp_autocast("bf16", cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert "float32" in compute_note("bf16", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("bf16", cuda) is torch.bfloat16
    assert compute_note("bf16", cuda) == "bf16: bfloat16 autocast on cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("bf16", cuda) is None
    assert autocast_dtype("amp", cuda) is torch.float16      # other precisions unchanged
    assert autocast_dtype("amp", cpu) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
                    reason="needs a CUDA device with bfloat16")
def test_bf16_trains_in_bfloat16_on_cuda(tiny):
    from textrefiner.clip_backbone import amp_autocast
    device = torch.device("cuda")
    model = build(tiny, PREC="bf16").to(device)
    model.train()
    seen = []
    handle = model.image_encoder.register_forward_hook(lambda m, i, o: seen.append(
        (o[0] if isinstance(o, tuple) else o).dtype))
    images = torch.randn(2, 3, 32, 32, device=device)
    with amp_autocast("bf16", device):
        loss, _ = model.forward_train(images, torch.tensor([0, 2], device=device))
    handle.remove()
    loss.backward()
    assert torch.isfinite(loss) and torch.bfloat16 in seen


@pytest.mark.parametrize("method", ["LLaMP", "LLaMP+TR"])
def test_sweep_runs_train_on_llamps_schedule_clipped_in_bf16(tmp_path, method):
    """A sweep's LLaMP runs (ImageNet's 10 epochs, DTD's 20), as textrefiner-train reads their
    command lines: LLaMP's schedule at every step (its formula, 25 batches an epoch), clipping at
    1.0, PREC bf16."""
    from textrefiner.methods import method_class
    from textrefiner.sweep.spec import expand, parse_spec
    from textrefiner.train import build_parser, setup_cfg
    spec = parse_spec({"datasets": ["imagenet", "dtd"], "methods": [method], "seeds": [1]})
    runs = [r for r in expand(spec, tmp_path, root="/data") if "/train_base/" in r.key]
    assert len(runs) == 2
    for run in runs:
        cfg = setup_cfg(build_parser().parse_args(run.argv))
        epochs = cfg.OPTIM.MAX_EPOCH
        assert (epochs, cfg.TRAINER.REFINER.ENABLED) == (10 if "imagenet" in run.key else 20,
                                                         method.endswith("+TR"))
        cls = method_class(cfg.TRAINER.NAME)
        assert cls.max_grad_norm == 1.0 and cfg.TRAINER.LLAMP.PREC == "bf16"
        optimizer = two_group_optimizer(cfg.OPTIM.LR, cfg.TRAINER.LLAMP.LORA_LR)
        schedule = cls.lr_scheduler(None, optimizer, cfg.OPTIM)  # reads no state of the model
        assert_same_rates(driven_rates(schedule, optimizer, epochs, 25),
                          llamp_rates_written_out(epochs, 25))


def test_bf16_on_the_cpu_computes_in_float32(demo, tiny, demo_files, tmp_path):
    """PREC bf16 (the configs') on the CPU: float32, as the log says; the gradient norms of its
    10 steps are PREC fp32's bit for bit, where amp (bfloat16 autocast on the CPU) changes them."""
    def run(precision):
        out = tmp_path / precision
        command = llamp_command(demo, tiny, demo_files, out, "standalone") + [
            "USE_CUDA", "False", "DATALOADER.TRAIN_X.BATCH_SIZE", "1", "TEST.NO_TEST", "True",
            "TRAINER.LLAMP.PREC", precision]
        norms = [step[2][0] for step in recorded_steps(command)]
        return norms, (out / "log.txt").read_text(encoding="utf-8")

    bf16, log = run("bf16")
    assert len(bf16) == 10 and "bf16: float32 on cpu" in log
    fp32, _ = run("fp32")
    amp, _ = run("amp")
    assert bf16 == fp32 and amp != fp32


ENGINE_RUN = ("DATALOADER.TRAIN_X.BATCH_SIZE", "1", "OPTIM.MAX_EPOCH", "2")  # 10 batches an epoch


@pytest.fixture(scope="module", params=[(engine, refiner) for engine in engines()
                                        for refiner in (False, True)],
                ids=lambda p: p[0] + ("-refiner" if p[1] else "-plain"))
def engine_run(request, demo, tiny, demo_files, tmp_path_factory):
    """A 2-epoch run of `--trainer LLaMP` (10 batches an epoch, so the extra step comes before
    batch 1), with and without --refiner: each step's rates and gradient norms (recorded_steps)."""
    engine, refiner = request.param
    out = tmp_path_factory.mktemp("schedule")
    command = llamp_command(demo, tiny, demo_files, out, engine, refiner=refiner) + list(
        ENGINE_RUN)
    return {"engine": engine, "refiner": refiner, "steps": recorded_steps(command), "out": out}


def recorded_steps(command, status=0):
    """Run textrefiner-train `command`; for each optimiser step: the group rates, the gradient
    norm over all the optimiser's parameters as it steps, and the norm that
    torch.nn.utils.clip_grad_norm_ found before clipping with its max_norm (None: not called)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from textrefiner.train import main
    seen, clipped = [], []
    clip = torch.nn.utils.clip_grad_norm_

    def recorded_clip(parameters, max_norm, *args, **kwargs):
        norm = clip(parameters, max_norm, *args, **kwargs)
        clipped.append((float(norm), max_norm))
        return norm

    def record(optimizer, args, kwargs):
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        before = clipped.pop() if clipped else None
        seen.append((rates(optimizer), float(torch.cat(grads).norm()), before))

    handle = register_optimizer_step_pre_hook(record)
    torch.nn.utils.clip_grad_norm_ = recorded_clip
    try:
        assert main(command) == status
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        handle.remove()
    assert not clipped
    return seen


def test_engines_train_on_llamps_schedule_with_clipping(engine_run):
    """Each step's group rates are those of train_llamp.py's formula (written out here); every
    step clips the norm over all trained weights (both groups, TextRefiner's too) to 1.0: the
    tiny model's gradients have norms far above 1, and each step's norm as the optimiser steps is
    the one before clipping times 1 / (norm + 1e-6), torch's and deepspeed's factor."""
    steps = engine_run["steps"]
    assert_same_rates([step[0] for step in steps], llamp_rates_written_out(2, 10))
    for _, after, (before, max_norm) in steps:
        assert max_norm == 1.0 and before > 10.0
        assert after == pytest.approx(before / (before + 1e-6), rel=1e-5)


def test_resumed_run_continues_llamps_schedule(demo, tiny, demo_files, tmp_path, engine_run):
    """Epoch 1 of a run resumed after epoch 0 trains at the uninterrupted run's rates (its LoRA
    group's own rate no obstacle to resuming); a changed OPTIM.LR is still refused."""
    command = llamp_command(demo, tiny, demo_files, tmp_path, engine_run["engine"],
                            refiner=engine_run["refiner"]) + list(ENGINE_RUN) + [
                                "TEST.NO_TEST", "True"]
    assert len(recorded_steps(command + ["OPTIM.MAX_EPOCH", "1"])) == 10
    assert recorded_steps(command + ["OPTIM.LR", "0.0001"], status=2) == []
    resumed = [step[0] for step in recorded_steps(command)]
    assert_same_rates(resumed, [step[0] for step in engine_run["steps"][10:]])


# ------------------------------------------------------------------ against LLaMP's train_llamp.py
def llamp_flags(epochs):
    return LLAMP_ARGS + ["--lr_scheduler", "cosine", "--max_epochs", str(epochs)]


# (epochs, batches an epoch) of the schedules compared with train_llamp.py's: the engines' short
# run, then ImageNet's 10 epochs and the others' 20, 25 batches (the extra step before batch 2)
SCHEDULES = [(2, 10), (10, 25), (20, 25)]


@pytest.fixture(scope="module")
def llamp_schedules(tmp_path_factory):
    """Each step's group rates in train_llamp.py's own code (its main's optimiser and schedule,
    driven by its `train` loop) for SCHEDULES, from tests/llamp_codebase_train.py."""
    llamp_checkout()
    work = tmp_path_factory.mktemp("llamp_train")
    setup = {"schedules": [{"args": llamp_flags(e), "batches": n} for e, n in SCHEDULES],
             "steps": None}
    result = run_llamp_script("llamp_codebase_train.py", work, "train_setup.pt", setup,
                              "train_codebase.pt")
    return result["schedules"]


def test_engines_rates_equal_llamp_code(llamp_schedules, engine_run):
    """Every step of the engines' 2-epoch run, both groups: the rate train_llamp.py sets."""
    assert len(llamp_schedules[0]) == 20
    assert_same_rates([step[0] for step in engine_run["steps"]], llamp_schedules[0])


@pytest.mark.parametrize("index", [1, 2], ids=["10_epochs", "20_epochs"])
def test_schedule_equals_llamp_code_over_whole_runs(llamp_schedules, index):
    """LLaMPSchedule stepped as the engines step it, over all epochs: train_llamp.py's rates."""
    epochs, batches = SCHEDULES[index]
    assert len(llamp_schedules[index]) == epochs * batches
    assert_same_rates(schedule_rates(epochs, batches), llamp_schedules[index])


def test_training_steps_equal_llamp_train_loop(tiny, tmp_path):
    """Two epochs of two batches: train_llamp.py's `train` loop with its optimiser, schedule and
    clipping at 1.0 on its model (deepspeed's engine replaced by a plain one, see
    tests/llamp_codebase_train.py) against the standalone engine's `run_epoch` on ours, from the
    same weights and inputs (images rounded to bfloat16, as its loop casts them)."""
    from textrefiner.engine.standalone import Logger, StandaloneTrainer
    from textrefiner.methods.llamp import from_llamp_state
    llamp_checkout()
    clip = build_random_clip(**CLIP_SIZES)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        images = torch.randn(2, 3, 32, 32, generator=generator).bfloat16().float()
        batches.append([images, images, torch.randint(3, (2,), generator=generator)])
    setup = {"schedules": [], "steps": {**codebase_setup(tiny, clip, tmp_path),
                                        "args": llamp_flags(2), "batches": batches}}
    theirs = run_llamp_script("llamp_codebase_train.py", tmp_path, "train_setup.pt", setup,
                              "train_codebase.pt")["steps"]
    assert max(theirs["norms"]) > 1.0      # so that the clipping counts

    cfg = make_cfg(tiny)
    cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.WEIGHT_DECAY = "adamw", 2e-4, 5e-5
    cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.WARMUP_EPOCH = 2, "cosine", 0
    model = build(tiny, clip)
    model.load_checkpoint_state({"net": theirs["initial"]}, "LLaMP's state")
    trainer = object.__new__(StandaloneTrainer)  # the engine's own epoch loop and step
    trainer.__dict__.update(cfg=cfg, model=model, device=torch.device("cpu"), world=1,
                            exact=False, rank=0, precision=cfg.TRAINER.LLAMP.PREC,
                            log=Logger(enabled=False), _no_bar=True, writer=None)
    trainer._build_optimisation()
    trainer.train_loader = lambda epoch: [{"img": b[0], "label": b[2]} for b in batches]
    losses, lrs = [], []
    step = trainer.train_step

    def recorded_step(batch):
        lrs.append(rates(trainer.optim))
        losses.append(step(batch))
        return losses[-1]

    trainer.train_step = recorded_step
    torch.manual_seed(setup["steps"]["step_seed"])
    for epoch in range(2):
        trainer.run_epoch(epoch)

    assert len(theirs["lrs"]) == 4
    assert_same_rates(lrs, theirs["lrs"])
    loss_diffs = [abs(ours["loss"] - float(t["loss_total"])) / float(t["loss_total"])
                  for ours, t in zip(losses, theirs["losses"])]
    final = from_llamp_state(theirs["final"], lambda name: True)
    start = from_llamp_state(theirs["initial"], lambda name: True)
    weight_diffs = {n: float((p.detach() - final[n].reshape(p.shape)).abs().max())
                    for n, p in model.trainable_parameters().items()}
    moved = {n: float((final[n] - start[n]).abs().max()) for n in weight_diffs}
    print("loss differences (relative):", loss_diffs, "weights:", max(weight_diffs.values()),
          "largest move:", max(moved.values()))
    # Seen: losses within 4.2e-6 relative, weights within 5.9e-6 (Adam's steps of up to 9e-4
    # magnify the first step's gradient differences, which tests the one step above); without
    # the clipping here (gradient norms 450 to 1340 there) 0.37 and 3.4e-4.
    assert max(loss_diffs) <= 2e-5
    assert max(weight_diffs.values()) <= 3e-5, weight_diffs


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_torchrun_trains_as_one_process_with_llamps_schedule_and_clipping(demo, tiny, demo_files,
                                                                           tmp_path, refiner):
    """Two ranks of batch 2 (DISTRIBUTED.EXACT) end where one process of batch 4 ends, with and
    without TextRefiner: the schedule's extra step and the clipping (after the ranks' gradients
    are summed) included. LoRA dropout 0: each rank draws the masks of its share, which one
    process draws otherwise."""
    from test_distributed import assert_same_run, torchrun

    from textrefiner.train import main
    one, many = tmp_path / "one", tmp_path / "many"

    def command(out, batch):
        return llamp_command(demo, tiny, demo_files, out, "standalone", refiner=refiner) + [
            "USE_CUDA", "False", "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE",
            str(batch), "TRAINER.LLAMP.LORA_DROPOUT", "0.0"]

    assert main(command(one, 4)) == 0
    torchrun(command(many, 2))
    assert_same_run(one, many, epoch=2, folder="LLaMP")
    for out in (one, many):
        saved = torch.load(out / "LLaMP" / "model.pth.tar-2", weights_only=False)["scheduler"]
        assert saved["_last_lr"] == pytest.approx([2e-4 * 0.5 * (1 + math.cos(math.pi / 10)),
                                                   2e-5 * 0.5 * (1 + math.cos(math.pi / 10))])
