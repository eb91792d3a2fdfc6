"""A run killed with SIGKILL (a real signal to a real `python -m textrefiner.train` process), then
resumed into another folder (`--output-dir B --resume A`) and into its own folder, ends with the
same final checkpoints (weights, cache, optimiser), the same best model and the same test accuracy
as an uninterrupted run, on both engines, with TEST.FINAL_MODEL last_step and best_val, with and
without --refiner. The run kills itself at a chosen point (TEXTREFINER_KILL_AT,
textrefiner/faults.py), so the killed state is the same on any machine: right after epoch 1's
checkpoints are saved ("between epochs") and right after the optimiser step of epoch 2's second
batch ("inside an epoch")."""
import hashlib
import importlib.util
import os
import subprocess

import pytest
import torch

from conftest import run_killed
from textrefiner.checkpoint import read_checkpoint
from textrefiner.results import read_accuracy
from textrefiner.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DASSL = importlib.util.find_spec("dassl") is not None
DASSL = pytest.param("dassl", marks=pytest.mark.skipif(not HAS_DASSL,
                                                       reason="Dassl.pytorch is not installed"))
EPOCHS = 3
FOLDER = "prompt_learner"
KILL_AT = {"between": "epoch=1", "inside": "epoch=2,batch=2"}  # TEXTREFINER_KILL_AT
# Each engine sees every (TEST.FINAL_MODEL, --refiner) pair and both kill points; the two engines
# together cover all eight combinations.
CASES = {
    "standalone": [("best_val", True, "between"), ("last_step", False, "inside"),
                   ("best_val", False, "inside"), ("last_step", True, "between")],
    "dassl": [("best_val", False, "between"), ("last_step", True, "inside"),
              ("best_val", True, "inside"), ("last_step", False, "between")],
}


def command(demo, out, engine, final_model, refiner, extra=()):
    args = ["--engine", engine, "--root", demo["root"], "--trainer", "CoOp", "--seed", "1",
            "--dataset-config-file", "configs/datasets/synthetic_shapes.yaml",
            "--config-file", "configs/trainers/CoOp/demo_cpu.yaml",
            "--output-dir", str(out)] + (["--refiner"] if refiner else []) + list(extra)
    opts = ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "2",
            "DATASET.SUBSAMPLE_CLASSES", "base", "DATALOADER.TRAIN_X.BATCH_SIZE", "2",
            "OPTIM.MAX_EPOCH", str(EPOCHS), "TEST.FINAL_MODEL", final_model]
    return args + opts  # no TRAIN.CHECKPOINT_FREQ: every epoch leaves a checkpoint on both engines


def final_tests(out):
    """The lines of the last test-set evaluation in log.txt."""
    with open(os.path.join(str(out), "log.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Evaluate on the *test*"))
    return [line for line in lines[start:] if line.startswith("* ")]


def assert_same(a, b, where):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_files(out, reference, required):
    """Every checkpoint file in `out` equals the uninterrupted run's; the `required` ones exist."""
    names = set(os.listdir(os.path.join(str(out), FOLDER)))
    assert required <= names <= set(os.listdir(os.path.join(str(reference), FOLDER))), names
    for name in names:
        path, ref = (os.path.join(str(d), FOLDER, name) for d in (out, reference))
        if name == "checkpoint":  # Dassl's marker naming the latest checkpoint
            assert open(path).read() == open(ref).read()
        else:
            assert_same(read_checkpoint(path), read_checkpoint(ref), f"{out}/{name}")


def finished(out) -> bool:
    """scripts/common.sh's test of a finished run (its scripts skip those)."""
    check = subprocess.run(["bash", "-c", 'source scripts/common.sh && finished "$0"', str(out)],
                           cwd=REPO)
    return check.returncode == 0


def digests(folder):
    return {os.path.relpath(os.path.join(root, f), folder):
            hashlib.sha256(open(os.path.join(root, f), "rb").read()).hexdigest()
            for root, _, files in os.walk(folder) for f in files}


@pytest.mark.parametrize("engine,final_model,refiner,kill_at", [
    pytest.param(engine, *case, marks=() if engine == "standalone" else DASSL.marks,
                 id=f"{engine}-{case[0]}-{'refiner' if case[1] else 'plain'}-{case[2]}")
    for engine, cases in CASES.items() for case in cases])
def test_killed_run_resumes_like_an_uninterrupted_one(demo, tmp_path, engine, final_model,
                                                      refiner, kill_at):
    killed, other, straight = tmp_path / "A", tmp_path / "B", tmp_path / "straight"
    output = run_killed(command(demo, killed, engine, final_model, refiner), KILL_AT[kill_at],
                        REPO)
    saved = set(os.listdir(killed / FOLDER))
    assert {"model.pth.tar-1", "checkpoint"} <= saved <= {"model.pth.tar-1", "checkpoint",
                                                           "model-best.pth.tar"}, saved
    if kill_at == "inside":  # epoch 2's first batch ran and printed; its second one did not print
        assert f"epoch [2/{EPOCHS}] batch [1/" in output
        assert f"epoch [2/{EPOCHS}] batch [2/" not in output
    else:
        assert "epoch [2/" not in output
    assert ("model-best.pth.tar" in saved) == (final_model == "best_val")
    before = digests(killed / FOLDER)
    assert not finished(killed), "scripts/common.sh must rerun (resume) a killed run"
    assert read_accuracy(killed / "log.txt") is None, "a validation result is no test result"

    assert main(command(demo, other, engine, final_model, refiner,
                        extra=("--resume", str(killed)))) == 0
    assert digests(killed / FOLDER) == before, "resuming from A must leave A as it was"
    assert main(command(demo, killed, engine, final_model, refiner)) == 0
    assert main(command(demo, straight, engine, final_model, refiner)) == 0

    required = {f"model.pth.tar-{EPOCHS}", "checkpoint"}
    if final_model == "best_val":
        required.add("model-best.pth.tar")
    final = read_checkpoint(str(straight / FOLDER / f"model.pth.tar-{EPOCHS}"))["state_dict"]
    assert ("refiner.cache.entries" in final) == refiner
    for out in (other, killed):
        assert finished(out)
        assert read_accuracy(out / "log.txt") == read_accuracy(straight / "log.txt") is not None
        assert_same_files(out, straight, required)
        assert final_tests(out) == final_tests(straight)
    other_log = (other / "log.txt").read_text()
    assert ("Carried the best checkpoint" in other_log) == (final_model == "best_val")
    assert "Carried" not in (killed / "log.txt").read_text()
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(other / FOLDER):
        assert os.stat(other / FOLDER / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_best_val_without_a_best_model_names_the_options(demo, tmp_path, capsys):
    """A finished last_step run resumed with best_val has no best model: the error says where it
    looked in terms of --output-dir and --resume."""
    first, second = tmp_path / "A", tmp_path / "B"
    assert main(command(demo, first, "standalone", "last_step", False)) == 0
    capsys.readouterr()
    assert main(command(demo, second, "standalone", "best_val", False,
                        extra=("--resume", str(first)))) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {second}" in err and f"--resume {first}" in err, err
    assert "--model-dir" not in err


@pytest.mark.parametrize("engine", ["standalone", DASSL])
def test_resume_from_a_folder_without_checkpoints_is_exit_2(demo, tmp_path, capsys, engine):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        assert main(command(demo, tmp_path / "out", engine, "last_step", False,
                            extra=("--resume", str(where)))) == 2
        assert f"--resume {where}" in capsys.readouterr().err
    assert not (tmp_path / "out" / FOLDER).exists()


@pytest.mark.parametrize("engine", [DASSL])
def test_resume_marker_naming_a_missing_checkpoint_is_exit_2(demo, tmp_path, capsys, engine):
    marker = tmp_path / "A" / FOLDER / "checkpoint"
    marker.parent.mkdir(parents=True)
    marker.write_text("model.pth.tar-5\n")
    assert main(command(demo, tmp_path / "B", engine, "last_step", False,
                        extra=("--resume", str(tmp_path / "A")))) == 2
    err = capsys.readouterr().err
    assert "model.pth.tar-5" in err and "--model-dir" not in err, err


def test_best_result_of_checkpoints_written_by_dassl_itself(tmp_path):
    """Dassl's own checkpoints carry no best result: it is read from model-best's val_result."""
    from textrefiner.checkpoint import restored_best_result, write_checkpoint

    latest = {"state_dict": {}, "epoch": 3, "val_result": None}
    assert restored_best_result(latest, str(tmp_path), FOLDER) == float("-inf")
    write_checkpoint({"state_dict": {}, "epoch": 2, "val_result": 42.5},
                     str(tmp_path / FOLDER / "model-best.pth.tar"))
    assert restored_best_result(latest, str(tmp_path), FOLDER) == 42.5
    assert restored_best_result(dict(latest, best_result=50.0), str(tmp_path), FOLDER) == 50.0
