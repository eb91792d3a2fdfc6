"""Every file textrefiner reads is data (textrefiner.safe_load).

Hostile files (a pickle that would create a marker file), truncated files and files of the wrong
kind get one line, through every reading path and the real command line, and run nothing; the
files the codebases published (Dassl's checkpoint dict with its optimiser and warm-up scheduler
state, in torch's zip and legacy formats) and those earlier textrefiner versions wrote still load.
"""
import os
import pickle
import random
import shlex
import warnings
import zipfile

import numpy as np
import pytest
import torch

from conftest import make_cfg, write_teacher_checkpoint
from test_codebase_checkpoints import (CASES, build_case, engine_args, trained_values,
                                       write_codebase_checkpoint)
from test_methods import base_clip, build, teacher_file, teachers  # noqa: F401
from textrefiner.checkpoint import (checkpoint_path, load_method_checkpoint, read_checkpoint,
                                    save_method_checkpoint)
from textrefiner.clip_backbone import load_clip
from textrefiner.data.base import (FEWSHOT_ALLOW_LIST, LEFT_AS_IT_IS, fewshot_cache_path,
                                   load_fewshot_cache)
from textrefiner.demo import prepare
from textrefiner.demo.weights import read_packed
from textrefiner.errors import UserError
from textrefiner.methods.promptkd import load_teacher
from textrefiner.safe_load import TRUST_ENV, RefusedFile, load_fewshot_pickle, load_torch_file
from textrefiner.train import main

SYSTEM = f"{os.system.__module__}.system"  # how a pickle names os.system ("posix.system")


class MakesMarker:
    """Unpickled by a full pickle, this creates the file `path` (through os.system)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


# ------------------------------------------------------------------------------ bad files
def hostile_checkpoint(path, marker, legacy=False):
    """A Dassl checkpoint dict whose `val_result` would run code (the issue's file)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    torch.save({"state_dict": {"ctx": torch.zeros(2, 3)}, "epoch": 1, "optimizer": None,
                "scheduler": None, "val_result": MakesMarker(marker)}, str(path),
               _use_new_zipfile_serialization=not legacy)
    return str(path)


def truncated_file(path, marker):
    torch.save({"state_dict": {"ctx": torch.randn(64, 64)}, "epoch": 1}, str(path))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(path)


def text_file(path, marker):
    with open(path, "w") as f:
        f.write("epoch: 1\nthis is a text file, not a checkpoint\n")
    return str(path)


def other_zip(path, marker):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "a zip of something else")
    return str(path)


BAD_FILES = {"hostile": hostile_checkpoint, "truncated": truncated_file, "text": text_file,
             "zip": other_zip}
# what the one line says for each
SAYS = {"hostile": ["Refused to read", SYSTEM, TRUST_ENV], "truncated": ["corrupt or truncated"],
        "text": ["corrupt or truncated"], "zip": ["corrupt or truncated"]}


def bad_file(kind, path, marker):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    return BAD_FILES[kind](path, marker)


def test_the_hostile_file_runs_code_when_fully_unpickled(tmp_path):
    """The test file is a real threat: torch.load(weights_only=False) creates the marker."""
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "evil.pth.tar", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hostile_checkpoint_is_refused_with_one_line(tmp_path, legacy):
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "model.pth.tar-1", marker, legacy)
    with pytest.raises(RefusedFile) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and path in message and SYSTEM in message
    assert f"{TRUST_ENV}=1" in message and info.value.kind == SYSTEM


def test_the_opt_in_reads_a_trusted_file_fully_and_says_so(tmp_path, monkeypatch, caplog):
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "model.pth.tar-1", marker)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert read_checkpoint(path)["epoch"] == 1
    assert marker.exists()  # the user said they trust it: it is read as the full pickle it is
    assert f"{TRUST_ENV}=1: reading {path} as a full pickle" in caplog.text


@pytest.mark.parametrize("kind", ["truncated", "text", "zip"])
def test_damaged_checkpoint_says_so(tmp_path, kind):
    path = bad_file(kind, tmp_path / "model.pth.tar-1", tmp_path / "marker")
    with pytest.raises(UserError, match="corrupt or truncated") as info:
        read_checkpoint(path)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_torchscript_archive_as_a_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "model.pth.tar-1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(RefusedFile, match="a TorchScript program") as info:
        read_checkpoint(path)
    assert path in str(info.value) and TRUST_ENV in str(info.value)


def test_torch_without_safe_globals_tuples_says_to_upgrade(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pth.tar-1")
    torch.save({"epoch": 1}, path)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UserError, match=r"needs torch >= 2.6 \(this is 2.5.1\+cpu\)"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------ what is allowed
def dassl_training_state(epoch, lr=0.002, warmup=True):
    """What Dassl's save_model writes beside the weights: the optimiser's state_dict, the
    scheduler's (Dassl's ConstantWarmupScheduler keeps its successor, a CosineAnnealingLR over the
    optimiser, as an attribute, and state_dict() pickles every attribute but the optimiser) and
    val_result."""
    params = [torch.nn.Parameter(torch.randn(4, 8))]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epoch + 2)
    for _ in range(epoch):
        params[0].grad = torch.ones_like(params[0])
        optimizer.step()
        successor.step()
    scheduler = successor.state_dict()
    if warmup:
        scheduler = {**scheduler, "successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5}
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler, "val_result": 71.25}


def random_states():
    """The random states a checkpoint may hold to resume exactly (Python, NumPy, torch)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "generator": torch.Generator().manual_seed(3)
            .get_state()}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_training_state_random_states_and_numpy_scalars_load(tmp_path, legacy):
    path = str(tmp_path / "state.pth.tar")
    saved = {**dassl_training_state(3), "random_states": random_states(),
             "best_result": np.float64(71.25), "count": np.int64(7)}
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    loaded = load_torch_file(path)
    assert loaded["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    momentum = saved["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)
    successor = loaded["scheduler"]["successor"]
    assert type(successor) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert successor.last_epoch == 3 and successor.get_last_lr() == saved["scheduler"]["_last_lr"]
    states = loaded["random_states"]
    assert states["python"] == saved["random_states"]["python"]
    name, keys, *rest = states["numpy"]
    assert name == "MT19937" and keys.dtype == np.uint32
    assert np.array_equal(keys, saved["random_states"]["numpy"][1])
    assert tuple(rest) == tuple(saved["random_states"]["numpy"][2:])
    assert torch.equal(states["torch"], saved["random_states"]["torch"])
    assert loaded["best_result"] == 71.25 and loaded["count"] == 7


def test_numpy_state_restores_the_same_draws(tmp_path):
    path = str(tmp_path / "state.pth.tar")
    np.random.seed(5)
    torch.save({"numpy": np.random.get_state()}, path)
    expected = np.random.rand(4)
    np.random.set_state(load_torch_file(path)["numpy"])
    assert np.array_equal(np.random.rand(4), expected)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", list(CASES))
def test_published_checkpoints_load(build, base_clip, tmp_path, name, legacy):
    """Each codebase's file as Dassl's save_checkpoint writes it, with the optimiser and warm-up
    scheduler state, in torch's zip format and the legacy one of torch < 1.6."""
    case = CASES[name]
    model = build_case(build, case, seed=1)
    values = trained_values(case, model)
    path = write_codebase_checkpoint(tmp_path, case, values, base_clip)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, **dassl_training_state(checkpoint["epoch"])}, path,
               _use_new_zipfile_serialization=not legacy)
    lines = []
    load_method_checkpoint(model, path, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"Read {path}: {case.layout}"), lines
    for key, tensor in case.targets(model).items():
        assert torch.equal(tensor.detach(), values[key].float().reshape(tensor.shape)), key


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_published_promptkd_teacher_loads(tmp_path, teacher_clip_path, legacy):
    path = write_teacher_checkpoint(tmp_path / "VLPromptLearner" / "model-best.pth.tar",
                                    teacher_clip_path)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, **dassl_training_state(checkpoint["epoch"])}, path,
               _use_new_zipfile_serialization=not legacy)
    cfg = make_cfg("TRAINER.PROMPTKD.TEACHER_CKPT", path,
                   "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path)
    teacher = load_teacher(cfg, ["a", "b"], "fp32")
    state = teacher.state_dict()
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("warmup", [False, True], ids=["standalone", "dassl-scheduler"])
def test_checkpoints_of_earlier_textrefiner_versions_load_and_resume(build, tmp_path, legacy,
                                                                     warmup):
    """What earlier versions wrote (textrefiner/checkpoint.py's history): the Dassl dict with
    the optimiser and scheduler state, `best_result`, and `classnames` (standalone engine); the
    Dassl engine's scheduler state holds Dassl's successor wherever Dassl's scheduler ran."""
    source = build("CoOp", seed=3)
    path = str(tmp_path / "prompt_learner" / "model.pth.tar-2")
    save_method_checkpoint(source, path, 1, best_result=70.0, classnames=source.classnames)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, **dassl_training_state(2, warmup=warmup)}, path,
               _use_new_zipfile_serialization=not legacy)
    target = build("CoOp", seed=4)
    loaded = load_method_checkpoint(target, path, log=lambda line: None, resume=True)
    assert loaded["epoch"] == 2 and loaded["best_result"] == 70.0
    for key, value in source.checkpoint_state().items():
        assert torch.equal(target.checkpoint_state()[key], value), key
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.randn(4, 8))], lr=0.002, momentum=0.9)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.state_dict()["state"][0]["momentum_buffer"].shape == (4, 8)


# ------------------------------------------------------------------------------ other files
def test_hostile_clip_weights_are_refused(tmp_path):
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "clip.pt", marker)
    with pytest.raises(RefusedFile, match="Refused to read the CLIP weights") as info:
        load_clip(path)
    assert not marker.exists() and SYSTEM in str(info.value) and path in str(info.value)


def test_hostile_demo_clip_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "clip_tiny.pt", marker)
    with pytest.raises(RefusedFile, match="Refused to read the demo CLIP"):
        read_packed(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_openclip_weight_file_is_refused_before_open_clip_reads_it(tmp_path, kind,
                                                                       monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    from textrefiner.openclip_models import load_openclip

    def never(*args, **kwargs):
        raise AssertionError("open_clip read a file textrefiner refused")

    monkeypatch.setattr(open_clip, "create_model", never)
    marker = tmp_path / "marker"
    path = bad_file(kind, tmp_path / "weights.pt", marker)
    with pytest.raises(UserError) as info:
        load_openclip(f"ViT-B-32/{path}", "fp32", "MODEL.BACKBONE.NAME")
    assert not marker.exists() and path in str(info.value)
    if kind == "hostile":
        assert SYSTEM in str(info.value) and TRUST_ENV in str(info.value)


# ------------------------------------------------------------------------------ few-shot caches
def hostile_cache(path, marker):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"train": [MakesMarker(marker)], "val": []}, f)
    return str(path)


FEWSHOT_FILES = {"hostile": hostile_cache, "truncated": truncated_file, "text": text_file,
                 "zip": other_zip}


def test_hostile_fewshot_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = hostile_cache(tmp_path / "shot_2-seed_1.pkl", marker)
    with pytest.raises(RefusedFile) as info:
        load_fewshot_pickle(path, FEWSHOT_ALLOW_LIST)
    assert not marker.exists() and info.value.kind == SYSTEM


@pytest.mark.parametrize("kind", list(FEWSHOT_FILES))
def test_unusable_fewshot_cache_is_not_used_nor_rewritten(tmp_path, kind, caplog):
    marker = tmp_path / "marker"
    path = fewshot_cache_path(str(tmp_path / "data"), 2, 1)
    os.makedirs(os.path.dirname(path))
    FEWSHOT_FILES[kind](path, marker)
    before = open(path, "rb").read()
    assert load_fewshot_cache(path, str(tmp_path / "data")) is LEFT_AS_IT_IS
    assert not marker.exists() and open(path, "rb").read() == before
    lines = [r.getMessage() for r in caplog.records if path in r.getMessage()]
    assert len(lines) == 1 and "Not using the few-shot cache" in lines[0]
    assert "left as it is" in lines[0] and "\n" not in lines[0]
    if kind == "hostile":
        assert SYSTEM in lines[0]


# ------------------------------------------------------------------------------ command line
ENGINES = ("standalone", "dassl")


@pytest.fixture
def no_dassl_loading(monkeypatch):
    """On the Dassl engine, Dassl's own checkpoint readers (torch.load with weights_only=False
    on older torch) must never be reached for our trainers."""
    try:
        import dassl.engine.trainer as dassl_trainer
        import dassl.utils as dassl_utils
        import dassl.utils.torchtools as torchtools
    except ImportError:
        return

    def never(*args, **kwargs):
        raise AssertionError("Dassl's own checkpoint loading was reached")

    for module in (dassl_trainer, dassl_utils, torchtools):
        for name in ("load_checkpoint", "load_pretrained_weights", "resume_from_checkpoint"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, never)


def cli_fails_with_one_line(args, capsys, path, says):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert path in err and all(part in err for part in says), err
    return err


def engine_kinds():
    return [(engine, kind) for engine in ENGINES for kind in BAD_FILES
            if engine == "standalone" or kind == "hostile"]


@pytest.mark.parametrize("engine,kind", engine_kinds())
def test_eval_only_model_dir(demo, tmp_path, capsys, no_dassl_loading, engine, kind):
    marker = tmp_path / "marker"
    folder = tmp_path / "downloaded"
    path = bad_file(kind, checkpoint_path(str(folder), "prompt_learner", 1), marker)
    args = engine_args(engine, demo, "CoOp", tmp_path / "eval", "new",
                       ("--eval-only", "--model-dir", str(folder), "--load-epoch", "1"))
    cli_fails_with_one_line(args, capsys, path, SAYS[kind])
    assert not marker.exists()


@pytest.mark.parametrize("engine,kind", engine_kinds())
def test_resume(demo, tmp_path, capsys, no_dassl_loading, engine, kind):
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    path = bad_file(kind, checkpoint_path(str(out), "prompt_learner", 1), marker)
    with open(os.path.join(os.path.dirname(path), "checkpoint"), "w") as f:
        f.write("model.pth.tar-1\n")
    args = engine_args(engine, demo, "CoOp", out, "base", ("--resume", str(out)))
    cli_fails_with_one_line(args, capsys, path, SAYS[kind])
    assert not marker.exists()


@pytest.mark.parametrize("engine,kind", engine_kinds())
def test_init_weights(demo, tmp_path, capsys, no_dassl_loading, engine, kind):
    marker = tmp_path / "marker"
    path = bad_file(kind, str(tmp_path / "shared" / "model-best.pth.tar"), marker)
    args = engine_args(engine, demo, "CoOp", tmp_path / "run", "base", ("--no-train",),
                       ("MODEL.INIT_WEIGHTS", path))
    cli_fails_with_one_line(args, capsys, path, SAYS[kind])
    assert not marker.exists()


@pytest.mark.parametrize("engine,kind", engine_kinds())
def test_promptkd_teacher(demo, tmp_path, capsys, no_dassl_loading, teacher_clip_path, engine,
                          kind):
    from test_train_cli import kd_opts as cli_kd_opts
    marker = tmp_path / "marker"
    path = bad_file(kind, str(tmp_path / "teacher" / "model-best.pth.tar"), marker)
    args = engine_args(engine, demo, "PromptKD", tmp_path / "run", "base", ("--no-train",),
                       cli_kd_opts(path, teacher_clip_path))
    cli_fails_with_one_line(args, capsys, path, SAYS[kind])
    assert not marker.exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_backbone_weights(demo, tmp_path, capsys, no_dassl_loading, engine):
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "clip.pt", marker)
    args = engine_args(engine, demo, "CoOp", tmp_path / "run", "base", ("--no-train",),
                       ("MODEL.BACKBONE.PATH", path))
    cli_fails_with_one_line(args, capsys, path, SAYS["hostile"])
    assert not marker.exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_hostile_fewshot_cache_in_the_dataset_folder(tmp_path, engine, no_dassl_loading, caplog):
    """The run draws the split in memory, trains, and leaves the file as it found it."""
    data = prepare(str(tmp_path / "demo"))
    marker = tmp_path / "marker"
    path = fewshot_cache_path(os.path.join(data["root"], "synthetic_shapes"), 2, 1)
    hostile_cache(path, marker)
    before = open(path, "rb").read()
    out = tmp_path / "run"
    assert main(engine_args(engine, data, "CoOp", out, "base", (),
                            ("OPTIM.MAX_EPOCH", "1", "DATASET.NUM_SHOTS", "2"))) == 0
    assert not marker.exists() and open(path, "rb").read() == before
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"Not using the few-shot cache {path}: it holds {SYSTEM}" in m for m in said)
    assert "* accuracy:" in (out / "log.txt").read_text(encoding="utf-8")  # and it trained
