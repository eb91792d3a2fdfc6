"""CoCoOp with TextRefiner on and off, against its codebase's per-image algorithm.

The references loop over the images as CoCoOp's codebase does (meta-net shift, then the C class
prompts of that image through the stock text transformer, block by block); the model runs the
text encoder once on all B x C prompts. Both must give the same numbers.
"""
import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import make_cfg
from test_methods import (ATOL, N_SEM, REFINER_NAMES, TOPK, _train_one_step, check_refiner_step,
                          hand_cache_write, hand_mlp, hand_refine, hand_semantic, hand_text,
                          hand_vision, perturb_prompts, prompted_embeddings, tokenize)
from textrefiner.checkpoint import read_checkpoint
from textrefiner.clip_backbone import amp_autocast, load_clip
from textrefiner.errors import UserError
from textrefiner.methods import METHODS, CoCoOp, build_method
from textrefiner.train import main

WORDS = "a photo of a"
COCOOP_OPTS = ("TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", WORDS)
REFINER_ON = ("TRAINER.REFINER.ENABLED", "True", "TRAINER.REFINER.TOPK", str(TOPK))
# The codebase's names, relative to the registered `prompt_learner` module.
CODEBASE_NAMES = {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                  "meta_net.linear2.weight", "meta_net.linear2.bias"}
OWN_PARAMS = {"prompt_learner." + name for name in CODEBASE_NAMES}
# Names of different token lengths: the end token sits at a different position in each prompt.
CLASSNAMES = ["cat", "red circle", "green_triangle", "yellow five pointed star", "striped disc"]


@pytest.fixture(scope="module")
def base_clip(clip_path):
    return load_clip(clip_path, "fp32")


@pytest.fixture
def build(base_clip):
    def _build(*opts, refiner=False, classnames=CLASSNAMES, seed=0, clip=None):
        cfg = make_cfg(*(COCOOP_OPTS + tuple(opts) + (REFINER_ON if refiner else ())))
        torch.manual_seed(seed)
        return CoCoOp(cfg, classnames, clip if clip is not None else copy.deepcopy(base_clip))

    return _build


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 32, 32, generator=gen), torch.tensor([0, 2, 4])


# ------------------------------------------------------------------------------ references
def hand_meta_net(learner, v):
    """linear1 -> ReLU -> linear2 written out: [B, vis_dim] -> [B, width]."""
    net = learner.meta_net
    hidden = F.relu(v @ net.linear1.weight.t() + net.linear1.bias)
    return hidden @ net.linear2.weight.t() + net.linear2.bias


def image_text(model, clip, v_b, classnames=CLASSNAMES):
    """E_b [C, d] of one image, as the codebase: ctx + meta_net(v_b) in every class prompt."""
    learner = model.prompt_learner
    ctx = learner.ctx + hand_meta_net(learner, v_b[None])[0]
    emb, eot = prompted_embeddings(clip, classnames, ctx, WORDS)
    return hand_text(clip, emb, eot)


def per_image_reference(model, clip, images, cache=None):
    """Loop over images: (logits [B, C], E [B, C, d], refined [B, C, d], tokens, attention).
    With `cache`, each image's classifier is refine(E_b) read from that cache."""
    feature, tokens, attention = hand_vision(clip.visual, images)
    v = F.normalize(feature, dim=-1)
    scale = clip.logit_scale.exp()
    texts, refined, logits = [], [], []
    for v_b in v:
        text = image_text(model, clip, v_b, model.classnames)
        classifier = text if cache is None else hand_refine(model.refiner, text, cache)
        texts.append(text)
        refined.append(classifier)
        logits.append(scale * v_b @ classifier.t())
    return torch.stack(logits), torch.stack(texts), torch.stack(refined), tokens, attention


class CountingTextEncoder:
    """Wraps the text encoder's forward and records the number of prompts of each call."""

    def __init__(self, model):
        self.inner = model.text_encoder.forward
        self.calls = []
        model.text_encoder.forward = self

    def __call__(self, embeddings, *args, **kwargs):
        self.calls.append(embeddings.shape[0])
        return self.inner(embeddings, *args, **kwargs)


# ------------------------------------------------------------------------------ structure
def test_reachable_by_name():
    assert METHODS["CoCoOp"] is CoCoOp and CoCoOp.checkpoint_name == "prompt_learner"


def test_prompt_learner_names_shapes_and_initial_context(build, base_clip):
    model = build()
    learner = model.prompt_learner
    assert set(learner.state_dict()) == CODEBASE_NAMES  # class token buffers are not saved
    assert tuple(learner.meta_net.linear1.weight.shape) == (32 // 16, 32)  # vis_dim -> vis_dim/16
    assert tuple(learner.meta_net.linear2.weight.shape) == (64, 32 // 16)  # -> text width
    assert isinstance(learner.meta_net.relu, torch.nn.ReLU)
    words = base_clip.token_embedding(tokenize([WORDS]))[0, 1:5]
    torch.testing.assert_close(learner.ctx.detach(), words.detach(), atol=0, rtol=0)
    random = build("TRAINER.COCOOP.CTX_INIT", "", "TRAINER.COCOOP.N_CTX", "8").prompt_learner
    assert tuple(random.ctx.shape) == (8, 64)
    assert random.token_suffix.shape[1] == 77 - 1 - 8


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_trainable_parameters_are_context_meta_net_and_refiner(build, refiner):
    model = build(refiner=refiner)
    expected = OWN_PARAMS | (REFINER_NAMES if refiner else set())
    assert set(model.trainable_parameters()) == expected
    saved = set(model.checkpoint_state())
    assert expected <= saved and all(k.startswith("refiner.") for k in saved - expected)


def test_meta_net_shifts_every_context_vector_per_image(build, base_clip, batch):
    model = build()
    perturb_prompts(model)
    learner = model.prompt_learner
    v = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():
        prompts = learner.conditioned(v)
        assert prompts.shape == (3, len(CLASSNAMES), 77, 64)
        for b in range(3):
            ctx = learner.ctx + hand_meta_net(learner, v[b:b + 1])[0]
            expected, _ = prompted_embeddings(base_clip, CLASSNAMES, ctx, WORDS)
            torch.testing.assert_close(prompts[b], expected, atol=1e-6, rtol=0)
        # the shift differs between images and is the same for every context vector of one
        shift = prompts[:, 0, 1:5] - learner.ctx
        torch.testing.assert_close(shift, shift[:, :1].expand(-1, 4, -1))
        assert not torch.allclose(shift[0], shift[1])


# ------------------------------------------------------------------------------ logits and losses
@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_eval_logits_equal_the_per_image_loop(build, base_clip, batch, refiner):
    model = build(refiner=refiner)
    perturb_prompts(model)
    model.eval()
    images = batch[0]
    counter = CountingTextEncoder(model)
    with torch.no_grad():
        got = model(images)
        cache = model.refiner.cache.entries if refiner else None
        expected = per_image_reference(model, base_clip, images, cache)[0]
    assert counter.calls == [len(images) * len(CLASSNAMES)]  # one call on all B x C prompts
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert model.num_eval_classes == len(CLASSNAMES)


def test_image_independent_classifier_is_refused(build):
    with pytest.raises(RuntimeError, match="depend on the image"):
        build().class_embeddings()


def test_plain_training_loss_is_cross_entropy_of_per_image_logits(build, base_clip, batch):
    model = build()
    perturb_prompts(model)
    images, labels = batch
    counter = CountingTextEncoder(model)
    with torch.no_grad():
        logits = per_image_reference(model, base_clip, images)[0]
    loss, parts = model.forward_train(images, labels)
    assert counter.calls == [len(images) * len(CLASSNAMES)]
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, labels), atol=ATOL,
                               rtol=1e-4)
    assert set(parts) == {"loss_cls", "acc"}


def test_refiner_training_loss_per_image_matches_formula(build, base_clip, batch):
    model = build(refiner=True)
    perturb_prompts(model)
    model.train()
    images, labels = batch
    cache = model.refiner.cache.entries.clone()
    with torch.no_grad():
        logits, text, refined, tokens, attention = per_image_reference(model, base_clip, images,
                                                                        cache)
        scale = base_clip.logit_scale.exp()
        aligned = hand_mlp(model.refiner.aligner, tokens, batch_stats=True)
        semantic = hand_semantic(aligned, attention)                  # [B, k + 2, d]
        loss_cls = F.cross_entropy(logits, labels)
        # image b's k + 2 local vectors against its own E_b; mean over images of equal counts
        loss_sem = torch.stack([
            F.cross_entropy(scale * semantic[b] @ text[b].t(), labels[b].repeat(N_SEM))
            for b in range(len(images))]).mean()
        loss_reg = torch.stack([(F.normalize(refined[b], dim=-1) - text[b]).abs().mean()
                                for b in range(len(images))]).mean()
        expected_cache = hand_cache_write(cache, aligned)
    check_refiner_step(model, images, labels, (loss_cls, loss_sem, loss_reg), expected_cache)


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_gradients_reach_exactly_the_trainable_parameters(build, batch, refiner):
    model = build(refiner=refiner)
    loss, _ = model.forward_train(*batch)
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        set(model.trainable_parameters())
    for name, param in model.trainable_parameters().items():
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_cache_moves_in_training_only(build, batch):
    model = build(refiner=True)
    entries = model.refiner.cache.entries.clone()
    model.eval()
    with torch.no_grad():
        model(batch[0])
    assert torch.equal(model.refiner.cache.entries, entries)
    model.train()
    model.forward_train(*batch)
    assert not torch.allclose(model.refiner.cache.entries, entries)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_checkpoint_moves_from_base_to_novel_classes(build, base_clip, refiner):
    base, novel = CLASSNAMES[:3], CLASSNAMES[3:]
    gen = torch.Generator().manual_seed(11)
    images, labels = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0, 2])
    trained = build(refiner=refiner, classnames=base)
    _train_one_step(trained, (images, labels))
    state = {k: v.clone() for k, v in trained.checkpoint_state().items()}
    assert OWN_PARAMS <= set(state) and ("refiner.cache.entries" in state) == refiner

    target = build(refiner=refiner, classnames=novel, seed=1)
    target.load_checkpoint_state(state)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    assert target.prompt_learner.token_prefix.shape[0] == len(novel)
    target.eval()
    with torch.no_grad():
        cache = target.refiner.cache.entries if refiner else None
        expected = per_image_reference(target, base_clip, images, cache)[0]
        torch.testing.assert_close(target(images), expected, atol=ATOL, rtol=1e-4)


def test_codebase_prompt_learner_state_loads_by_name(build, base_clip, batch):
    """CoCoOp's `prompt_learner` state dict (with the token buffers its load_model deletes)."""
    gen = torch.Generator().manual_seed(3)
    codebase_state = {name: 0.1 * torch.randn(p.shape, generator=gen)
                      for name, p in build().prompt_learner.state_dict().items()}
    codebase_state["token_prefix"] = torch.randn(7, 1, 64, generator=gen)
    codebase_state["token_suffix"] = torch.randn(7, 72, 64, generator=gen)
    model = build()
    kept = {k: v for k, v in codebase_state.items() if not k.startswith("token_")}
    model.prompt_learner.load_state_dict(kept, strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]),
                                   per_image_reference(model, base_clip, batch[0])[0],
                                   atol=ATOL, rtol=1e-4)


def test_mismatched_checkpoints_say_what_to_change(build, base_clip):
    with pytest.raises(UserError, match="drop --refiner"):
        build(refiner=True).load_checkpoint_state(build().checkpoint_state())
    coop = build_method("CoOp", make_cfg(), CLASSNAMES, copy.deepcopy(base_clip))
    with pytest.raises(UserError, match="another method"):
        build().load_checkpoint_state(coop.checkpoint_state())


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision", ["fp32", "fp16", "amp"])
def test_precisions_train_and_evaluate_on_cpu(clip_path, build, batch, precision):
    reference = build(refiner=True)
    model = build("TRAINER.COCOOP.PREC", precision, refiner=True,
                  clip=load_clip(clip_path, precision))
    assert model.prompt_learner.meta_net.linear1.weight.dtype == (
        torch.float16 if precision == "fp16" else torch.float32)  # as the codebase's .half()
    images, labels = batch
    device = torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad(), amp_autocast(precision, device):
            logits = model(images).float()
        model.train()
        with amp_autocast(precision, device):
            loss, _ = model.forward_train(images, labels)
        loss.backward()
    except RuntimeError as exc:  # an op without a CPU half kernel in this torch build
        if precision == "fp16" and "alf" in str(exc):
            pytest.skip(f"fp16 on CPU unsupported by this torch build: {exc}")
        raise
    reference.eval()
    with torch.no_grad():
        expected = reference(images)
    # Same weights in lower precision: the logits (|logit| <= 14.3) agree to a few hundredths.
    torch.testing.assert_close(logits, expected, atol=0.15, rtol=0)
    assert torch.isfinite(loss)
    for name, param in model.trainable_parameters().items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


# ------------------------------------------------------------------------------ engine
DATASET_CFG = "configs/datasets/synthetic_shapes.yaml"
DEMO_CFG = "configs/trainers/CoOp/demo_cpu.yaml"
ENGINE_OPTS = ("TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", WORDS,
               "DATALOADER.TRAIN_X.BATCH_SIZE", "4")


def command(demo, out, *opts, epochs=2, refiner=True, seed=1):
    args = ["--engine", "standalone", "--root", demo["root"], "--trainer", "CoCoOp",
            "--seed", str(seed), "--dataset-config-file", DATASET_CFG, "--config-file", DEMO_CFG,
            "--output-dir", str(out)] + (["--refiner"] if refiner else [])
    return args + ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "2",
                   "DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.MAX_EPOCH", str(epochs),
                   *ENGINE_OPTS, *opts]


def last_result(out):
    with open(os.path.join(str(out), "log.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("* total:"))
    return lines[start:start + 5]


def epoch_state(out, epoch):
    path = os.path.join(str(out), "prompt_learner", f"model.pth.tar-{epoch}")
    return read_checkpoint(path)["state_dict"]


def test_standalone_engine_is_seeded_and_resumes(demo, tmp_path):
    straight, again, resumed = tmp_path / "straight", tmp_path / "again", tmp_path / "resumed"
    keep_all = ("TRAIN.CHECKPOINT_FREQ", "1")
    assert main(command(demo, straight, *keep_all)) == 0
    assert main(command(demo, again)) == 0
    # A run stopped after epoch 1: its folder without the epoch-2 checkpoint.
    shutil.copytree(str(straight), str(resumed))
    os.remove(resumed / "prompt_learner" / "model.pth.tar-2")
    assert main(command(demo, resumed)) == 0  # the same command again continues after epoch 1
    with open(resumed / "log.txt", encoding="utf-8") as f:
        assert "Resumed from epoch 1" in f.read()
    reference = epoch_state(straight, 2)
    assert OWN_PARAMS | {"refiner.cache.entries"} <= set(reference)
    for out in (again, resumed):
        state = epoch_state(out, 2)
        assert sorted(state) == sorted(reference)
        for key in reference:
            assert torch.equal(state[key], reference[key]), key
        assert last_result(out) == last_result(straight)


def test_standalone_engine_trains_with_amp_on_cpu(demo, tmp_path):
    assert main(command(demo, tmp_path, "TRAINER.COCOOP.PREC", "amp", epochs=1)) == 0
    assert last_result(tmp_path)[2].startswith("* accuracy:")
