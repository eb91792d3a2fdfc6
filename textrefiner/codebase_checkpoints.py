"""Checkpoints in the layouts of the original codebases (CoOp, CoCoOp, MaPLe, PromptSRC, PromptKD).

Those codebases save with Dassl as we do (`<dir>/<model name>/model.pth.tar-<epoch>`, a dict with
`state_dict`, `epoch`, `optimizer`, ...), but their `state_dict` is that of the module their trainer
registered:

* CoOp and CoCoOp register the prompt learner alone: keys relative to it (`ctx`, `meta_net.*`);
* MaPLe, PromptSRC and PromptKD register the whole model: the trained prompts plus the frozen CLIP
  (`image_encoder.*`, `text_encoder.*`, `logit_scale`);
* all of them also save class-dependent buffers (`token_prefix`, `token_suffix`, PromptKD's
  `token_prefix2` / `token_suffix2`), which their `load_model` deletes: they are rebuilt from the
  class names. PromptSRC saves its frozen zero-shot image encoder (`ZS_image_encoder`) too.

A method states its codebase's layout as a `CodebaseLayout` (`PromptMethod.codebase_layout`); by
default the one its `checkpoint_name` implies: a submodule of that name was registered alone,
otherwise the whole model. A file's keys are mapped to ours; keys that name frozen parameters or
buffers of our model (the CLIP weights) and the class-dependent buffers are not loaded; what is
left must be exactly the method's trainable weights, as for our own checkpoints.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .errors import UserError

# Parts of key names the codebases save but never load: rebuilt from the class names, or
# (PromptSRC) a frozen un-prompted copy of the image encoder.
CLASS_BUFFERS = ("token_prefix", "token_suffix", "token_prefix2", "token_suffix2",
                 "tokenized_prompts")
UNUSED_COPIES = ("ZS_image_encoder",)
REFINER = "refiner."
OWN_CHECKPOINT = "a textrefiner checkpoint"  # how the log names ours


def is_codebase_read(read: str) -> bool:
    """Whether `load_checkpoint_state` read a codebase's layout (from what it returned)."""
    return not read.startswith(OWN_CHECKPOINT)


@dataclass(frozen=True)
class CodebaseLayout:
    """How a method's original codebase saves it.

    `registered`: our submodule the codebase registered alone ("prompt_learner": keys relative to
    it), or "" for the whole model. `dropped`: key parts it saves that are never loaded.
    `renames`: (codebase prefix, our prefix) pairs for modules we name differently.
    `convolutions`: codebase keys of 1x1 convolution weights [out, in, 1, 1] that are linears'
    weights [out, in] here.
    """

    codebase: str
    registered: str = ""
    dropped: Tuple[str, ...] = CLASS_BUFFERS + UNUSED_COPIES
    renames: Tuple[Tuple[str, str], ...] = ()
    convolutions: Tuple[str, ...] = ()

    def describe(self, folder: str) -> str:
        if self.registered:
            return (f"a {self.codebase}-codebase checkpoint ({folder}, keys relative to the "
                    f"{self.registered.replace('_', ' ')})")
        return f"a {self.codebase}-codebase checkpoint ({folder}, the whole model)"

    def our_name(self, key: str) -> str:
        for theirs, ours in self.renames:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        return f"{self.registered}.{key}" if self.registered else key

    def codebase_name(self, key: str) -> str:
        """Our name of a whole-model key as the codebase names it (`our_name` reversed)."""
        for theirs, ours in self.renames:
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key

    def is_dropped(self, key: str) -> bool:
        return any(part in self.dropped for part in key.split("."))


# What a file is, from its keys, first match first: (method, its codebase's checkpoint folder or
# "" for ours, keys the file must hold); a key ending in "." stands for any key under that prefix.
# Only used to say what a file is.
KNOWN_FILES = (
    ("PromptKD", "VLPromptLearner, a student", ("VPT_image_trans.conv1.",)),
    ("PromptKD", "", ("VPT_image_trans.fc1.",)),
    ("MaPLe", "MultiModalPromptLearner", ("prompt_learner.proj.", "logit_scale")),
    ("MaPLe", "", ("prompt_learner.proj.",)),
    ("PromptSRC", "VLPromptLearner, as are PromptKD's teachers",
     ("prompt_learner.ctx", "image_encoder.VPT", "logit_scale")),
    ("PromptSRC", "", ("prompt_learner.ctx", "image_encoder.VPT")),
    ("CoCoOp", "prompt_learner", ("ctx", "meta_net.")),
    ("CoCoOp", "", ("prompt_learner.meta_net.",)),
    ("CoOp", "prompt_learner", ("ctx",)),
    ("CoOp", "", ("prompt_learner.ctx",)),
)
KNOWN_LAYOUTS = ("textrefiner's own, or those of the CoOp, CoCoOp, MaPLe, PromptSRC and PromptKD "
                 "codebases")


def identify(state: Dict[str, torch.Tensor]) -> Optional[Tuple[str, str]]:
    """(method, description) of a checkpoint's `state_dict`, e.g. ("MaPLe", "a MaPLe-codebase
    checkpoint (MultiModalPromptLearner)"), or None when it fits no known file."""
    keys = {_strip_module(k) for k in state}

    def holds(name):
        return any(k.startswith(name) for k in keys) if name.endswith(".") else name in keys

    for method, folder, required in KNOWN_FILES:
        if all(holds(name) for name in required):
            if folder:
                return method, f"a {method}-codebase checkpoint ({folder})"
            refiner = " with TextRefiner" if any(k.startswith(REFINER) for k in keys) else ""
            return method, f"a textrefiner {method} checkpoint{refiner}"
    return None


def what_it_is(state: Dict[str, torch.Tensor], method: str) -> str:
    """A sentence for mismatch messages: what the file is, and what to check."""
    found = identify(state)
    if found is None:
        return (f"It fits no known layout ({KNOWN_LAYOUTS}): check --model-dir, --trainer and the "
                "config file.")
    if found[0] == method:
        return (f"It is {found[1]}, saved with other settings: check the config file (prompt "
                "length and depth, class-specific context, backbone).")
    return (f"It is {found[1]}, of another method than {method}: check --trainer (this file "
            f"needs {found[0]}) and the config file.")


def layout_of(model) -> Optional[CodebaseLayout]:
    """The method's codebase layout: its own `codebase_layout`, or the one its checkpoint name
    implies (a submodule of that name registered alone, else the whole model)."""
    if model.codebase_layout is not None:
        return model.codebase_layout
    name = model.checkpoint_name
    if not name:
        return None
    registered = name if isinstance(getattr(model, name, None), torch.nn.Module) else ""
    return CodebaseLayout(type(model).__name__, registered)


def as_codebase_state(model, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`checkpoint_state()` output as the method's codebase saves it, for a model without
    TextRefiner, so that the codebase's `load_model` and tools read the file as their own: where
    the codebase registers a submodule alone (CoOp, CoCoOp), keys relative to it (`ctx`,
    `meta_net.*`) plus the class-dependent buffers it saves (`token_prefix`, `token_suffix`);
    where it registers the whole model, its names and shapes (PromptKD's projector as the 1x1
    convolutions `VPT_image_trans.conv1.0`, `.1`, `.3`; MaPLe's and PromptSRC's names are ours).
    With TextRefiner on, `state` (the codebases have no TextRefiner)."""
    layout = layout_of(model)
    if model.refiner is not None or layout is None:
        return state
    if not layout.registered:  # the whole model: its names and shapes
        renamed = {layout.codebase_name(k): v for k, v in state.items()}
        return {k: v.reshape(*v.shape, 1, 1) if k in layout.convolutions else v
                for k, v in renamed.items()}
    prefix = layout.registered + "."
    if not all(k.startswith(prefix) for k in state):
        return state
    module = getattr(model, layout.registered)
    buffers = {name: buffer for name, buffer in module.named_buffers()
               if name in CLASS_BUFFERS and name != "tokenized_prompts"}
    return {**{k[len(prefix):]: v for k, v in state.items()}, **buffers}


def is_own_layout(state: Dict[str, torch.Tensor], saved_names: Sequence[str]) -> bool:
    """Whether the keys are ours (a textrefiner checkpoint): each a saved name or a refiner key."""
    saved = set(saved_names)
    return all(k in saved or k.startswith(REFINER) for k in state)


def as_own_state(model, state: Dict[str, torch.Tensor], source: str):
    """`state` (ours, or in the method's codebase layout) under our names; returns (state,
    description of what was read, for the log)."""
    state = {_strip_module(k): v for k, v in state.items()}
    layout = layout_of(model)
    if layout is None or is_own_layout(state, model.checkpoint_state()):
        return state, OWN_CHECKPOINT
    weights, frozen, differing = from_codebase(model, state, layout, source)
    description = layout.describe(model.checkpoint_name)
    if frozen:
        description += f"; its {frozen} frozen CLIP tensors are not loaded"
    if differing:
        description += (f" ({len(differing)} differ from this model's CLIP, e.g. "
                        f"{differing[0]!r}: scores use the CLIP of MODEL.BACKBONE)")
    return weights, description


def from_codebase(model, state: Dict[str, torch.Tensor], layout: CodebaseLayout, source: str):
    """The trainable weights of a codebase-layout `state` under our names; returns (weights,
    number of frozen CLIP tensors left out, keys of those that differ from our CLIP's). Keys
    that fit nothing are a UserError."""
    expected = model.checkpoint_state()
    own = model.state_dict()
    weights, frozen, differing, unknown = {}, 0, [], []
    for key, value in state.items():
        name = layout.our_name(_strip_module(key))
        if layout.is_dropped(name):
            continue
        if name in expected:
            weights[name] = _fit(value, expected[name].shape)
        elif name in own:  # a frozen CLIP weight of our model: the backbone's own is used
            if value.shape != own[name].shape:
                raise UserError(
                    f"{source}: the frozen CLIP weight {key!r} has shape {tuple(value.shape)}, "
                    f"this model's CLIP has {tuple(own[name].shape)}. It was trained on "
                    "another backbone: check MODEL.BACKBONE.NAME (or MODEL.BACKBONE.PATH).")
            frozen += 1
            if not torch.equal(value.to(own[name].dtype), own[name].cpu()):
                differing.append(key)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:4]) + (" ..." if len(unknown) > 4 else "")
        raise UserError(f"{source} does not fit a {type(model).__name__} model (unknown keys: "
                        f"{shown}). {what_it_is(state, type(model).__name__)}")
    return weights, frozen, differing


def _fit(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A 1x1 convolution's weight [out, in, 1, 1] as the equivalent linear's [out, in]."""
    if value.shape != shape and value.dim() > len(shape) and \
            tuple(value.shape[:len(shape)]) == tuple(shape) and \
            all(s == 1 for s in value.shape[len(shape):]):
        return value.reshape(shape)
    return value


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key
