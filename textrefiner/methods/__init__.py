"""The methods TextRefiner plugs into, as plain PyTorch modules (no Dassl needed).

`build_method(name, cfg, classnames, clip_model)` builds one by its trainer name.
"""
from ..errors import UserError
from .base import PromptMethod, build_refiner
from .cocoop import CoCoOp
from .coop import CoOp
from .llamp import LLaMP
from .maple import MaPLe
from .promptkd import PromptKD
from .promptsrc import PromptSRC
from .zeroshot import ZeroshotCLIP

#: {trainer name: method class}, e.g. METHODS["CoOp"] is `CoOp`; the names `--trainer` takes.
METHODS = {cls.__name__: cls for cls in (CoOp, CoCoOp, LLaMP, MaPLe, PromptKD, PromptSRC,
                                           ZeroshotCLIP)}


def method_class(name: str):
    """The method class for a trainer name (a key of METHODS, e.g. "CoOp")."""
    if name not in METHODS:
        raise UserError(f"Unknown trainer {name!r}: choose one of {sorted(METHODS)}.")
    return METHODS[name]


def build_method(name: str, cfg, classnames, clip_model) -> PromptMethod:
    """The method `name` (a key of METHODS) for `classnames` ([C] strings) on `clip_model` (from
    `load_clip`, in float16 or float32), configured by cfg (textrefiner.config); its prompts and
    refiner are created in CLIP's dtype."""
    return method_class(name)(cfg, classnames, clip_model)


__all__ = ["PromptMethod", "CoOp", "CoCoOp", "LLaMP", "MaPLe", "PromptKD", "PromptSRC", "ZeroshotCLIP",
           "METHODS",
           "method_class", "build_method", "build_refiner"]
