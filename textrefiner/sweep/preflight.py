"""Before a sweep starts or submits anything: is every dataset (a folder of one's own images
included) where its runs will look, and can every CLIP weight file be had (a local file, or a
name in `clip`'s download cache, or one it can still download)? `missing(cfgs)` gives one line
per dataset or weight that is not, with the command that prepares it; the sweep prints them and
starts nothing (`--dry-run` prints them too). A run that fails for a reason no check can see
still fails alone."""
from __future__ import annotations

import os
import socket
import urllib.parse

from ..clip_backbone import HF_PREFIX, OPENCLIP_PREFIX, clip_cache_dir, import_clip
from ..data.datasets import FACTS, dataset_dir, dataset_root
from ..data.folder import FOLDER_DATASET, list_folder
from ..errors import UserError

DOWNLOAD_CHECK_TIMEOUT_S = 10  # one connection attempt to the weights' host, when one is needed


def missing(cfgs) -> list:
    """The lines for what `cfgs` (the runs' configs) need and this machine lacks, in order."""
    lines, seen = [], set()
    for cfg in cfgs:
        for item, check in ((("dataset", dataset_root(cfg), cfg.DATASET.NAME), _dataset_line),
                            (("clip", _backbone(cfg)), _weights_line)):
            if item not in seen:
                seen.add(item)
                line = check(*item[1:])
                if line:
                    lines.append(line)
    return lines


def _backbone(cfg) -> str:
    return cfg.MODEL.BACKBONE.PATH or cfg.MODEL.BACKBONE.NAME


def _dataset_line(root, name):
    """None when dataset `name` is laid out under `root` (for ImageFolder: the folder itself) as
    its reader expects, else the line."""
    if name == FOLDER_DATASET:
        return _folder_line(root)
    if name not in FACTS:  # not one of ours: its reader says what it lacks
        return None
    folder = dataset_dir(root, name)
    facts = FACTS[name]
    needed = [folder, os.path.join(folder, facts.image_dir)]
    if facts.split_file:
        needed.append(os.path.join(folder, facts.split_file))
    needed += [os.path.join(folder, path) for path in _prepared_files(facts.folder)]
    absent = next((path for path in needed if not os.path.exists(path)), None)
    if absent is None:
        return None
    return f"dataset {name}: {absent} not found; prepare it: {_prepare_command(name, root)}"


def _folder_line(folder):
    """None when a folder of one's own images passes the reader's checks that open no image
    (the folder, its class folders, classnames.txt), else the reader's line."""
    try:
        list_folder(folder)
    except UserError as exc:
        return f"dataset {exc}"
    return None


def _prepared_files(folder) -> tuple:
    """What `textrefiner-data` checks once it has prepared the dataset in `folder`."""
    return _data_spec(folder)[1].expect if _data_spec(folder) else ()


def _data_spec(folder):
    """(textrefiner-data's name, its DatasetSpec) of the dataset laid out in `folder`, or None."""
    from ..data.prepare import DATASETS
    return next(((key, spec) for key, spec in DATASETS.items() if spec.folder == folder), None)


def _prepare_command(name, root) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    if name == "SyntheticShapes":  # the demo's: `prepare DIR` writes DIR/data/synthetic_shapes
        parent = os.path.dirname(root) if os.path.basename(root) == "data" else "DIR"
        return (f"python -m textrefiner.demo prepare {parent}"
                + ("" if parent != "DIR" else " (it writes DIR/data; give --root DIR/data)"))
    found = _data_spec(FACTS[name].folder)
    key = found[0] if found else name
    return f"textrefiner-data {key} --root {root}"


def _weights_line(name_or_path):
    """None when the CLIP weights can be had, else the line."""
    if name_or_path.startswith(OPENCLIP_PREFIX) or os.path.isfile(name_or_path):
        return None  # OpenCLIP's own hub and cache decide; a file is there
    if name_or_path.startswith(HF_PREFIX):  # a folder, or a repo in the local cache
        from ..hf_models import missing_line
        return missing_line(name_or_path[len(HF_PREFIX):], "MODEL.BACKBONE.NAME")
    models = import_clip().clip._MODELS
    if name_or_path not in models:
        return (f"CLIP weights {name_or_path}: neither a file nor a CLIP model name "
                f"({', '.join(sorted(models))}); set MODEL.BACKBONE.PATH to a local file")
    url = models[name_or_path]
    cached = os.path.join(clip_cache_dir(), os.path.basename(url))
    if os.path.isfile(cached) or _reachable(url):
        return None
    host = urllib.parse.urlsplit(url).hostname
    return (f"CLIP weights {name_or_path}: not in {clip_cache_dir()} and {host} cannot be "
            f"reached; prepare it: python -c \"import clip; clip.load('{name_or_path}')\" on a "
            f"machine online, then copy {os.path.basename(url)} to {cached}")


def _reachable(url) -> bool:
    host = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((host.hostname, host.port or 443),
                                      timeout=DOWNLOAD_CHECK_TIMEOUT_S):
            return True
    except OSError:
        return False
