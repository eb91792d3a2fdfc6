"""The demo sweep through `textrefiner-sweep demo --jobs 2` against today's way, one process per run
one after another (scripts/demo.sh before the sweep tool: `python -m textrefiner.train` per run,
no feature store), side by side in one run. (`benchmarks/run.py --sections sweep` runs it; so
does this file alone.)

Both ways go through a stand-in interpreter that times each run's own training and evaluation
(the standalone engine's train() and test(), outermost call) and, in the sweep, each run's wall
time from its fork to its end (the executor's Progress); one JSON line per event. Reported: the
whole sweep's wall time with / without the tool (demo data and tiny CLIP prepared by both), each
way's start-up cost per run (the run's wall time minus its own training and evaluation; mean),
and whether every run's accuracy is the same both ways; then the sweep again with --jobs 1, whose
start-up cost is free of the contention between its own two runs on a 2-core machine.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from textrefiner.results import read_accuracy  # noqa: E402
from textrefiner.sweep.spec import expand, load_spec  # noqa: E402

JOBS = 2
# Runs `python -m textrefiner.train ARGS` or `python -m textrefiner.sweep.cli ARGS` in-process,
# with the probes; writes JSON lines to $SWEEP_PROBE.
PROBE = """
import json, os, sys, time
probe_file = os.environ["SWEEP_PROBE"]
def emit(**record):
    with open(probe_file, "a") as f:
        f.write(json.dumps(record) + "\\n")
import textrefiner.engine.standalone as standalone
depth = [0]
def timed(method):
    def wrapper(self, *a, **k):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return method(self, *a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                emit(dir=self.cfg.OUTPUT_DIR, own_s=time.perf_counter() - start)
    return wrapper
standalone.StandaloneTrainer.train = timed(standalone.StandaloneTrainer.train)
standalone.StandaloneTrainer.test = timed(standalone.StandaloneTrainer.test)
module, args = sys.argv[1], sys.argv[2:]
if module == "textrefiner.sweep.cli":
    from textrefiner.sweep import progress
    ended = progress.Progress.ended_run
    def ended_run(self, key, ok):
        ended(self, key, ok)
        if key in self.seconds:
            emit(key=key, wall_s=self.seconds[key])
    progress.Progress.ended_run = ended_run
    from textrefiner.sweep.cli import main
else:
    sys.argv = ["textrefiner-train", *args]
    from textrefiner.train import main
sys.exit(main(args))
"""


def _env(probe):
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": ROOT, "SWEEP_PROBE": probe}


def _records(probe):
    with open(probe) as f:
        return [json.loads(line) for line in f]


def one_process_per_run(out, probe, log):
    """Today's scripts/demo.sh: prepare, then each run in its own process, in order."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "textrefiner.demo", "prepare", out], check=True,
                   env=_env(probe), stdout=subprocess.DEVNULL)
    runs = expand(load_spec("demo"), out)  # no feature store, as demo.sh had none
    walls = {}
    for run in runs:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", PROBE, "textrefiner.train", *run.argv],
                       check=True, cwd=ROOT, env=_env(probe), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        walls[run.output_dir] = time.perf_counter() - t
    total = time.perf_counter() - start
    log(f"  one process per run: {total:.1f} s")
    return runs, total, walls


def sweep_tool(out, probe, log, jobs=JOBS):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PROBE, "textrefiner.sweep.cli", "demo", "--out", out,
                    "--jobs", str(jobs)], check=True, cwd=ROOT, env=_env(probe),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - start
    runs = expand(load_spec("demo"), out)
    walls = {os.path.join(out, r["key"]): r["wall_s"] for r in _records(probe) if "key" in r}
    log(f"  textrefiner-sweep demo --jobs {jobs}: {total:.1f} s")
    return runs, total, walls


def startup_per_run(walls, probe):
    own = {}
    for record in _records(probe):
        if "dir" in record:
            own[record["dir"]] = own.get(record["dir"], 0.0) + record["own_s"]
    costs = [walls[d] - own[d] for d in walls if d in own]
    return mean(costs), mean(own.values())


def sweep_section(log=print):
    log(f"sweep: the demo, one process per run vs textrefiner-sweep --jobs {JOBS} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, {os.cpu_count()} CPUs)")
    tmp = tempfile.mkdtemp(prefix="sweep_bench_")
    try:
        cold_probe, warm_probe = os.path.join(tmp, "cold.jsonl"), os.path.join(tmp, "warm.jsonl")
        cold_runs, cold_total, cold_walls = one_process_per_run(os.path.join(tmp, "cold"),
                                                                cold_probe, log)
        warm_runs, warm_total, warm_walls = sweep_tool(os.path.join(tmp, "warm"), warm_probe,
                                                       log)
        one_probe = os.path.join(tmp, "one.jsonl")  # one job: no contention between the runs
        _, one_total, one_walls = sweep_tool(os.path.join(tmp, "one"), one_probe, log, jobs=1)
        one_startup, one_own = startup_per_run(one_walls, one_probe)
        cold_startup, cold_own = startup_per_run(cold_walls, cold_probe)
        warm_startup, warm_own = startup_per_run(warm_walls, warm_probe)
        same = all(read_accuracy_of(a) is not None and read_accuracy_of(a) == read_accuracy_of(b)
                   for a, b in zip(cold_runs, warm_runs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"sweep_runs": len(warm_runs), "sweep_jobs": JOBS,
            "sweep_wall_s_one_process_per_run": cold_total, "sweep_wall_s_tool": warm_total,
            "sweep_wall_ratio": warm_total / cold_total,
            "sweep_startup_s_per_run_one_process": cold_startup,
            "sweep_startup_s_per_run_tool": warm_startup,
            "sweep_own_s_per_run_one_process": cold_own, "sweep_own_s_per_run_tool": warm_own,
            "sweep_same_accuracies": float(same),
            "sweep_wall_s_tool_jobs1": one_total,
            "sweep_startup_s_per_run_tool_jobs1": one_startup,
            "sweep_own_s_per_run_tool_jobs1": one_own}


def read_accuracy_of(run):
    from pathlib import Path

    return read_accuracy(Path(run.output_dir, "log.txt"))


def print_sweep_table(results, log=print):
    r = results
    log(f"  wall time, {r['sweep_runs']} runs: one process per run "
        f"{r['sweep_wall_s_one_process_per_run']:.1f} s, textrefiner-sweep --jobs "
        f"{r['sweep_jobs']} {r['sweep_wall_s_tool']:.1f} s: ratio {r['sweep_wall_ratio']:.3f}")
    log(f"  start-up per run (wall - own train+eval): one process "
        f"{r['sweep_startup_s_per_run_one_process']:.2f} s, sweep "
        f"{r['sweep_startup_s_per_run_tool']:.2f} s (own train+eval per run: "
        f"{r['sweep_own_s_per_run_one_process']:.2f} s / {r['sweep_own_s_per_run_tool']:.2f} s)")
    log(f"  --jobs 1: wall {r['sweep_wall_s_tool_jobs1']:.1f} s, start-up per run "
        f"{r['sweep_startup_s_per_run_tool_jobs1']:.2f} s (own train+eval "
        f"{r['sweep_own_s_per_run_tool_jobs1']:.2f} s)")
    log(f"  same accuracies: {'yes' if r['sweep_same_accuracies'] else 'NO'}")


if __name__ == "__main__":
    found = sweep_section()
    print_sweep_table(found)
    print(json.dumps(found, indent=2))
