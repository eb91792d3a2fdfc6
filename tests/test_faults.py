"""TEXTREFINER_KILL_AT and TEXTREFINER_PAUSE_AT (textrefiner/faults.py): the value is checked, and
a process dies with SIGKILL (or waits for a signal) at exactly the named point and nowhere else.
Whole runs killed this way: tests/test_resume.py, tests/test_distributed.py,
tests/test_demo_learns.py, tests/test_feature_store.py; held for Slurm: tests/test_slurm.py."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT
from textrefiner import faults
from textrefiner.errors import UserError
from textrefiner.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text, point", [
    ("epoch=2", {"epoch": 2}),
    ("epoch=2,batch=1,rank=1", {"epoch": 2, "batch": 1, "rank": 1}),
    ("store_write=3,rank=0", {"store_write": 3, "rank": 0}),
])
def test_values_read(text, point):
    assert faults.parse(text) == point


@pytest.mark.parametrize("text", ["epoch=0", "epoch=x", "epoch", "batch=1", "rank=1", "epoch=1,",
                                  "epoch=1,epoch=2", "epoch=1,store_write=2", "epoch=1,step=2",
                                  "epoch=-1", "store_write=0"])
def test_malformed_values_name_the_format(text):
    with pytest.raises(UserError, match="expected epoch=E"):
        faults.parse(text)


def test_rank_picks_the_process(monkeypatch):
    monkeypatch.setenv(faults.ENV, "epoch=1,rank=1")
    monkeypatch.delenv("RANK", raising=False)
    assert faults.planned() is None  # no RANK: rank 0
    monkeypatch.setenv("RANK", "1")
    assert faults.planned() == {"epoch": 1, "rank": 1}
    monkeypatch.setenv(faults.ENV, "epoch=1")
    monkeypatch.setenv("RANK", "3")
    assert faults.planned() == {"epoch": 1}  # no rank given: every process


def test_malformed_value_stops_the_cli_before_anything_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(faults.ENV, "epoch=2,batch")
    assert main(["--trainer", "CoOp", "--output-dir", str(tmp_path / "out")]) == 2
    assert f"{faults.ENV}='epoch=2,batch'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


CALLS = """
from textrefiner import faults
for epoch in (1, 2, 3):
    for batch in (1, 2, 3):
        faults.after_step(epoch, batch)
        print(f"step {epoch}.{batch}", flush=True)
    faults.after_epoch(epoch)
    print(f"epoch {epoch}", flush=True)
for n in (1, 2, 3):
    faults.before_store_rename(f"tmp{n}")
    print(f"store {n}", flush=True)
"""


@pytest.mark.parametrize("kill_at, last", [
    ("epoch=2,batch=2", "step 2.1"), ("epoch=2", "step 2.3"), ("store_write=2", "store 1"),
    ("epoch=2,batch=2,rank=1", None), ("epoch=9", None)])  # not this rank; never reached
def test_the_process_dies_exactly_at_the_point(kill_at, last):
    proc = subprocess.run([sys.executable, "-c", CALLS], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_TIMEOUT, env=dict(os.environ, TEXTREFINER_KILL_AT=kill_at,
                                                         RANK="0"))
    printed = proc.stdout.split("\n")[:-1]
    if last is None:
        assert proc.returncode == 0 and printed[-1] == "store 3", proc.stderr
        return
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert printed[-1] == last
    assert proc.stderr.startswith(f"TEXTREFINER_KILL_AT={kill_at}: killed process "), proc.stderr


@pytest.mark.parametrize("pause_at, last", [("epoch=2,batch=2", "step 2.1"), ("epoch=2", "step 2.3")])
def test_the_process_waits_at_the_point_until_a_signal_ends_it(pause_at, last):
    """TEXTREFINER_PAUSE_AT: the process holds there (a handler that returns does not free it);
    what is printed before the hold is all there is, however long the test takes to signal."""
    env = dict(os.environ, TEXTREFINER_PAUSE_AT=pause_at, RANK="0")
    code = "import signal; signal.signal(signal.SIGUSR1, lambda *_: None)\n" + CALLS
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    waits = proc.stderr.readline()  # blocks until the process stands at the point
    assert waits.startswith(f"TEXTREFINER_PAUSE_AT={pause_at}: process {proc.pid} "), waits
    proc.send_signal(signal.SIGUSR1)  # handled and returned: still held
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == -signal.SIGTERM
    assert out.split("\n")[:-1][-1] == last


def test_malformed_pause_value_is_refused(monkeypatch):
    monkeypatch.setenv(faults.PAUSE_ENV, "batch=1")
    with pytest.raises(UserError, match="TEXTREFINER_PAUSE_AT='batch=1'"):
        faults.check()
