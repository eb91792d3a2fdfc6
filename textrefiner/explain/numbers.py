"""The numbers behind textrefiner-explain's pictures: `explain_images` -> `Explanation`.

One pass over the images computes everything (each image is encoded once, with its local
tokens): the evaluator's logits with the refiner on and, from the same image features, with the
refiner switched off and nothing else; the CLS-to-patch attention and the top-k patches that
`select_semantic_tokens` takes; each patch's aligned token's cache entry and the patches nearest
each entry; the classes' read weights (Eq. 5). `textrefiner.explain.report` draws them.
"""
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..clip_backbone import amp_autocast
from ..errors import UserError
from ..losses import semantic_patch_indices
from ..methods.base import image_text_logits
from ..methods.cocoop import CoCoOp
from ..predict import Predictor, _ImageFiles, _readable, _report_skipped

__all__ = ["Explanation", "explain_images", "explain_image", "refiner_off", "attribute_purity",
           "class_entry_match", "similar_order"]

NEAREST = 8      # patches kept per cache entry
DEFAULT_TOPK = 5  # semantic patches marked when the run has no refiner (the published TOPK)


@dataclass
class Explanation:
    """What `explain_images` measured on I images: C classes, N patches per image (a grid of
    `grid` rows x columns), M cache entries, k semantic patches. Tensors are on the CPU, float32
    or int64. Patch indices count from 0 in row-major order over the grid, CLS not included.

    Always present:
        classnames [C] names; paths [I] the image files ("" for in-memory images);
        labels [I] int64 class index, -1 where unknown;
        image_size (H, W) of the model's input; grid (rows, columns) of patches, rows x columns = N;
        logits [I, C] the evaluator's scores (refiner on where the run has one): logits, or
            for LLaMP probabilities (a mean over templates of softmaxes;
            `scores_are_probabilities`);
        logits_plain [I, C] the same images' scores with the refiner switched off and nothing
            else (equal to `logits` without a refiner);
        cls_attention [I, N] the last block's CLS-to-patch attention (a ResNet: its attention
            pool's query to each spatial position), mean over heads;
        semantic_patches [I, k] the top-k patches by that attention, as `select_semantic_tokens`
            takes them (decreasing attention);
        patch_similarity [I, N] cosine of each patch's token, in the classifier's space, with the
            predicted class's (refined) embedding.
    With TextRefiner (None without):
        entries [M, d] the cache; read_weights [C, M] each class's Eq. 5 softmax over the entries
            (CoCoOp: mean over the images' per-image classes; LLaMP: over its templates);
        assignment [I, N] the entry each patch's aligned token is nearest to (as the cache's
            write assigns it); cls_assignment [I] the same for the CLS token;
        nearest [M, n] the n patches (flat index image * N + patch) whose aligned tokens are most
            similar to each entry, best first; nearest_similarity [M, n] those cosines.
    For the pictures: display (a PIL image -> as the model saw it, resized and cropped) and
    sources (the PIL images, where they were given in memory).
    Derived: predictions and predictions_plain [I] (argmax of the two scores), has_refiner,
    num_patches (N), and the methods below (`probabilities`, `image_numbers`, ...).
    """
    classnames: List[str]
    paths: List[str]
    labels: torch.Tensor
    image_size: Tuple[int, int]
    grid: Tuple[int, int]
    logits: torch.Tensor
    logits_plain: torch.Tensor
    cls_attention: torch.Tensor
    semantic_patches: torch.Tensor
    patch_similarity: torch.Tensor
    entries: Optional[torch.Tensor] = None
    read_weights: Optional[torch.Tensor] = None
    assignment: Optional[torch.Tensor] = None
    cls_assignment: Optional[torch.Tensor] = None
    nearest: Optional[torch.Tensor] = None
    nearest_similarity: Optional[torch.Tensor] = None
    display: Optional[Callable] = None  # PIL image -> PIL image as the model saw it (pictures)
    sources: Optional[list] = None  # the PIL images, where they were given in memory (pictures)
    scores_are_probabilities: bool = False  # LLaMP: logits hold probabilities already

    @property
    def has_refiner(self) -> bool:
        return self.entries is not None

    @property
    def num_patches(self) -> int:
        return self.cls_attention.shape[1]

    @property
    def predictions(self) -> torch.Tensor:
        """[I] int64 predicted class, refiner on."""
        return self.logits.argmax(dim=1)

    @property
    def predictions_plain(self) -> torch.Tensor:
        """[I] int64 predicted class, refiner off."""
        return self.logits_plain.argmax(dim=1)

    def probabilities(self, plain: bool = False) -> torch.Tensor:
        """[I, C] class probabilities with refinement (plain: without), rows summing to 1: the
        softmax of the logits (LLaMP's scores are probabilities already)."""
        scores = self.logits_plain if plain else self.logits
        return scores if self.scores_are_probabilities else scores.softmax(dim=-1)

    def image_numbers(self, index: int = 0, top: int = 5) -> dict:
        """Image `index`'s numbers as plain Python (JSON-ready), what its picture shows: "path",
        "label" (class name or None), "predicted" and "predicted_plain" (class names, with and
        without refinement), "top" (the `top` classes by probability with refinement: a list of
        {"class", "probability", "probability_plain"}), "grid" [rows, columns],
        "semantic_patches" [k] of [row, column] (decreasing CLS attention), "cls_attention" and
        "patch_similarity" (rows x columns nested lists), "has_refiner"."""
        refined, plain = self.probabilities()[index], self.probabilities(plain=True)[index]
        label, columns = int(self.labels[index]), self.grid[1]
        names = self.classnames

        def grid(values):
            return values.reshape(self.grid).tolist()
        return {
            "path": self.paths[index], "label": names[label] if label >= 0 else None,
            "predicted": names[int(self.predictions[index])],
            "predicted_plain": names[int(self.predictions_plain[index])],
            "top": [{"class": names[c], "probability": float(refined[c]),
                     "probability_plain": float(plain[c])}
                    for c in refined.topk(min(top, len(names))).indices.tolist()],
            "grid": list(self.grid),
            "semantic_patches": [list(divmod(p, columns))
                                 for p in self.semantic_patches[index].tolist()],
            "cls_attention": grid(self.cls_attention[index]),
            "patch_similarity": grid(self.patch_similarity[index]),
            "has_refiner": self.has_refiner}

    def token_counts(self) -> torch.Tensor:
        """[M] int64 patch tokens of these images assigned to each entry."""
        return torch.bincount(self.assignment.flatten(), minlength=self.entries.shape[0])

    def patch_boxes(self, flat: torch.Tensor) -> torch.Tensor:
        """[..., 4] (image index, row, column, patch index) of flat patch indices [...]."""
        image, patch = flat // self.num_patches, flat % self.num_patches
        columns = self.grid[1]
        return torch.stack([image, patch // columns, patch % columns, patch], dim=-1)

    def per_class_accuracy(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(accuracy with refinement [C], without [C], labelled images [C]) in %, over the
        images with a known label; NaN for a class with none."""
        known = self.labels >= 0
        labels = self.labels[known]
        count = torch.bincount(labels, minlength=len(self.classnames))

        def accuracy(predictions):
            right = torch.bincount(labels[predictions[known] == labels],
                                   minlength=len(self.classnames))
            return 100.0 * right.float() / count.float()   # NaN where count is 0
        return accuracy(self.predictions), accuracy(self.predictions_plain), count

    def changed(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images whose prediction the refinement changed: (right -> wrong, wrong -> right, every
        changed image) as index tensors; the first two need labels (empty where unknown)."""
        changed = self.predictions != self.predictions_plain
        known = self.labels >= 0
        right, right_plain = self.predictions == self.labels, self.predictions_plain == self.labels
        return (torch.nonzero(changed & known & right_plain & ~right)[:, 0],
                torch.nonzero(changed & known & right & ~right_plain)[:, 0],
                torch.nonzero(changed)[:, 0])


def similar_order(rows: torch.Tensor) -> torch.Tensor:
    """[R] int64 order of the rows of [R, K] that puts similar rows (cosine) next to each other:
    sorted by the Fiedler vector of their similarity graph (spectral seriation). The class-reads
    heatmap orders its classes (rows of read weights) and entries (columns) with it."""
    if rows.shape[0] < 3:
        return torch.arange(rows.shape[0])
    unit = F.normalize(rows.double() - rows.double().mean(dim=0), dim=1)
    affinity = (unit @ unit.t()).clamp(min=0)                               # [R, R]
    laplacian = torch.diag(affinity.sum(dim=1)) - affinity
    vectors = torch.linalg.eigh(laplacian).eigenvectors
    fiedler = vectors[:, 1]
    return torch.sort(fiedler * torch.sign(fiedler.sum() + 1e-12), stable=True).indices


def _shares(explanation: Explanation, attributes: torch.Tensor, classes: torch.Tensor,
            flat: torch.Tensor) -> torch.Tensor:
    """[..., n] whether the image of each flat patch index [..., n] shares one of `classes`'
    [...] attribute values (attributes [A, C]); False for unlabelled images."""
    labels = explanation.labels[flat // explanation.num_patches]                # [..., n]
    known = labels >= 0
    patch_values = attributes[:, labels.clamp(min=0)]                            # [A, ..., n]
    class_values = attributes[:, classes].unsqueeze(-1)                          # [A, ..., 1]
    return (patch_values == class_values).any(dim=0) & known


def attribute_purity(explanation: Explanation, attributes: torch.Tensor, draws: int = 2000,
                     seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """How pure each entry's nearest patches are in known attributes of the images' classes
    (the demo: colour and shape), against chance. attributes: [A, C] int64, attribute a's value
    for class c. An entry's purity is the largest share of its n nearest patches whose images'
    classes agree on one attribute value (of any attribute); chance is the mean of the same
    statistic over `draws` sets of n patches drawn uniformly from the labelled images. Returns
    (purity [M], chance []) in [0, 1]."""
    def purity(flat):                                                            # [R, n]
        labels = explanation.labels[flat // explanation.num_patches]
        values = attributes[:, labels]                                           # [A, R, n]
        counts = F.one_hot(values, int(attributes.max()) + 1).sum(dim=2)         # [A, R, V]
        return counts.amax(dim=(0, 2)).float() / flat.shape[1]

    labelled = torch.nonzero(explanation.labels >= 0)[:, 0]
    if explanation.nearest is None or len(labelled) == 0:
        raise ValueError("attribute_purity needs a TextRefiner run and labelled images")
    n = explanation.nearest.shape[1]
    generator = torch.Generator().manual_seed(seed)
    images = labelled[torch.randint(len(labelled), (draws, n), generator=generator)]
    patches = torch.randint(explanation.num_patches, (draws, n), generator=generator)
    return purity(explanation.nearest), purity(images * explanation.num_patches + patches).mean()


def class_entry_match(explanation: Explanation, attributes: torch.Tensor,
                      top: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whether the entries a class reads most hold patches of its own attributes. For each class
    c: the share of the nearest patches of its `top` most-read entries whose images share one of
    c's attribute values (attributes [A, C], e.g. colour and shape), and chance: that share over
    all patches of the labelled images. Returns (match [C], chance [C]) in [0, 1]."""
    classes = torch.arange(len(explanation.classnames))
    entries = explanation.read_weights.topk(top, dim=1).indices                  # [C, top]
    flat = explanation.nearest[entries].flatten(1)                               # [C, top * n]
    match = _shares(explanation, attributes, classes, flat).float().mean(dim=1)
    labelled = torch.nonzero(explanation.labels >= 0)[:, 0]
    every = (labelled * explanation.num_patches).expand(len(classes), -1)       # [C, I']
    chance = _shares(explanation, attributes, classes, every).float().mean(dim=1)
    return match, chance


# ---------------------------------------------------------------------------- one batch
@contextlib.contextmanager
def refiner_off(model, classifier: Optional[torch.Tensor] = None):
    """The model with its refiner switched off (E instead of Ehat) and nothing else. Its cached
    evaluation classifier becomes `classifier` (E computed earlier under this context; None: E
    is computed on first use) and is restored on exit, so neither E nor Ehat is recomputed
    needlessly."""
    refiner, cached = model.refiner, model._classifier
    model.refiner, model._classifier = None, classifier
    try:
        yield model
    finally:
        model.refiner, model._classifier = refiner, cached


def classifier_space(model, tokens: torch.Tensor) -> torch.Tensor:
    """Local tokens [B, 1+N, d_img] mapped as the method maps the image feature before it meets
    the classifier (PromptKD's projector into the teacher's space; the identity otherwise)."""
    projector = getattr(model, "VPT_image_trans", None)
    return tokens if projector is None else projector(tokens)


def _shared_classifiers(model):
    """(E, Ehat, E as the model caches it) shared by all images: [C, d] (LLaMP: [T, C, d]; the
    cache holds every class where PromptKD scores a slice of them), or Nones for CoCoOp, whose
    classes depend on the image."""
    if isinstance(model, CoCoOp):
        return None, None, None
    refined = model.class_embeddings()
    with refiner_off(model):
        plain = model.class_embeddings()
        cache = model._classifier
    return plain, refined, cache


@torch.no_grad()
def explain_batch(model, images: torch.Tensor, topk: int, shared=None) -> dict:
    """The per-image numbers of one preprocessed batch [B, 3, H, W] (on the model's device): a
    dict of tensors named as `Explanation`'s fields, plus "scores" [B, 1+N, M] (the aligned
    tokens' cosines with the entries, with TextRefiner) and "read_weights" [C, M] summed over
    this batch's images (CoCoOp) or None. `shared` is `_shared_classifiers(model)`, computed
    once for all batches."""
    plain_text, refined_text, plain_cache = shared or _shared_classifiers(model)
    out = model.encode_images(images, return_tokens=True)
    features = F.normalize(out.features, dim=-1)
    refiner = model.refiner
    batch = {"cls_attention": out.cls_attention.float(),
             "semantic_patches": semantic_patch_indices(out.cls_attention, topk)}
    read, per_image = None, plain_text is None
    if per_image:  # CoCoOp: E_b per image, computed once for both classifiers
        plain_text = model.batch_text_features(features)               # [B, C, d]
        refined_text = model.refined(plain_text)
        scale = model.logit_scale.exp()
        batch["logits"] = scale * image_text_logits(features, refined_text)
        batch["logits_plain"] = scale * image_text_logits(features, plain_text)
        if refiner is not None:
            read = refiner.cache.read_weights(plain_text).float().sum(dim=0)
    else:
        batch["logits"] = model.forward_features(out.features)
        with refiner_off(model, plain_cache):
            batch["logits_plain"] = model.forward_features(out.features)
    predicted = batch["logits"].argmax(dim=1)
    batch["patch_similarity"] = _patch_similarity(
        classifier_space(model, out.tokens)[:, 1:], refined_text, predicted, per_image)
    batch["read_weights"] = read
    if refiner is not None:
        aligned = F.normalize(refiner.align(out.tokens).float(), dim=-1)   # V' [B, 1+N, d]
        scores = aligned @ refiner.cache.entries.float().t()               # [B, 1+N, M]
        batch["scores"] = scores
        batch["assignment"] = scores[:, 1:].argmax(dim=-1)
        batch["cls_assignment"] = scores[:, 0].argmax(dim=-1)
    batch["logits"], batch["logits_plain"] = batch["logits"].float(), batch["logits_plain"].float()
    return batch


def _patch_similarity(patches, classifier, predicted, per_image: bool):
    """[B, N] cosines of the patches [B, N, d] with the predicted class's embedding, from a
    shared classifier [C, d] or [T, C, d] (templates: their mean direction), or one per image
    [B, C, d] (`per_image`)."""
    classifier = F.normalize(classifier.float(), dim=-1)
    if per_image:
        chosen = classifier[torch.arange(len(predicted)), predicted]       # [B, d]
    else:
        if classifier.dim() == 3:
            classifier = F.normalize(classifier.mean(dim=0), dim=-1)
        chosen = classifier[predicted]                                     # [B, d]
    return torch.einsum("bnd,bd->bn", F.normalize(patches.float(), dim=-1), chosen)


# ---------------------------------------------------------------------------- many batches
class _Collector:
    """Gathers batches: per-image tensors appended, each entry's nearest patches kept as a
    running top-n, CoCoOp's read weights summed."""

    def __init__(self, nearest: int):
        self.nearest = nearest
        self.parts = {}
        self.images = 0
        self.best = None  # (similarities [n, M], flat patch indices [n, M])
        self.read_sum = None

    def add(self, batch: dict):
        scores = batch.pop("scores", None)
        read = batch.pop("read_weights")
        if scores is not None:
            self._keep_nearest(scores[:, 1:])
        if read is not None:
            self.read_sum = read if self.read_sum is None else self.read_sum + read
        for name, value in batch.items():
            self.parts.setdefault(name, []).append(value.cpu())
        self.images += batch["logits"].shape[0]

    def _keep_nearest(self, scores):
        count, n_patches, entries = scores.shape
        flat = scores.reshape(-1, entries)                                  # [B * N, M]
        values, index = flat.topk(min(self.nearest, flat.shape[0]), dim=0)  # [n, M]
        index = index + self.images * n_patches
        if self.best is not None:
            values = torch.cat([self.best[0], values])
            index = torch.cat([self.best[1], index])
            values, keep = values.topk(min(self.nearest, values.shape[0]), dim=0)
            index = index.gather(0, keep)
        self.best = (values, index)

    def tensors(self) -> dict:
        joined = {name: torch.cat(values) for name, values in self.parts.items()}
        if self.best is not None:
            joined["nearest_similarity"] = self.best[0].t().cpu()
            joined["nearest"] = self.best[1].t().cpu()
        return joined


def _batches(predictor: Predictor, images, workers: int, skipped):
    """(preprocessed batch, paths) from paths, PIL images or a preprocessed tensor."""
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], predictor.batch_size):
            part = images[i:i + predictor.batch_size]
            yield part, [""] * part.shape[0]
        return
    if all(isinstance(image, (str, os.PathLike)) for image in images):
        loader = torch.utils.data.DataLoader(
            _ImageFiles([str(p) for p in images], predictor.transform),
            batch_size=predictor.batch_size, num_workers=workers, collate_fn=_readable,
            pin_memory=predictor.device.type == "cuda")
        for batch, names, failed in loader:
            for path, reason in failed:
                skipped(path, reason)
            if names:
                yield batch, names
        return
    for i in range(0, len(images), predictor.batch_size):
        part = images[i:i + predictor.batch_size]
        yield predictor.preprocess(part), [p if isinstance(p, str) else "" for p in part]


@torch.no_grad()
def explain_images(predictor: Predictor, images, labels=None, nearest: int = NEAREST,
                   topk: Optional[int] = None, workers: int = 0, progress: bool = False,
                   skipped=None) -> Explanation:
    """Explain a run's predictions on `images` in one pass (each image encoded once).

    predictor: a `Predictor` (e.g. `Predictor.from_run(model_dir)`); images: paths, PIL images,
    or a preprocessed batch [I, 3, H, W]; labels: [I] class indices (-1 unknown) or None;
    nearest: patches kept per cache entry; topk: semantic patches marked (default: the refiner's
    k, else 5); progress: a progress bar on stderr; skipped(path, reason): told of unreadable
    files, which are left out. Returns an `Explanation` (its docstring gives every shape).
    """
    model = predictor.model
    refiner = model.refiner
    topk = topk or (refiner.topk if refiner is not None else DEFAULT_TOPK)
    total = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if total == 0:
        raise UserError("No images to explain: give image files or folders.")
    kept, sizes = [], None
    collector = _Collector(nearest)
    bar = tqdm(total=total, unit="img", file=sys.stderr, disable=not progress or None,
               leave=False, dynamic_ncols=True, desc="explain")
    with amp_autocast(predictor.precision, predictor.device):
        shared = _shared_classifiers(model)
        for batch, names in _batches(predictor, images, workers, skipped or _report_skipped):
            batch = batch.to(predictor.device)
            sizes = tuple(batch.shape[-2:])
            collector.add(explain_batch(model, batch, topk, shared))
            kept += names
            bar.update(len(names))
    bar.close()
    parts = collector.tensors()
    if not kept:
        raise UserError("None of the images could be read: give readable image files.")
    n_patches = parts["cls_attention"].shape[1]
    rows = int(round(n_patches ** 0.5))
    found = _labels(labels, images, kept, predictor.classnames)
    explanation = Explanation(
        classnames=list(predictor.classnames), paths=kept, labels=found, image_size=sizes,
        grid=(rows, n_patches // rows), display=_display_or_none(predictor),
        scores_are_probabilities=model.scores_are_probabilities, **{k: parts[k] for k in (
            "logits", "logits_plain", "cls_attention", "semantic_patches", "patch_similarity")})
    if not isinstance(images, torch.Tensor) and not all(isinstance(p, (str, os.PathLike))
                                                        for p in images):
        explanation.sources = list(images)
    if refiner is not None:
        explanation.entries = refiner.cache.entries.float().cpu()
        explanation.read_weights = _read_weights(refiner, shared, collector)
        for name in ("assignment", "cls_assignment", "nearest", "nearest_similarity"):
            setattr(explanation, name, parts[name])
    return explanation


def _display_or_none(predictor):
    try:
        return predictor.display_transform()
    except UserError:
        return None  # then pictures need the image given as the model saw it


def _read_weights(refiner, shared, collector) -> torch.Tensor:
    if shared[0] is None:  # CoCoOp: summed over the images
        return (collector.read_sum / collector.images).cpu()
    weights = refiner.cache.read_weights(shared[0]).float()
    return (weights.mean(dim=0) if weights.dim() == 3 else weights).cpu()


def _labels(labels, images, kept, classnames) -> torch.Tensor:
    """Given labels as a tensor; else read from each file's folder name where it names a class."""
    if labels is not None:
        labels = [int(v) for v in labels]
        if len(labels) != len(images):
            raise UserError(f"labels give {len(labels)} classes for {len(images)} images: give "
                            "one per image.")
        if len(kept) < len(labels):  # unreadable files were left out: keep the others' labels
            label_of = dict(zip(images, labels))
            labels = [label_of[p] for p in kept]
        return torch.tensor(labels, dtype=torch.int64)
    index = {name.lower(): i for i, name in enumerate(classnames)}
    index.update({name.lower().replace(" ", "_"): i for i, name in enumerate(classnames)})
    return torch.tensor([index.get(os.path.basename(os.path.dirname(p)).lower(), -1) if p else -1
                         for p in kept], dtype=torch.int64)


def explain_image(predictor: Predictor, image, label: int = -1) -> Explanation:
    """`explain_images` for one image (a path or a PIL image): an `Explanation` with I = 1."""
    return explain_images(predictor, [image], labels=[label])
