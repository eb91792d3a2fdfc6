"""The trimmed text encoder: exact against the full 77-position pass of the original codebases,
for every method; and its memory options (activation checkpointing, chunks) change no gradient."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import textrefiner.clip_backbone as backbone
import textrefiner.methods.promptsrc as promptsrc_module
from textrefiner.clip_backbone import TextEncoder, encode_text, load_clip
from textrefiner.config import ConfigError
from textrefiner.methods import build_method
from textrefiner.train import build_parser, setup_cfg

from conftest import make_cfg

# benchmarks/run.py, imported as the benchmarks import each other (their folder on sys.path)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from run import full_length_encode_text  # noqa: E402  (the original codebases' path)

# End tokens at different positions; the last name makes L cross a multiple of 16.
NAMES = ["red circle", "blue square with a thin border", "green_triangle",
         "a very long and winding class name that keeps going on and on for many more words"]
REFINER_ON = ("TRAINER.REFINER.ENABLED", "True", "TRAINER.REFINER.TOPK", "3")
SRC_OPTS = ("TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2",
            "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2")


@pytest.fixture
def full_length(monkeypatch):
    """Within the block: every text encoding of the library runs the full-length reference."""
    def use():
        monkeypatch.setattr(backbone, "encode_text", full_length_encode_text)
        monkeypatch.setattr(promptsrc_module, "encode_text", full_length_encode_text)
    return use


def opts_for(method, teacher_ckpt, teacher_clip_path):
    if method in ("CoOp-end", "CoOp-middle", "CoOp-front"):
        return ("TRAINER.COOP.CLASS_TOKEN_POSITION", method.split("-")[1])
    return {
        "CoOp-CSC": ("TRAINER.COOP.CSC", "True", "TRAINER.COOP.CTX_INIT", ""),
        "CoCoOp": ("TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", "a photo of a"),
        "MaPLe": (),
        "PromptSRC": SRC_OPTS,
        "PromptKD": ("TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt,
                     "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path),
        "ZeroshotCLIP": (),
    }[method]


def build(method, clip, teacher_ckpt, teacher_clip_path, *extra, precision="fp32"):
    opts = opts_for(method, teacher_ckpt, teacher_clip_path) + extra
    precisions = [item for key in ("COOP", "COCOOP", "MAPLE", "PROMPTSRC", "PROMPTKD")
                  for item in (f"TRAINER.{key}.PREC", precision)]
    cfg = make_cfg(*(opts + tuple(precisions)))
    torch.manual_seed(0)
    model = build_method(method.split("-")[0], cfg, NAMES, copy.deepcopy(clip))
    perturb(model)
    return model


def perturb(model, seed=3):
    """Move the prompts away from their initial words, so the test sees learned prompts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_((0.3 * torch.randn(param.shape, generator=gen)).to(param.dtype))


def text_of(model, images):
    """What the method reads from its text encoder: E (per image for CoCoOp), and PromptSRC's
    frozen template ensemble, or the teacher's features for PromptKD."""
    if type(model).__name__ == "CoCoOp":
        v = F.normalize(model.encode_images(images).features, dim=-1)
        return [model.batch_text_features(v)]
    if type(model).__name__ == "PromptKD":
        return [model.teacher.text_features()]
    if type(model).__name__ == "PromptSRC":
        model.fixed_embeddings = None
        return [model.text_features(), model.zero_shot_text_features()]
    return [model.text_features()]


METHODS = ["CoOp-end", "CoOp-middle", "CoOp-front", "CoOp-CSC", "CoCoOp", "MaPLe", "PromptSRC",
           "PromptKD", "ZeroshotCLIP"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))


# ------------------------------------------------------------------------------------------
def test_blocks_run_on_the_trimmed_length(small_clip):
    seen = []
    hook = small_clip.transformer.resblocks[0].ln_1.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[0]))
    try:
        for texts, expected in (([NAMES[0]], 16), (NAMES, 32), (["x " * 80], 77)):
            tokens = backbone.tokenize(texts) if expected < 77 else backbone.import_clip().clip \
                .tokenize(texts, truncate=True)
            eot = tokens.argmax(-1)
            assert int(eot.max()) + 1 <= expected
            backbone.encode_text_tokens(small_clip, tokens)
            assert seen[-1] == expected
    finally:
        hook.remove()


@pytest.mark.parametrize("method", METHODS)
def test_trimmed_equals_full_length_fp32(method, small_clip, teacher_ckpt, teacher_clip_path,
                                         images, full_length):
    model = build(method, small_clip, teacher_ckpt, teacher_clip_path)
    with torch.no_grad():
        trimmed = text_of(model, images)
        if method == "PromptKD":  # the teacher's features are computed when it is built
            trimmed = [model.teacher_text]
        full_length()
        if method in ("ZeroshotCLIP", "PromptKD"):  # text encoded when the model is built
            model = build(method, small_clip, teacher_ckpt, teacher_clip_path)
            full = [model.text_features()] if method == "ZeroshotCLIP" else [model.teacher_text]
        else:
            full = text_of(model, images)
    for ours, reference in zip(trimmed, full):
        assert ours.shape == reference.shape
        assert (ours - reference).abs().max().item() <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_trimmed_logits_argmax_equal_full_length_fp16(method, clip_path, teacher_ckpt,
                                                      teacher_clip_path, images, full_length):
    clip16 = load_clip(clip_path, "fp16")
    model = build(method, clip16, teacher_ckpt, teacher_clip_path, precision="fp16").eval()
    with torch.no_grad():
        trimmed = model(images)
        full_length()
        if method in ("ZeroshotCLIP", "PromptKD"):  # text encoded when built
            model = build(method, clip16, teacher_ckpt, teacher_clip_path, precision="fp16")
            model.eval()
        model.invalidate_eval_cache()
        full = model(images)
    assert trimmed.dtype == full.dtype
    assert torch.equal(trimmed.argmax(-1), full.argmax(-1))
    assert (trimmed.float() - full.float()).abs().max().item() <= 0.05 * full.abs().max().item()


def test_chunks_equal_one_pass(small_clip):
    tokens = backbone.tokenize(NAMES * 3)
    embeddings = backbone.embed_tokens(small_clip, tokens)
    eot = tokens.argmax(-1)
    whole = encode_text(small_clip, embeddings, eot)
    for chunk in (1, 5, 12, 50):
        parts = encode_text(small_clip, embeddings, eot, chunk_size=chunk)
        assert (parts - whole).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------
MEMORY_OPTIONS = [("TRAINER.TEXT_ENCODER.CHECKPOINTING", "True"),
                  ("TRAINER.TEXT_ENCODER.CHUNK_SIZE", "2"),
                  ("TRAINER.TEXT_ENCODER.CHECKPOINTING", "True",
                   "TRAINER.TEXT_ENCODER.CHUNK_SIZE", "3")]


def training_grads(model, images, labels):
    torch.manual_seed(1)
    model.train()
    loss, _ = model.forward_train(images, labels)
    params = model.trainable_parameters()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("method", ["CoOp-end", "CoCoOp", "MaPLe", "PromptSRC"])
@pytest.mark.parametrize("option", MEMORY_OPTIONS, ids=["checkpointing", "chunks", "both"])
def test_memory_options_keep_loss_and_gradients(method, option, small_clip, teacher_ckpt,
                                                teacher_clip_path, images):
    labels = torch.tensor([0, 3, 1])
    plain = build(method, small_clip, teacher_ckpt, teacher_clip_path, *REFINER_ON)
    saving = build(method, small_clip, teacher_ckpt, teacher_clip_path, *(REFINER_ON + option))
    encoders = [m for m in saving.modules() if isinstance(m, TextEncoder)]
    assert encoders and all(m.checkpointing == ("True" in option) for m in encoders)
    loss, grads = training_grads(plain, images, labels)
    loss_saving, grads_saving = training_grads(saving, images, labels)
    # Chunks add each class's share of a prompt's gradient in another order: equal to fp32
    # rounding relative to the gradient's size (PromptSRC's L1 weights make it reach ~1).
    scale = 1.0 if "TRAINER.TEXT_ENCODER.CHUNK_SIZE" not in option else \
        max([1.0] + [g.abs().max().item() for g in grads.values() if g is not None])
    assert (loss - loss_saving).abs().item() <= 1e-6 * max(1.0, loss.abs().item())
    assert set(grads) == set(grads_saving)
    for name, grad in grads.items():
        if grad is None:
            assert grads_saving[name] is None
            continue
        assert (grad - grads_saving[name]).abs().max().item() <= 1e-6 * scale, name


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass of `fn()`."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total[0]


def test_checkpointing_keeps_far_fewer_activations(small_clip):
    tokens = backbone.tokenize(NAMES * 4)
    embeddings = backbone.embed_tokens(small_clip, tokens).detach().requires_grad_(True)
    eot = tokens.argmax(-1)
    kept = saved_bytes(lambda: encode_text(small_clip, embeddings, eot))
    recomputed = saved_bytes(lambda: encode_text(small_clip, embeddings, eot, checkpointing=True))
    assert recomputed < 0.3 * kept


def test_options_from_flags_and_keys(tmp_path):
    args = build_parser().parse_args(["--trainer", "CoOp", "--text-checkpointing",
                                      "--text-chunk-size", "64"])
    cfg = setup_cfg(args)
    assert cfg.TRAINER.TEXT_ENCODER.CHECKPOINTING is True
    assert cfg.TRAINER.TEXT_ENCODER.CHUNK_SIZE == 64
    defaults = setup_cfg(build_parser().parse_args(["--trainer", "CoOp"]))
    assert defaults.TRAINER.TEXT_ENCODER.CHECKPOINTING is False
    assert defaults.TRAINER.TEXT_ENCODER.CHUNK_SIZE == 0
    with pytest.raises(ConfigError, match="TRAINER.TEXT_ENCODER.CHUNK_SIZE must be an integer"):
        setup_cfg(build_parser().parse_args(["--trainer", "CoOp", "--text-chunk-size", "-1"]))
