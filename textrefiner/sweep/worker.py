"""Run one run of a sweep in this process, exactly as `textrefiner-train <argv>` would, and record
its outcome in <output_dir>/sweep_status.json. Both executors call `execute_run`: the local one in
a child forked per run (textrefiner.sweep.local), the Slurm one in its job."""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import shlex
import socket
import subprocess
import sys
import traceback

from .plan import PROGRAM_MODULES, TRAIN_PROGRAM, Run, read_status, run_finished

ERROR_PREFIX = "textrefiner-train: error:"
# Stopped, not failed: Ctrl-C (textrefiner-train exits 130), SIGINT, SIGTERM, SIGKILL (as a
# negative return code, or 128 + signal from a shell). No outcome is kept, so the next sweep
# resumes the run instead of holding it back as failed.
STOPPED = frozenset({130, 143, 137, -2, -15, -9})


class Requeued(SystemExit):
    """The run's Slurm job was requeued (submitit's handler of Slurm's warning signal, which then
    exits): the run leaves without an outcome, and this exit goes on up to submitit, which counts
    it as a requeued job's, not a failure. textrefiner.sweep.slurm raises it."""


def execute_run(run: Run) -> int:
    """Run `run` here (its output appended to <output_dir>/sweep.log); return its exit code.

    textrefiner-train resumes from the checkpoints in --output-dir, so a run killed before is
    continued, not restarted. A run of several GPUs goes through torchrun (the exact path of
    textrefiner.distributed), as a child process. A run that another sweep on the same OUT runs
    (a second terminal, a Slurm job beside a local sweep) is waited for, then not run again."""
    os.makedirs(run.output_dir, exist_ok=True)
    with _run_lock(run) as outcome_of_other:
        if run_finished(run):
            return 0
        if outcome_of_other is not None:  # it failed in the other sweep while this one waited
            return outcome_of_other
        return _execute(run)


def _execute(run: Run) -> int:
    with contextlib.suppress(FileNotFoundError):
        os.remove(run.status_file)  # no stale outcome while the run is on its way
    with open(run.log, "a", encoding="utf-8") as log:
        log.write(f"$ {run.command()}\n")
        log.flush()
        if run.gpus > 1:
            code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={run.gpus}", "-m", "textrefiner.train",
                                    *run.argv], stdout=log, stderr=subprocess.STDOUT)
        else:
            with _output_to(log):
                code = _call_main(run.argv, run.program)
    write_status(run, code)
    return code


def lock_file(run: Run) -> str:
    """OUT/.sweep/locks/<run key>.lock: held by the process that runs the run."""
    out = run.output_dir[:-len(run.key)].rstrip(os.sep)
    return os.path.join(out, ".sweep", "locks", run.key + ".lock")


@contextlib.contextmanager
def _run_lock(run: Run):
    """Hold the run's lock (waiting, with one line on stderr, while another process holds it);
    yields the exit code the holder recorded while this process waited, else None. The lock
    goes with the process, however it ends (kill -9 too)."""
    path = lock_file(run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+", encoding="utf-8") as lock:
        outcome = None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            print(f"{run.key}: {holder} runs it (same OUT); waiting for it", file=sys.stderr,
                  flush=True)
            before = read_status(run)
            fcntl.flock(lock, fcntl.LOCK_EX)
            after = read_status(run)
            if after and after != before:
                outcome = int(after.get("exit_code", 1))
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()} on {socket.gethostname()} ({_job_name()})\n")
        lock.flush()
        yield outcome


def _job_name() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"Slurm job {job}" if job else shlex.join(sys.argv[:2]) or "python"


def _call_main(argv, program=TRAIN_PROGRAM) -> int:
    main = importlib.import_module(PROGRAM_MODULES[program]).main

    saved_argv = sys.argv
    sys.argv = [program, *argv]  # the run's log prints its command from sys.argv
    try:
        return int(main(list(argv)) or 0)
    except Requeued:
        raise
    except SystemExit as exc:  # argparse's errors (exit 2) and explicit exits
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a bug in a run must not take the sweep down
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved_argv
        sys.stdout.flush()
        sys.stderr.flush()


@contextlib.contextmanager
def _output_to(log):
    """Send this process's stdout and stderr (Python's and the C libraries') to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def error_line(log_path: str) -> str:
    """The run's error: textrefiner-train's `error:` line, else the log's last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    return (errors or lines or [""])[-1]


def write_status(run: Run, code: int) -> None:
    if code in STOPPED:
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.status_file)
        return
    state = "finished" if code == 0 else "failed"
    status = {"state": state, "exit_code": code,
              "error": "" if code == 0 else (error_line(run.log) or f"exit code {code}"),
              "log": run.log, "command": run.command()}
    tmp = run.status_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(status, f, indent=1)
    os.replace(tmp, run.status_file)
