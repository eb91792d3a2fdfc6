"""textrefiner-sweep: specs, the plan, runs through the warm executor bit for bit as alone,
failures, resuming, the report with the paper's numbers."""
import csv
import glob
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from textrefiner.results import read_accuracy
from textrefiner.sweep import cli
from textrefiner.sweep.plan import initial_states, run_finished
from textrefiner.sweep.progress import Progress
from textrefiner.sweep.report import write_report
from textrefiner.errors import UserError
from textrefiner.sweep.spec import expand, load_spec, parse_spec, validate

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1800  # only to stop a hung test
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def write_spec(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def fake_accuracy(run_dir, acc):
    os.makedirs(run_dir, exist_ok=True)
    Path(run_dir, "log.txt").write_text(f"=> result\n* total: 100\n* accuracy: {acc}%\n")


# ----------------------------------------------------------------------------- specs and plans

BAD_SPECS = {
    "unknown dataset 'petz'": "datasets: [petz]\nmethods: [CoOp]\n",
    "unknown method 'CoOpp+TR'": "datasets: [dtd]\nmethods: [CoOpp+TR]\n",
    "TRAINER.REFINER.CACHE_SIZ": "datasets: [dtd]\nmethods: [CoOp+TR]\n"
                                 "grid: {TRAINER.REFINER.CACHE_SIZ: [5, 10]}\n",
    "grid TRAINER.REFINER.ALPHA: empty grid": "datasets: [dtd]\nmethods: [CoOp+TR]\n"
                                              "grid: {TRAINER.REFINER.ALPHA: []}\n",
    "no config file": "datasets: [dtd]\nmethods: [CoOp]\nconfig: vit_b99\n",
    "unknown key 'seed'": "datasets: [dtd]\nmethods: [CoOp]\nseed: [1]\n",
}


@pytest.mark.parametrize("expected", sorted(BAD_SPECS))
def test_a_spec_error_is_one_line_before_anything_runs(tmp_path, capsys, expected):
    spec = write_spec(tmp_path, BAD_SPECS[expected])
    assert cli.main([spec, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("textrefiner-sweep: error:"), err
    assert expected in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_dry_run_counts_runs_finished_and_to_do(tmp_path, capsys):
    out = tmp_path / "t4"
    assert cli.main(["paper-table4", "--out", str(out), "--dry-run"]) == 0
    # 5 lambda1 + 5 lambda2 points share (0.02, 20): 9 settings x 3 seeds x (train, test)
    assert capsys.readouterr().out.splitlines()[-1] == "54 runs in all: 0 finished, 54 to do"
    runs = expand(load_spec("paper-table4"), out)
    fake_accuracy(runs[0].output_dir, 70.0)
    fake_accuracy(runs[1].output_dir, 60.0)
    assert cli.main(["paper-table4", "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "54 runs in all: 2 finished, 52 to do"
    counts = {}
    for name in ("paper-table1", "paper-table2", "paper-table3", "paper-fig4", "paper-fig5",
                 "demo"):
        counts[name] = len(expand(load_spec(name), tmp_path / name))
    # table1: 11 datasets x (zero-shot 1 seed x 2 evaluations + 8 trained methods x 3 x 2 +
    # LLaMP's LLM step); table2: zero-shot on 5 test sets + 6 methods x 3 seeds x (train + 4)
    assert counts == {"paper-table1": 561, "paper-table2": 95, "paper-table3": 30,
                      "paper-fig4": 30, "paper-fig5": 30, "demo": 14}


def test_runs_are_the_scripts_runs(tmp_path):
    runs = expand(load_spec("paper-table3"), tmp_path / "out", root="/data")
    by_key = {r.key: r for r in runs}
    train = by_key["base2new/train_base/imagenet/shots_16/CoOp+TR/vit_b16_ep10_ctxv1@cache/seed2"]
    test = by_key["base2new/test_new/imagenet/shots_16/CoOp+TR/vit_b16_ep10_ctxv1@cache/seed2"]
    assert test.after == train.key and train.after is None
    assert (train.kind, test.kind, train.trainer) == ("train", "test", "CoOp")
    argv = list(test.argv)
    assert argv[argv.index("--model-dir") + 1] == train.output_dir
    assert argv[argv.index("--load-epoch") + 1] == "10" and "--eval-only" in argv
    assert argv[argv.index("--output-dir") + 1] == str(tmp_path / "out" / test.key)
    pairs = dict(zip(argv[-6::2], argv[-5::2]))
    assert pairs == {"DATASET.SUBSAMPLE_CLASSES": "new", "TRAINER.REFINER.SEM_WEIGHT": "0.0",
                     "TRAINER.REFINER.REG_WEIGHT": "0.0"}
    assert "--refiner" in train.argv and "--refiner" not in by_key[
        "base2new/train_base/imagenet/shots_16/CoOp/vit_b16_ep10_ctxv1/seed1"].argv
    assert test.command().startswith("textrefiner-train --root /data --trainer CoOp ")
    assert runs.index(train) < runs.index(test)
    xd = expand(load_spec("paper-table2"), tmp_path / "xd")
    maple = [r for r in xd if r.key.startswith("xd/test/imagenet_a/shots_16/MaPLe+TR/")]
    assert [r.key.split("/")[5] for r in maple] == ["vit_b16_c2_ep5_batch4_2ctx_cross_datasets"] * 3
    assert all(r.after.startswith("xd/train/imagenet/shots_16/MaPLe+TR/") for r in maple)


def test_spec_templates_and_shapes(tmp_path):
    spec = parse_spec({"datasets": ["dtd"], "methods": ["CoOp"], "seeds": [4],
                       "root": "{out}/data", "overrides": {"MODEL.BACKBONE.PATH": "{out}/c.pt",
                                                           "TEST.NO_TEST": True}})
    (run, _) = expand(spec, tmp_path)
    assert run.argv[run.argv.index("--root") + 1] == f"{tmp_path}/data"
    assert run.argv[-4:] == ("MODEL.BACKBONE.PATH", f"{tmp_path}/c.pt", "TEST.NO_TEST", "True")
    assert run.key.endswith("/seed4")


def test_spec_dataset_may_be_a_folder_of_ones_own_images(tmp_path):
    spec = parse_spec({"datasets": ["dtd", "{out}/my_pets"], "methods": ["CoOp", "PromptKD"],
                       "seeds": [1]})
    runs = {r.key: r for r in expand(spec, tmp_path, root="/data")}
    train = runs["base2new/train_base/my_pets/shots_16/CoOp/vit_b16_ep10_ctxv1/seed1"]
    argv = list(train.argv)
    assert argv[argv.index("--dataset-config-file") + 1].endswith("datasets/image_folder.yaml")
    assert argv[argv.index("DATASET.FOLDER") + 1] == f"{tmp_path}/my_pets"
    test = runs["base2new/test_new/my_pets/shots_16/CoOp/vit_b16_ep10_ctxv1/seed1"]
    assert list(test.argv)[list(test.argv).index("DATASET.FOLDER") + 1] == f"{tmp_path}/my_pets"
    kd = list(runs["base2new/train_base/my_pets/shots_0/PromptKD/"
                   "vit_b16_c2_ep20_batch8_4+4ctx/seed1"].argv)
    assert kd[kd.index("TRAINER.PROMPTKD.TEACHER_CKPT") + 1] == (
        "teacher_model/my_pets/VLPromptLearner/model-best.pth.tar")
    assert "DATASET.FOLDER" not in runs[
        "base2new/train_base/dtd/shots_16/CoOp/vit_b16_ep10_ctxv1/seed1"].argv
    # a name that is neither a dataset config nor a path: the one-line error says both
    petz = parse_spec({"datasets": ["petz"], "methods": ["CoOp"]})
    with pytest.raises(UserError, match="unknown dataset 'petz'.*or a folder of your own images"):
        validate(petz, expand(petz, tmp_path))


def test_progress_line_and_estimate():
    runs = expand(parse_spec({"datasets": ["dtd"], "methods": ["CoOp"], "seeds": [1, 2]}), "/o")
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(runs, stream=stream, clock=lambda: now[0])
    progress.started_run(runs[0].key)
    now[0] = 10.0
    progress.ended_run(runs[0].key, ok=True)
    states = {runs[0].key: "finished", runs[1].key: "running", runs[2].key: "queued",
              runs[3].key: "failed"}
    # left: 1 queued + half of 1 running, 10 s each, 1 slot
    assert progress.line(states) == ("[sweep] 1/4 finished, 1 running, 1 queued, 1 failed, "
                                     "about 15 s left")
    progress.update(states)
    assert stream.getvalue() == progress.line(states) + "\n"  # not a terminal: plain lines

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    live = Progress(runs, stream=Terminal())
    live.update(states)
    live.update(states)  # unchanged: not written again
    states[runs[1].key] = "finished"
    live.update(states)
    assert live.stream.getvalue() == (
        "\r[sweep] 1/4 finished, 1 running, 1 queued, 1 failed"
        "\r[sweep] 2/4 finished, 0 running, 1 queued, 1 failed")  # one line, rewritten


# ----------------------------------------------------------------------------- running


def sweep(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "textrefiner.sweep.cli", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "**", "*.pth.tar*"), recursive=True))


def assert_same_outputs(runs_a, runs_b):
    for a, b in zip(runs_a, runs_b):
        assert a.key == b.key
        acc_a = read_accuracy(Path(a.output_dir, "log.txt"))
        assert acc_a is not None and acc_a == read_accuracy(Path(b.output_dir, "log.txt")), a.key
        files_a = [os.path.relpath(f, a.output_dir) for f in checkpoints(a.output_dir)]
        assert files_a == [os.path.relpath(f, b.output_dir) for f in checkpoints(b.output_dir)]
        assert files_a or a.kind == "test", a.key
        for name in files_a:
            state_a = torch.load(os.path.join(a.output_dir, name), weights_only=False)["state_dict"]
            state_b = torch.load(os.path.join(b.output_dir, name), weights_only=False)["state_dict"]
            assert state_a.keys() == state_b.keys()
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), (a.key, name)


@pytest.mark.slow
def test_demo_sweep_is_bit_identical_to_one_process_per_run(tmp_path):
    """The slow one: the demo through the warm executor (--jobs 2) and the same runs, each alone
    in a fresh `python -m textrefiner.train` process, one after another."""
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    done = sweep("demo", "--out", str(warm), "--jobs", "2")
    assert done.returncode == 0, done.stderr
    assert "14/14 finished, 0 running, 0 queued, 0 failed" in done.stderr
    spec = load_spec("demo")
    from textrefiner.demo import prepare_pretrained

    prepare_pretrained(str(cold), log=None)
    cold_runs = expand(spec, cold, feature_store=str(cold / "feature_store"))
    for run in cold_runs:
        alone = subprocess.run([sys.executable, "-m", "textrefiner.train", *run.argv], cwd=REPO,
                               env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        assert alone.returncode == 0, alone.stderr
    warm_runs = expand(spec, warm, feature_store=str(warm / "feature_store"))
    assert_same_outputs(warm_runs, cold_runs)
    md = (warm / "report" / "results.md").read_text()
    assert "| CoOp+TR | 75.00 ± " in md and "### Average" not in md  # README's demo table
    again = sweep("demo", "--out", str(warm), "--dry-run")
    assert again.stdout.splitlines()[-1] == "14 runs in all: 14 finished, 0 to do"


SMALL = """\
protocol: base2new
prepare: demo
root: "{out}/data"
datasets: [synthetic_shapes]
config: demo_tiny
engine: standalone
seeds: [1]
overrides: {OPTIM.MAX_EPOCH: 2}
"""


@pytest.mark.slow
def test_failed_run_is_listed_and_retried(tmp_path):
    """A run that fails for a reason no check before the sweep sees (a damaged CLIP file) fails
    alone."""
    spec = write_spec(tmp_path, SMALL + """\
methods:
  - {method: ZeroshotCLIP, overrides: {MODEL.BACKBONE.PATH: "{out}/clip_tiny.pt"}}
  - {method: CoOp, overrides: {MODEL.BACKBONE.PATH: "{out}/later.pt"}}
""")
    out = tmp_path / "out"
    out.mkdir()
    (out / "later.pt").write_bytes(b"not a checkpoint")
    first = sweep(spec, "--out", str(out))
    assert first.returncode == 1
    train = "base2new/train_base/synthetic_shapes/shots_16/CoOp/demo_tiny/seed1"
    test = "base2new/test_new/synthetic_shapes/shots_16/CoOp/demo_tiny/seed1"
    assert "2/4 finished, 0 running, 0 queued, 1 failed, 1 blocked" in first.stderr
    lines = first.stderr.splitlines()
    at = lines.index(f"FAILED {train}")
    assert lines[at + 1].startswith("  error: textrefiner-train: error: ")
    assert "later.pt" in lines[at + 1]
    assert lines[at + 2] == f"  log: {out / train / 'sweep.log'}"
    assert lines[at + 3].startswith("  rerun: textrefiner-train --root ")
    assert f"BLOCKED {test}: not run: its training run {train} failed" in lines
    # the printed command redoes the run by hand, exactly
    assert f"--output-dir {out / train} " in lines[at + 3]

    again = sweep(spec, "--out", str(out))  # failed runs stay failed until --retry-failed
    assert again.returncode == 1 and "1 failed, 1 blocked" in again.stderr
    os.replace(out / "clip_tiny.pt", out / "later.pt")  # the sweep writes clip_tiny.pt again
    retried = sweep(spec, "--out", str(out), "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert "4/4 finished, 0 running, 0 queued, 0 failed" in retried.stderr
    runs = expand(load_spec(spec), out)
    assert all(run_finished(r) for r in runs)
    assert initial_states(runs) == {r.key: "skipped" for r in runs}


def test_missing_datasets_and_weights_stop_the_sweep_before_anything_runs(tmp_path, capsys,
                                                                          monkeypatch):
    """One line per missing dataset or CLIP weight file, with the command that prepares it; no
    run starts; --dry-run prints the same lines."""
    from textrefiner.sweep import preflight
    monkeypatch.setattr(preflight, "clip_cache_dir", lambda: str(tmp_path / "cache"))
    monkeypatch.setattr(preflight, "_reachable", lambda url: False)  # offline
    data = tmp_path / "nodata"
    spec = write_spec(tmp_path, f"""\
protocol: base2new
root: {data}
datasets: [synthetic_shapes, dtd]
methods: [CoOp, {{method: ZeroshotCLIP, overrides: {{MODEL.BACKBONE.PATH: {tmp_path}/no.pt}}}}]
seeds: [1, 2]
""")
    out = tmp_path / "out"
    expected = [
        f"missing: dataset SyntheticShapes: {data}/synthetic_shapes not found; prepare it: "
        f"python -m textrefiner.demo prepare DIR (it writes DIR/data; give --root DIR/data)",
        f"missing: CLIP weights ViT-B/16: not in {tmp_path}/cache and "
        "openaipublic.azureedge.net cannot be reached; prepare it: python -c \"import clip; "
        f"clip.load('ViT-B/16')\" on a machine online, then copy ViT-B-16.pt to "
        f"{tmp_path}/cache/ViT-B-16.pt",
        f"missing: CLIP weights {tmp_path}/no.pt: neither a file nor a CLIP model name",
        f"missing: dataset DescribableTextures: {data}/dtd not found; prepare it: "
        f"textrefiner-data dtd --root {data}"]
    assert cli.main([spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(expected) + 1, err
    for line, start in zip(sorted(err[:-1]), sorted(expected)):
        assert line.startswith(start), (line, start)
    assert err[-1] == ("textrefiner-sweep: error: 4 dataset(s) or CLIP weight file(s) missing "
                       "(above); nothing was started")
    assert not out.exists()
    assert cli.main([spec, "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("missing:")] == err[:-1]
    assert not out.exists()


def test_a_missing_or_empty_folder_of_ones_own_images_stops_the_sweep(demo, tmp_path, capsys):
    """A `datasets` entry that is a folder: the reader's own line for a folder that is not there
    or holds no class folder, before anything starts; nothing for a good folder."""
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    empty.mkdir()
    spec = write_spec(tmp_path, f"""\
protocol: base2new
datasets: [{photos}, {empty}]
methods: [{{method: ZeroshotCLIP, overrides: {{MODEL.BACKBONE.PATH: {demo["clip"]}}}}}]
seeds: [1]
""")
    out = tmp_path / "out"
    assert cli.main([spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"missing: dataset ImageFolder: folder not found: {photos}. Point "
                      "DATASET.FOLDER (or --root) at a folder of class subfolders "
                      "(FOLDER/<class>/*.jpg).")
    assert err[1].startswith(f"missing: dataset {empty} has no class folders"), err
    assert len(err) == 3 and not out.exists()
    from textrefiner.sweep import preflight
    assert preflight._folder_line(str(photos)) is not None
    assert preflight._folder_line(os.path.join(demo["root"], "synthetic_shapes", "images")) is None


@pytest.mark.slow
def test_two_sweeps_on_one_out_run_each_run_once(tmp_path):
    """Two demo sweeps started together on one OUT: each run runs once (the other sweep waits
    for it, then skips it), and both end with one sweep's outputs, the README's numbers."""
    out = tmp_path / "out"
    first, second = (subprocess.Popen(
        [sys.executable, "-m", "textrefiner.sweep.cli", "demo", "--out", str(out)], cwd=REPO,
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2))
    results = [proc.communicate(timeout=TIMEOUT) for proc in (first, second)]
    for proc, (_, err) in zip((first, second), results):
        assert proc.returncode == 0, err
        assert "14/14 finished, 0 running, 0 queued, 0 failed" in err
    assert "runs it (same OUT); waiting for it" in results[0][1] + results[1][1]
    runs = expand(load_spec("demo"), out)
    for run in runs:
        assert Path(run.log).read_text().count("$ textrefiner-train") == 1, run.key
        log = Path(run.output_dir, "log.txt").read_text()
        assert log.count("* accuracy:") == (1 if run.kind == "test" else 0) or \
            run.kind == "train", run.key
    md = (out / "report" / "results.md").read_text()
    assert "| CoOp+TR | 75.00 ± " in md and "| CoOp | 75.00 ± " in md


@pytest.mark.slow
def test_killed_sweep_resumes_bit_identically(tmp_path):
    """Killed (SIGKILL, the runs die with it) once the first run has finished, watched on disk;
    started again, it skips that run and resumes the rest: same outputs as a sweep never killed."""
    spec = write_spec(tmp_path, SMALL + """\
methods: [CoOp+TR]
seeds: [1, 2]
overrides: {OPTIM.MAX_EPOCH: 2, MODEL.BACKBONE.PATH: "{out}/clip_tiny.pt"}
""")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert sweep(spec, "--out", str(whole)).returncode == 0
    runs = expand(load_spec(spec), killed)
    proc = subprocess.Popen([sys.executable, "-m", "textrefiner.sweep.cli", spec, "--out",
                             str(killed)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(runs[0].status_file) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    assert run_finished(runs[0]) and not all(run_finished(r) for r in runs)
    resumed = sweep(spec, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert Path(runs[0].log).read_text().count("$ textrefiner-train") == 1  # not run twice
    assert_same_outputs(expand(load_spec(spec), whole), runs)


# ----------------------------------------------------------------------------- report


def test_report_puts_the_papers_numbers_beside_each_cell(tmp_path):
    spec = load_spec("paper-table3")
    runs = {r.key: r for r in expand(spec, tmp_path)}
    cfg = "vit_b16_ep10_ctxv1@cache"
    for seed, base, novel in ((1, 76.0, 70.0), (2, 77.0, 71.0)):
        fake_accuracy(runs[f"base2new/train_base/imagenet/shots_16/CoOp+TR/{cfg}/seed{seed}"]
                      .output_dir, base)
        fake_accuracy(runs[f"base2new/test_new/imagenet/shots_16/CoOp+TR/{cfg}/seed{seed}"]
                      .output_dir, novel)
    fake_accuracy(runs["base2new/train_base/imagenet/shots_16/CoOp/vit_b16_ep10_ctxv1/seed1"]
                  .output_dir, 76.47)
    written = write_report(tmp_path, spec)
    md = Path(written[0]).read_text()
    # mean 76.50 (paper 76.50), std of (76, 77) = 0.71; novel 70.50 vs 70.48; HM of the means
    assert ("| CoOp+TR@cache | 76.50 ± 0.71 (paper 76.50, +0.00) | 70.50 ± 0.71 (paper 70.48, "
            "+0.02) | 73.38 ± 0.71 (paper 73.37, +0.01) | 2 |") in md
    assert "| CoOp | 76.47 ± 0.00 (paper 76.47, +0.00) | - | - | 1/0 |" in md
    assert "Average" not in md
    rows = list(csv.DictReader(io.StringIO(Path(written[1]).read_text())))
    row = next(r for r in rows if r["cfg"] == cfg)
    assert (row["base"], row["base_std"], row["paper_novel"]) == ("76.50", "0.71", "70.48")
    assert Path(written[2]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_one_setting_grid_is_a_line_plot(tmp_path, monkeypatch):
    spec = load_spec("paper-fig4")
    for run in expand(spec, tmp_path):
        size = int(run.key.split("CACHE_SIZE=")[1].split("/")[0])
        fake_accuracy(run.output_dir, 70 + size / 100 + (1 if "test_new" in run.key else 0))
    drawn = []
    from textrefiner.sweep import report

    real = report.line_plot
    monkeypatch.setattr(report, "line_plot", lambda *a: drawn.append(a) or real(*a))
    written = write_report(tmp_path, spec)
    (rows, key, paper, _), = drawn
    assert key == "TRAINER.REFINER.CACHE_SIZE" and len(rows) == 5
    assert paper["imagenet"]["CoOp+TR@CACHE_SIZE=25"] == [76.84, 70.54, 73.56]
    assert "| CoOp+TR@CACHE_SIZE=25 | 70.25 ± 0.00 (paper 76.84, -6.59) |" in Path(
        written[0]).read_text()


def test_report_of_a_grid_follows_the_grid_values_as_numbers(tmp_path, monkeypatch):
    """Rows and points in the order 5, 10, 25, 50 (not "10" < "25" < "5" as text), and the log
    axis labelled with those values only (no minor-tick labels such as 6x10^0 between them)."""
    import matplotlib.figure

    spec = parse_spec({"datasets": ["synthetic_shapes"], "methods": ["CoOp+TR"], "seeds": [1],
                       "grid": {"TRAINER.REFINER.CACHE_SIZE": [10, 50, 5, 25]}})
    for run in expand(spec, tmp_path):
        size = int(run.key.split("CACHE_SIZE=")[1].split("/")[0])
        fake_accuracy(run.output_dir, 70 + size / 10 + (1 if "test_new" in run.key else 0))
    axes = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        fig.canvas.draw()  # the tick labels are made when drawn
        axes.extend(fig.axes)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    written = write_report(tmp_path, spec)
    md = Path(written[0]).read_text()
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| CoOp+TR@")]
    assert rows == ["| CoOp+TR@CACHE_SIZE=5", "| CoOp+TR@CACHE_SIZE=10", "| CoOp+TR@CACHE_SIZE=25",
                    "| CoOp+TR@CACHE_SIZE=50"]
    assert "Average" not in md
    (ax,) = axes
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "10", "25", "50"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == []
    base_line = ax.lines[0]
    assert list(base_line.get_xdata()) == [5, 10, 25, 50]
    assert list(base_line.get_ydata()) == pytest.approx([70.5, 71, 72.5, 75])


def test_gpu_slots_split_the_visible_gpus(monkeypatch):
    from textrefiner.sweep.local import gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert gpu_slots(8, 1) == [str(i) for i in range(8)]
    assert gpu_slots(8, 2) == ["0,1", "2,3", "4,5", "6,7"]  # 4 runs of 2 GPUs at a time
    assert gpu_slots(2, 3) == ["0,1,2", "3,4,5"]
    assert gpu_slots(3, 4) == ["0,1,2,3", "4,5,6,7"]  # multi-GPU runs never share their GPUs
    assert gpu_slots(10, 1) == [str(i) for i in range(8)] + ["0", "1"]  # one-GPU runs share
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_slots(2, 1) == ["0", "0"]  # --jobs 2 on one GPU: two runs share it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_slots(3, 1) == [None, None, None]  # CPU slots


def test_warm_process_reads_clip_weights_and_dataset_indexes_once(tmp_path, monkeypatch, clip_path):
    """What the sweep reads ahead (then forks) is what a run would read itself."""
    from textrefiner import clip_backbone
    from textrefiner.clip_backbone import load_clip, preload_state_dict
    from textrefiner.data import datasets, write_synthetic_dataset
    from textrefiner.data.datasets import preload_dataset, read_dataset

    monkeypatch.setattr(clip_backbone, "_PRELOADED", {})
    monkeypatch.setattr(datasets, "_PRELOADED", {})
    cold = load_clip(clip_path).state_dict()
    preload_state_dict(clip_path)
    # any read of the file would fail
    monkeypatch.setattr(clip_backbone, "load_torch_file", None)
    monkeypatch.setattr(clip_backbone, "is_torchscript", None)
    warm = load_clip(clip_path).state_dict()
    assert cold.keys() == warm.keys() and all(torch.equal(cold[k], warm[k]) for k in cold)
    load_clip(clip_path)  # twice: the preloaded dict is not consumed by clip's build_model

    write_synthetic_dataset(str(tmp_path / "data"), num_classes=4, per_class_test=2,
                            image_size=8, seed=0)
    cold = read_dataset(str(tmp_path / "data"), "SyntheticShapes")
    preload_dataset(str(tmp_path / "data"), "SyntheticShapes")
    monkeypatch.setitem(datasets.DATASETS, "SyntheticShapes", None)
    warm = read_dataset(str(tmp_path / "data"), "SyntheticShapes")
    again = read_dataset(str(tmp_path / "data"), "SyntheticShapes")
    assert warm == cold and warm[0] is not again[0]  # new lists each time


def test_a_stopped_run_is_resumed_not_held_back_as_failed(tmp_path):
    from textrefiner.sweep.worker import write_status

    (run, _) = expand(parse_spec({"datasets": ["dtd"], "methods": ["CoOp"], "seeds": [1]}),
                      tmp_path)
    os.makedirs(run.output_dir)
    Path(run.log).write_text("textrefiner-train: error: no images in data/dtd\n")
    write_status(run, 2)
    assert initial_states([run])[run.key] == "failed"
    assert initial_states([run], retry_failed=True)[run.key] == "queued"
    for code in (130, -2, -15, -9):  # Ctrl-C, SIGINT, SIGTERM, SIGKILL: stopped, not failed
        write_status(run, 2)
        write_status(run, code)
        assert initial_states([run])[run.key] == "queued"
