"""`textrefiner-sweep SPEC`: run a sweep of textrefiner-train runs (a shipped one, e.g.
paper-table1 or demo, or a YAML spec; see textrefiner/sweep/spec.py), skip what is finished, and
write the report with the paper's numbers.

    textrefiner-sweep demo                           # the offline demo, output/demo
    textrefiner-sweep paper-table1 --root DATA --jobs 8 --dry-run
    textrefiner-sweep my_sweep.yaml --out output/mine --jobs 2 --retry-failed
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import os
import sys

from ..errors import UserError, run_command
from .plan import initial_states
from .preflight import missing
from .spec import SHIPPED, expand, load_spec, validate

EXECUTORS = ("local", "slurm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-sweep", description="Run a sweep of textrefiner-train runs: a shipped "
        f"sweep ({', '.join(SHIPPED)}) or a YAML spec.")
    parser.add_argument("spec", help="a shipped sweep name or a YAML file")
    parser.add_argument("--out", help="output tree (default: output/<sweep name>)")
    parser.add_argument("--root", default=os.environ.get("DATA", "data"),
                        help="datasets folder (default: $DATA or data), unless the spec sets root")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (runs in all, finished, to do) and stop")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (local executor)")
    parser.add_argument("--gpus-per-run", type=int, default=1,
                        help="GPUs per run; more than 1 runs through torchrun (exact path)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run again the runs that failed in an earlier sweep")
    parser.add_argument("--no-feature-store", action="store_true",
                        help="do not share the test images' features through OUT/feature_store")
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--status", action="store_true",
                        help="print where the sweep stands and stop (slurm: its jobs)")
    parser.add_argument("--wait", action="store_true",
                        help="slurm: submit what is neither finished nor queued, wait for the "
                             "jobs (as sbatch --wait), then write the report")
    _add_executor_args(parser)
    return parser


def _add_executor_args(parser) -> None:
    """HOOK for the Slurm executor: textrefiner/sweep/slurm.py (`add_slurm_args`) adds its own
    options (--slurm KEY=VALUE, --partition, ...) when it is there."""
    if importlib.util.find_spec(f"{__package__}.slurm") is None:
        return
    from . import slurm  # its own import errors are reported, not skipped

    slurm.add_slurm_args(parser)


def default_out(spec_name: str) -> str:
    base = os.path.basename(spec_name)
    return os.path.join("output", base[:-5] if base.endswith(".yaml") else base)


def plan(args):
    """(spec, runs, out, configs of the runs' distinct settings) for the command's arguments; a
    spec error is a UserError."""
    if args.jobs < 1 or args.gpus_per_run < 1:
        raise UserError("--jobs and --gpus-per-run must be at least 1")
    spec = load_spec(args.spec)
    out = os.path.abspath(args.out or default_out(args.spec))
    store = "" if args.no_feature_store else os.path.join(out, "feature_store")
    runs = expand(spec, out, root=args.root, gpus=args.gpus_per_run, feature_store=store)
    return spec, runs, out, validate(spec, runs)


def print_plan(runs, states, stream=None) -> None:
    stream = stream or sys.stdout
    for run in runs:
        if states[run.key] == "queued":
            print(f"to do: {run.key}", file=stream)
    finished = sum(1 for s in states.values() if s == "skipped")
    failed = sum(1 for s in states.values() if s == "failed")
    todo = sum(1 for s in states.values() if s == "queued")
    line = f"{len(runs)} runs in all: {finished} finished, {todo} to do"
    if failed:
        line += f", {failed} failed before (--retry-failed runs them again)"
    print(line, file=stream)


def _print_missing(lines, stream) -> None:
    for line in lines:
        print(f"missing: {line}", file=stream)


@contextlib.contextmanager
def _locked(path):
    """An exclusive lock on `path` (a second holder waits); released when the process ends."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv=None) -> int:
    return run_command("textrefiner-sweep", _main, build_parser().parse_args(argv),
                       interrupted="interrupted; run the same command again to resume")


def _main(args) -> int:
    if args.executor == "local" and not args.dry_run and not args.status:
        from .local import claim_threads

        claim_threads()  # before any tensor work here (the demo's prepare): see claim_threads
    spec, runs, out, cfgs = plan(args)
    if args.dry_run:
        if spec.prepare != "demo":  # the demo sweep prepares its data and CLIP itself
            _print_missing(missing(cfgs), sys.stdout)
        print_plan(runs, initial_states(runs, args.retry_failed))
        if args.executor == "slurm":
            from . import slurm

            print(slurm.describe(runs, args))
        return 0
    if spec.prepare == "demo" and not args.status:
        from ..demo import prepare_pretrained

        with _locked(os.path.join(out, ".sweep", "prepare.lock")):  # a second sweep on OUT
            prepare_pretrained(out, log=None)
    if not args.status:
        lines = missing(cfgs)
        if lines:
            _print_missing(lines, sys.stderr)
            raise UserError(f"{len(lines)} dataset(s) or CLIP weight file(s) missing (above); "
                            "nothing was started")
    if args.executor == "slurm":  # HOOK: textrefiner/sweep/slurm.py (the Slurm executor)
        if importlib.util.find_spec(f"{__package__}.slurm") is None:
            raise UserError("--executor slurm: this installation has no Slurm executor "
                            "(textrefiner/sweep/slurm.py)")
        from . import slurm

        if args.status:
            return slurm.status(runs, args)
        if args.wait:  # as sbatch --wait: submit what is neither finished nor queued, then wait
            slurm.submit(runs, args, hint=False)
            return slurm.wait(runs, args)
        return slurm.submit(runs, args)
    if args.status:
        print_plan(runs, initial_states(runs))
        return 0
    from .local import run_local

    states = run_local(runs, jobs=args.jobs, gpus_per_run=args.gpus_per_run,
                       retry_failed=args.retry_failed)
    from .report import write_report

    write_report(out, spec)
    return 0 if all(s in ("finished", "skipped") for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
