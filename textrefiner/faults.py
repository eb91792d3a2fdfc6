"""Deterministic fault injection: kill (or hold) this process at a chosen point of a run.

Tests (and anyone checking that a run resumes) set the environment variable TEXTREFINER_KILL_AT
to a comma-separated list of `key=value`:

* `epoch=E`: after epoch E (1-based, as the log prints `epoch [E/N]`) has ended and everything
  the engine writes at its end is on disk (validation, model-best, `model.pth.tar-E`), before
  epoch E+1 starts;
* `epoch=E,batch=B`: right after the optimiser step of batch B (1-based) of epoch E, before that
  batch's log line or anything later is written;
* `store_write=N`: the N-th features file this process writes to a feature store (key.json not
  counted), after its temporary file is written and flushed, before it is renamed into place;
* `rank=R` (optional): only the process whose RANK (set by torchrun) is R; unset RANK counts as 0.

Both engines and the feature store call the hooks below. The process prints one line to stderr
and sends itself SIGKILL, so the state it leaves is the same on a fast machine and a slow one,
unlike a signal sent from outside when some output appears. A point never reached does nothing.

TEXTREFINER_PAUSE_AT takes the same points but holds the process there, waiting for signals,
instead of killing it: a test that interrupts a run from outside (Slurm's `scontrol requeue`, its
warning signal before a time limit) waits for the run to stand at that point, then interrupts it,
on a fast machine as on a slow one. Whatever the signal's handler does (exit, requeue) ends the
hold; a resumed run starts after the point and never reaches it again.
"""
import os
import signal
import sys
from typing import Dict, Optional

ENV = "TEXTREFINER_KILL_AT"
PAUSE_ENV = "TEXTREFINER_PAUSE_AT"
FORMAT = "epoch=E[,batch=B][,rank=R] or store_write=N[,rank=R] (positive integers; R from 0)"

_store_writes = 0  # features files this process has started to write to a feature store


def _bad(text: str, why: str, env: str = ENV):
    from .errors import UserError
    return UserError(f"{env}={text!r} {why}: expected {FORMAT}, or unset it.")


def parse(text: str, env: str = ENV) -> Dict[str, int]:
    """{"epoch": E, "batch": B, "store_write": N, "rank": R}, the keys given, checked."""
    point = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("epoch", "batch", "store_write", "rank") or key in point:
            raise _bad(text, f"has {part.strip()!r}", env)
        if not value.isdigit() or (int(value) < 1 and key != "rank"):
            raise _bad(text, f"gives {key} {value!r}", env)
        point[key] = int(value)
    if "batch" in point and "epoch" not in point:
        raise _bad(text, "gives a batch without its epoch", env)
    if ("store_write" in point) == ("epoch" in point):
        raise _bad(text, "must name either an epoch or a store_write", env)
    return point


def planned(env: str = ENV) -> Optional[Dict[str, int]]:
    """The point this process is to stop (or, for PAUSE_ENV, wait) at, or None; raises
    UserError when malformed."""
    text = os.environ.get(env, "")
    if not text:
        return None
    point = parse(text, env)
    if "rank" in point and point["rank"] != _rank():
        return None
    return point


def _rank() -> int:
    """This process's rank under torchrun (RANK), 0 without it."""
    return int(os.environ.get("RANK") or 0)


def check():
    """Refuse a malformed TEXTREFINER_KILL_AT or TEXTREFINER_PAUSE_AT before anything runs."""
    planned()
    planned(PAUSE_ENV)


def _kill(where: str):
    sys.stdout.flush()
    print(f"{ENV}={os.environ[ENV]}: killed process {os.getpid()} (rank {_rank()}) {where}",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _pause(where: str):
    sys.stdout.flush()
    print(f"{PAUSE_ENV}={os.environ[PAUSE_ENV]}: process {os.getpid()} (rank {_rank()}) waits "
          f"{where} for a signal", file=sys.stderr, flush=True)
    while True:  # a handler that returns (a signal the run ignores) keeps the hold
        signal.pause()


def _stop(epoch: int, batch: Optional[int], where: str):
    """Kill or hold the process when `epoch` (and `batch`, None after the epoch) is a planned
    point."""
    for env, act in ((ENV, _kill), (PAUSE_ENV, _pause)):
        point = planned(env)
        if point and point.get("epoch") == epoch and point.get("batch") == batch:
            act(where)


def after_step(epoch: int, batch: int):
    """Called after the optimiser step of `batch` (1-based) of `epoch` (1-based)."""
    _stop(epoch, batch, f"after the optimiser step of epoch {epoch}, batch {batch}")


def after_epoch(epoch: int):
    """Called once `epoch` (1-based) has ended and its checkpoints are written."""
    _stop(epoch, None, f"after epoch {epoch} and its checkpoints")


def before_store_rename(path: str):
    """Called when a features file's temporary `path` is written, before its rename."""
    global _store_writes
    _store_writes += 1
    point = planned()
    if point and point.get("store_write") == _store_writes:
        _kill(f"before renaming the feature store's temporary file {path}")
