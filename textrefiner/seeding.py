"""Random numbers as the codebases draw them: one seed, one global stream, saved with checkpoints.

CoOp's train.py over Dassl seeds Python's `random`, NumPy and torch once (`set_random_seed`), and
everything after draws from those global generators in the order it runs: the few-shot draws,
CLIP's `build_model` (which initialises every parameter before loading the weights), the method's
own modules, then, every epoch, the train loader (its worker base seed, RandomSampler's
permutation, and the augmentations when it has no workers). Both engines do the same and reseed
nothing per epoch, so a seed gives the codebase's run on either engine.

Two things are added, neither of which draws from the global stream:

* TextRefiner initialises its weights and cache from its own generator, seeded from SEED
  (`own_generator`), so that a run with and without `--refiner` sees the same images and
  augmentations;
* every checkpoint holds the global generators' states (`random_states`), which a resumed run
  restores (`restore_random_states`), so that it continues as the uninterrupted run. They are
  stored as tensors, ints, floats and strings only (what `torch.load(weights_only=True)` reads).
"""
import contextlib
import hashlib
import random

import numpy as np
import torch

from .errors import UserError


def set_seed(seed: int):
    """Dassl's `set_random_seed`: Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for `purpose` (e.g. "refiner") derived from SEED, independent of the global stream."""
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def own_generator(seed: int, purpose: str):
    """Run the block on a torch CPU generator of its own, seeded from (`seed`, `purpose`), and
    give the global one back untouched. With no seed (SEED < 0) the block draws from a copy of the
    global state, which it does not advance either."""
    with torch.random.fork_rng(devices=[]):
        if seed >= 0:
            torch.manual_seed(derived_seed(seed, purpose))
        yield


@contextlib.contextmanager
def one_loader_pass():
    """Run the block (an evaluation) drawing from the global torch generator exactly what one pass
    over a DataLoader without random transforms draws, its base seed (one int64), whatever the
    block iterates: this rank's share of the images under torchrun (perhaps none), or features
    read from the feature store. Each evaluation then moves the stream as Dassl's does."""
    with torch.random.fork_rng(devices=[]):
        yield
    torch.empty((), dtype=torch.int64).random_()


# ------------------------------------------------------------------ saved with checkpoints
def random_states() -> dict:
    """The global generators' states, in types `torch.load(weights_only=True)` reads."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
              "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                        int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict):
    """Set the global generators to `random_states()` output."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def check_resumable_seed(checkpoint: dict, seed: int, path: str):
    """A run resumes with the seed it started with (its random states come from that seed)."""
    saved = checkpoint.get("seed")
    if saved is None or saved == seed:
        return
    asked = f"--seed {seed}" if seed >= 0 else "no seed"
    raise UserError(f"{path} was trained with --seed {saved}, but this command gives {asked}, and "
                    f"resuming continues the saved random states: train into a new --output-dir "
                    f"to use another seed, or give --seed {saved} to resume.")


def restore_from_checkpoint(checkpoint: dict):
    """Restore the random states a checkpoint holds (checkpoints of earlier versions hold none:
    the run then continues from the states it has). Returns whether it did."""
    states = checkpoint.get("random_states")
    if not states:
        return False
    restore_random_states(states)
    return True

