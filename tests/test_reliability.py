"""Failure modes of a run: interrupted saves, corrupt or mismatched checkpoints, kills and resumes,
reproducibility, non-finite tokens, and the user mistakes that must be an exit code 2 with a message
naming what to fix."""
import errno
import glob
import importlib.util
import os
import shutil
import urllib.error

import pytest
import torch

from textrefiner import clip_backbone
from textrefiner._compat import import_clip
from textrefiner.checkpoint import read_checkpoint, write_checkpoint
from textrefiner.demo import prepare
from textrefiner.errors import OutputError, UserError
from textrefiner.refiner import LocalCache
from textrefiner.train import main, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET_CFG = "configs/datasets/synthetic_shapes.yaml"
DEMO_CFG = "configs/trainers/CoOp/demo_cpu.yaml"
MAPLE_OPTS = ("TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", "2")
NEEDS_DASSL = pytest.mark.skipif(importlib.util.find_spec("dassl") is None,
                                 reason="Dassl.pytorch is not installed")
ENGINES = ["standalone", pytest.param("dassl", marks=NEEDS_DASSL)]
EVERY_EPOCH = ("TRAIN.CHECKPOINT_FREQ", "1")  # Dassl saves every epoch too, as the standalone


def command(demo, out, *opts, trainer="CoOp", refiner=True, seed=1, shots=2, epochs=2,
            classes="base", extra=(), engine="standalone"):
    args = ["--engine", engine, "--root", demo["root"], "--trainer", trainer,
            "--seed", str(seed), "--dataset-config-file", os.path.join(REPO, DATASET_CFG),
            "--config-file", os.path.join(REPO, DEMO_CFG), "--output-dir", str(out)]
    args += (["--refiner"] if refiner else []) + list(extra)
    args += ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", str(shots),
             "DATASET.SUBSAMPLE_CLASSES", classes, "OPTIM.MAX_EPOCH", str(epochs)]
    return args + list(opts)


def result_block(out):
    """The evaluation lines (`* total:` ... `* macro_f1:`) of the last evaluation in log.txt."""
    with open(os.path.join(str(out), "log.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("* total:")]
    assert starts, "no evaluation in log.txt"
    return [line for line in lines[starts[-1]:starts[-1] + 5] if line.startswith("* ")]


def state_of(out, name="prompt_learner", epoch=2):
    return read_checkpoint(os.path.join(str(out), name, f"model.pth.tar-{epoch}"))["state_dict"]


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def coop_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("coop_seed1")
    assert main(command(demo, out)) == 0
    return out


@pytest.fixture(scope="module")
def maple_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("maple")
    assert main(command(demo, out, *MAPLE_OPTS, trainer="MaPLe")) == 0
    return out


# ------------------------------------------------------------------------------ (a) atomic saves
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch, existing):
    target = tmp_path / "prompt_learner" / "model.pth.tar-1"
    if existing:
        write_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, str(target))
        before = target.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OutputError, match="disk full"):
        write_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, str(target))
    monkeypatch.setattr(torch, "save", real_save)
    if existing:
        assert target.read_bytes() == before
        assert torch.equal(read_checkpoint(str(target))["state_dict"]["w"], torch.ones(3))
    else:
        assert not target.exists()
    assert os.listdir(target.parent) == (["model.pth.tar-1"] if existing else [])


def test_a_save_interrupted_by_keyboard_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint({"epoch": 1}, str(tmp_path / "model.pth.tar-1"))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ (b) bad checkpoints
def test_b_truncated_checkpoint_is_a_user_error(tmp_path):
    path = str(tmp_path / "model.pth.tar-1")
    write_checkpoint({"state_dict": {"w": torch.randn(64, 64)}, "epoch": 1}, path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        read_checkpoint(path)
    with open(path, "wb") as f:
        f.write(b"")
    with pytest.raises(UserError):
        read_checkpoint(path)


def test_b_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(str(tmp_path / "nothing.pth"))


def test_b_eval_from_a_corrupt_checkpoint_is_exit_2(demo, coop_run, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(str(coop_run), str(model_dir))
    path = model_dir / "prompt_learner" / "model.pth.tar-2"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    args = command(demo, tmp_path / "new", classes="new",
                   extra=("--eval-only", "--model-dir", str(model_dir), "--load-epoch", "2"))
    assert main(args) == 2
    assert str(path) in capsys.readouterr().err


def test_b_maple_checkpoint_into_coop_is_exit_2(demo, maple_run, tmp_path, capsys):
    model_dir = tmp_path / "model"
    (model_dir / "prompt_learner").mkdir(parents=True)
    shutil.copy(str(maple_run / "MultiModalPromptLearner" / "model.pth.tar-2"),
                str(model_dir / "prompt_learner" / "model.pth.tar-2"))
    args = command(demo, tmp_path / "new", classes="new", refiner=False,
                   extra=("--eval-only", "--model-dir", str(model_dir), "--load-epoch", "2"))
    assert main(args) == 2
    assert "model.pth.tar-2" in capsys.readouterr().err


def test_b_maple_state_into_coop_model_is_a_user_error(demo, maple_run, tmp_path):
    coop = run(command(demo, tmp_path / "coop", refiner=False, extra=("--no-train",))).model
    with pytest.raises(UserError):
        coop.load_checkpoint_state(state_of(maple_run, "MultiModalPromptLearner"), source="maple")


# ------------------------------------------------------------------------------ (c) determinism
def test_c_same_seed_same_checkpoint_and_accuracy(demo, coop_run, tmp_path):
    again = tmp_path / "again"
    assert main(command(demo, again)) == 0
    assert_same_tensors(state_of(coop_run), state_of(again))
    assert result_block(coop_run) == result_block(again)


def test_c_different_seeds_draw_different_few_shot_subsets(demo, tmp_path):
    draws = {}
    for seed in (1, 2):
        trainer = run(command(demo, tmp_path / f"seed{seed}", seed=seed, extra=("--no-train",)))
        draws[seed] = [item.impath for item in trainer.splits.train_x]
        cache = glob.glob(os.path.join(demo["root"], "synthetic_shapes", "split_fewshot",
                                       f"shot_2-seed_{seed}.pkl"))
        assert cache, "the few-shot draw is cached as in CoOp"
    assert len(draws[1]) == len(draws[2]) == 2 * 5
    assert draws[1] != draws[2]


# ------------------------------------------------------------------------------ (d) kill + resume
# tests/test_resume.py kills real runs with SIGKILL and resumes them on both engines.


# ------------------------------------------------------------------------------ (e) NaN tokens
def test_e_non_finite_tokens_never_reach_the_cache():
    torch.manual_seed(0)
    cache = LocalCache(6, 8)
    tokens = torch.randn(2, 5, 8)
    tokens[0, 1, 3] = float("nan")
    tokens[1, 4, 0] = float("inf")
    tokens[1, 2] = float("-inf")
    assigned = cache.write(tokens)
    assert assigned == 7
    assert cache.skipped_tokens == 3
    assert torch.isfinite(cache.entries).all()
    before = cache.entries.clone()
    assert cache.write(torch.full((4, 8), float("nan"))) == 0
    assert cache.skipped_tokens == 7
    assert torch.equal(cache.entries, before)


# ------------------------------------------------------------------------------ (f)-(i) exit 2
@pytest.mark.parametrize("flag,value,key", [
    ("--cache-size", "0", "CACHE_SIZE"),
    ("--cache-momentum", "1.0", "MOMENTUM"),
    ("--alpha", "-1", "ALPHA"),
    ("--topk", "100", "TOPK"),
])
def test_f_refiner_values_out_of_range_are_exit_2(demo, tmp_path, capsys, flag, value, key):
    out = tmp_path / "out"
    assert main(command(demo, out, extra=(flag, value))) == 2
    err = capsys.readouterr().err
    assert key in err or flag in err, err
    assert not (out / "log.txt").exists()


def test_g_promptkd_without_teacher_checkpoint_is_exit_2(demo, tmp_path, capsys):
    args = command(demo, tmp_path / "out", "TRAINER.PROMPTKD.PREC", "fp32",
                   "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2", "DATASET.NUM_SHOTS", "0",
                   trainer="PromptKD")
    assert main(args) == 2
    assert "TRAINER.PROMPTKD.TEACHER_CKPT" in capsys.readouterr().err


def test_h_clip_weights_absent_offline_is_exit_2(demo, tmp_path, capsys, monkeypatch):
    clip = import_clip()

    def offline(url, root, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(clip.clip, "_download", offline)
    monkeypatch.setattr(clip_backbone, "clip_cache_dir", lambda: str(tmp_path / "clip_cache"))
    args = command(demo, tmp_path / "out", "MODEL.BACKBONE.PATH", "", "MODEL.BACKBONE.NAME",
                   "ViT-B/16")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "MODEL.BACKBONE.PATH" in err and "ViT-B/16" in err


def test_i_unreadable_image_is_exit_2_with_its_path(tmp_path, capsys):
    own = prepare(str(tmp_path / "demo"))  # a private copy: this test breaks an image
    images = sorted(glob.glob(os.path.join(own["root"], "synthetic_shapes", "images", "*",
                                           "train_000.png")))
    broken = images[0]
    with open(broken, "wb") as f:
        f.write(b"this is not a png")
    args = command(own, tmp_path / "out", shots=-1, classes="all", epochs=1)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert os.path.join(os.path.basename(os.path.dirname(broken)), "train_000.png") in err, err


# ------------------------------------------------------------------------------ (j) failing runs
# A user error or an environment failure: one clear line, an exit code, nothing saved lost; both
# engines.
def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("textrefiner-train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def checkpoints_left(out):
    """The checkpoint folder's files; each checkpoint loads whole, with finite weights."""
    folder = os.path.join(str(out), "prompt_learner")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names:
        assert not name.startswith(".tmp"), names
        if name.startswith("model"):
            for key, value in read_checkpoint(os.path.join(folder, name))["state_dict"].items():
                assert torch.isfinite(value).all(), (name, key)
    return names


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("precision,lr", [("fp16", "1e6"), ("fp32", "3e4")])
def test_j_divergence_is_one_clear_line(demo, tmp_path, capsys, engine, precision, lr):
    """fp16 used to end in torch's "value cannot be converted to type c10::Half without
    overflow"; fp32 at 3e4 diverges in epoch 2, after epoch 1 was saved."""
    out = tmp_path / "out"
    args = command(demo, out, "TRAINER.COOP.PREC", precision, "OPTIM.LR", lr, *EVERY_EPOCH,
                   "DATALOADER.TRAIN_X.BATCH_SIZE", "2", engine=engine, epochs=3)
    assert main(args) == 2
    line = error_line(capsys)
    assert "lower OPTIM.LR" in line, line
    assert ("instead of fp16" in line) == (precision == "fp16")
    left = checkpoints_left(out)
    assert f"model.pth.tar-3" not in left
    if precision == "fp32":
        assert "model.pth.tar-1" in left


@pytest.mark.parametrize("engine", ENGINES)
def test_j_rerun_with_a_lower_lr_says_where_to_train(demo, tmp_path, capsys, engine):
    """After "lower OPTIM.LR", the same folder would resume at the saved rate: that is an error
    naming the way out, not a silent rerun of the diverging schedule."""
    out = tmp_path / "out"
    assert main(command(demo, out, *EVERY_EPOCH, engine=engine, epochs=1)) == 0
    capsys.readouterr()
    assert main(command(demo, out, "OPTIM.LR", "0.001", *EVERY_EPOCH, engine=engine)) == 2
    line = error_line(capsys)
    assert "OPTIM.LR 0.002" in line and "new --output-dir" in line, line
    assert checkpoints_left(out) == ["checkpoint", "model.pth.tar-1"]


def test_j_diverged_weights_never_replace_a_checkpoint(demo, tmp_path):
    from textrefiner.checkpoint import save_method_checkpoint

    trainer = run(command(demo, tmp_path / "out", refiner=False, extra=("--no-train",)))
    path = str(tmp_path / "model.pth.tar-1")
    save_method_checkpoint(trainer.model, path, 0)
    before = open(path, "rb").read()
    with torch.no_grad():
        trainer.model.prompt_learner.ctx[0, 0] = float("nan")
    with pytest.raises(UserError, match="prompt_learner.ctx.*lower OPTIM.LR|Lower OPTIM.LR"):
        save_method_checkpoint(trainer.model, path, 1)
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("engine", ENGINES)
def test_j_full_disk_while_saving_then_resume(demo, tmp_path, capsys, monkeypatch, engine):
    out, straight = tmp_path / "out", tmp_path / "straight"
    args = command(demo, out, *EVERY_EPOCH, engine=engine)
    real_save = torch.save
    calls = []

    def disk_full_on_second_save(obj, f, *rest, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            f.write(b"the first blocks of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *rest, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    assert main(args) == 1
    line = error_line(capsys)
    assert str(out / "prompt_learner" / "model.pth.tar-2") in line, line
    assert "No space left on device" in line and "run the same command again" in line, line
    assert checkpoints_left(out) == ["checkpoint", "model.pth.tar-1"]
    assert (out / "prompt_learner" / "checkpoint").read_text() == "model.pth.tar-1\n"
    assert (out / "log.txt").read_text().splitlines()[-1] == line  # the log says what happened

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert main(args) == 0
    log = (out / "log.txt").read_text()
    assert "Resumed from epoch 1" in log or "Found checkpoint" in log
    assert main(command(demo, straight, *EVERY_EPOCH, engine=engine)) == 0
    assert_same_tensors(state_of(out), state_of(straight))
    assert result_block(out) == result_block(straight)


@pytest.mark.parametrize("engine", ENGINES)
def test_j_outputs_follow_the_umask(demo, tmp_path, engine):
    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        assert main(command(demo, out, "TEST.FINAL_MODEL", "best_val", engine=engine,
                            epochs=1)) == 0
    finally:
        os.umask(previous)
    files = [os.path.join(root, f) for root, _, names in os.walk(out) for f in names]
    assert any(f.endswith("model-best.pth.tar") for f in files), files
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o640, path


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("engine", ENGINES)
def test_j_full_disk_while_logging_is_one_line(demo, tmp_path, capsys, engine):
    """log.txt on a full disk (a link to /dev/full, where every write fails with ENOSPC)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").symlink_to("/dev/full")
    assert main(command(demo, out, engine=engine, epochs=1)) == 1
    line = error_line(capsys)
    assert str(out / "log.txt") in line and "No space left on device" in line, line


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("blocked", ["output_dir", "tensorboard"])
def test_j_unwritable_outputs_are_one_line(demo, tmp_path, capsys, engine, blocked):
    """A file where the run needs a folder (as a read-only or foreign folder would fail)."""
    if blocked == "output_dir":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "out"
        culprit = out
    else:
        out = tmp_path / "out"
        out.mkdir()
        culprit = out / "tensorboard"
        culprit.write_text("")
    assert main(command(demo, out, engine=engine, epochs=1)) == 1
    line = error_line(capsys)
    assert str(culprit) in line, line


@pytest.mark.parametrize("engine,workers", [
    ("standalone", 0), pytest.param("dassl", 0, marks=NEEDS_DASSL),
    pytest.param("dassl", 2, marks=NEEDS_DASSL)])  # a worker's error loses its errno
def test_j_dataset_unreadable_mid_run_then_resume(demo, tmp_path, capsys, monkeypatch, engine,
                                                  workers):
    from PIL import Image

    out = tmp_path / "out"
    args = command(demo, out, *EVERY_EPOCH, "DATALOADER.NUM_WORKERS", str(workers), engine=engine)
    first = out / "prompt_learner" / "model.pth.tar-1"
    real_open = Image.open

    def unreadable_after_epoch_1(path, *rest, **kwargs):
        if first.exists():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *rest, **kwargs)

    monkeypatch.setattr(Image, "open", unreadable_after_epoch_1)
    assert main(args) == 1
    line = error_line(capsys)
    assert demo["root"] in line and "Permission denied" in line, line
    assert checkpoints_left(out) == ["checkpoint", "model.pth.tar-1"]
    monkeypatch.setattr(Image, "open", real_open)
    assert main(args) == 0
    assert "model.pth.tar-2" in checkpoints_left(out)
