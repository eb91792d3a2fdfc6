"""scripts/*.sh driven with a fake python that records its arguments and writes fake logs."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))

# Stands in for `python`: `-m textrefiner.train` is recorded and leaves a log.txt with an accuracy
# of 80+seed (training / base) or 60+seed (evaluation on new classes); `-m textrefiner.results`
# runs the real module, loaded by path so the package's heavy imports are skipped.
FAKE_PYTHON = """import importlib.util, json, os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "textrefiner.results"]:
    spec = importlib.util.spec_from_file_location("results", {results!r})
    module = sys.modules["results"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.exit(module.main(args[2:]))
if args[:2] != ["-m", "textrefiner.train"]:
    os.execv({python!r}, [{python!r}] + args)
with open(os.environ["FAKE_RECORD"], "a") as f:
    f.write(json.dumps(args[2:]) + "\\n")
out = args[args.index("--output-dir") + 1]
seed = int(args[args.index("--seed") + 1])
acc = 60 + seed if "new" in args else 80 + seed
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "log.txt"), "w") as f:
    f.write("=> result\\n* total: 100\\n* accuracy: %.1f%%\\n* error: 1.0%%\\n" % acc)
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def fake(tmp_path):
    code = tmp_path / "fake_python.py"
    code.write_text(FAKE_PYTHON.format(python=sys.executable, results=str(REPO / "textrefiner/results.py")))
    # a shell stub, not a #! line naming this Python: a #! line cannot hold a path with a space
    stub = tmp_path / "fake_python"
    stub.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(code))} \"$@\"\n")
    stub.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    env = dict(os.environ, PYTHON=str(stub), FAKE_RECORD=str(record),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def run(script, *args, ok=True, **environ):
        proc = subprocess.run(["bash", f"scripts/{script}", *args], cwd=REPO, env={**env, **environ},
                              capture_output=True, text=True, timeout=HANG_TIMEOUT)
        if ok:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def calls():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    run.calls = calls
    return run


def opt(args, name):
    return args[args.index(name) + 1]


def overrides(args):
    """Trailing KEY VALUE pairs as a dict."""
    keys = [i for i, a in enumerate(args) if a.isupper() or ("." in a and a.split(".")[0].isupper())]
    return {args[i]: args[i + 1] for i in keys}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow  # two pytest runs beside busy loops
def test_busy_tests_runs_pytest_twice_beside_busy_loops_and_stops_them():
    env = dict(os.environ, PYTHON=sys.executable, BUSY="2", KERNELS="1")  # the defaults
    selection = ["tests/test_faults.py", "-k", "values_read", "-n", "0"]  # one process: 3 tests
    proc = subprocess.run(["bash", "scripts/busy_tests.sh", *selection], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("3 passed") == 2 and "ATEN_CPU_CAPABILITY=default" in proc.stdout
    pids = proc.stdout.split("(pids ", 1)[1].split(")", 1)[0].split()
    assert len(pids) == 2 and not any(alive(int(pid)) for pid in pids)
    failing = subprocess.run(["bash", "scripts/busy_tests.sh", *selection, "-k", "no_such_test"],
                             cwd=REPO, env=dict(env, BUSY="1", KERNELS="0"),
                             capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert failing.returncode != 0 and "again under" not in failing.stdout


def test_base2new_commands_and_summary(fake, tmp_path):
    out = tmp_path / "out"
    proc = fake("base2new.sh", "CoOp", "dtd", "--refiner", "--seeds", "1 2", "--root", "/data", "--out", str(out),
                "OPTIM.MAX_EPOCH", "3")
    calls = fake.calls()
    assert len(calls) == 4
    train, test = calls[0], calls[1]
    common = out / "base2new/{}/dtd/shots_16/CoOp+TR/vit_b16_ep10_ctxv1/seed1"
    assert opt(train, "--trainer") == "CoOp" and opt(train, "--root") == "/data" and opt(train, "--seed") == "1"
    assert opt(train, "--dataset-config-file") == "configs/datasets/dtd.yaml"
    assert opt(train, "--config-file") == "configs/trainers/CoOp/vit_b16_ep10_ctxv1.yaml"
    assert opt(train, "--output-dir") == str(common).format("train_base")
    assert "--refiner" in train and "--eval-only" not in train
    assert overrides(train) == {"DATASET.NUM_SHOTS": "16", "DATASET.SUBSAMPLE_CLASSES": "base", "OPTIM.MAX_EPOCH": "3"}
    assert opt(test, "--output-dir") == str(common).format("test_new")
    assert opt(test, "--model-dir") == str(common).format("train_base")
    assert opt(test, "--load-epoch") == "3" and "--eval-only" in test and "--refiner" in test
    assert overrides(test)["DATASET.SUBSAMPLE_CLASSES"] == "new"
    assert opt(calls[2], "--seed") == "2"
    # base (81 + 82) / 2, novel (61 + 62) / 2, HM = 2 * 81.5 * 61.5 / 143
    assert "dtd CoOp+TR (vit_b16_ep10_ctxv1, 16 shots): base 81.50  novel 61.50  HM 70.10  (seeds: 2)" in proc.stdout


def test_base2new_on_a_folder_of_ones_own_images(fake, tmp_path):
    photos = tmp_path / "my_pets"
    (photos / "cat").mkdir(parents=True)
    out = tmp_path / "out"
    proc = fake("base2new.sh", "CoOp", str(photos), "--seeds", "1", "--out", str(out))
    train, test = fake.calls()
    assert opt(train, "--dataset-config-file") == "configs/datasets/image_folder.yaml"
    for args in (train, test):
        assert overrides(args)["DATASET.FOLDER"] == str(photos)
    assert opt(train, "--output-dir") == str(
        out / "base2new/train_base/my_pets/shots_16/CoOp/vit_b16_ep10_ctxv1/seed1")
    assert "my_pets CoOp (vit_b16_ep10_ctxv1, 16 shots): base 81.00  novel 61.00" in proc.stdout
    # PromptKD's teacher is looked for under the folder's name
    fake("base2new.sh", "PromptKD", str(photos), "--seeds", "1", "--out", str(tmp_path / "kd"))
    assert overrides(fake.calls()[2])["TRAINER.PROMPTKD.TEACHER_CKPT"] == (
        "teacher_model/my_pets/VLPromptLearner/model-best.pth.tar")
    # neither a dataset nor a folder: one line saying both
    proc = fake("base2new.sh", "CoOp", str(tmp_path / "nope"), "--out", str(out), ok=False)
    assert proc.returncode != 0 and "and no folder" in proc.stderr
    assert "image_folder" in proc.stderr and "(or a folder of class folders)" in proc.stderr


def test_base2new_skips_finished_runs(fake, tmp_path):
    out = tmp_path / "out"
    args = ("CoOp", "eurosat", "--seeds", "1 2", "--out", str(out), "OPTIM.MAX_EPOCH", "2")
    fake("base2new.sh", *args)
    assert len(fake.calls()) == 4
    proc = fake("base2new.sh", *args)
    assert len(fake.calls()) == 4 and proc.stdout.count("skip (finished)") == 4

    log = out / "base2new/test_new/eurosat/shots_16/CoOp/vit_b16_ep10_ctxv1/seed2/log.txt"
    log.write_text("epoch [1/2] crashed\n")  # an unfinished run is redone
    fake("base2new.sh", *args)
    calls = fake.calls()
    assert len(calls) == 5 and opt(calls[-1], "--output-dir") == str(log.parent) and "--eval-only" in calls[-1]


def test_promptkd_options(fake, tmp_path):
    fake("base2new.sh", "PromptKD", "dtd", "--refiner", "--seeds", "1", "--out", str(tmp_path / "o"))
    train, test = fake.calls()
    # trains on all classes whatever SUBSAMPLE_CLASSES says; "base" makes its final test score
    # the base classes, so the train log ends with the base accuracy
    assert overrides(train) == {"DATASET.NUM_SHOTS": "0", "TRAINER.MODAL": "base2novel",
                                "TRAINER.PROMPTKD.KD_WEIGHT": "200",
                                "DATASET.SUBSAMPLE_CLASSES": "base",
                                "TRAINER.PROMPTKD.TEACHER_CKPT": "teacher_model/"
                                "DescribableTextures/VLPromptLearner/model-best.pth.tar"}
    assert overrides(test)["DATASET.SUBSAMPLE_CLASSES"] == "new"
    assert "shots_0/PromptKD+TR/vit_b16_c2_ep20_batch8_4+4ctx" in opt(train, "--output-dir")
    fake("base2new.sh", "PromptKD", "caltech101", "--seeds", "1", "--out", str(tmp_path / "o"),
         "TRAINER.PROMPTKD.TEACHER_CKPT", "mine.pth.tar")
    third = overrides(fake.calls()[2])
    assert third["TRAINER.PROMPTKD.KD_WEIGHT"] == "1000"
    assert third["TRAINER.PROMPTKD.TEACHER_CKPT"] == "mine.pth.tar"  # given: not defaulted


def test_zeroshot_evaluates_base_and_new(fake, tmp_path):
    proc = fake("base2new.sh", "ZeroshotCLIP", "oxford_pets", "--seeds", "1", "--out", str(tmp_path / "o"))
    base, new = fake.calls()
    assert "--eval-only" in base and "--eval-only" in new and "--model-dir" not in base + new
    assert overrides(base)["DATASET.SUBSAMPLE_CLASSES"] == "base" and overrides(new)["DATASET.SUBSAMPLE_CLASSES"] == "new"
    assert opt(base, "--config-file") == "configs/trainers/ZeroshotCLIP/vit_b16.yaml"
    assert "base 81.00  novel 61.00" in proc.stdout


def test_bad_arguments(fake, tmp_path):
    proc = fake("base2new.sh", "NoSuchTrainer", "dtd", "--out", str(tmp_path), ok=False)
    assert proc.returncode != 0 and "unknown trainer" in proc.stderr
    proc = fake("base2new.sh", "ZeroshotCLIP", "dtd", "--refiner", "--out", str(tmp_path), ok=False)
    assert proc.returncode != 0 and "nothing to refine" in proc.stderr
    assert fake.calls() == []


def test_xd_trains_on_imagenet_and_tests_targets(fake, tmp_path):
    out = tmp_path / "out"
    proc = fake("xd.sh", "CoOp", "--refiner", "--seeds", "1", "--out", str(out), "--targets", "dtd imagenetv2",
                "OPTIM.MAX_EPOCH", "5")
    train, *tests = fake.calls()
    assert opt(train, "--dataset-config-file") == "configs/datasets/imagenet.yaml"
    assert opt(train, "--output-dir") == str(out / "xd/train/imagenet/shots_16/CoOp+TR/vit_b16_ep10_ctxv1/seed1")
    assert overrides(train)["DATASET.NUM_SHOTS"] == "16" and "--refiner" in train
    assert [opt(t, "--dataset-config-file") for t in tests] == ["configs/datasets/dtd.yaml",
                                                                "configs/datasets/imagenetv2.yaml"]
    assert all(opt(t, "--model-dir") == opt(train, "--output-dir") and opt(t, "--load-epoch") == "5" for t in tests)
    assert "| Method | ImageNet | DTD | -V2 | Seeds |" in proc.stdout
    assert "| CoOp+TR | 81.00 | 81.00 | 81.00 | 1 |" in proc.stdout


def test_xd_maple_uses_cross_dataset_config(fake, tmp_path):
    fake("xd.sh", "MaPLe", "--seeds", "1", "--out", str(tmp_path / "o"), "--targets", "imagenet_a")
    train, test = fake.calls()
    assert opt(train, "--config-file") == "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml"
    assert opt(test, "--load-epoch") == "2"  # MAX_EPOCH read from that config file


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_cocoop_base2new_and_xd(fake, tmp_path, refiner):
    flag = ["--refiner"] if refiner else []
    label = "CoCoOp+TR" if refiner else "CoCoOp"
    cfg = "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"
    proc = fake("base2new.sh", "CoCoOp", "eurosat", *flag, "--seeds", "1", "--out", str(tmp_path / "o"))
    train, test = fake.calls()
    assert opt(train, "--trainer") == "CoCoOp" and opt(train, "--config-file") == cfg
    assert ("--refiner" in train) == refiner and ("--refiner" in test) == refiner
    assert f"shots_16/{label}/vit_b16_c4_ep10_batch1_ctxv1/seed1" in opt(train, "--output-dir")
    assert overrides(train) == {"DATASET.NUM_SHOTS": "16", "DATASET.SUBSAMPLE_CLASSES": "base"}
    assert opt(test, "--load-epoch") == "10" and overrides(test)["DATASET.SUBSAMPLE_CLASSES"] == "new"
    assert f"eurosat {label} (vit_b16_c4_ep10_batch1_ctxv1, 16 shots): base 81.00  novel 61.00" in proc.stdout

    proc = fake("xd.sh", "CoCoOp", *flag, "--seeds", "1", "--out", str(tmp_path / "x"), "--targets", "dtd")
    xd_train, xd_test = fake.calls()[2:]
    assert opt(xd_train, "--config-file") == cfg and opt(xd_test, "--load-epoch") == "10"
    assert ("--refiner" in xd_train) == refiner and ("--refiner" in xd_test) == refiner
    assert f"| {label} | 81.00 | 81.00 | 1 |" in proc.stdout


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_promptsrc_base2new_and_xd(fake, tmp_path, refiner):
    flag = ["--refiner"] if refiner else []
    label = "PromptSRC+TR" if refiner else "PromptSRC"
    out = tmp_path / "o"
    proc = fake("base2new.sh", "PromptSRC", "dtd", *flag, "--seeds", "1", "--out", str(out))
    train, test = fake.calls()
    assert opt(train, "--config-file") == "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml"
    assert overrides(train) == {"DATASET.NUM_SHOTS": "16", "DATASET.SUBSAMPLE_CLASSES": "base"}
    assert opt(test, "--load-epoch") == "20" and ("--refiner" in train) == refiner == ("--refiner" in test)
    assert f"shots_16/{label}/vit_b16_c2_ep20_batch4_4+4ctx" in opt(train, "--output-dir")
    assert f"dtd {label} (vit_b16_c2_ep20_batch4_4+4ctx, 16 shots): base 81.00  novel 61.00" in proc.stdout

    proc = fake("xd.sh", "PromptSRC", *flag, "--seeds", "1", "--out", str(out), "--targets", "dtd")
    xd_train, xd_test = fake.calls()[2:]
    cfg = "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml"
    assert opt(xd_train, "--config-file") == cfg and opt(xd_test, "--load-epoch") == "20"
    assert f"| {label} | 81.00 | 81.00 | 1 |" in proc.stdout


def test_teacher_script_trains_promptsrc_l14_and_places_the_checkpoint(fake, tmp_path):
    out, teachers = tmp_path / "o", tmp_path / "teachers"
    run_dir = out / "teachers/dtd/shots_16/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx/seed1"
    (run_dir / "VLPromptLearner").mkdir(parents=True)
    (run_dir / "VLPromptLearner" / "model.pth.tar-3").write_text("weights of epoch 3")
    proc = fake("teacher.sh", "dtd", "--out", str(out), "OPTIM.MAX_EPOCH", "3", TEACHERS=str(teachers))
    (train,) = fake.calls()
    assert opt(train, "--trainer") == "PromptSRC" and "--refiner" not in train
    assert opt(train, "--config-file") == "configs/trainers/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx.yaml"
    assert overrides(train) == {"DATASET.NUM_SHOTS": "16", "DATASET.SUBSAMPLE_CLASSES": "base",
                                "OPTIM.MAX_EPOCH": "3"}
    placed = teachers / "DescribableTextures" / "VLPromptLearner" / "model-best.pth.tar"
    assert placed.read_text() == "weights of epoch 3" and str(placed) in proc.stdout
    assert fake("teacher.sh", "dtd", "--refiner", "--out", str(out), ok=False).returncode != 0


@pytest.mark.parametrize("script, args", [("base2new.sh", ("CoOp", "dtd", "--seeds", "1")),
                                          ("xd.sh", ("CoOp", "--seeds", "1", "--targets", "dtd"))])
def test_feature_store_variable_reaches_every_run(fake, tmp_path, script, args):
    fake(script, *args, "--out", str(tmp_path / "out"), FEATURE_STORE=str(tmp_path / "store"))
    calls = fake.calls()
    assert len(calls) == 2
    assert all(opt(call, "--feature-store") == str(tmp_path / "store") for call in calls)
    fake(script, *args, "--out", str(tmp_path / "out2"))
    assert not any("--feature-store" in call for call in fake.calls()[2:])


@pytest.mark.parametrize("script, args", [("base2new.sh", ("CoOp", "dtd", "--seeds", "1")),
                                          ("xd.sh", ("CoOp", "--seeds", "1", "--targets", "dtd"))])
def test_engine_variable_reaches_every_run(fake, tmp_path, script, args):
    fake(script, *args, "--out", str(tmp_path / "out"), ENGINE="standalone")
    calls = fake.calls()
    assert len(calls) == 2 and all(opt(call, "--engine") == "standalone" for call in calls)
    fake(script, *args, "--out", str(tmp_path / "out2"))
    assert not any("--engine" in call for call in fake.calls()[2:])


def test_demo_runs_the_demo_sweep_and_leaves_the_engine_to_the_user():
    """The engines give the same run (tests/test_codebase_runs.py), so the demo pins none."""
    script = (REPO / "scripts" / "demo.sh").read_text()
    spec = (REPO / "textrefiner" / "sweep" / "specs" / "demo.yaml").read_text()
    assert "textrefiner.sweep.cli demo" in script
    assert "ENGINE=" not in script and "engine:" not in spec
