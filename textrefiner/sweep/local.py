"""The local executor: `--jobs N` runs at a time on this machine, each in a child forked from this
warm process.

Why a fork per run, from the sweep's own process:
- warm: this process imports torch, torchvision, clip and textrefiner.train once, and reads the
  CLIP weights and the dataset indexes of the sweep's runs once
  (textrefiner.clip_backbone.preload_state_dict, textrefiner.data.datasets.preload_dataset); a child
  starts with all of it in its (copy-on-write) memory, in milliseconds instead of the ~3.5 s an
  import of textrefiner.train costs a fresh process.
- exact: each run is `textrefiner.train.main(argv)` in a process of its own, so nothing one run
  changes (RNG states, torch's thread count, sys.stdout, Dassl's registries, CUDA state) reaches
  another; a long-lived worker running run after run would have to undo all of that by hand.
  The child sets the thread count a fresh process would have (this process's, read before any
  work), and this process never initialises CUDA or runs an OpenMP region, which do not survive
  a fork; children see their GPUs through CUDA_VISIBLE_DEVICES set before they touch CUDA.
- robust: a run that crashes (even in C) takes only its child down; children die with the sweep
  (PR_SET_PDEATHSIG), so a killed sweep leaves no run behind, and the next one resumes them.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal

from .plan import Run, initial_states
from .progress import Progress
from .worker import STOPPED, execute_run, write_status


def warm_up(runs: list) -> None:
    """Import what every run imports, and read the CLIP weights the runs will load."""
    import torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401 - the engines' SummaryWriter: 0.2 s a run
    import torchvision  # noqa: F401

    from .. import train
    from ..clip_backbone import import_clip, preload_state_dict
    from ..data.datasets import dataset_root, preload_dataset
    from ..engine import standalone  # noqa: F401

    import_clip()
    parser = train.build_parser()
    paths, engines, datasets = set(), set(), set()
    for run in runs:
        try:
            args = parser.parse_args(list(run.argv))
            cfg = train.setup_cfg(args)
            engines.add(train.resolve_engine(args.engine))
            datasets.add((dataset_root(cfg), cfg.DATASET.NAME))
        except Exception:  # noqa: BLE001 - the run itself reports its error, in its log
            continue
        paths.add(cfg.MODEL.BACKBONE.PATH or cfg.MODEL.BACKBONE.NAME)
    if torch.cuda.is_initialized():  # a CUDA context does not survive fork
        raise RuntimeError("the sweep process initialised CUDA before forking its runs")
    if "dassl" in engines:
        import dassl.engine  # noqa: F401
        import textrefiner_trainers  # noqa: F401
    for path in sorted(p for p in paths if p):
        with contextlib.suppress(Exception):  # not there yet / a name to download: the run reads it
            preload_state_dict(path)
    for root, name in sorted(datasets):  # the built-in engine's reader (Dassl reads its own)
        with contextlib.suppress(Exception):  # missing: the run reports it, in its log
            preload_dataset(root, name)


def fresh_thread_count() -> int:
    """torch's intra-op thread count in a process that has just imported torch (OMP_NUM_THREADS,
    else the cores): what the run would get alone. Read before this process does any work."""
    import torch

    return torch.get_num_threads()


def gpu_slots(jobs: int, gpus_per_run: int) -> list:
    """CUDA_VISIBLE_DEVICES of each slot ("" = CPU): the GPUs this process may use, split into
    groups of `gpus_per_run`, at most `jobs` of them; CPU slots when there is no GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        devices = [str(i) for i in range(_nvidia_gpu_count())]
    if not devices:
        return [None] * jobs
    groups = [",".join(devices[i:i + gpus_per_run])
              for i in range(0, len(devices) - gpus_per_run + 1, gpus_per_run)]
    return groups[:jobs] if groups else [None] * jobs


def _nvidia_gpu_count() -> int:
    """GPUs from the driver's device files, without initialising CUDA in this process (a CUDA
    context does not survive fork)."""
    import glob

    return len(glob.glob("/proc/driver/nvidia/gpus/*"))


def run_local(runs: list, jobs: int = 1, gpus_per_run: int = 1, retry_failed: bool = False,
              progress: Progress | None = None) -> dict:
    """Run what is left of `runs`; return key -> final state."""
    progress = progress or Progress(runs)
    states = initial_states(runs, retry_failed)
    reasons: dict = {}
    by_key = {run.key: run for run in runs}
    slots = gpu_slots(jobs, gpus_per_run)
    if len(slots) < jobs:
        progress.stream.write(f"[sweep] --jobs {jobs}: {len(slots)} at a time, one per "
                              f"{gpus_per_run} GPU(s) of CUDA_VISIBLE_DEVICES / the machine\n")
    free = list(range(len(slots)))
    children: dict = {}  # pid -> (key, slot)
    threads = fresh_thread_count()
    if "queued" in states.values():
        warm_up([r for r in runs if states[r.key] == "queued"])
    try:
        while True:
            _block_dependents(states, by_key, reasons)
            for run in runs:
                if not free:
                    break
                if states[run.key] == "queued" and _ready(run, states):
                    slot = free.pop(0)
                    pid = _fork_run(run, slots[slot], threads)
                    children[pid] = (run.key, slot)
                    states[run.key] = "running"
                    progress.started_run(run.key)
            progress.update(states, len(slots))
            if not children:
                break
            pid, status = os.waitpid(-1, 0)  # the next run to end (nothing changes meanwhile)
            if pid not in children:
                continue
            key, slot = children.pop(pid)
            free.append(slot)
            free.sort()
            code = os.waitstatus_to_exitcode(status)
            if code < 0:  # killed by a signal: the child could not write its outcome
                write_status(by_key[key], code)
            if code in STOPPED:
                reasons[key] = f"exit {code}; the next sweep resumes it"
            states[key] = "finished" if code == 0 else "stopped" if code in STOPPED else "failed"
            progress.ended_run(key, code == 0)
    finally:
        for pid in children:  # interrupted: the children go with the sweep
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    progress.finish(states, reasons)
    return states


def _ready(run: Run, states: dict) -> bool:
    return run.after is None or states.get(run.after) in ("finished", "skipped")


def _block_dependents(states: dict, by_key: dict, reasons: dict) -> None:
    for key, state in states.items():
        after = by_key[key].after
        if state == "queued" and after and states.get(after) in ("failed", "blocked", "stopped"):
            states[key] = "blocked"
            reasons[key] = f"not run: its training run {after} {states[after]}"


def _fork_run(run: Run, devices, threads: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices
        import torch

        torch.set_num_threads(threads)
        code = execute_run(run)
    finally:
        os._exit(code if 0 <= code < 256 else 1)


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the sweep process dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
