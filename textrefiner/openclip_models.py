"""OpenCLIP backbones (`open_clip_torch`, an optional extra: pip install textrefiner[openclip]).

MODEL.BACKBONE.NAME "openclip:<model>/<pretrained>", e.g. "openclip:ViT-B-16/laion2b_s34b_b88k":
open_clip builds <model> and fetches the weights of that pretrained tag as it usually does, or
reads <pretrained> when it is a local file ("openclip:ViT-B-16//data/vit_b16_laion.bin").
"openclip:hf-hub:<org>/<repo>" takes model and weights from the Hugging Face hub.

Only models with CLIP's towers are taken: class `CLIP` with a ViT image tower (class token,
`ln_post`, `proj`; or CLIP's ResNet with its attention pool) and a causal text transformer pooled
at the arg-max (end) token, both built from plain residual attention blocks, and CLIP's BPE
tokenizer. Those use the module names of OpenAI's CLIP, so `OpenCLIP` below only regroups them and
every encoder of `clip_backbone` runs on them unchanged (batch-first blocks and layer scales are
handled there). Anything else is refused with one line naming what is not supported.
"""
import inspect
import os

import torch
import torch.nn as nn

from ._compat import import_clip
from .errors import UserError
from .safe_load import load_torch_file, one_line, trusted

INSTALL = "pip install 'textrefiner[openclip]'"
NO_PICKLE = (".safetensors", ".npz", ".npy")
TOKENIZER_PROBES = ["a photo of a dog.", "A PHOTO of an Airbus A320, a type of aircraft!",
                    "x x x x great_crested  newt", "Gruyère & café au lait"]


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError(f"OpenCLIP backbones need the open_clip_torch package: {INSTALL}."
                        ) from None
    return open_clip


def parse_spec(spec: str):
    """"<model>/<pretrained>" -> (model, pretrained or None); hf-hub names keep their '/'."""
    if spec.startswith("hf-hub:"):
        parts = spec.split("/", 2)
        return "/".join(parts[:2]), (parts[2] if len(parts) > 2 and parts[2] else None)
    model, _, pretrained = spec.partition("/")
    return model, pretrained or None


class OpenCLIP(nn.Module):
    """An OpenCLIP `CLIP` with CLIP's towers, under the names of OpenAI's `clip.model.CLIP`
    (`visual`, `transformer`, `token_embedding`, `positional_embedding`, `ln_final`,
    `text_projection`, `logit_scale`: the same names, so its state dict keys are open_clip's).
    `image_mean` / `image_std`: the normalisation its weights were trained with."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        for attr in ("visual", "transformer", "token_embedding", "positional_embedding",
                     "ln_final", "text_projection", "logit_scale"):
            setattr(self, attr, getattr(model, attr))
        self.name = name
        preprocess = getattr(model.visual, "preprocess_cfg", None) or {}
        self.image_mean = tuple(preprocess.get("mean", ())) or None
        self.image_std = tuple(preprocess.get("std", ())) or None

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype


def load_openclip(spec: str, precision: str, config_key: str) -> OpenCLIP:
    """Build "openclip:<spec>" (see the module docstring) in PREC `precision`."""
    open_clip = import_open_clip()
    name, pretrained = parse_spec(spec)
    if pretrained is None and not name.startswith("hf-hub:"):
        tags = _known_tags(open_clip, name)
        raise UserError(f"{config_key} 'openclip:{spec}' names no weights: write "
                        f"'openclip:{name}/<pretrained tag or local file>'"
                        + (f" (tags for {name}: {', '.join(tags)})." if tags else "."))
    check_local_weights(pretrained)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu",
                                       precision="fp16" if precision == "fp16" else "fp32",
                                       **weights_only_option(open_clip))
    except Exception as exc:  # open_clip raises RuntimeError, hub and file errors alike
        raise UserError(f"open_clip could not build 'openclip:{spec}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}). Check the model name "
                        "and pretrained tag (open_clip.list_pretrained()), or, offline, give a "
                        f"local weights file: {config_key} openclip:{name}/<file>.") from None
    check_clip_towers(model, f"openclip:{spec}")
    check_tokenizer(open_clip, name, model, f"openclip:{spec}")
    return OpenCLIP(model, f"openclip:{spec}")


def check_local_weights(pretrained):
    """A local weights file is read as data only (textrefiner.safe_load) before open_clip reads
    it, which versions without `weights_only` do with a full pickle. Safetensors and NumPy files
    hold no pickle (open_clip reads .npz with allow_pickle off)."""
    if pretrained and os.path.isfile(pretrained) and not pretrained.endswith(NO_PICKLE):
        try:
            load_torch_file(pretrained, "OpenCLIP weights")
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"Could not read OpenCLIP weights from {pretrained!r} "
                            f"({type(exc).__name__}: {one_line(exc)}).") from None


def weights_only_option(open_clip) -> dict:
    """create_model(weights_only=True) where open_clip has it (it then also reads the weights of
    pretrained tags and hub models as data only), unless the user opted in to full pickles."""
    if "weights_only" not in inspect.signature(open_clip.create_model).parameters:
        return {}
    return {"weights_only": not trusted()}


def _known_tags(open_clip, name: str):
    try:
        return open_clip.list_pretrained_tags_by_model(name)
    except Exception:
        return []


def unsupported_part(model: nn.Module):
    """What makes an open_clip model other than CLIP's towers, or None when it has them."""
    from open_clip.model import CLIP
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    if not isinstance(model, CLIP):
        return f"its class is {type(model).__name__} (only CLIP, with CLIP's text transformer)"
    if getattr(model, "logit_bias", None) is not None:
        return "its sigmoid (SigLIP) logit bias"
    visual = model.visual
    if hasattr(visual, "attnpool"):
        if not hasattr(visual.attnpool, "c_proj"):
            return f"its ResNet pool {type(visual.attnpool).__name__}"
    elif not isinstance(visual, VisionTransformer):
        return f"its image tower {type(visual).__name__} (only a ViT or CLIP's ResNet)"
    elif getattr(visual, "attn_pool", None) is not None:
        return "the attentional pooling of its image tower"
    elif visual.pool_type != "tok":
        return f"its image pooling {visual.pool_type!r} (only the class token, 'tok')"
    elif len(set(visual.image_size)) != 1:
        return f"its non-square image size {tuple(visual.image_size)}"
    if model.text_pool_type != "argmax":
        return f"its text pooling {model.text_pool_type!r} (only the end token, 'argmax')"
    if model.attn_mask is None:
        return "its text transformer without a causal mask"
    if model.text_projection is None:
        return "its text tower without a projection"
    blocks = list(model.transformer.resblocks)
    if not hasattr(visual, "attnpool"):
        blocks += list(visual.transformer.resblocks)
    for block in blocks:
        if not (type(block) is ResidualAttentionBlock
                and isinstance(block.attn, nn.MultiheadAttention)):
            return (f"its {type(block).__name__} blocks (qk-norm, scaled cosine or other custom "
                    "attention)")
    return None


def check_clip_towers(model: nn.Module, name: str):
    reason = unsupported_part(model)
    if reason is not None:
        raise UserError(f"OpenCLIP model {name!r} is not supported because of {reason}: use an "
                        "OpenCLIP model with CLIP's towers (e.g. openclip:ViT-B-16/"
                        "laion2b_s34b_b88k).")


def check_tokenizer(open_clip, name: str, model: nn.Module, spec: str):
    """The project tokenizes with CLIP's BPE (77 positions): the model's tokenizer must agree."""
    context = model.positional_embedding.shape[0]
    try:
        tokenizer = open_clip.get_tokenizer(name)
        theirs = tokenizer(TOKENIZER_PROBES)
    except Exception as exc:
        raise UserError(f"open_clip could not build the tokenizer of {spec!r} ({exc}).") from None
    ours = import_clip().tokenize(TOKENIZER_PROBES)
    if context != ours.shape[1] or not torch.equal(torch.as_tensor(theirs), ours):
        raise UserError(f"OpenCLIP model {spec!r} is not supported because its tokenizer "
                        f"({type(tokenizer).__name__}, {context} positions) is not CLIP's BPE "
                        "tokenizer with 77 positions.")
