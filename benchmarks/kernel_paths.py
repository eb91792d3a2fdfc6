"""How much the demo's accuracies move across CPU kernel paths (what another machine would run).

PyTorch picks its CPU kernels at start-up, and each kernel sums in its own order: ATen's vectorised
kernels from `ATEN_CPU_CAPABILITY` (default, avx2, avx512), oneDNN's from `ONEDNN_MAX_CPU_ISA`,
MKL's matrix products from `MKL_ENABLE_INSTRUCTIONS` (and `MKL_CBWR`). Running
`scripts/demo.sh` under each setting this CPU supports stands in for other CPUs: the shipped
tiny CLIP is the same file everywhere, so what moves is training's float summation order alone.

    python benchmarks/kernel_paths.py [--out DIR] [--json benchmarks/results_kernel_paths.json]

Prints every run's accuracy (method, seed, base / novel) under each setting and its spread
(max - min over settings), and how far each setting's trained weights are from the first
setting's (which shows that the settings did run other kernels); tests/test_demo_learns.py takes
its margins from these. `--reuse` reads the runs already under --out instead of running them.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from glob import glob

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from textrefiner.checkpoint import read_checkpoint  # noqa: E402
from textrefiner.results import scan_runs  # noqa: E402

SETTINGS = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "oldest-x86": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                   "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:
        return set()


def supported_settings() -> dict:
    settings = dict(SETTINGS)
    if "avx512f" not in cpu_flags():
        del settings["aten-avx512"]  # torch would quietly run its avx2 kernels instead
    return settings


def run_demo(out: str, env: dict) -> float:
    start = time.time()
    subprocess.run(["bash", os.path.join(REPO, "scripts", "demo.sh"), out], cwd=REPO,
                   env=dict(os.environ, **env), check=True, stdout=subprocess.DEVNULL)
    return time.time() - start


def accuracies(out: str) -> dict:
    """{(method, seed, "base" | "novel"): accuracy} of one demo run."""
    half = {"train_base": "base", "test_new": "novel"}
    return {(run.method, run.seed, half[run.stage]): run.accuracy
            for run in scan_runs(out, "base2new")}


def trained_weights(out: str) -> dict:
    """{checkpoint path below `out`: its state dict} of every run's last checkpoint."""
    found = {}
    for path in glob(os.path.join(out, "base2new", "train_base", "**", "model.pth.tar-*"),
                     recursive=True):
        found[os.path.relpath(path, out)] = read_checkpoint(path)["state_dict"]
    return found


def largest_difference(states: dict, reference: dict) -> float:
    """max |a - b| over every floating-point tensor of every checkpoint both hold."""
    return max((float((a[key].float() - reference[path][key].float()).abs().max())
                for path, a in states.items() if path in reference
                for key in a if a[key].is_floating_point()), default=0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the demo runs go (default: a temp dir)")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks",
                                                       "results_kernel_paths.json"))
    parser.add_argument("--reuse", action="store_true",
                        help="read the runs already under --out instead of running the demo")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="kernel_paths_")
    table, seconds, weights = {}, {}, {}
    for name, env in supported_settings().items():
        if not args.reuse:
            seconds[name] = run_demo(os.path.join(out, name), env)
            print(f"{name}: {seconds[name]:.0f} s", flush=True)
        table[name] = accuracies(os.path.join(out, name))
        weights[name] = trained_weights(os.path.join(out, name))
    first = next(iter(weights))
    moved = {name: largest_difference(states, weights[first]) for name, states in weights.items()}
    print(f"\nlargest difference of the trained weights from {first}'s: "
          + ", ".join(f"{name} {value:.1e}" for name, value in moved.items()))

    values = defaultdict(dict)
    for name, found in table.items():
        for key, accuracy in found.items():
            values[key][name] = accuracy
    names = list(table)
    print("\n| run | " + " | ".join(names) + " | spread |")
    print("|---|" + "---:|" * (len(names) + 1))
    rows = []
    for key in sorted(values):
        row = values[key]
        spread = max(row.values()) - min(row.values())
        method, seed, half = key
        rows.append({"method": method, "seed": seed, "half": half, "spread": round(spread, 2),
                     **{name: row.get(name) for name in names}})
        print(f"| {method} seed {seed} {half} | "
              + " | ".join(f"{row.get(n, float('nan')):.1f}" for n in names)
              + f" | {spread:.1f} |")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"settings": supported_settings(), "seconds": seconds, "runs": rows,
                   "largest_weight_difference": moved}, f, indent=1)
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
