"""Random numbers as the codebases draw them: one seed, one global stream, saved with checkpoints.

CoOp's train.py over Dassl seeds Python's `random`, NumPy and torch once (`set_random_seed`), and
everything after draws from those global generators in the order it runs: the few-shot draws,
CLIP's `build_model` (which initialises every parameter before loading the weights), the method's
own modules, then, every epoch, the train loader (its worker base seed, RandomSampler's
permutation, and the augmentations when it has no workers). Both engines do the same and reseed
nothing per epoch, so a seed gives the codebase's run on either engine.

PromptSRC's and PromptKD's codebases build CLIP with their IVLP prompts inside it: each deep
prompt's initial value is drawn among CLIP's own initial values, and PromptSRC then builds two
plain copies of CLIP for its frozen references, PromptKD its teacher's CLIP and then its projector.
`load_clip` keeps the torch state it started CLIP's build from (`BUILD_STATE`), and those methods
go back to it and draw what the codebase draws, in its order (`draw_clip_build`), so that their
prompts start from the codebase's values and the stream continues where the codebase's does.

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
import torch.nn as nn

from ._compat import import_clip
from .errors import UserError

BUILD_STATE = "torch_state_at_build"  # attribute `load_clip` gives a CLIP it built


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


# ------------------------------------------------------------ CLIP builds of the IVLP codebases
def clip_build_shapes(clip_model) -> dict:
    """What a ViT CLIP's construction draws depends on: its tensors' shapes, read off the model."""
    visual, blocks = clip_model.visual, clip_model.transformer.resblocks
    return {"vision_width": visual.conv1.weight.shape[0],
            "patch_size": visual.conv1.weight.shape[-1],
            "positions": visual.positional_embedding.shape[0],
            "vision_heads": visual.transformer.resblocks[0].attn.num_heads,
            "vision_layers": len(visual.transformer.resblocks),
            "embed_dim": visual.proj.shape[1],
            "text_width": clip_model.ln_final.weight.shape[0],
            "text_heads": blocks[0].attn.num_heads,
            "text_layers": len(blocks),
            "vocab_size": clip_model.token_embedding.weight.shape[0],
            "context_length": clip_model.positional_embedding.shape[0],
            "text_embed_dim": clip_model.text_projection.shape[1]}


def rewind_to_clip_build(clip_model) -> bool:
    """Set the global torch generator to the state `load_clip` built `clip_model` from. False (and
    nothing done) for a CLIP built otherwise (OpenCLIP, transformers), which no codebase
    builds."""
    start = getattr(clip_model, BUILD_STATE, None)
    if start is None:
        return False
    torch.set_rng_state(start)
    return True


def draw_clip_build(shapes: dict, n_ctx_text: int = 0, depth_text: int = 0,
                    n_ctx_vision: int = 0, depth_vision: int = 0):
    """Draw from the global torch generator what the IVLP codebases' `clip.build_model` draws when
    it builds a ViT CLIP of these shapes (`clip_build_shapes`) with these prompts, in its order,
    and return the prompts' initial values (float32): (text [layers 1..depth_text-1], vision
    [layers 0..depth_vision-1]). Depths beyond the layers prompt every layer, as there. Without
    prompts, what the stock `build_model` draws (values its weights then overwrite)."""
    Block = import_clip().model.ResidualAttentionBlock

    def prompt(n_ctx, width):
        return torch.empty(n_ctx, width).normal_(std=0.02)

    vision_width, text_width = shapes["vision_width"], shapes["text_width"]
    text, vision = [], []
    patch = shapes["patch_size"]
    nn.Conv2d(3, vision_width, kernel_size=patch, stride=patch, bias=False)
    if depth_vision > 0:
        vision.append(prompt(n_ctx_vision, vision_width))  # after conv1, before the embeddings
    torch.randn(vision_width)  # class embedding
    torch.randn(shapes["positions"], vision_width)
    for i in range(shapes["vision_layers"]):
        Block(vision_width, shapes["vision_heads"])
        if 0 < i < depth_vision:
            vision.append(prompt(n_ctx_vision, vision_width))  # at the end of block i
    torch.randn(vision_width, shapes["embed_dim"])  # visual.proj
    for i in range(shapes["text_layers"]):
        Block(text_width, shapes["text_heads"])
        if 0 < i < depth_text:
            text.append(prompt(n_ctx_text, text_width))
    nn.Embedding(shapes["vocab_size"], text_width)
    # CLIP.initialize_parameters: token and positional embeddings, text blocks, text projection
    torch.empty(shapes["vocab_size"], text_width).normal_()
    torch.empty(shapes["context_length"], text_width).normal_()
    for _ in range(shapes["text_layers"]):
        for rows, cols in ((3, 1), (1, 1), (4, 1), (1, 4)):  # in_proj, out_proj, c_fc, c_proj
            torch.empty(rows * text_width, cols * text_width).normal_()
    torch.empty(text_width, shapes["text_embed_dim"]).normal_()
    return text, vision


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

