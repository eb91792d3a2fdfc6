"""Checkpoints written by the original codebases load and score like prompts set by hand.

Each file is built here as its codebase's trainer saves it (Dassl's dict; the `state_dict` of the
module it registers, under that codebase's own key names, with its class-dependent buffers and,
for whole-model layouts, the frozen CLIP weights), from the names in REFERENCE.md and the
codebases' trainers, never from our own `checkpoint_state()`. The expected logits come from a
model whose parameters were set by hand, through attributes named in this file, to the same values.
"""
import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Tuple

import pytest
import torch

from conftest import make_cfg
from test_methods import (base_clip, build, kd_opts, teacher_clip_weights,  # noqa: F401
                          teacher_file, teachers)
from textrefiner.checkpoint import checkpoint_path, load_init_weights, load_method_checkpoint
from textrefiner.clip_backbone import load_clip
from textrefiner.errors import UserError
from textrefiner.methods import METHODS, build_method
from textrefiner.train import main, run

OTHER_CLASSES = 7  # the class buffers a codebase saves were built for another class list


# ------------------------------------------------------------------------------ codebases' files
def clip_weights(clip, text=True):
    """The frozen CLIP of a whole-model checkpoint: `image_encoder.*` (and `text_encoder.*`,
    the text encoder's four modules), `logit_scale`."""
    if text:
        return teacher_clip_weights(clip)
    state = {"image_encoder." + k: v.clone() for k, v in clip.visual.state_dict().items()}
    state["logit_scale"] = clip.logit_scale.detach().clone()
    return state


def class_buffers(clip, prefix="", suffixes=("",)):
    width = clip.ln_final.weight.shape[0]
    context = clip.positional_embedding.shape[0]
    state = {}
    for end in suffixes:
        state[f"{prefix}token_prefix{end}"] = torch.randn(OTHER_CLASSES, 1, width)
        state[f"{prefix}token_suffix{end}"] = torch.randn(OTHER_CLASSES, context - 5, width)
    return state


def coop_targets(m):
    return {"ctx": m.prompt_learner.ctx}


def cocoop_targets(m):
    one, two = m.prompt_learner.meta_net.linear1, m.prompt_learner.meta_net.linear2
    return {"ctx": m.prompt_learner.ctx,
            "meta_net.linear1.weight": one.weight, "meta_net.linear1.bias": one.bias,
            "meta_net.linear2.weight": two.weight, "meta_net.linear2.bias": two.bias}


def maple_targets(m):
    pl = m.prompt_learner
    return {"prompt_learner.ctx": pl.ctx, "prompt_learner.proj.weight": pl.proj.weight,
            "prompt_learner.proj.bias": pl.proj.bias,
            "prompt_learner.compound_prompts_text.0": pl.compound_prompts_text[0],
            "prompt_learner.compound_prompt_projections.0.weight":
                pl.compound_prompt_projections[0].weight,
            "prompt_learner.compound_prompt_projections.0.bias":
                pl.compound_prompt_projections[0].bias}


def student_vision_prompts(m):
    return {"image_encoder.VPT": m.image_encoder.VPT,
            "image_encoder.transformer.resblocks.1.VPT_shallow":
                m.image_encoder.transformer.resblocks[1].VPT_shallow}


def promptkd_targets(m):
    """PromptKD's projector is `conv1` = Conv2d(1x1), BatchNorm2d, ReLU, Conv2d(1x1)."""
    p = m.VPT_image_trans
    ours = {"0.weight": p.fc1.weight, "0.bias": p.fc1.bias, "1.weight": p.norm.weight,
            "1.bias": p.norm.bias, "1.running_mean": p.norm.running_mean,
            "1.running_var": p.norm.running_var, "3.weight": p.fc2.weight, "3.bias": p.fc2.bias}
    return {**student_vision_prompts(m),
            **{f"VPT_image_trans.conv1.{k}": tensor for k, tensor in ours.items()}}


def promptsrc_targets(m):
    return {**student_vision_prompts(m), "prompt_learner.ctx": m.prompt_learner.ctx,
            "text_encoder.transformer.resblocks.1.VPT_shallow":
                m.text_encoder.transformer.resblocks[1].VPT_shallow}


@dataclass
class Case:
    method: str
    folder: str                      # the Dassl model name its codebase registers
    targets: Callable                # model -> {codebase key: our tensor}, written by hand
    extras: Callable                 # clip -> what else the codebase saves (never loaded)
    layout: str                      # how the log names the layout
    opts: Tuple[str, ...] = ()
    conv_1x1: Tuple[str, ...] = field(default=())  # keys saved as 1x1 convolution weights


CASES = {
    "CoOp": Case("CoOp", "prompt_learner", coop_targets, lambda c: class_buffers(c),
                 "a CoOp-codebase checkpoint (prompt_learner, keys relative to the prompt "
                 "learner)"),
    "MaPLe": Case("MaPLe", "MultiModalPromptLearner", maple_targets,
                  lambda c: {**clip_weights(c), **class_buffers(c, "prompt_learner.")},
                  "a MaPLe-codebase checkpoint (MultiModalPromptLearner, the whole model)"),
    "PromptKD": Case("PromptKD", "VLPromptLearner", promptkd_targets,
                     lambda c: clip_weights(c, text=False),
                     "a PromptKD-codebase checkpoint (VLPromptLearner, the whole model)",
                     conv_1x1=("VPT_image_trans.conv1.0.weight", "VPT_image_trans.conv1.3.weight")),
    # Methods being added: their config keys may need adjusting when they are merged.
    "CoCoOp": Case("CoCoOp", "prompt_learner", cocoop_targets, lambda c: class_buffers(c),
                   "a CoCoOp-codebase checkpoint (prompt_learner, keys relative to the prompt "
                   "learner)", opts=("TRAINER.COCOOP.PREC", "fp32",
                                     "TRAINER.COCOOP.CTX_INIT", "a photo of a")),
    "PromptSRC": Case("PromptSRC", "VLPromptLearner", promptsrc_targets,
                      lambda c: {**clip_weights(c), **class_buffers(c, "prompt_learner."),
                                 **{"prompt_learner.ZS_image_encoder." + k: v.clone()
                                    for k, v in c.visual.state_dict().items()}},
                      "a PromptSRC-codebase checkpoint (VLPromptLearner, the whole model)",
                      opts=("TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.N_CTX_VISION", "4",
                            "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2",
                            "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2")),
}
MERGED = [name for name in CASES if name in METHODS]


def trained_values(case, model, seed=3):
    """Random values (fp16, as the published fp16 runs save them) for every trained key."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for key, tensor in case.targets(model).items():
        value = 0.3 * torch.randn(tensor.shape, generator=gen)
        if key.endswith("running_var"):
            value = value.abs() + 0.5
        shape = tuple(tensor.shape) + ((1, 1) if key in case.conv_1x1 else ())
        values[key] = value.half().reshape(shape)
    return values


def write_codebase_checkpoint(directory, case, values, clip, epoch=3):
    """`<directory>/<folder>/model.pth.tar-<epoch>` and the marker file `checkpoint` naming it, as
    Dassl's save_checkpoint writes them."""
    state = {**case.extras(clip), **values}
    if case.conv_1x1:  # a BatchNorm2d also saves its step count
        state["VPT_image_trans.conv1.1.num_batches_tracked"] = torch.tensor(40)
    path = checkpoint_path(str(directory), case.folder, epoch)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": state, "epoch": epoch, "val_result": None,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.002, "params": [0]}]},
                "scheduler": {"last_epoch": epoch, "base_lrs": [0.002]}}, path)
    with open(os.path.join(os.path.dirname(path), "checkpoint"), "w") as marker:
        marker.write(os.path.basename(path) + "\n")
    return path


def set_by_hand(case, model, values):
    with torch.no_grad():
        for key, tensor in case.targets(model).items():
            tensor.copy_(values[key].reshape(tensor.shape).to(tensor.dtype))


def eval_logits(model, images):
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))


def build_case(build, case, **kwargs):
    if case.method not in METHODS:
        pytest.skip(f"{case.method} is not in this branch")
    return build(case.method, *case.opts, **kwargs)


# ------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("name", list(CASES))
def test_codebase_checkpoint_scores_like_prompts_set_by_hand(build, base_clip, images, tmp_path,
                                                             name):
    case = CASES[name]
    reference = build_case(build, case, seed=2)
    values = trained_values(case, reference)
    path = write_codebase_checkpoint(tmp_path, case, values, base_clip)
    set_by_hand(case, reference, values)

    model = build_case(build, case, seed=1)
    before = eval_logits(model, images)
    lines = []
    checkpoint = load_method_checkpoint(model, path, log=lines.append)
    assert checkpoint["epoch"] == 3
    assert len(lines) == 1 and lines[0].startswith(f"Read {path}: {case.layout}"), lines
    assert "differ" not in lines[0]
    expected = eval_logits(reference, images)
    assert not torch.allclose(before, expected, atol=1e-3)  # the load is what makes them equal
    torch.testing.assert_close(eval_logits(model, images), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MERGED)
def test_own_checkpoint_still_reads_as_ours(build, name):
    source = build_case(build, CASES[name], seed=3)
    target = build_case(build, CASES[name], seed=4)
    assert target.load_checkpoint_state(source.checkpoint_state()) == "a textrefiner checkpoint"


# ------------------------------------------------------------------------------ clear refusals
def write_for(build, base_clip, tmp_path, name):
    case = CASES[name]
    model = build_case(build, case)
    return write_codebase_checkpoint(tmp_path, case, trained_values(case, model), base_clip)


@pytest.mark.parametrize("source,target,says", [
    ("MaPLe", "CoOp", "a MaPLe-codebase checkpoint (MultiModalPromptLearner), of another method"),
    ("CoOp", "MaPLe", "a CoOp-codebase checkpoint (prompt_learner), of another method"),
    ("CoOp", "PromptKD", "a CoOp-codebase checkpoint (prompt_learner), of another method"),
    ("PromptKD", "MaPLe", "a PromptKD-codebase checkpoint (VLPromptLearner, a student)"),
])
def test_codebase_checkpoint_of_another_method_says_what_it_is(build, base_clip, tmp_path,
                                                               source, target, says):
    path = write_for(build, base_clip, tmp_path, source)
    with pytest.raises(UserError, match="needs " + source) as info:
        load_init_weights(build(target), path)
    assert says in str(info.value) and path in str(info.value)


def test_textrefiner_checkpoint_of_another_method_says_what_it_is(build):
    with pytest.raises(UserError, match="a textrefiner MaPLe checkpoint, of another method"):
        build("CoOp").load_checkpoint_state(build("MaPLe").checkpoint_state())


def test_file_of_no_known_layout_says_so(build, tmp_path):
    path = str(tmp_path / "model.pth.tar-1")
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(2, 2)}, "epoch": 1}, path)
    with pytest.raises(UserError, match="fits no known layout"):
        load_method_checkpoint(build("CoOp"), path)


def test_codebase_checkpoint_with_refiner_on_says_drop_refiner(build, base_clip, tmp_path):
    path = write_for(build, base_clip, tmp_path, "CoOp")
    with pytest.raises(UserError, match=r"It is a CoOp-codebase checkpoint .*drop --refiner.*"
                                        "MODEL.INIT_WEIGHTS"):
        load_method_checkpoint(build("CoOp", refiner=True), path)


def test_frozen_clip_of_another_backbone_is_refused(build, teacher_clip_path, tmp_path):
    case = CASES["MaPLe"]
    model = build("MaPLe")
    other = load_clip(teacher_clip_path, "fp32")
    path = write_codebase_checkpoint(tmp_path, case, trained_values(case, model), other)
    with pytest.raises(UserError, match="another backbone"):
        load_method_checkpoint(model, path)


def test_frozen_clip_weights_that_differ_are_named_in_the_log(build, base_clip, tmp_path):
    case = CASES["MaPLe"]
    model = build("MaPLe")
    other = copy.deepcopy(base_clip)
    with torch.no_grad():
        other.text_projection.add_(0.01)
    path = write_codebase_checkpoint(tmp_path, case, trained_values(case, model), other)
    lines = []
    load_method_checkpoint(model, path, log=lines.append)
    assert "(1 differ from this model's CLIP, e.g. 'text_encoder.text_projection'" in lines[0]
    assert torch.equal(model.text_encoder.text_projection, base_clip.text_projection)


def test_model_dir_of_another_method_names_its_folder(build, base_clip, tmp_path):
    write_for(build, base_clip, tmp_path, "MaPLe")
    with pytest.raises(UserError, match="holds MultiModalPromptLearner/.*MaPLe"):
        load_method_checkpoint(build("CoOp"), checkpoint_path(str(tmp_path), "prompt_learner", 3))


def test_init_weights_must_name_a_file(build, tmp_path):
    with pytest.raises(UserError, match="names a checkpoint file"):
        load_init_weights(build("CoOp"), str(tmp_path))


# ------------------------------------------------------------------------------ MODEL.INIT_WEIGHTS
def test_init_weights_load_prompts_and_leave_the_refiner_fresh(build, base_clip, tmp_path):
    case = CASES["CoOp"]
    model = build("CoOp", refiner=True)
    fresh = {k: v.clone() for k, v in model.refiner.state_dict().items()}
    values = trained_values(case, model)
    path = write_codebase_checkpoint(tmp_path, case, values, base_clip)
    lines = []
    load_init_weights(model, path, log=lines.append)
    assert torch.equal(model.prompt_learner.ctx, values["ctx"].float())
    for key, value in model.refiner.state_dict().items():
        assert torch.equal(value, fresh[key]), key
    assert "TextRefiner starts fresh" in lines[0] and "CoOp-codebase" in lines[0]


def test_init_weights_of_a_refiner_run_into_a_plain_model_say_so(build):
    trained = build("CoOp", refiner=True)
    model = build("CoOp")
    read = model.load_checkpoint_state(trained.checkpoint_state(), fresh_refiner=True)
    assert "TextRefiner weights are not used" in read
    assert torch.equal(model.prompt_learner.ctx, trained.prompt_learner.ctx)


# ------------------------------------------------------------------------------ both engines
ENGINES = ("standalone", "dassl")


def engine_args(engine, demo, method, out, classes, flags=(), opts=()):
    """`textrefiner-train` arguments for the demo data on either engine."""
    if engine == "dassl":
        pytest.importorskip("dassl")
        from test_dassl_layer import cli_args
        return cli_args(method, out, demo["clip"], demo["root"], classes, flags, opts)
    from test_train_cli import METHOD_OPTS, command
    return command(demo, method, out, *(METHOD_OPTS.get(method, ()) + tuple(opts)),
                   classes=classes, extra=flags)


def codebase_dir(demo, tmp_path, method, opts=()):
    """A folder as the method's codebase leaves it, for the demo CLIP; returns (folder, values)."""
    case = CASES[method]
    clip = load_clip(demo["clip"], "fp32")
    model = build_method(method, make_cfg(*opts), ["a", "b"], clip)
    values = trained_values(case, model)
    write_codebase_checkpoint(tmp_path / "codebase", case, values, clip)
    return tmp_path / "codebase", values


def read_log(out):
    return (out / "log.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("method", ["CoOp", "MaPLe", "PromptKD"])
@pytest.mark.parametrize("engine", ENGINES)
def test_eval_only_reads_a_codebase_folder(demo, tmp_path, teacher_ckpt, teacher_clip_path,
                                           engine, method):
    from test_train_cli import kd_opts as cli_kd_opts
    opts = cli_kd_opts(teacher_ckpt, teacher_clip_path) if method == "PromptKD" else ()
    folder, values = codebase_dir(demo, tmp_path, method, opts)
    out = tmp_path / "eval"
    trainer = run(engine_args(engine, demo, method, out, "new", (
        "--eval-only", "--model-dir", str(folder), "--load-epoch", "3"), opts))
    log = read_log(out)
    assert f": {CASES[method].layout}" in log and "* accuracy:" in log
    for key, tensor in CASES[method].targets(trainer.model).items():
        assert torch.equal(tensor.detach().cpu(), values[key].float().reshape(tensor.shape)), key


@pytest.mark.parametrize("engine", ENGINES)
def test_init_weights_start_refiner_training_from_a_codebase_prompt(demo, tmp_path, engine):
    folder, values = codebase_dir(demo, tmp_path, "CoOp")
    out = tmp_path / "train"
    path = checkpoint_path(str(folder), "prompt_learner", 3)
    trainer = run(engine_args(engine, demo, "CoOp", out, "base", ("--refiner", "--no-train"),
                              ("MODEL.INIT_WEIGHTS", path)))
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), values["ctx"].float())
    log = read_log(out)
    assert f"(MODEL.INIT_WEIGHTS): read {path}: a CoOp-codebase checkpoint" in log
    assert "TextRefiner starts fresh" in log


def test_init_weights_then_training_runs(demo, tmp_path):
    folder, _ = codebase_dir(demo, tmp_path, "MaPLe")
    out = tmp_path / "train"
    path = checkpoint_path(str(folder), "MultiModalPromptLearner", 3)
    assert main(engine_args("standalone", demo, "MaPLe", out, "base", ("--refiner",),
                            ("MODEL.INIT_WEIGHTS", path, "OPTIM.MAX_EPOCH", "1"))) == 0
    log = read_log(out)
    assert f"read {path}: a MaPLe-codebase checkpoint" in log and "* accuracy:" in log


def test_codebase_folder_with_refiner_at_eval_is_exit_2(demo, tmp_path, capsys):
    folder, _ = codebase_dir(demo, tmp_path, "CoOp")
    args = engine_args("standalone", demo, "CoOp", tmp_path / "eval", "new", (
        "--refiner", "--eval-only", "--model-dir", str(folder), "--load-epoch", "3"))
    assert main(args) == 2
    assert "MODEL.INIT_WEIGHTS" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ENGINES)
def test_resuming_a_codebase_run_says_use_init_weights(demo, tmp_path, engine, capsys):
    folder, _ = codebase_dir(demo, tmp_path, "CoOp")
    assert main(engine_args(engine, demo, "CoOp", folder, "base")) == 2
    err = capsys.readouterr().err
    assert "a CoOp-codebase checkpoint" in err and "cannot be resumed" in err
    assert "MODEL.INIT_WEIGHTS" in err
