"""textrefiner-explain's pictures and its report folder (index.html + PNGs, opens from the disk).

Every picture is drawn from an `Explanation` (textrefiner.explain.numbers) and the image files; nothing
here runs the model. Patches are cut from the images resized and cropped as the model saw them.
"""
import html
import io
import os
import sys
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from .numbers import Explanation, explain_image, similar_order

TILE = 56           # px of one patch in the atlas strips
THUMB_CLASSES = 5   # classes in each image's bar chart
CLASS_LABELS = 80   # the heatmap names its classes up to this many
ACCURACY_CLASSES = 60


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, dpi=100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- images
class _Images:
    """The images as the model saw them (PIL, input size), read once each on demand."""

    def __init__(self, explanation: Explanation):
        self.explanation = explanation
        self.seen = {}

    def __getitem__(self, index: int) -> Image.Image:
        if index not in self.seen:
            self.seen[index] = _as_seen(self.explanation, index)
        return self.seen[index]


def _as_seen(explanation: Explanation, index: int, image=None) -> Image.Image:
    source = image if image is not None else explanation.paths[index]
    if not source and explanation.sources is not None:
        source = explanation.sources[index]
    if not isinstance(source, Image.Image):
        if not source:
            raise ValueError(f"image {index} was given as a tensor: pass it as `image` (a PIL "
                             "image) to draw it")
        with Image.open(source) as img:
            source = img.convert("RGB")
    shown = explanation.display(source) if explanation.display is not None else source
    height, width = explanation.image_size
    return shown.convert("RGB").resize((width, height)) if shown.size != (width, height) \
        else shown.convert("RGB")


def _patch(image: Image.Image, row: int, col: int, grid) -> Image.Image:
    width, height = image.size
    rows, cols = grid
    box = (round(col * width / cols), round(row * height / rows),
           round((col + 1) * width / cols), round((row + 1) * height / rows))
    return image.crop(box).resize((TILE, TILE), Image.NEAREST)


def entry_strip(explanation: Explanation, entry: int, images: _Images) -> Image.Image:
    """The patches nearest entry `entry`, best first, side by side (TILE px each)."""
    boxes = explanation.patch_boxes(explanation.nearest[entry]).tolist()
    strip = Image.new("RGB", (len(boxes) * (TILE + 2), TILE + 2), "white")
    for i, (image, row, col, _) in enumerate(boxes):
        strip.paste(_patch(images[image], row, col, explanation.grid), (i * (TILE + 2) + 1, 1))
    return strip


def atlas_png(explanation: Explanation, images: _Images, entries=None) -> Image.Image:
    """One picture of the cache: a row per entry (all, the most-written first, or `entries` in
    that order) with its patch-token count, the class that reads it most, and its nearest
    patches. An entry no token of these images is assigned to is labelled so in grey: its
    nearest patches are merely the least far."""
    from PIL import ImageFont

    counts = explanation.token_counts()
    if entries is None:
        entries = torch.sort(counts, descending=True, stable=True).indices.tolist()
    font = ImageFont.load_default(size=13)
    reader = explanation.read_weights.max(dim=0)
    strips = [entry_strip(explanation, e, images) for e in entries]
    label_width, row = 300, TILE + 6
    atlas = Image.new("RGB", (label_width + max(s.width for s in strips), row * len(strips)),
                      "white")
    draw = ImageDraw.Draw(atlas)
    for i, (entry, strip) in enumerate(zip(entries, strips)):
        name = _short(explanation.classnames[int(reader.indices[entry])], 22)
        written = int(counts[entry]) > 0
        draw.text((6, i * row + 8), f"entry {entry}: {int(counts[entry])} tokens"
                  + ("" if written else " (none assigned)"),
                  fill="black" if written else "#999999", font=font)
        draw.text((6, i * row + 28), f"read most by {name} ({float(reader.values[entry]):.3f})",
                  fill="#444444" if written else "#999999", font=font)
        atlas.paste(strip, (label_width, i * row + 2))
    return atlas


# ---------------------------------------------------------------------------- per image
def image_figure_png(explanation: Explanation, index: int, image=None, dpi: int = 100,
                     images: _Images = None) -> bytes:
    """`textrefiner.explain.draw_image_explanation`'s picture (PNG bytes)."""
    plt = _pyplot()
    seen = images[index] if images is not None else _as_seen(explanation, index, image)
    rows, cols = explanation.grid
    width, height = seen.size
    extent = (0, width, height, 0)
    names = explanation.classnames
    label = int(explanation.labels[index])
    predicted = int(explanation.predictions[index])
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1.2, 1.2, 1.3]})
    marked = axes[0]
    marked.imshow(seen, extent=extent)
    marked.set_xticks([])
    marked.set_yticks([])
    k = explanation.semantic_patches.shape[1]
    for rank, patch in enumerate(explanation.semantic_patches[index].tolist(), start=1):
        r, c = divmod(patch, cols)
        x0, y0, w, h = c * width / cols, r * height / rows, width / cols, height / rows
        marked.add_patch(plt.Rectangle((x0, y0), w, h, fill=False, edgecolor="#ffeb3b", lw=2))
        marked.text(x0 + w * 0.08, y0 + h * 0.35, str(rank), color="black", fontsize=8,
                    bbox=dict(facecolor="#ffeb3b", edgecolor="none", pad=1))
    marked.set_title(f"top-{k} semantic patches (by CLS attention)", fontsize=9)
    _overlay(axes[1], seen, explanation.cls_attention[index], (rows, cols), "magma",
             "CLS attention over patches", plt)
    similarity = explanation.patch_similarity[index]
    which = "refined " if explanation.has_refiner else ""
    _overlay(axes[2], seen, similarity, (rows, cols), "RdBu_r",
             f"patch cos. with {which}'{_short(names[predicted])}'", plt,
             limit=float(similarity.abs().max()))
    _class_bars(axes[3], explanation, index)
    truth = f"true: {names[label]}" if label >= 0 else "true: unknown"
    plain = int(explanation.predictions_plain[index])
    verdict = f"predicted: {names[predicted]}" + (
        f" (without refinement: {names[plain]})" if plain != predicted else "")
    fig.suptitle(f"{_where(explanation, index)}  |  {truth}  |  {verdict}", fontsize=10)
    return _png(fig, dpi)


def _where(explanation: Explanation, index: int) -> str:
    """The image's file with its folder (datasets repeat file names across class folders)."""
    path = explanation.paths[index]
    if not path:
        return f"image {index}"
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _overlay(ax, seen, values, grid, cmap, title, plt, limit=None):
    width, height = seen.size
    ax.imshow(seen, extent=(0, width, height, 0))
    grid_values = values.reshape(grid).numpy()
    shown = ax.imshow(grid_values, extent=(0, width, height, 0), cmap=cmap, alpha=0.6,
                      interpolation="nearest",
                      vmin=-limit if limit else None, vmax=limit if limit else None)
    plt.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _class_bars(ax, explanation: Explanation, index: int):
    refined = explanation.probabilities()[index]
    plain = explanation.probabilities(plain=True)[index]
    top = torch.unique(torch.cat([refined.topk(min(THUMB_CLASSES, len(refined))).indices,
                                  plain.topk(min(THUMB_CLASSES, len(plain))).indices]))
    top = top[torch.argsort(refined[top], descending=True)][:THUMB_CLASSES + 2].flip(0)
    positions = torch.arange(len(top)).float()
    label = int(explanation.labels[index])
    if explanation.has_refiner:
        ax.barh(positions + 0.2, refined[top].numpy(), height=0.4, color="#1f77b4",
                label="with refinement (Ê)")
        ax.barh(positions - 0.2, plain[top].numpy(), height=0.4, color="#bbbbbb",
                label="without (E)")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.barh(positions, refined[top].numpy(), height=0.6, color="#1f77b4")
    names = [_short(explanation.classnames[i]) + (" ✓" if i == label else "")
             for i in top.tolist()]
    ax.set_yticks(positions.numpy(), names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("top classes (probability)", fontsize=9)
    ax.yaxis.tick_right()


def _short(name: str, length: int = 28) -> str:
    return name if len(name) <= length else name[:length - 1] + "…"


# ---------------------------------------------------------------------------- cache pictures
def class_reads_png(explanation: Explanation):
    """(PNG bytes, class order, entry order) of the classes x entries read-weight heatmap."""
    plt = _pyplot()
    weights = explanation.read_weights
    classes, entries = similar_order(weights), similar_order(weights.t())
    shown = weights[classes][:, entries].numpy()
    n_classes, n_entries = shown.shape
    fig, ax = plt.subplots(figsize=(min(3 + 0.3 * n_entries, 20),
                                    min(1.8 + 0.22 * min(n_classes, CLASS_LABELS), 24)))
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_entries), [str(e) for e in entries.tolist()], fontsize=7)
    ax.set_xlabel("cache entry")
    if n_classes <= CLASS_LABELS:
        ax.set_yticks(range(n_classes), [_short(explanation.classnames[c])
                                         for c in classes.tolist()], fontsize=7)
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{n_classes} classes")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02).set_label("read weight (Eq. 5)")
    ax.set_title("Which entries each class reads (rows and columns ordered by similarity)",
                 fontsize=10)
    return _png(fig), classes, entries


def usage_png(explanation: Explanation) -> bytes:
    plt = _pyplot()
    counts = explanation.token_counts().numpy()
    cls_counts = torch.bincount(explanation.cls_assignment,
                                minlength=len(counts)).numpy()
    fig, ax = plt.subplots(figsize=(min(3 + 0.3 * len(counts), 20), 2.6))
    ax.bar(range(len(counts)), counts, color="#1f77b4", label="patch tokens")
    ax.bar(range(len(counts)), cls_counts, bottom=counts, color="#ff7f0e", label="CLS tokens")
    ax.set_xticks(range(len(counts)), [str(i) for i in range(len(counts))], fontsize=7)
    ax.set_xlabel("cache entry")
    ax.set_ylabel("tokens assigned")
    ax.legend(fontsize=7)
    ax.set_title("How many of these images' aligned tokens each entry takes", fontsize=10)
    return _png(fig)


def accuracy_png(explanation: Explanation) -> bytes:
    plt = _pyplot()
    refined, plain, count = explanation.per_class_accuracy()
    classes = torch.nonzero(count > 0)[:, 0]
    if len(classes) > ACCURACY_CLASSES:  # the classes refinement moved most
        moved = (refined - plain)[classes].abs()
        classes = classes[torch.argsort(moved, descending=True)[:ACCURACY_CLASSES]]
    positions = torch.arange(len(classes)).float()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.26 * len(classes)))
    ax.barh(positions + 0.2, refined[classes].numpy(), height=0.4, color="#1f77b4",
            label="with refinement (Ê)")
    ax.barh(positions - 0.2, plain[classes].numpy(), height=0.4, color="#bbbbbb",
            label="without (E)")
    ax.set_yticks(positions.numpy(), [_short(explanation.classnames[c]) for c in
                                      classes.tolist()], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: bars reach 100
    ax.set_title("Per-class accuracy on the same images, refiner on and off", fontsize=10)
    return _png(fig)


# ---------------------------------------------------------------------------- the report
def spread_over_classes(explanation: Explanation, count: int):
    """Up to `count` image indices taking each class (label, else prediction) in turn."""
    groups = explanation.labels.where(explanation.labels >= 0, explanation.predictions)
    order = torch.argsort(groups, stable=True)
    rank = torch.arange(len(order)) - torch.searchsorted(groups[order], groups[order])
    turn = torch.empty_like(rank)
    turn[order] = rank                                     # position of each image in its class
    chosen = torch.argsort(turn * len(groups) + groups, stable=True)[:count]
    return chosen.tolist()


def write_report(explanation: Explanation, folder: str, title: str = "run", per_image: int = 12,
                 changed: int = 8, progress: bool = False) -> str:
    """Write the report folder (index.html and its PNGs) for an explanation of image files or
    PIL images; returns the path of index.html. per_image: images drawn in the per-image
    section; changed: changed images drawn each way."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images = _Images(explanation)
    page = _Page(explanation, folder, title)
    if explanation.has_refiner:
        page.cache_atlas(images)
        page.class_reads()
        page.what_changed(images, changed, progress)
    else:
        page.note("This run has no TextRefiner: the cache atlas, the class reads and what "
                  "refinement changed need a run trained with --refiner. Shown: the per-image "
                  "pictures (attention, the top-k patches TextRefiner would take, similarity "
                  "to the predicted class).")
    page.per_image(images, spread_over_classes(explanation, per_image), progress)
    return page.write()


class _Page:
    def __init__(self, explanation: Explanation, folder: str, title: str):
        self.ex, self.folder, self.title = explanation, folder, title
        self.sections = [self._summary()]
        self.drawn = set()

    def save(self, name: str, png: bytes) -> str:
        with open(os.path.join(self.folder, name), "wb") as f:
            f.write(png)
        return name

    def save_image(self, name: str, image: Image.Image) -> str:
        image.save(os.path.join(self.folder, name), format="PNG", optimize=True)
        return name

    def note(self, text: str):
        self.sections.append(f'<p class="note">{html.escape(text)}</p>')

    def _summary(self) -> str:
        ex = self.ex
        facts = [f"{len(ex.paths)} images", f"{len(ex.classnames)} classes",
                 f"{ex.grid[0]} x {ex.grid[1]} patches of a {ex.image_size[1]} x "
                 f"{ex.image_size[0]} px input", f"top-k = {ex.semantic_patches.shape[1]}"]
        if ex.has_refiner:
            facts.append(f"{ex.entries.shape[0]} cache entries of dimension {ex.entries.shape[1]}")
        known = ex.labels >= 0
        if known.any():
            on = (ex.predictions[known] == ex.labels[known]).float().mean() * 100
            off = (ex.predictions_plain[known] == ex.labels[known]).float().mean() * 100
            facts.append(f"accuracy on the {int(known.sum())} labelled images: {on:.1f}%"
                         + (f" with refinement, {off:.1f}% without" if ex.has_refiner else ""))
        items = "".join(f"<li>{html.escape(f)}</li>" for f in facts)
        return f"<h1>What TextRefiner learned: {html.escape(self.title)}</h1><ul>{items}</ul>"

    # ------------------------------------------------------------------------ sections
    def cache_atlas(self, images: _Images):
        ex = self.ex
        counts = ex.token_counts()
        total = int(counts.sum())
        readers = ex.read_weights.topk(min(3, len(ex.classnames)), dim=0)   # per entry
        rows = []
        for entry in range(ex.entries.shape[0]):
            strip = self.save_image(f"images/entry_{entry}.png", entry_strip(ex, entry, images))
            names = ", ".join(f"{html.escape(ex.classnames[c])} ({w:.3f})" for w, c in
                              zip(readers.values[:, entry].tolist(),
                                  readers.indices[:, entry].tolist()))
            share = 100.0 * int(counts[entry]) / max(total, 1)
            rows.append(f"<tr><td>{entry}</td><td>{int(counts[entry])} ({share:.1f}%)</td>"
                        f"<td>{names}</td><td><img src='{strip}' alt='entry {entry}'></td></tr>")
        usage = self.save("usage.png", usage_png(ex))
        atlas = self.save_image("atlas.png", atlas_png(ex, images))
        used = int((counts > 0).sum())
        self.sections.append(
            "<h2 id='atlas'>The cache atlas</h2>"
            "<p>Each entry of the local cache with the image patches whose aligned tokens are "
            "nearest to it (best first, cut from the images at their place), how many patch "
            f"tokens of these images are assigned to it ({used} of {len(counts)} entries take "
            "any), and the classes that read it most (their Eq. 5 weight; uniform would be "
            f"1/{len(counts)} = {1 / len(counts):.3f}).</p>"
            f"<img src='{usage}' alt='entry usage'><h3>All entries in one picture (the "
            "most-written first)</h3>"
            f"<img src='{atlas}' alt='cache atlas'><h3>Entry by entry</h3>"
            "<table><tr><th>entry</th><th>patch tokens</th><th>read most by</th>"
            "<th>nearest patches</th></tr>" + "".join(rows) + "</table>")

    def class_reads(self):
        ex = self.ex
        png, classes, _ = class_reads_png(ex)
        heatmap = self.save("class_reads.png", png)
        top = ex.read_weights.topk(min(3, ex.read_weights.shape[1]), dim=1)
        rows = []
        for c in classes.tolist():
            cells = "".join(f"<td>entry {e} ({w:.3f})<br><img src='images/entry_{e}.png' "
                            f"alt='entry {e}'></td>" for w, e in
                            zip(top.values[c].tolist(), top.indices[c].tolist()))
            rows.append(f"<tr><td>{html.escape(ex.classnames[c])}</td>{cells}</tr>")
        self.sections.append(
            "<h2 id='reads'>Class reads</h2><p>Each class's read weights over the entries (the "
            "softmax of Eq. 5; a row sums to 1); rows and columns ordered so that similar ones "
            "sit together. Below, each class's top entries with their nearest patches.</p>"
            f"<img src='{heatmap}' alt='class reads'><table class='reads'><tr><th>class</th>"
            "<th>1st</th>"
            "<th>2nd</th><th>3rd</th></tr>" + "".join(rows) + "</table>")

    def what_changed(self, images: _Images, limit: int, progress: bool):
        ex = self.ex
        worse, better, changed = ex.changed()
        parts = ["<h2 id='changed'>What refinement changed</h2>"
                 f"<p>{len(changed)} of {len(ex.paths)} predictions differ between the "
                 "refined classifier Ê and E (the refiner switched off, nothing else).</p>"]
        if (ex.labels >= 0).any():
            parts.append(f"<img src='{self.save('accuracy.png', accuracy_png(ex))}' "
                         "alt='per-class accuracy'>")
            for name, chosen in ((f"Wrong to right ({len(better)})", better),
                                 (f"Right to wrong ({len(worse)})", worse)):
                parts.append(f"<h3>{name}</h3>" + self._pictures(images, chosen[:limit].tolist(),
                                                                 progress))
        else:
            parts.append("<p>No labels: which way each change went is unknown.</p>"
                         + self._pictures(images, changed[:2 * limit].tolist(), progress))
        self.sections.append("".join(parts))

    def per_image(self, images: _Images, chosen, progress: bool):
        self.sections.append(
            "<h2 id='images'>Per image</h2><p>The image with the top-k patches TextRefiner's "
            "semantic loss takes (by CLS attention, numbered), the attention map, each patch's "
            "cosine with the predicted class's embedding, and the top classes with and "
            "without refinement (✓ the true class).</p>" + self._pictures(images, chosen,
                                                                         progress))

    def _pictures(self, images: _Images, chosen, progress: bool) -> str:
        tags = []
        for index in tqdm(chosen, desc="pictures", unit="img", file=sys.stderr, leave=False,
                          disable=not progress or None):
            name = f"images/image_{index}.png"
            if index not in self.drawn:
                self.save(name, image_figure_png(self.ex, index, images=images))
                self.drawn.add(index)
            tags.append(f"<img class='wide' src='{name}' alt='image {index}'>")
        return "".join(tags) or "<p>None.</p>"

    def write(self) -> str:
        path = os.path.join(self.folder, "index.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(PAGE.format(title=html.escape(self.title), body="\n".join(self.sections)))
        return path


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>textrefiner-explain: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle;
         font-size: 0.9em; }}
img.wide {{ display: block; max-width: 100%; margin: 0.4em 0; }}
table.reads {{ width: 100%; table-layout: fixed; }}
table.reads th:first-child {{ width: 9em; }}
table.reads img {{ width: 100%; }}
.note {{ background: #fff3cd; padding: 0.6em; }}
</style></head><body>
<p><a href="#atlas">cache atlas</a> · <a href="#reads">class reads</a> ·
<a href="#changed">what refinement changed</a> · <a href="#images">per image</a></p>
{body}
</body></html>
"""


# ---------------------------------------------------------------------------- one image
class ImageFigure(NamedTuple):
    """`explain_image_figure`'s result: png, the per-image picture (PNG bytes); numbers, its
    numbers as plain Python (`Explanation.image_numbers`); explanation, every tensor (I = 1)."""
    png: bytes
    numbers: dict
    explanation: Explanation


def explain_image_figure(predictor, image, label: int = -1, top: int = 5,
                         dpi: int = 100) -> ImageFigure:
    """One image's picture and numbers, for a page that shows one prediction: `image` (a path
    or a PIL image) through `explain_images`, drawn by `draw_image_explanation`. label: its
    class index where known (-1 unknown); top: classes listed in the numbers.

    It encodes the image once, computes E beside Ehat, and for that batch swaps the model's
    refiner out and back (`refiner_off`): a server must not run other predictions on the same
    model object at the same time (hold one lock around both)."""
    explanation = explain_image(predictor, image, label)
    return ImageFigure(draw_image_explanation(explanation, 0, dpi=dpi),
                       explanation.image_numbers(0, top), explanation)


def draw_image_explanation(explanation: Explanation, index: int = 0, image=None,
                           dpi: int = 100) -> bytes:
    """The per-image picture of image `index` as PNG bytes: the image with its top-k semantic
    patches marked, its CLS-attention map, each patch's similarity to the predicted class's
    (refined) embedding, and its top classes with and without refinement. The image is read
    from its path, or taken from the PIL images `explain_images` was given; `image` (a PIL
    image or a path) is needed only where it was given as a tensor. It is shown resized and
    cropped as the model saw it."""
    return image_figure_png(explanation, index, image, dpi)
