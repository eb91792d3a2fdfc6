"""Reading files that someone else may have written: a file is data, never a program.

Everything textrefiner reads that could hold a pickle comes through here:

* torch files (checkpoints of ours and of the codebases, PromptKD teachers, MODEL.INIT_WEIGHTS,
  resume folders, CLIP state dicts, OpenCLIP weight files, the demo CLIP):
  `torch.load(weights_only=True)` plus `TORCH_ALLOW_LIST`, the few extra types such files hold;
* few-shot caches (`split_fewshot/*.pkl`): a `pickle.Unpickler` that builds the classes its caller
  allows (the Datum classes of `textrefiner.data.base.FEWSHOT_ALLOW_LIST`) and nothing else;
* TorchScript archives (OpenAI's CLIP releases): they are programs (their code runs when
  `torch.jit.load` reads them), so only the files OpenAI published are loaded, recognised by the
  sha256 that their download address carries.

Anything else is refused before it is built, with one line naming the file, the type and the
opt-in: `TEXTREFINER_TRUST_CHECKPOINTS=1` reads a torch file or TorchScript archive the user
trusts as a full pickle (and says so in the log). There is no silent fallback.
"""
import hashlib
import logging
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import torch
from packaging.version import Version

from .errors import UserError

logger = logging.getLogger(__name__)

TRUST_ENV = "TEXTREFINER_TRUST_CHECKPOINTS"
_NP_CORE = np._core if hasattr(np, "_core") else np.core  # NumPy 2 renamed numpy.core
_NP_DTYPE_CLASSES = (  # dtype instances are built by their class (NumPy >= 1.25): numbers only
    [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"])


def _plain_dict(default_factory=None, *args):
    """What a pickled `collections.defaultdict` is read as: a dict with its items."""
    return dict(*args)


# The types a torch file may hold beyond weights_only's own (tensors, Parameters, dicts, lists,
# tuples, sets, numbers, strings, torch dtypes and devices). One entry per type, with who writes
# it; (obj, "module.name") entries also accept files pickled under an older module name.
TORCH_ALLOW_LIST = [
    # Dassl's warm-up schedulers (ConstantWarmupScheduler, LinearWarmupScheduler) keep the
    # schedule they hand over to as `successor`, and their state_dict() pickles that object with
    # its optimiser object: the CoOp, CoCoOp, MaPLe, PromptSRC and PromptKD checkpoints saved by
    # Dassl's save_checkpoint (all use WARMUP_EPOCH 1), and ours on the Dassl engine wherever
    # Dassl's scheduler runs. Dassl's build_lr_scheduler hands over to these three ...
    torch.optim.lr_scheduler.CosineAnnealingLR,
    torch.optim.lr_scheduler.StepLR,
    torch.optim.lr_scheduler.MultiStepLR,
    # ... built over one of Dassl's build_optimizer optimisers (Dassl's own RAdam is not listed:
    # no method here trains with it) ...
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    # ... whose pickled `state` is a defaultdict(dict): read as a plain dict (weights_only fills
    # no other mapping; that optimiser object is never stepped, its schedule only sets its
    # learning rates), with `dict`, its default factory.
    (_plain_dict, "collections.defaultdict"),
    dict,
    # NumPy: scalars (a `val_result` or `best_result` computed with NumPy), and arrays with their
    # dtypes (the NumPy random state, `np.random.get_state()`, that checkpoints saving the random
    # states hold), under NumPy 2's names and NumPy 1's.
    (_NP_CORE.multiarray.scalar, "numpy._core.multiarray.scalar"),
    (_NP_CORE.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (_NP_CORE.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (_NP_CORE.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *_NP_DTYPE_CLASSES,
]


class RefusedFile(UserError):
    """A file that holds something other than data; `kind` names what."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def one_line(text) -> str:
    """An error's text on one line (torch's and pickle's messages span several)."""
    return " ".join(str(text).split())


def trusted() -> bool:
    """Whether the user opted in to reading torch files as full pickles."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _refusal(path: str, what: str, kind: str) -> RefusedFile:
    return RefusedFile(
        f"Refused to read the {what} {path}: it holds {kind}, which is not among the types such "
        f"files hold (tensors, numbers, containers, optimiser and scheduler state, NumPy arrays), "
        f"and reading it could run code. If you trust whoever wrote it, set {TRUST_ENV}=1 to "
        "read it as a full pickle.", kind)


# How torch's weights-only unpickler names what it refused
_REFUSED_PATTERNS = (r"GLOBAL (\S+) was not an allowed global", r"unsupported GLOBAL (\S+)",
                     r"unrecognized function (.+?)(?: which belongs|$)",
                     r"(?:Can only build|Can only create new object).*but got (<class '[^']+'>)")


def _refused_kind(message: str):
    for pattern in _REFUSED_PATTERNS:
        found = re.search(pattern, message, re.MULTILINE)
        if found:
            return found.group(1)
    return None


def load_torch_file(path: str, what: str = "checkpoint"):
    """`torch.load(path)` on the CPU, building only weights-only types and `TORCH_ALLOW_LIST`.

    Raises RefusedFile when the file holds anything else (or is a TorchScript archive); a
    damaged file raises what torch raises (callers word their own "corrupt" message).
    """
    if trusted():
        logger.warning("%s=1: reading %s as a full pickle, which can run code", TRUST_ENV, path)
        return torch.load(path, map_location="cpu", weights_only=False)
    if is_torchscript(path):
        raise _refusal(path, what, "a TorchScript program")
    _check_torch_version()
    try:
        with torch.serialization.safe_globals(TORCH_ALLOW_LIST):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        kind = _refused_kind(str(exc))
        if kind is None:
            raise
        raise _refusal(path, what, kind) from None


def _check_torch_version():
    """safe_globals with (obj, "module.name") entries arrived in torch 2.6 (setup.py's floor)."""
    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        raise UserError(f"textrefiner reads checkpoints as data only, which needs torch >= 2.6 "
                        f"(this is {torch.__version__}): pip install -U torch.")


def is_torchscript(path: str) -> bool:
    """A TorchScript archive: a zip file with a `constants.pkl` record (as torch tells them)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(os.path.basename(name) == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_torchscript_state_dict(path: str, known_sha256: set, what: str) -> dict:
    """The state dict of a TorchScript archive whose sha256 is in `known_sha256` (files whose
    publisher is trusted as much as the code that reads them), or of any with the opt-in."""
    if not trusted() and sha256_of(path) not in known_sha256:
        raise RefusedFile(
            f"Refused to read the {what} {path}: it is a TorchScript archive other than the "
            "ones OpenAI published (its sha256 differs), and loading one runs the code it holds. "
            "Use OpenAI's file or a saved state dict (torch.save(model.state_dict(), FILE)); if "
            f"you trust whoever wrote it, set {TRUST_ENV}=1 to load it.", "a TorchScript program")
    if trusted():
        logger.warning("%s=1: loading the TorchScript archive %s", TRUST_ENV, path)
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return dict(torch.jit.load(f, map_location="cpu").state_dict())


class _AllowListUnpickler(pickle.Unpickler):
    """Builds only the classes of `allowed` ({(module, name): class}); every other global (a
    function to call, a class to build) is refused before anything runs."""

    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise _RefusedGlobal(f"{module}.{name}")
        return self.allowed[(module, name)]


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def load_fewshot_pickle(path: str, allowed: dict):
    """Unpickle a few-shot cache, building only the classes of `allowed` ({(module, name): class},
    the Datum classes). Raises RefusedFile for any other type; a damaged file raises what pickle
    raises."""
    with open(path, "rb") as f:
        try:
            return _AllowListUnpickler(f, allowed).load()
        except _RefusedGlobal as exc:
            raise RefusedFile(f"it holds {exc}, which a few-shot cache never holds (only "
                              "Datum objects), and reading it could run code", str(exc)) from None
