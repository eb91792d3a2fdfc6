"""Checkpoint files in Dassl's layout, shared by both engines.

`<output dir>/<model name>/model.pth.tar-<epoch>` and `model-best.pth.tar`, each a dict
`{"state_dict", "epoch", "optimizer", "scheduler", "val_result", ...}`, plus Dassl's marker file
`checkpoint` naming the latest one. A method's `state_dict` is its `checkpoint_state()`; files
the original codebases wrote load too (textrefiner.codebase_checkpoints).

Writes are atomic (temporary file in the same folder, then rename), so a kill during a save never
leaves a truncated checkpoint behind.
"""
import os
import pickle
import tempfile

import torch

from .codebase_checkpoints import is_codebase_read
from .errors import UserError


BEST = "model-best.pth.tar"
# Dassl model names -> the methods (ours and their codebases') that save under them
CODEBASE_FOLDERS = {"prompt_learner": "CoOp and CoCoOp", "MultiModalPromptLearner": "MaPLe",
                    "VLPromptLearner": "PromptSRC and PromptKD"}
LATEST_MARKER = "checkpoint"  # Dassl's file naming the latest checkpoint, read to resume


def checkpoint_path(directory: str, name: str, epoch=None) -> str:
    """`<directory>/<name>/model.pth.tar-<epoch>`, or `model-best.pth.tar` without an epoch."""
    return os.path.join(directory, name, BEST if epoch is None else f"model.pth.tar-{epoch}")


def _atomic_write(path: str, write, mode: str):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_checkpoint(obj: dict, path: str) -> str:
    return _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def save_method_checkpoint(model, path: str, epoch: int, optimizer=None, scheduler=None,
                           val_result=None, mark_latest: bool = True, **extra) -> str:
    """Save `model.checkpoint_state()` with the optimiser and schedule; `epoch` is 0-based."""
    state = {"state_dict": model.checkpoint_state(), "epoch": epoch + 1,
             "optimizer": None if optimizer is None else optimizer.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "val_result": val_result, **extra}
    write_checkpoint(state, path)
    if mark_latest:
        marker = os.path.join(os.path.dirname(path), LATEST_MARKER)
        _atomic_write(marker, lambda f: f.write(os.path.basename(path) + "\n"), "w")
    return path


def load_method_checkpoint(model, path: str, log=print, resume: bool = False) -> dict:
    """Load a checkpoint into `model` (a PromptMethod): ours, or one its original codebase wrote
    (textrefiner.codebase_checkpoints). Logs which layout was read; returns the checkpoint dict.
    `resume`: the run continues with its optimiser and schedule, which only ours hold."""
    if not os.path.isfile(path):
        raise UserError(f"No checkpoint at {path}. Check --model-dir (the OUTPUT_DIR of the "
                        "training run) and --load-epoch (without it, model-best.pth.tar is "
                        "loaded)." + _other_folders(path))
    checkpoint = read_checkpoint(path)
    read = model.load_checkpoint_state(_state_dict(checkpoint, path), source=path)
    if resume and is_codebase_read(read):
        raise UserError(f"{path} is {read}: a run of that codebase cannot be resumed here (its "
                        "optimiser and schedule are the codebase's). Start a new run from its "
                        f"weights with MODEL.INIT_WEIGHTS {path}, or set another OUTPUT_DIR.")
    log(f"Read {path}: {read}")
    return checkpoint


def load_init_weights(model, path: str, log=print):
    """MODEL.INIT_WEIGHTS: start training from the weights in the file `path` (as Dassl), ours or
    the method's codebase's; a refiner the file lacks starts fresh."""
    if os.path.isdir(path):
        raise UserError(f"MODEL.INIT_WEIGHTS is a folder ({path!r}); it names a checkpoint file, "
                        "as in Dassl, e.g. <output dir>/prompt_learner/model-best.pth.tar.")
    checkpoint = read_checkpoint(path, "MODEL.INIT_WEIGHTS file")
    read = model.load_checkpoint_state(_state_dict(checkpoint, path), source=path,
                                       fresh_refiner=True)
    log(f"Initial weights (MODEL.INIT_WEIGHTS): read {path}: {read}")


def _state_dict(checkpoint: dict, path: str) -> dict:
    """The weights of a Dassl checkpoint dict, or the dict itself when it holds weights only."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict of tensors: it is not a model "
                        "checkpoint (Dassl's dict with 'state_dict', or a state_dict).")
    return state


def _other_folders(path: str) -> str:
    """A hint naming the codebases' checkpoint folders that the model dir holds instead."""
    name_dir = os.path.dirname(path)
    model_dir, wanted = os.path.dirname(name_dir), os.path.basename(name_dir)
    present = [name for name in CODEBASE_FOLDERS
               if name != wanted and os.path.isdir(os.path.join(model_dir, name))]
    return "".join(f" {model_dir} holds {name}/, the checkpoints of "
                   f"{CODEBASE_FOLDERS[name]}: check --trainer." for name in present)


def read_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """Load a checkpoint dict on the CPU; a missing or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"The {what} {path!r} does not exist.")
    try:
        obj = _load(path)
    except Exception as exc:  # any failure to parse the file means it is damaged
        raise UserError(f"The {what} {path!r} is corrupt or truncated ({type(exc).__name__}: "
                        f"{exc}). Delete it and train again, or point to another file.") from None
    if not isinstance(obj, dict):
        raise UserError(f"The {what} {path!r} is not a checkpoint dictionary.")
    return obj


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise
    # Older Dassl checkpoints may pickle plain Python objects; the user chose this file.
    return torch.load(path, map_location="cpu", weights_only=False)
