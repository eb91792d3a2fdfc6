"""LLaMP (textrefiner/methods/llamp.py) on tiny models: a random-weight LLaMA saved and loaded
through the real path, LLaMP's cached files written by tests/llamp_files.py, and a small stock
CLIP (converted to transformers' layout where LLaMP's own code needs it).

Against LLaMP's code (`test_step_and_evaluation_equal_llamp_code`): needs a checkout of
zhaohengz/LLaMP in TEXTREFINER_CODEBASES and, in TEXTREFINER_LLAMP_PYTHON, an interpreter with its
pinned transformers 4.35.0, peft 0.4.0 and accelerate 0.24.1 (docs/llamp.md says how to make one).
"""
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


def run_codebase(tiny, clip, images, labels, tmp_path):
    checkout = llamp_checkout()
    tokenizer_files = write_clip_tokenizer_files(str(tmp_path / "tokenizer"))
    setup = {"clip_config": hf_clip_configs(clip), "clip_state": openai_to_hf_clip(
        clip.state_dict()), "tokenizer_files": tokenizer_files, "llm": tiny["llm"],
        "llm_sizes": LLM_SIZES, "files": tiny["files"],
        "classnames": {"base": BASE, "new": NEW}, "args": LLAMP_ARGS, "images": images,
        "labels": labels, "init_seed": 3, "step_seed": 5}
    torch.save(setup, tmp_path / "setup.pt")
    env = {**os.environ, "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([LLAMP_PYTHON, os.path.join(HERE, "llamp_codebase_step.py"),
                           str(tmp_path), checkout], env=env, capture_output=True, text=True,
                          timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(tmp_path / "codebase.pt", weights_only=False)


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
