"""Failure modes of a run: interrupted saves, corrupt or mismatched checkpoints, kills and resumes,
reproducibility, non-finite tokens, and the user mistakes that must be an exit code 2 with a message
naming what to fix."""
import glob
import os
import shutil
import signal
import urllib.error

import pytest
import torch

from conftest import kill_after_first_epoch
from textrefiner import clip_backbone
from textrefiner._compat import import_clip
from textrefiner.checkpoint import read_checkpoint, write_checkpoint
from textrefiner.demo import prepare
from textrefiner.errors import UserError
from textrefiner.refiner import LocalCache
from textrefiner.train import main, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET_CFG = "configs/datasets/synthetic_shapes.yaml"
DEMO_CFG = "configs/trainers/CoOp/demo_cpu.yaml"
MAPLE_OPTS = ("TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", "2")


def command(demo, out, *opts, trainer="CoOp", refiner=True, seed=1, shots=2, epochs=2,
            classes="base", extra=()):
    args = ["--engine", "standalone", "--root", demo["root"], "--trainer", trainer,
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
    with pytest.raises(OSError, match="disk full"):
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
RESUME_OPTS = ("DATALOADER.TRAIN_X.BATCH_SIZE", "1")
RESUME_SHOTS = 8  # 40 single-image steps per epoch: long enough to kill the run mid-training


def test_d_killed_run_resumes_to_the_same_result(demo, tmp_path):
    killed = tmp_path / "killed"
    args = command(demo, killed, *RESUME_OPTS, shots=RESUME_SHOTS, epochs=3)
    still_running, returncode = kill_after_first_epoch(args, killed / "prompt_learner", REPO)
    assert still_running, "the run finished before it could be killed"
    assert not (killed / "prompt_learner" / "model.pth.tar-3").exists()
    assert returncode == -signal.SIGKILL
    snapshot = tmp_path / "snapshot"
    shutil.copytree(str(killed), str(snapshot))

    # The same command again continues in its output dir ...
    assert main(args) == 0
    # ... and --resume continues from another folder.
    resumed = tmp_path / "resumed"
    assert main(command(demo, resumed, *RESUME_OPTS, shots=RESUME_SHOTS, epochs=3,
                        extra=("--resume", str(snapshot)))) == 0
    with open(resumed / "log.txt", encoding="utf-8") as f:
        assert "Resumed from epoch" in f.read()

    straight = tmp_path / "straight"
    assert main(command(demo, straight, *RESUME_OPTS, shots=RESUME_SHOTS, epochs=3)) == 0
    reference = state_of(straight, epoch=3)
    for out in (killed, resumed):
        assert_same_tensors(state_of(out, epoch=3), reference)
        assert result_block(out) == result_block(straight)


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
