"""One run of a sweep (a `textrefiner-train` command and its folder), and when it is finished.

The executors (textrefiner.sweep.local, textrefiner.sweep.slurm) take a list of `Run` in
dependency order: a test run names its training run in `after`, a LLaMP training run its
dataset's LLM step (a `textrefiner-llamp-cache` run, finished when its files exist).
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..results import read_accuracy

TRAINERS = ("CoOp", "CoCoOp", "LLaMP", "MaPLe", "PromptKD", "PromptSRC", "ZeroshotCLIP")
TRAIN_PROGRAM = "textrefiner-train"
LLAMP_CACHE_PROGRAM = "textrefiner-llamp-cache"  # LLaMP's LLM step (textrefiner/llamp_cache.py)
PROGRAM_MODULES = {TRAIN_PROGRAM: "textrefiner.train",
                   LLAMP_CACHE_PROGRAM: "textrefiner.llamp_cache"}
STATUS_FILE = "sweep_status.json"  # {"state", "exit_code", "error", "log", "command"}
SWEEP_LOG = "sweep.log"  # the run's stdout and stderr (textrefiner-train writes log.txt itself)


@dataclass(frozen=True)
class Run:
    key: str  # the run folder relative to the sweep's OUT, unique within the sweep
    output_dir: str  # absolute path of the run folder (== --output-dir)
    argv: tuple  # the program's arguments (everything after its name)
    after: Optional[str]  # key of the run that must finish first (a test run's training run)
    trainer: str  # one of TRAINERS
    kind: str  # "train", "test" or "llm" (LLaMP's LLM step)
    gpus: int = 1  # GPUs per run (> 1: the exact torchrun path)
    program: str = TRAIN_PROGRAM  # one of PROGRAM_MODULES
    outputs: tuple = ()  # files that, once all exist, make the run finished (else log.txt's line)

    def command(self) -> str:
        """A shell line a person can paste to redo this run by hand."""
        words = [self.program, *self.argv]
        if self.gpus > 1:
            words = ["torchrun", "--standalone", f"--nproc_per_node={self.gpus}",
                     "-m", "textrefiner.train", *self.argv]
        return shlex.join(words)

    @property
    def log(self) -> str:
        return os.path.join(self.output_dir, SWEEP_LOG)

    @property
    def status_file(self) -> str:
        return os.path.join(self.output_dir, STATUS_FILE)


def run_finished(run: Run) -> bool:
    """scripts/common.sh's `finished`: log.txt holds a final (non-validation) accuracy line; a
    run with `outputs` (an LLM step): they all exist."""
    if run.outputs:
        return all(os.path.isfile(path) for path in run.outputs)
    return read_accuracy(Path(run.output_dir, "log.txt")) is not None


def read_status(run: Run) -> Optional[dict]:
    """The outcome textrefiner.sweep.worker recorded for `run`, or None."""
    try:
        with open(run.status_file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def initial_states(runs: list, retry_failed: bool = False) -> dict:
    """key -> "skipped" (finished before: never run twice), "failed" (failed before; queued again
    with `retry_failed`) or "queued" (never run, or killed on its way: it resumes)."""
    states = {}
    for run in runs:
        if run_finished(run):
            states[run.key] = "skipped"
        elif not retry_failed and (read_status(run) or {}).get("state") == "failed":
            states[run.key] = "failed"
        else:
            states[run.key] = "queued"
    return states
