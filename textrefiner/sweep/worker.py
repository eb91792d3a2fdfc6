"""Run one run of a sweep in this process, exactly as `textrefiner-train <argv>` would, and record
its outcome in <output_dir>/sweep_status.json. Both executors call `execute_run`: the local one in
a child forked per run (textrefiner.sweep.local), the Slurm one in its job."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import traceback

from .plan import PROGRAM_MODULES, TRAIN_PROGRAM, Run, read_status  # noqa: F401 (read_status: API)

ERROR_PREFIX = "textrefiner-train: error:"
# Stopped, not failed: Ctrl-C (textrefiner-train exits 130), SIGINT, SIGTERM, SIGKILL (as a
# negative return code, or 128 + signal from a shell). No outcome is kept, so the next sweep
# resumes the run instead of holding it back as failed.
STOPPED = frozenset({130, 143, 137, -2, -15, -9})


def execute_run(run: Run) -> int:
    """Run `run` here (its output appended to <output_dir>/sweep.log); return its exit code.

    textrefiner-train resumes from the checkpoints in --output-dir, so a run killed before is
    continued, not restarted. A run of several GPUs goes through torchrun (the exact path of
    textrefiner.distributed), as a child process."""
    os.makedirs(run.output_dir, exist_ok=True)
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


def _call_main(argv, program=TRAIN_PROGRAM) -> int:
    main = importlib.import_module(PROGRAM_MODULES[program]).main

    saved_argv = sys.argv
    sys.argv = [program, *argv]  # the run's log prints its command from sys.argv
    try:
        return int(main(list(argv)) or 0)
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
