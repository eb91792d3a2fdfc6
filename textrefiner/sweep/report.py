"""The sweep's report in OUT/report: results.md, results.csv and results.png, from the output tree
as `textrefiner-results` reads it (textrefiner.results: rows, means, spreads, the bar plot), with
mean ± standard deviation over seeds and, for the paper's sweeps, the published number and the
difference beside each cell (paper_numbers.yaml). A sweep over one setting (fig4, fig5) is drawn
as lines of base, novel and HM against that setting.
"""
from __future__ import annotations

import csv
import io
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from .. import results
from ..results import AVERAGE, DATASET_NAMES
from .spec import Spec

VARIANT_MARK = results.GRID_MARK  # config folder "<cfg>@<variant or grid point>"


@lru_cache(maxsize=None)
def paper_numbers() -> dict:
    return yaml.safe_load(resources.files(__package__).joinpath("paper_numbers.yaml").read_text())


def paper_cells(spec: Spec) -> dict:
    """{dataset: {label: numbers}} of the spec's table, or {}."""
    if not spec.paper:
        return {}
    return paper_numbers()[spec.paper]["cells"]


def label_of(method: str, cfg: str) -> str:
    """"CoOp+TR" or "CoOp+TR@cache": the method and its variant or grid point."""
    return method + (VARIANT_MARK + cfg.split(VARIANT_MARK, 1)[1] if VARIANT_MARK in cfg else "")


def cell(mean, std, paper=None) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    if paper is not None:
        text += f" (paper {paper:.2f}, {mean - paper:+.2f})"
    return text


def base2new_markdown(rows, paper: dict) -> str:
    parts = ["## Base-to-novel (accuracy %, mean ± std over seeds; HM = 2BN/(B+N); "
             "(paper P, difference) where the paper has the cell)", ""]
    for dataset in dict.fromkeys(r.dataset for r in rows):
        title = DATASET_NAMES.get(dataset, dataset)
        seeds = "Datasets" if dataset == AVERAGE else "Seeds"
        parts += [f"### {title}", "", f"| Method | Base | Novel | HM | {seeds} |",
                  "|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r.dataset == dataset):
            label = label_of(r.method, r.cfg)
            published = paper.get(dataset, {}).get(label) or [None] * 3
            parts.append(f"| {label} | {cell(r.base, r.base_std, published[0])} | "
                         f"{cell(r.novel, r.novel_std, published[1])} | "
                         f"{cell(r.hm, r.hm_std, published[2])} | {r.seeds} |")
        parts.append("")
    return "\n".join(parts)


def cross_markdown(rows, paper: dict) -> str:
    datasets = list(dict.fromkeys(sorted((r.dataset for r in rows), key=results._dataset_order)))
    labels = list(dict.fromkeys(label_of(r.method, r.cfg) for r in sorted(
        rows, key=lambda r: results._method_order((r.method, r.cfg, r.shots)))))
    table = {(r.dataset, label_of(r.method, r.cfg)): r for r in rows}
    parts = ["## Cross-dataset / cross-domain (accuracy %, mean ± std over seeds; trained on "
             "ImageNet; (paper P, difference))", "",
             "| Method | " + " | ".join(DATASET_NAMES.get(d, d) for d in datasets) + " |",
             "|---|" + "---:|" * len(datasets)]
    for label in labels:
        cells = []
        for d in datasets:
            r = table.get((d, label))
            cells.append(cell(r.accuracy, r.std, paper.get(d, {}).get(label)) if r else "-")
        parts.append(f"| {label} | " + " | ".join(cells) + " |")
    parts.append("")
    return "\n".join(parts)


def to_csv(b2n, xd, paper: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "dataset", "method", "cfg", "shots", "seeds", "base", "base_std",
                     "novel", "novel_std", "hm", "hm_std", "accuracy", "accuracy_std",
                     "paper_base", "paper_novel", "paper_hm", "paper_accuracy"])
    f = results._csv
    for r in b2n:
        published = paper.get(r.dataset, {}).get(label_of(r.method, r.cfg)) or [None] * 3
        writer.writerow(["base2new", r.dataset, r.method, r.cfg, r.shots, r.seeds, f(r.base),
                         f(r.base_std), f(r.novel), f(r.novel_std), f(r.hm), f(r.hm_std), "", "",
                         *map(f, published), ""])
    for r in xd:
        writer.writerow(["xd", r.dataset, r.method, r.cfg, r.shots, r.seeds, "", "", "", "", "",
                         "", f(r.accuracy), f(r.std), "", "", "",
                         f(paper.get(r.dataset, {}).get(label_of(r.method, r.cfg)))])
    return buf.getvalue()


def grid_axis(spec: Spec):
    """(config key, values) when the sweep varies one setting of one method: a line plot."""
    keys = {k for g in spec.grid for k in g}
    if len(keys) != 1 or len(spec.methods) != 1:
        return None
    key = keys.pop()
    return key, [v for g in spec.grid for v in g[key]]


def line_plot(rows, key: str, paper: dict, path: Path) -> None:
    """Base, novel and HM against the grid's setting: value labels, the seeds' spread as error
    bars, the paper's values as markers, an axis zoomed to the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    short = key.rsplit(".", 1)[-1]
    points = []
    for r in rows:
        label = label_of(r.method, r.cfg)
        if r.dataset == AVERAGE or f"{short}=" not in label:
            continue
        x = float(label.split(f"{short}=", 1)[1].split(",")[0])
        points.append((x, r, paper.get(r.dataset, {}).get(label)))
    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    shown = []
    for i, (name, get) in enumerate((("Base", lambda r: (r.base, r.base_std)),
                                     ("Novel", lambda r: (r.novel, r.novel_std)),
                                     ("HM", lambda r: (r.hm, r.hm_std)))):
        xs = [x for x, r, _ in points if get(r)[0] is not None]
        ys = [get(r)[0] for _, r, _ in points if get(r)[0] is not None]
        es = [get(r)[1] or 0.0 for _, r, _ in points if get(r)[0] is not None]
        line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize="x-small")
        marks = [(x, p[i]) for x, _, p in points if p]
        if marks:
            ax.scatter([x for x, _ in marks], [v for _, v in marks], marker="D", s=30,
                       color=line[0].get_color(), edgecolors="black", zorder=3,
                       label=f"{name} (paper)")
        shown += [y - e for y, e in zip(ys, es)] + [y + e for y, e in zip(ys, es)]
        shown += [v for _, v in marks]
    if len({x for x, _, _ in points}) > 1 and min(x for x, _, _ in points) > 0 and \
            max(x for x, _, _ in points) / min(x for x, _, _ in points) >= 10:
        ax.set_xscale("log")
    ticks = sorted({x for x, _, _ in points})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_locator(NullLocator())  # the grid's values only: no "6x10^0" between them
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(*results.zoomed_limits(shown))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the lines
    datasets = dict.fromkeys(DATASET_NAMES.get(r.dataset, r.dataset) for _, r, _ in points)
    ax.set_title(f"{', '.join(datasets)}: accuracy against {short}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir, spec: Spec) -> list:
    """Write OUT/report/results.{md,csv,png}; return their paths ([] when nothing finished)."""
    out_dir = Path(out_dir)
    runs = results.scan_runs(out_dir, "base2new") + results.scan_runs(out_dir, "xd")
    b2n, xd = results.base2new_rows(runs), results.cross_rows(runs)
    if not b2n and not xd:
        return []
    paper = paper_cells(spec)
    report = out_dir / "report"
    os.makedirs(report, exist_ok=True)
    sections = ([base2new_markdown(b2n, paper)] if b2n else []) + \
        ([cross_markdown(xd, paper)] if xd else [])
    title = f"# {spec.name}" + (f": the paper's {spec.paper}" if spec.paper else "")
    (report / "results.md").write_text("\n".join([title, ""] + sections))
    (report / "results.csv").write_text(to_csv(b2n, xd, paper))
    axis = grid_axis(spec)
    if axis and b2n:
        line_plot(b2n, axis[0], paper, report / "results.png")
    else:
        marks = {}
        for r in b2n:
            published = paper.get(r.dataset, {}).get(label_of(r.method, r.cfg))
            for title_, value in zip(("Base", "Novel", "HM"), published or ()):
                marks[(title_, r.dataset, r.method, r.cfg, r.shots)] = value
        for r in xd:
            value = paper.get(r.dataset, {}).get(label_of(r.method, r.cfg))
            if value is not None:
                marks[("Cross-dataset", r.dataset, r.method, r.cfg, r.shots)] = value
        results.plot(b2n, xd, report / "results.png", paper=marks,
                     label=lambda m, c, k: label_of(m, c))
    return [str(report / name) for name in ("results.md", "results.csv", "results.png")]
