"""Checkpoint files in Dassl's layout, shared by both engines.

`<output dir>/<model name>/model.pth.tar-<epoch>` and `model-best.pth.tar`, each a dict
`{"state_dict", "epoch", "optimizer", "scheduler", "val_result", ...}`, plus Dassl's marker file
`checkpoint` naming the latest one. A method's `state_dict` is its `checkpoint_state()`; what else
it needs to resume (`run_state()`, e.g. PromptSRC's running GPA sum) goes under "method_state".

Writes are atomic (temporary file in the same folder, then rename), so a kill during a save never
leaves a truncated checkpoint behind.
"""
import os
import pickle
import tempfile

import torch

from .errors import UserError


BEST = "model-best.pth.tar"
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
    run_state = model.run_state()
    if run_state:
        state["method_state"] = run_state  # e.g. PromptSRC's running GPA sum, needed to resume
    write_checkpoint(state, path)
    if mark_latest:
        marker = os.path.join(os.path.dirname(path), LATEST_MARKER)
        _atomic_write(marker, lambda f: f.write(os.path.basename(path) + "\n"), "w")
    return path


def load_method_checkpoint(model, path: str) -> dict:
    """Load a checkpoint into `model` (a PromptMethod); returns the whole checkpoint dict."""
    if not os.path.isfile(path):
        raise UserError(f"No checkpoint at {path}. Check --model-dir (the OUTPUT_DIR of the "
                        "training run) and --load-epoch (without it, model-best.pth.tar is "
                        "loaded).")
    checkpoint = read_checkpoint(path)
    model.load_checkpoint_state(checkpoint["state_dict"], source=path)
    model.load_run_state(checkpoint.get("method_state"))
    return checkpoint


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
