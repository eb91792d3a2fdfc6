"""textrefiner.seeding: saved random states, TextRefiner's own generator, the seed a run resumes
with, and checkpoints in the codebases' layout that still load here."""
import copy
import io
import random

import numpy as np
import pytest
import torch

from textrefiner.checkpoint import load_method_checkpoint, read_checkpoint, save_method_checkpoint
from textrefiner.errors import UserError
from textrefiner.methods import method_class
from textrefiner.clip_backbone import load_clip
from textrefiner.seeding import (check_resumable_seed, clip_build_shapes, draw_clip_build,
                                 own_generator, random_states, restore_random_states,
                                 rewind_to_clip_build, set_seed)
from textrefiner.train import main

from conftest import make_cfg



@pytest.fixture
def build(small_clip):
    def _build(method, refiner=False, seed=1):
        opts = ["SEED", str(seed), "TRAINER.COCOOP.PREC", "fp32",
                "TRAINER.COCOOP.CTX_INIT", "a photo of a", "TRAINER.REFINER.ENABLED", str(refiner)]
        return method_class(method)(make_cfg(*opts), ["red circle", "blue square"],
                                    copy.deepcopy(small_clip))
    return _build


def draws():
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()),
            np.random.randn(), random.gauss(0, 1))


def test_saved_states_load_with_weights_only_and_restore_every_generator():
    set_seed(5)
    draws()
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    buffer = io.BytesIO()
    torch.save({"random_states": random_states()}, buffer)
    expected = draws()
    buffer.seek(0)
    states = torch.load(buffer, weights_only=True)["random_states"]
    set_seed(6)
    restore_random_states(states)
    assert draws() == expected


def test_own_generator_leaves_the_global_stream_alone():
    torch.manual_seed(1)
    before = torch.get_rng_state()
    with own_generator(1, "refiner"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)  # another global state: the block draws the same
    with own_generator(1, "refiner"):
        assert torch.equal(torch.rand(4), first)
    with own_generator(2, "refiner"):
        assert not torch.equal(torch.rand(4), first)


def test_refiner_init_depends_on_the_seed_only(build):
    torch.manual_seed(0)
    a = build("CoOp", refiner=True).refiner.state_dict()
    torch.manual_seed(1)
    b = build("CoOp", refiner=True).refiner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_is_refused_on_resume():
    check_resumable_seed({"seed": 1}, 1, "f")
    check_resumable_seed({}, 2, "f")  # checkpoints of earlier versions hold no seed
    with pytest.raises(UserError, match="--seed 1.*--seed 2.*--seed 1 to resume"):
        check_resumable_seed({"seed": 1}, 2, "f")


@pytest.mark.parametrize("engine", ["standalone", pytest.param("dassl", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("dassl") is None, reason="no Dassl.pytorch"))])
def test_resuming_with_another_seed_is_exit_2(demo, tmp_path, capsys, engine):
    def command(seed, epochs):
        return ["--engine", engine, "--root", demo["root"], "--trainer", "CoOp", "--seed", seed,
                "--dataset-config-file",
                "configs/datasets/synthetic_shapes.yaml",
                "--config-file", "configs/trainers/CoOp/demo_cpu.yaml",
                "--output-dir", str(tmp_path), "MODEL.BACKBONE.PATH", demo["clip"],
                "DATASET.NUM_SHOTS", "1", "OPTIM.MAX_EPOCH", epochs, "TEST.NO_TEST", "True",
                "TRAIN.CHECKPOINT_FREQ", "1"]
    assert main(command("1", "1")) == 0
    assert main(command("2", "2")) == 2
    assert "was trained with --seed 1, but this command gives --seed 2" in capsys.readouterr().err


def test_plain_coop_files_are_in_the_codebase_layout_and_old_ones_load(build, tmp_path):
    model = build("CoOp")
    with torch.no_grad():
        model.prompt_learner.ctx.add_(1.0)
    path = str(tmp_path / "prompt_learner" / "model.pth.tar-1")
    save_method_checkpoint(model, path, 0)
    state = read_checkpoint(path)["state_dict"]
    assert sorted(state) == ["ctx", "token_prefix", "token_suffix"]
    assert torch.equal(state["ctx"], model.prompt_learner.ctx.detach())
    fresh = build("CoOp")
    log = []
    load_method_checkpoint(fresh, path, log.append, resume=True)  # ours: it resumes
    assert torch.equal(fresh.prompt_learner.ctx, model.prompt_learner.ctx)
    assert "a textrefiner checkpoint in the CoOp codebase's layout" in log[0]
    # a file of earlier versions: keys "prompt_learner.ctx"
    old = str(tmp_path / "old.pth.tar")
    torch.save({"state_dict": {"prompt_learner.ctx": state["ctx"] * 2}, "epoch": 1}, old)
    load_method_checkpoint(fresh, old, log.append, resume=True)
    assert torch.equal(fresh.prompt_learner.ctx, state["ctx"] * 2)
    # with TextRefiner, our names
    tr = build("CoOp", refiner=True)
    save_method_checkpoint(tr, path, 0)
    assert "prompt_learner.ctx" in read_checkpoint(path)["state_dict"]


def test_plain_cocoop_files_are_in_the_codebase_layout(build, tmp_path):
    model = build("CoCoOp")
    path = str(tmp_path / "prompt_learner" / "model.pth.tar-1")
    save_method_checkpoint(model, path, 0)
    state = read_checkpoint(path)["state_dict"]
    assert {"ctx", "meta_net.linear1.weight", "meta_net.linear2.bias"} <= set(state)
    assert not any(k.startswith("prompt_learner.") for k in state)
    fresh = build("CoCoOp")
    load_method_checkpoint(fresh, path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))



def test_a_clip_build_without_prompts_draws_what_the_stock_build_draws(clip_path):
    torch.manual_seed(3)
    clip_model = load_clip(clip_path, "fp32")
    after = torch.get_rng_state()
    assert rewind_to_clip_build(clip_model)
    draw_clip_build(clip_build_shapes(clip_model))
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("method", ["PromptSRC", "PromptKD"])
def test_ivlp_prompts_are_drawn_in_the_clip_build_and_the_refiner_changes_no_draw(
        method, small_clip, teacher_ckpt, teacher_clip_path):
    """The deep prompts start from what the codebase's IVLP CLIP build draws from the state CLIP
    was built from; with --refiner they, PromptKD's projector and the stream after the model are
    those of the run without it."""
    models, states = [], []
    for refiner in (False, True):
        opts = ["SEED", "1", "TRAINER.PROMPTSRC.PREC", "fp32",
                "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2",
                "TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt,
                "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
                "TRAINER.REFINER.ENABLED", str(refiner)]
        torch.manual_seed(5)  # moved on since CLIP was built: the build's state is used
        models.append(method_class(method)(make_cfg(*opts), ["red circle", "blue square"],
                                           copy.deepcopy(small_clip)))
        states.append(torch.get_rng_state())
    plain, refined = models
    assert torch.equal(states[0], states[1])
    learned = plain.checkpoint_state()
    assert learned and all(torch.equal(v, refined.state_dict()[k]) for k, v in learned.items())
    rewind_to_clip_build(small_clip)
    depth_text = 2 if method == "PromptSRC" else 9
    text, vision = draw_clip_build(clip_build_shapes(small_clip), 4, depth_text, 4, 2)
    assert torch.equal(plain.image_encoder.VPT, vision[0])
    assert torch.equal(plain.image_encoder.transformer.resblocks[1].VPT_shallow, vision[1])
    if method == "PromptSRC":
        assert torch.equal(plain.text_encoder.transformer.resblocks[1].VPT_shallow, text[0])


def test_plain_promptkd_files_hold_the_codebase_projector_and_old_ones_load(
        small_clip, teacher_ckpt, teacher_clip_path, tmp_path):
    def build(refiner=False):
        opts = ["TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt, "TRAINER.PROMPTKD.TEACHER_PATH",
                teacher_clip_path, "TRAINER.REFINER.ENABLED", str(refiner)]
        return method_class("PromptKD")(make_cfg(*opts), ["red circle", "blue square"],
                                        copy.deepcopy(small_clip))

    model = build()
    with torch.no_grad():
        model.VPT_image_trans.norm.running_mean.add_(1.0)
    path = str(tmp_path / "VLPromptLearner" / "model.pth.tar-1")
    save_method_checkpoint(model, path, 0)
    state = read_checkpoint(path)["state_dict"]
    trans = model.VPT_image_trans
    assert torch.equal(state["VPT_image_trans.conv1.0.weight"], trans.fc1.weight[..., None, None])
    assert torch.equal(state["VPT_image_trans.conv1.3.weight"], trans.fc2.weight[..., None, None])
    assert torch.equal(state["VPT_image_trans.conv1.1.running_mean"], trans.norm.running_mean)
    assert not any(".fc1." in k or ".norm." in k for k in state)
    fresh = build()
    load_method_checkpoint(fresh, path, resume=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.checkpoint_state().items())
    # a file of earlier versions: fc1, norm, fc2
    old = str(tmp_path / "old.pth.tar")
    torch.save({"state_dict": model.checkpoint_state(), "epoch": 1}, old)
    again = build()
    load_method_checkpoint(again, old, resume=True)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.checkpoint_state().items())
    # with TextRefiner, our names
    save_method_checkpoint(build(refiner=True), path, 0)
    assert "VPT_image_trans.fc1.weight" in read_checkpoint(path)["state_dict"]
