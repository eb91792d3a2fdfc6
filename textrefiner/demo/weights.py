"""The demo's pretrained tiny CLIP as a small file shipped with the package.

Pretraining (`textrefiner.demo.pretrain`) runs 400 Adam steps, which turn the last-bit differences
between CPU kernel paths (AVX2, AVX-512, AMX, NEON: each sums in its own order) into another
model. So the demo does not pretrain: it loads `clip_tiny.pt` beside this file, made once, and
every machine gets the same weights. The file is a *packed* state dict:

* every tensor of the stock `clip.model.CLIP` state dict but the token embedding, in the dtype
  `clip.model.build_model` gives it: it rounds the weights of convolutions, linears, attention and
  projections to fp16 when it loads them, so storing those in fp16 loses nothing (`load_clip`
  builds the same model, bit for bit, from the packed file as from the fp32 one);
* of the token embedding [vocab, width], only the rows of the demo's vocabulary (the words of
  the pretraining captions and of every prompt the project builds for the demo's classes);
  `unpack` rebuilds the other rows as zeros. Pretraining never updates a row whose token it does
  not see, so those rows hold only their random initialisation, which no demo prompt reads.

`python -m textrefiner.demo pretrain FILE` writes the same format (the weights it gives depend on
the machine's CPU kernels); `python -m textrefiner.demo prepare DIR --weights FILE` uses it.
"""
import itertools
import os
from typing import Dict

import torch

from .._compat import import_clip
from ..clip_backbone import tokenize
from ..errors import UserError
from ..safe_load import load_torch_file, sha256_of
from ..data.synthetic import COLORS, SHAPES
from ..methods.templates import DATASET_TEMPLATES, DEFAULT_TEMPLATE, IMAGENET_TEMPLATES
from .pretrain import POSITIONS, SIZES, TEMPLATES, world_classes

SHIPPED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_tiny.pt")
SHIPPED_SHA256 = "b90d7cd1c551bddd976b14bcbbbbb85fb7ba216fd84bbd363fa853316e6c6593"
FORMAT = "textrefiner-demo-clip/1"
TOKEN_KEY = "token_embedding.weight"


def demo_vocabulary() -> torch.Tensor:
    """Sorted token ids of every caption the pretraining can draw and of every prompt the project
    builds for a class of its world (CoOp's "a photo of a", the dataset templates, CLIP's
    ensemble)."""
    words = {"color": list(COLORS), "shape": SHAPES, "size": list(SIZES), "position": POSITIONS}
    captions = {template.format(**dict(zip(words, choice)))
                for template in TEMPLATES for choice in itertools.product(*words.values())}
    templates = {DEFAULT_TEMPLATE, *DATASET_TEMPLATES.values(), *IMAGENET_TEMPLATES}
    prompts = [t.format(f"{color} {shape}") for t in sorted(templates)
               for color, shape in world_classes()]
    prompts.append("X X X X a photo of a")  # CoOp's placeholders and its CTX_INIT
    return torch.unique(tokenize(sorted(captions) + prompts))  # sorted, with 0 (padding)


def pack(state_dict: Dict[str, torch.Tensor], token_ids: torch.Tensor) -> dict:
    """The state dict as `build_model` loads it, with only the `token_ids` rows of its token
    embedding."""
    state_dict = import_clip().model.build_model(dict(state_dict)).state_dict()
    rest = {key: value for key, value in state_dict.items() if key != TOKEN_KEY}
    table = state_dict[TOKEN_KEY]
    return {"format": FORMAT, "state_dict": rest, "vocab_size": table.shape[0],
            "token_ids": token_ids.clone(), "token_rows": table[token_ids].clone()}


def unpack(packed: dict) -> Dict[str, torch.Tensor]:
    """A full CLIP state dict (`clip.model.build_model` reads it); absent rows are zeros."""
    rows = packed["token_rows"]
    table = rows.new_zeros(packed["vocab_size"], rows.shape[1])
    table[packed["token_ids"]] = rows
    return {**packed["state_dict"], TOKEN_KEY: table}


def read_packed(path: str, sha256: str = None) -> Dict[str, torch.Tensor]:
    """The full state dict from a packed file, after checking its sha256 when one is given."""
    if sha256 is not None and sha256_of(path) != sha256:
        raise UserError(f"{path} is not the file this textrefiner shipped (its sha256 differs): "
                        "reinstall textrefiner (pip install --force-reinstall --no-deps, the wheel "
                        "or checkout you installed), or rebuild a machine-dependent one with "
                        "`python -m textrefiner.demo pretrain FILE`.")
    try:
        packed = load_torch_file(path, "demo CLIP")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"Could not read the demo CLIP {path!r} ({exc}).") from None
    if not isinstance(packed, dict) or packed.get("format") != FORMAT:
        raise UserError(f"{path!r} is not a packed demo CLIP ({FORMAT}): write one with "
                        "`python -m textrefiner.demo pretrain FILE`.")
    return unpack(packed)


def write_packed(path: str, packed: dict) -> str:
    """Write atomically: a killed run leaves no file that looks finished."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    partial = f"{path}.partial"
    torch.save(packed, partial)
    os.replace(partial, path)
    return path
