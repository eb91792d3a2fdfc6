"""Checkpoint files in Dassl's layout, shared by both engines.

`<output dir>/<model name>/model.pth.tar-<epoch>` and `model-best.pth.tar`, each a dict
`{"state_dict", "epoch", "optimizer", "scheduler", "val_result", ...}`, plus Dassl's marker file
`checkpoint` naming the latest one. A method's `state_dict` is its `checkpoint_state()`; what else
it needs to resume (`run_state()`, e.g. PromptSRC's running GPA sum) goes under "method_state";
files the original codebases wrote load too (textrefiner.codebase_checkpoints).

Writes are atomic (temporary file in the same folder, then rename), so a kill or a full disk during
a save never leaves a truncated checkpoint behind and never touches the previous one. Saved files
follow the user's umask, like every other output of the run.
"""
import math
import os
import secrets
import shutil

import torch

from .codebase_checkpoints import OWN_CHECKPOINT, as_codebase_state, is_codebase_read
from .errors import OutputError, UserError, output_failed
from .safe_load import load_torch_file, one_line
from .seeding import random_states


BEST = "model-best.pth.tar"
# Dassl model names -> the methods (ours and their codebases') that save under them
CODEBASE_FOLDERS = {"prompt_learner": "CoOp and CoCoOp", "MultiModalPromptLearner": "MaPLe",
                    "VLPromptLearner": "PromptSRC and PromptKD"}
LATEST_MARKER = "checkpoint"  # Dassl's file naming the latest checkpoint, read to resume
# Key of the files written here: without TextRefiner, CoOp's and CoCoOp's are in their codebase's
# layout (textrefiner.codebase_checkpoints.as_codebase_state), and still resume here.
WRITTEN_HERE = "textrefiner"


def checkpoint_path(directory: str, name: str, epoch=None) -> str:
    """`<directory>/<name>/model.pth.tar-<epoch>`, or `model-best.pth.tar` without an epoch."""
    return os.path.join(directory, name, BEST if epoch is None else f"model.pth.tar-{epoch}")


def _create_temporary(folder: str, name: str):
    """An exclusive new file beside `name`, created with mode 0666 so that the umask decides its
    permissions (tempfile's files are 0600: collaborators could not read the checkpoint)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".tmp-{name}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: str, write, mode: str):
    """Write `path` through `write(file)` into a temporary file beside it, then rename it into
    place (a kill or a full disk never leaves a truncated file); an OSError is an OutputError."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _create_temporary(folder, os.path.basename(path))
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from None
        raise
    return path


def _write_failed(path: str, exc: OSError) -> OutputError:
    kept = f" The previous {os.path.basename(path)} is intact." if os.path.isfile(path) else ""
    return output_failed(path, exc, kept + " Nothing saved before was changed.")


def write_checkpoint(obj: dict, path: str) -> str:
    return atomic_write(path, lambda f: torch.save(obj, f), "wb")


def save_method_checkpoint(model, path: str, epoch: int, optimizer=None, scheduler=None,
                           val_result=None, mark_latest: bool = True, **extra) -> str:
    """Save `model.checkpoint_state()` with the optimiser and schedule, and the global random
    states (textrefiner.seeding) that a resumed run restores; `epoch` is 0-based."""
    weights = model.checkpoint_state()
    _refuse_non_finite(weights, path)
    state = {"state_dict": as_codebase_state(model, weights), "epoch": epoch + 1,
             "optimizer": None if optimizer is None else optimizer.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "val_result": val_result, "random_states": random_states(),
             WRITTEN_HERE: 1, **extra}
    run_state = model.run_state()
    if run_state:
        state["method_state"] = run_state  # e.g. PromptSRC's running GPA sum, needed to resume
    write_checkpoint(state, path)
    if mark_latest:
        marker = os.path.join(os.path.dirname(path), LATEST_MARKER)
        atomic_write(marker, lambda f: f.write(os.path.basename(path) + "\n"), "w")
    return path


def run_record(cfg, classnames) -> dict:
    """What a checkpoint records of its run, from which textrefiner-predict rebuilds the model:
    the class names and the configuration, less where the run was written (OUTPUT_DIR, RESUME),
    so a resumed run's checkpoints are the uninterrupted run's."""
    config = cfg.clone()
    config.defrost()
    config.OUTPUT_DIR = config.RESUME = ""
    return {"classnames": list(classnames), "config": config.dump()}


def _refuse_non_finite(weights: dict, path: str):
    """Diverged weights never replace a good checkpoint."""
    for key, value in weights.items():
        if torch.is_floating_point(value) and not torch.isfinite(value).all():
            raise UserError(f"Training diverged: {key} holds NaN or inf values, so {path} was not "
                            "written and the checkpoints already saved are kept. Lower OPTIM.LR "
                            "(or use PREC fp32/amp instead of fp16).")


def carry_best_checkpoint(resume_dir: str, output_dir: str, name: str):
    """Copy `<resume_dir>/<name>/model-best.pth.tar` into `output_dir` when a run resumes from
    another folder: its best validation result was restored with the run, so a later epoch
    replaces the copy only if it beats it, and `TEST.FINAL_MODEL best_val` finds it where an
    uninterrupted run leaves it. Returns the line to log, or None when there is nothing to carry."""
    source, target = checkpoint_path(resume_dir, name), checkpoint_path(output_dir, name)
    if not os.path.isfile(source) or same_folder(resume_dir, output_dir):
        return None
    with open(source, "rb") as original:
        atomic_write(target, lambda f: shutil.copyfileobj(original, f), "wb")
    return (f"Carried the best checkpoint so far, {source}, into {target} (--output-dir); "
            "TEST.FINAL_MODEL best_val tests it unless a later epoch beats it")


def restored_best_result(checkpoint: dict, directory: str, name: str) -> float:
    """The best validation result so far of the run being resumed: saved with its checkpoints, or
    (checkpoints written by Dassl itself) the `val_result` of its model-best.pth.tar."""
    if checkpoint.get("best_result") is not None:
        return float(checkpoint["best_result"])
    best = checkpoint_path(directory, name)
    result = read_checkpoint(best).get("val_result") if os.path.isfile(best) else None
    return -math.inf if result is None else float(result)


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_resumable_lr(checkpoint: dict, lr: float, path: str):
    """Resuming restores the saved schedule, whose learning rate would silently override a new
    OPTIM.LR (e.g. one lowered after the training loss became NaN)."""
    # the first group's: a method's other groups have rates of their own (LLaMP's LoRA)
    saved = ((checkpoint.get("scheduler") or {}).get("base_lrs") or [])[:1]
    if any(not math.isclose(base, lr, rel_tol=1e-6) for base in saved):
        raise UserError(f"{path} was trained with OPTIM.LR {saved[0]:g}, but this command sets "
                        f"{lr:g}, and resuming keeps the saved rate: train into a new --output-dir "
                        f"to use {lr:g}, or set OPTIM.LR {saved[0]:g} to resume.")


def no_checkpoint_to_resume(resume_dir: str, name: str) -> UserError:
    return UserError(f"--resume {resume_dir} holds no checkpoint to continue from (nothing in "
                     f"{os.path.join(resume_dir, name)}): give the --output-dir of the run to "
                     "continue, or leave --resume out to train from scratch.")


def missing_best_error(output_dir: str, resume_dir: str, name: str, trained_epochs: int):
    """The UserError for `TEST.FINAL_MODEL best_val` without a best checkpoint, in terms of the
    options the user gave (--output-dir, --resume)."""
    places = f"--output-dir {output_dir}"
    if resume_dir and not same_folder(resume_dir, output_dir):
        places += f" nor in --resume {resume_dir}"
    why = ("no epoch was left to train and the resumed run saved no best model (it ran without "
           "validation: TEST.FINAL_MODEL last_step or TEST.NO_TEST)" if trained_epochs == 0 else
           "no validated epoch saved one")
    return UserError(f"TEST.FINAL_MODEL best_val tests the best validated model, but there is no "
                     f"{os.path.join(name, BEST)} in {places}: {why}. Test the last epoch with "
                     "TEST.FINAL_MODEL last_step, or train again into an empty --output-dir.")


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
    if checkpoint.get(WRITTEN_HERE) and is_codebase_read(read):
        read = f"{OWN_CHECKPOINT} in the {read[2:].split('-codebase')[0]} codebase's layout"
    if resume and is_codebase_read(read):
        raise UserError(f"{path} is {read}: a run of that codebase cannot be resumed here (its "
                        "optimiser and schedule are the codebase's). Start a new run from its "
                        f"weights with MODEL.INIT_WEIGHTS {path}, or set another OUTPUT_DIR.")
    model.load_run_state(checkpoint.get("method_state"))
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
    """The weights of a Dassl checkpoint dict (LLaMP's: {"net": ..., "epoch": ...}), or the dict
    itself when it holds weights only."""
    state = checkpoint.get("state_dict", checkpoint.get("net", checkpoint))
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
    """Load a checkpoint dict on the CPU, as data only (textrefiner.safe_load); a missing,
    unreadable or refused file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"The {what} {path!r} does not exist.")
    try:
        obj = load_torch_file(path, what)
    except UserError:
        raise
    except Exception as exc:  # any failure to parse the file means it is damaged
        raise UserError(f"The {what} {path!r} is corrupt or truncated ({type(exc).__name__}: "
                        f"{one_line(exc)}). Delete it and train again, or point to another file."
                        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"The {what} {path!r} is not a checkpoint dictionary.")
    return obj

