"""`textrefiner-results`: collect accuracies from an output tree into Table 1 / Table 2 shaped tables.

Layout read (written by scripts/base2new.sh and scripts/xd.sh):
  <out>/base2new/{train_base,test_new}/<dataset>/shots_<K>/<Method>/<cfg>/seed<S>/log.txt
  <out>/xd/{train,test}/<dataset>/shots_<K>/<Method>/<cfg>/seed<S>/log.txt
Each run's accuracy is the last "* accuracy: <x>%" line of its log.txt.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

from textrefiner.errors import describe_os_error

ACCURACY_LINE = re.compile(r"^\s*\* accuracy: ([0-9]+(?:\.[0-9]+)?)%", re.MULTILINE)
EVALUATION_HEADER = re.compile(r"Evaluate on the \*(\w+)\* set")
SEED_DIR = re.compile(r"^seed_?(\d+)$")

# Paper order and display names (CoOp's dataset config names as keys).
DATASET_NAMES = {
    "imagenet": "ImageNet",
    "caltech101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102",
    "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
    "imagenetv2": "-V2",
    "imagenet_sketch": "-Sketch",
    "imagenet_a": "-A",
    "imagenet_r": "-R",
}
AVERAGE = "Average"
# Table 1's order of methods; each "<method>+TR" row follows its method, unknown names come last.
METHOD_ORDER = ("ZeroshotCLIP", "CoOp", "CoCoOp", "MaPLe", "PromptSRC", "PromptKD")
TR_SUFFIX = "+TR"  # scripts/common.sh set_method
GRID_MARK = "@"  # a sweep's config folder "<cfg>@<variant or grid point>" (textrefiner/sweep/spec.py)


@dataclass(frozen=True)
class Run:
    """One run directory: which experiment it belongs to and its accuracy (None if unfinished)."""

    stage: str  # train_base | test_new | train | test
    dataset: str
    shots: int
    method: str
    cfg: str
    seed: int
    accuracy: float | None
    log: Path


@dataclass(frozen=True)
class Base2NewRow:
    dataset: str  # config name, or "Average"
    method: str
    cfg: str
    shots: int
    base: float | None
    novel: float | None
    base_seeds: int
    novel_seeds: int
    # spread over seeds (sample standard deviation; 0 for one seed; None for Average rows); the
    # HM's is that of the per-seed HMs (seeds with both numbers)
    base_std: float | None = None
    novel_std: float | None = None
    hm_std: float | None = None

    @property
    def hm(self) -> float | None:
        return harmonic_mean(self.base, self.novel)

    @property
    def seeds(self) -> str:
        if self.base_seeds == self.novel_seeds:
            return str(self.base_seeds)
        return f"{self.base_seeds}/{self.novel_seeds}"


@dataclass(frozen=True)
class CrossRow:
    dataset: str
    method: str
    cfg: str
    shots: int
    accuracy: float
    seeds: int
    std: float | None = None  # over seeds, as Base2NewRow's


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    """HM = 2BN / (B + N), as in Table 1."""
    if base is None or novel is None or base + novel == 0:
        return None
    return 2 * base * novel / (base + novel)


def read_accuracy(log: Path) -> float | None:
    """The last "* accuracy: x%" value in `log` that is not a validation result (a run killed
    while validating every epoch for TEST.FINAL_MODEL best_val has only those), or None."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    parts = EVALUATION_HEADER.split(text)  # [before, split, section, split, section, ...]
    sections = [parts[0]] + [body for split, body in zip(parts[1::2], parts[2::2])
                             if split != "val"]
    found = [value for section in sections for value in ACCURACY_LINE.findall(section)]
    return float(found[-1]) if found else None


def scan_runs(out_root: Path | str, setting: str) -> list[Run]:
    """All seed directories under <out_root>/<setting> ("base2new" or "xd")."""
    runs = []
    for seed_dir in sorted(Path(out_root, setting).glob("*/*/shots_*/*/*/seed*")):
        match = SEED_DIR.match(seed_dir.name)
        if not seed_dir.is_dir() or not match:
            continue
        cfg_dir = seed_dir.parent
        method_dir = cfg_dir.parent
        shots_dir = method_dir.parent
        dataset_dir = shots_dir.parent
        log = seed_dir / "log.txt"
        runs.append(Run(
            stage=dataset_dir.parent.name, dataset=dataset_dir.name, shots=int(shots_dir.name[len("shots_"):]),
            method=method_dir.name, cfg=cfg_dir.name, seed=int(match.group(1)), accuracy=read_accuracy(log), log=log,
        ))
    return runs


def incomplete(runs: list[Run]) -> list[str]:
    """Warnings for runs without a log or an accuracy line."""
    return [f"no accuracy in {r.log}" + ("" if r.log.exists() else " (log.txt missing)")
            for r in runs if r.accuracy is None]


def _dataset_order(name: str) -> tuple[int, str]:
    order = list(DATASET_NAMES)
    return (order.index(name), name) if name in order else (len(order), name)


def _method_order(key: tuple) -> tuple:
    """Sort key of a (method label, cfg, shots) tuple: Table 1's order, "+TR" after its method,
    a sweep's grid points in the order of their values."""
    method, cfg, *rest = key
    base = method[:-len(TR_SUFFIX)] if method.endswith(TR_SUFFIX) else method
    rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, base, method != base, _config_order(cfg)) + tuple(rest)


def _config_order(cfg: str) -> tuple:
    """Sort key of a config folder: a sweep's "<cfg>@<variant or KEY=VALUE,...>" suffix
    (textrefiner/sweep/spec.py) compares its values as numbers (CACHE_SIZE=5 before =10)."""
    name, _, point = cfg.partition(GRID_MARK)
    parts = []
    for part in point.split(",") if point else ():
        setting, _, value = part.partition("=")
        try:
            parts.append((setting, 0, float(value), ""))
        except ValueError:
            parts.append((setting, 1, 0.0, value))
    return (name, tuple(parts))


def _mean_by_seed(runs: list[Run]) -> tuple[float | None, int]:
    accs = [r.accuracy for r in runs if r.accuracy is not None]
    return (mean(accs), len(accs)) if accs else (None, 0)


def _std(values: list) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return stdev(values) if len(values) > 1 else 0.0


def _seed_hms(base_runs: list[Run], novel_runs: list[Run]) -> list:
    novel = {r.seed: r.accuracy for r in novel_runs}
    return [harmonic_mean(r.accuracy, novel.get(r.seed)) for r in base_runs]


def base2new_rows(runs: list[Run]) -> list[Base2NewRow]:
    """One row per (dataset, method, cfg, shots), base and novel averaged over seeds, after the
    Average rows (only when there are several datasets: an average of one is that dataset again)."""
    groups: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.stage in ("train_base", "test_new"):
            groups[(run.dataset, run.method, run.cfg, run.shots)][run.stage].append(run)
    rows = []
    for (dataset, method, cfg, shots), stages in groups.items():
        base, n_base = _mean_by_seed(stages["train_base"])
        novel, n_novel = _mean_by_seed(stages["test_new"])
        if base is None and novel is None:
            continue
        rows.append(Base2NewRow(
            dataset, method, cfg, shots, base, novel, n_base, n_novel,
            _std([r.accuracy for r in stages["train_base"]]),
            _std([r.accuracy for r in stages["test_new"]]),
            _std(_seed_hms(stages["train_base"], stages["test_new"]))))
    rows.sort(key=lambda r: (_dataset_order(r.dataset), _method_order((r.method, r.cfg, r.shots))))
    if len({r.dataset for r in rows}) == 1:
        return rows
    return average_rows(rows) + rows


def average_rows(rows: list[Base2NewRow]) -> list[Base2NewRow]:
    """Table 1's Average: mean base and mean novel over datasets; HM of those means.

    Only datasets with both numbers count; the seeds field holds the number of datasets.
    """
    per_method: dict[tuple, list[Base2NewRow]] = defaultdict(list)
    for row in rows:
        if row.base is not None and row.novel is not None:
            per_method[(row.method, row.cfg, row.shots)].append(row)
    return [
        Base2NewRow(AVERAGE, method, cfg, shots, mean(r.base for r in group), mean(r.novel for r in group),
                    len(group), len(group))
        for (method, cfg, shots), group in sorted(per_method.items(), key=lambda kv: _method_order(kv[0]))
    ]


def cross_rows(runs: list[Run]) -> list[CrossRow]:
    """One accuracy per (dataset, method) averaged over seeds; ImageNet from xd/test, else xd/train."""
    groups: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.stage in ("train", "test"):
            groups[(run.dataset, run.method, run.cfg, run.shots)][run.stage].append(run)
    rows = []
    for (dataset, method, cfg, shots), stages in groups.items():
        stage = "test" if _mean_by_seed(stages["test"])[0] is not None else "train"
        acc, n = _mean_by_seed(stages[stage])
        if acc is not None:
            rows.append(CrossRow(dataset, method, cfg, shots, acc, n,
                                 _std([r.accuracy for r in stages[stage]])))
    rows.sort(key=lambda r: (_dataset_order(r.dataset), _method_order((r.method, r.cfg, r.shots))))
    return rows


def summarize_base2new(out_root, dataset=None, method=None, cfg=None, shots=None) -> list[Base2NewRow]:
    """Base / novel / HM averaged over seeds, optionally for one dataset and/or method (label, e.g. "CoOp+TR")."""
    rows = base2new_rows(scan_runs(out_root, "base2new"))
    return [r for r in rows
            if r.dataset != AVERAGE
            and dataset in (None, r.dataset) and method in (None, r.method)
            and cfg in (None, r.cfg) and shots in (None, r.shots)]


# ----------------------------------------------------------------------------- formatting


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _label(keys: list[tuple[str, str, int]]):
    """Method label: the name alone unless a method was run with several cfg/shots."""
    counts = defaultdict(int)
    for method, _, _ in keys:
        counts[method] += 1
    return lambda m, c, k: m if counts[m] == 1 else f"{m} ({c}, {k} shots)"


def base2new_markdown(rows: list[Base2NewRow]) -> str:
    label = _label(sorted({(r.method, r.cfg, r.shots) for r in rows}))
    parts = ["## Base-to-novel generalisation (accuracy %, mean over seeds; HM = 2BN/(B+N))", ""]
    datasets = []
    for r in rows:
        if r.dataset not in datasets:
            datasets.append(r.dataset)
    for dataset in datasets:
        title = DATASET_NAMES.get(dataset, dataset)
        seeds_col = "Datasets" if dataset == AVERAGE else "Seeds"
        parts += [f"### {title}", "", f"| Method | Base | Novel | HM | {seeds_col} |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r.dataset == dataset:
                parts.append(f"| {label(r.method, r.cfg, r.shots)} | {_fmt(r.base)} | {_fmt(r.novel)} "
                             f"| {_fmt(r.hm)} | {r.seeds} |")
        parts.append("")
    return "\n".join(parts)


def cross_markdown(rows: list[CrossRow]) -> str:
    keys = sorted({(r.method, r.cfg, r.shots) for r in rows}, key=_method_order)
    label = _label(keys)
    datasets = sorted({r.dataset for r in rows}, key=_dataset_order)
    table = {(r.dataset, r.method, r.cfg, r.shots): r for r in rows}
    head = "| Method | " + " | ".join(DATASET_NAMES.get(d, d) for d in datasets) + " | Seeds |"
    parts = ["## Cross-dataset / cross-domain (accuracy %, mean over seeds; trained on ImageNet)", "",
             head, "|---|" + "---:|" * (len(datasets) + 1)]
    for key in keys:
        cells = [table.get((d, *key)) for d in datasets]
        seeds = sorted({c.seeds for c in cells if c})
        parts.append(f"| {label(*key)} | " + " | ".join(_fmt(c.accuracy if c else None) for c in cells)
                     + f" | {'/'.join(map(str, seeds))} |")
    parts.append("")
    return "\n".join(parts)


def to_csv(b2n: list[Base2NewRow], xd: list[CrossRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "dataset", "method", "cfg", "shots", "seeds", "base", "novel", "hm", "accuracy"])
    for r in b2n:
        writer.writerow(["base2new", r.dataset, r.method, r.cfg, r.shots, r.seeds,
                         _csv(r.base), _csv(r.novel), _csv(r.hm), ""])
    for r in xd:
        writer.writerow(["xd", r.dataset, r.method, r.cfg, r.shots, r.seeds, "", "", "", _csv(r.accuracy)])
    return buf.getvalue()


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def plot(b2n: list[Base2NewRow], xd: list[CrossRow], path: Path, paper: dict | None = None,
         label=None) -> None:
    """Grouped bars: one panel each for base, novel, HM (and cross-dataset), one bar colour per
    method; each bar with its value, the seeds' spread as an error bar and, where `paper` has it
    ({(panel title, dataset, method, cfg, shots): value}), the published value as a marker. The
    axis spans the values, not 0-100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if b2n:
        for title, getter in (("Base", lambda r: (r.base, r.base_std)),
                              ("Novel", lambda r: (r.novel, r.novel_std)),
                              ("HM", lambda r: (r.hm, r.hm_std))):
            panels.append((title, {(r.dataset, r.method, r.cfg, r.shots): getter(r) for r in b2n}))
    if xd:
        panels.append(("Cross-dataset", {(r.dataset, r.method, r.cfg, r.shots): (r.accuracy, r.std)
                                         for r in xd}))
    fig, axes = plt.subplots(max(len(panels), 1), 1, figsize=(12, 3.2 * max(len(panels), 1)), squeeze=False)
    for ax, (title, values) in zip(axes[:, 0], panels):
        _bars(ax, title, values, {k[1:]: v for k, v in (paper or {}).items() if k[0] == title},
              label)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no finished runs", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax, title: str, values: dict, paper: dict, label=None) -> None:
    """values: {(dataset, method, cfg, shots): (mean, std)}; paper: {same key: value}."""
    datasets = sorted({k[0] for k in values}, key=lambda d: (d != AVERAGE, _dataset_order(d)))
    methods = sorted({k[1:] for k in values}, key=_method_order)
    label = label or _label(methods)
    width = 0.8 / max(len(methods), 1)
    shown = []
    for i, method in enumerate(methods):
        cells = [values.get((d, *method)) or (None, None) for d in datasets]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(datasets))]
        kept = [(x, m, s or 0.0) for x, (m, s) in zip(xs, cells) if m is not None]
        if not kept:
            continue
        bars = ax.bar([x for x, _, _ in kept], [m for _, m, _ in kept], width,
                      yerr=[s for _, _, s in kept], capsize=3, label=label(*method))
        ax.bar_label(bars, labels=[f"{m:.1f}" for _, m, _ in kept], fontsize="x-small",
                     padding=2)
        shown += [m - s for _, m, s in kept] + [m + s for _, m, s in kept]
        marks = [(x, paper[(d, *method)]) for x, d in zip(xs, datasets) if (d, *method) in paper]
        if marks:
            labelled = "paper" in ax.get_legend_handles_labels()[1]
            ax.scatter([x for x, _ in marks], [v for _, v in marks], marker="D", color="black",
                       zorder=3, s=18, label=None if labelled else "paper")
            shown += [v for _, v in marks]
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels([DATASET_NAMES.get(d, d) for d in datasets], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(*zoomed_limits(shown))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the bars


def zoomed_limits(values: list, low: float = 0.0, high: float = 100.0) -> tuple:
    """An axis that shows the differences: the values' span plus a margin (room for the value
    labels above the bars), within [low, high]."""
    if not values:
        return low, high
    span = max(max(values) - min(values), 1.0)
    return max(low, min(values) - 0.6 * span), min(high, max(values) + 0.4 * span)


# ----------------------------------------------------------------------------- command line


def _keep(value, wanted) -> bool:
    return wanted is None or value == wanted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textrefiner-results",
                                     description="Tabulate base-to-novel and cross-dataset results.")
    parser.add_argument("out_root", type=Path, help="output tree written by scripts/base2new.sh / xd.sh")
    parser.add_argument("--out", type=Path, help="write results.md, results.csv and results.png here")
    parser.add_argument("--dataset", help="only this dataset (config name, e.g. oxford_pets)")
    parser.add_argument("--method", help='only this method label (e.g. "CoOp+TR")')
    parser.add_argument("--cfg", help="only this config name")
    parser.add_argument("--shots", type=int, help="only this number of shots")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--base2new-summary", action="store_true",
                      help="print one line of base / novel / HM per dataset and method")
    mode.add_argument("--xd-summary", action="store_true", help="print only the cross-dataset table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = [r for r in scan_runs(args.out_root, "base2new") + scan_runs(args.out_root, "xd")
            if _keep(r.dataset, args.dataset) and _keep(r.method, args.method)
            and _keep(r.cfg, args.cfg) and _keep(r.shots, args.shots)]
    for warning in incomplete(runs):
        print(f"warning: {warning}", file=sys.stderr)
    b2n = base2new_rows(runs)
    xd = cross_rows(runs)

    if args.base2new_summary:
        for r in b2n:
            if r.dataset != AVERAGE:
                print(f"{r.dataset} {r.method} ({r.cfg}, {r.shots} shots): base {_fmt(r.base)}  "
                      f"novel {_fmt(r.novel)}  HM {_fmt(r.hm)}  (seeds: {r.seeds})")
        if not any(r.dataset != AVERAGE for r in b2n):
            print("no finished base-to-novel runs found", file=sys.stderr)
            return 1
        return 0
    sections = []
    if b2n and not args.xd_summary:
        sections.append(base2new_markdown(b2n))
    if xd:
        sections.append(cross_markdown(xd))
    if not sections:
        print(f"no finished runs found under {args.out_root}", file=sys.stderr)
        return 1
    markdown = "\n".join(sections)
    if args.out is None or args.xd_summary:
        print(markdown)
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.md").write_text(markdown)
            (args.out / "results.csv").write_text(to_csv(b2n, xd))
            plot(b2n, xd, args.out / "results.png")
        except OSError as err:
            print(f"error: cannot write the tables to --out: {describe_os_error(err)}",
                  file=sys.stderr)
            return 1
        print(f"wrote {args.out / 'results.md'}, results.csv, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
