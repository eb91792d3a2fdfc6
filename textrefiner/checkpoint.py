"""Checkpoint files in Dassl's layout: `{"state_dict", "epoch", "optimizer", "scheduler", ...}`.

Writes are atomic (temporary file in the same folder, then rename), so a kill during a save never
leaves a truncated checkpoint behind.
"""
import os
import pickle
import tempfile

import torch

from .errors import UserError


def write_checkpoint(obj: dict, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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
