"""Data items, splits, CoOp's split files, base/novel class split and few-shot sampling."""

import copyreg
import json
import logging
import math
import os
import pickle
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import List, Optional

from textrefiner.checkpoint import atomic_write
from textrefiner.errors import OutputError, UserError
from textrefiner.safe_load import RefusedFile, load_fewshot_pickle, one_line

logger = logging.getLogger(__name__)

SUBSAMPLE_CHOICES = ("all", "base", "new")


@dataclass(frozen=True)
class Datum:
    """One image: its path, label, class name and domain (same attributes as Dassl's Datum)."""

    impath: str
    label: int
    classname: str
    domain: int = 0


@dataclass
class DatasetSplits:
    """Train/val/test lists of `Datum` and the class names, ordered by label.

    `val` is None for test-only datasets (ImageNet-V2/-Sketch/-A/-R), as in CoOp.
    """

    train_x: List[Datum]
    val: Optional[List[Datum]]
    test: List[Datum]
    classnames: List[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.classnames:
            self.classnames = classnames_of(self.train_x)

    @property
    def lab2cname(self):
        return dict(enumerate(self.classnames))

    @property
    def num_classes(self):
        return len(self.classnames)


def classnames_of(items):
    """Class names ordered by label, read off the items (as Dassl's get_lab2cname)."""
    lab2cname = {item.label: item.classname for item in items}
    return [lab2cname[label] for label in sorted(lab2cname)]


def require_path(path, dataset_name, what="folder"):
    """Raise a UserError saying how to prepare `dataset_name` when `path` does not exist."""
    if not os.path.exists(path):
        raise UserError(
            f"{dataset_name}: {what} not found: {path}\n"
            f"Prepare the dataset with `textrefiner-data {dataset_name} --root DIR` "
            f"(DIR = DATASET.ROOT, the folder that holds all datasets), "
            f"or follow CoOp's DATASETS.md."
        )
    return path


def read_split_json(path, image_dir):
    """Read CoOp's `split_zhou_*.json`, {"train"|"val"|"test": [[rel path, label, classname]]}.

    Returns (train, val, test) lists of `Datum` with paths joined onto `image_dir`.
    """
    with open(path) as f:
        split = json.load(f)

    def convert(rows):
        return [
            Datum(impath=os.path.join(image_dir, path), label=int(label), classname=classname)
            for path, label, classname in rows
        ]

    return convert(split["train"]), convert(split["val"]), convert(split["test"])


def split_json_text(train, val, test, image_dir):
    """Lists of `Datum` as the text of CoOp's split json, paths relative to `image_dir`."""

    def extract(items):
        return [
            [os.path.relpath(item.impath, image_dir), item.label, item.classname] for item in items
        ]

    split = {"train": extract(train), "val": extract(val), "test": extract(test)}
    return json.dumps(split, indent=4, separators=(",", ": "))


def write_split_json(path, train, val, test, image_dir):
    """Write lists of `Datum` as CoOp's split json, paths relative to `image_dir`."""
    with open(path, "w") as f:
        f.write(split_json_text(train, val, test, image_dir))


def base_and_new_labels(items):
    """Sorted labels split in two: base = first ceil(n / 2), new = the rest."""
    labels = sorted({item.label for item in items})
    m = math.ceil(len(labels) / 2)
    return labels[:m], labels[m:]


def subsample_classes(*splits, subsample="all"):
    """Keep the base or new half of the classes in every split, relabelled from 0.

    The classes are those of the first split; `None` splits pass through. Returns a list.
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise UserError(
            f"DATASET.SUBSAMPLE_CLASSES must be one of {list(SUBSAMPLE_CHOICES)}, got {subsample!r}"
        )
    if subsample == "all":
        return list(splits)
    base, new = base_and_new_labels(splits[0])
    selected = base if subsample == "base" else new
    relabel = {old: new_label for new_label, old in enumerate(selected)}
    return [
        None if items is None
        else [replace(item, label=relabel[item.label]) for item in items if item.label in relabel]
        for items in splits
    ]


def group_by_label(items):
    """Items grouped per label, labels in order of first appearance (as Dassl)."""
    groups = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    return groups


def generate_fewshot(items, num_shots, rng=None, repeat=False):
    """Draw `num_shots` items per class, as Dassl's generate_fewshot_dataset.

    A class with fewer items keeps all of them (or, with `repeat`, draws with replacement).
    `rng` is a `random.Random` (default: the global `random` module); `random.Random(seed)`
    gives the same draws as CoOp after `random.seed(seed)`. num_shots < 1 keeps everything.
    """
    if num_shots < 1:
        return items
    rng = rng or random
    output = []
    for group in group_by_label(items).values():
        if len(group) >= num_shots:
            output.extend(rng.sample(group, num_shots))
        elif repeat:
            output.extend(rng.choices(group, k=num_shots))
        else:
            output.extend(group)
    return output


def fewshot_cache_path(dataset_dir, num_shots, seed):
    """CoOp's cache file of a few-shot draw."""
    return os.path.join(dataset_dir, "split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl")


# Dassl's Datum, as CoOp-style repositories pickle it into `split_fewshot/`. The cache is written
# in that format (Dassl need not be installed to write or read it), so the codebases sharing a
# dataset folder read our files without textrefiner, and we read theirs without Dassl.
DASSL_DATUM = ("dassl.data.datasets.base_dataset", "Datum")


class _DasslDatumState:
    """What a pickled Dassl Datum holds (`_impath`, `_label`, `_domain`, `_classname`): the class
    the cache's Dassl Datums unpickle to, and the stand-in that writes them."""

    def __init__(self, impath="", label=0, domain=0, classname=""):
        self._impath, self._label = impath, label
        self._domain, self._classname = domain, classname

    def __reduce__(self):
        return copyreg.__newobj__, (_DasslDatumState,), self.__dict__.copy()

    impath = property(lambda self: self._impath)
    label = property(lambda self: self._label)
    domain = property(lambda self: self._domain)
    classname = property(lambda self: self._classname)


class _DasslFormatPickler(pickle._Pickler):  # the Python pickler: its save_global can be changed
    """Writes `_DasslDatumState` as Dassl's Datum class, whether or not Dassl is importable."""

    def save_global(self, obj, name=None):
        if obj is not _DasslDatumState:
            return super().save_global(obj, name)
        module, qualname = DASSL_DATUM
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("utf-8"))
        self.memoize(obj)


# (module, name) in a few-shot cache -> the class it is read as; nothing else is built.
FEWSHOT_ALLOW_LIST = {
    # Dassl's Datum: the caches CoOp-style codebases write, and ours (read without Dassl)
    DASSL_DATUM: _DasslDatumState,
    # textrefiner's own Datum: the caches earlier versions of textrefiner wrote
    (Datum.__module__, Datum.__qualname__): Datum,
}


# A cache file that exists but is not used, left as it is: only a file that we read as a few-shot
# cache (ours, the codebases', or an earlier textrefiner's) is ever written over. What else is in a
# shared dataset folder belongs to someone else: a hostile file is evidence to keep, a file of
# another tool is theirs.
LEFT_AS_IT_IS = "left as it is"


def load_fewshot_cache(path, dataset_dir):
    """The cached {"train": [...], "val": [...]} as our `Datum`s; None when there is no usable
    cache and the draw may be written to `path`; LEFT_AS_IT_IS when the file is not used and
    must not be overwritten (unreadable, or holding anything but Datums).

    Reads the files of CoOp-style codebases and ours (Dassl's Datum, with or without Dassl), and
    those of earlier textrefiner versions (textrefiner's Datum), which are rewritten in Dassl's
    format; nothing else is built (textrefiner.safe_load). A file that points outside
    `dataset_dir` (dataset moved) is drawn again.
    """
    if not os.path.exists(path):
        return None
    try:
        data = load_fewshot_pickle(path, FEWSHOT_ALLOW_LIST)
        old_format = any(isinstance(item, Datum) for items in data.values() for item in items)
        cached = {key: [as_datum(item) for item in items] for key, items in data.items()}
    except RefusedFile as err:
        logger.warning("Not using the few-shot cache %s: %s. Drawing the split again in memory; "
                       "the file is left as it is (delete it to have the draw written there).",
                       path, err)
        return LEFT_AS_IT_IS
    except Exception as err:  # truncated, or not a cache of Datums: not a file we wrote
        logger.warning("Not using the few-shot cache %s: it is not a readable cache of Datums "
                       "(%s: %s). Drawing the split again in memory; the file is left as it is "
                       "(delete it to have the draw written there).", path, type(err).__name__,
                       one_line(err))
        return LEFT_AS_IT_IS
    root = os.path.join(os.path.abspath(dataset_dir), "")
    if any(not item.impath.startswith(root) for items in cached.values() for item in items[:1]):
        logger.warning("Few-shot cache %s points outside %s; drawing it again", path, dataset_dir)
        return None
    logger.info("Loading preprocessed few-shot data from %s", path)
    if old_format:
        logger.info("Rewriting %s in Dassl's format, which the CoOp-style codebases read", path)
        save_fewshot_cache(path, cached)
    return cached


def save_fewshot_cache(path, data):
    """Write the few-shot draw as CoOp does (a pickle of Dassl Datums), atomically; a read-only
    dataset folder only costs a warning."""
    converted = {key: [_DasslDatumState(item.impath, item.label, item.domain, item.classname)
                       for item in items] for key, items in data.items()}
    try:
        atomic_write(path, lambda f: _DasslFormatPickler(
            f, protocol=pickle.HIGHEST_PROTOCOL).dump(converted), "wb")
        logger.info("Saving preprocessed few-shot data to %s", path)
    except OutputError as err:
        logger.warning("Could not write few-shot cache %s (%s)", path, err)


def as_datum(item):
    """Our `Datum` from any object with Dassl's Datum attributes."""
    if isinstance(item, Datum):
        return item
    return Datum(
        impath=item.impath, label=int(item.label), classname=item.classname,
        domain=int(getattr(item, "domain", 0)),
    )


def fewshot_splits(dataset_dir, train, val, num_shots, seed, cache_dir=None):
    """Few-shot train (K shots) and val (min(K, 4) shots), cached per (K, seed) as CoOp does,
    in `cache_dir` (default: `dataset_dir`).

    `val` None (ImageNet) draws and caches the train split only.
    """
    if num_shots < 1:
        return train, val
    path = fewshot_cache_path(cache_dir or dataset_dir, num_shots, seed)
    cached = load_fewshot_cache(path, dataset_dir)
    if cached is not None and cached is not LEFT_AS_IT_IS:
        return cached["train"], cached.get("val", val)
    rng = random.Random(seed)
    data = {"train": generate_fewshot(train, num_shots, rng)}
    if val is not None:
        data["val"] = generate_fewshot(val, min(num_shots, 4), rng)
    if cached is None:
        save_fewshot_cache(path, data)
    return data["train"], data.get("val")
