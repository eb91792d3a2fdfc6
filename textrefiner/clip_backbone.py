"""CLIP helpers over the stock `clip` package: loading, local tokens, and deep prompts.

Nothing here copies CLIP's model code. The encoders below walk the stock modules (`conv1`,
`ln_pre`, the residual blocks, `ln_post`, `proj`, ...) in the same order as `CLIP.encode_image` and
`CLIP.encode_text`, which lets them

* return the last block's local tokens in the joint space and its CLS-to-patch attention, and
* insert deep prompts (MaPLe's coupled ones, IVLP's independent ones) before the blocks that carry
  them.

With no prompts and no tokens asked for, they compute exactly what the stock methods compute.

Backbones: OpenAI's ViTs and ResNets (`ModifiedResNet`), OpenCLIP models with CLIP's towers
(`textrefiner.openclip_models`), which use the same module names, and transformers' CLIPModels,
converted into the stock classes (`textrefiner.hf_models`). A ResNet has no blocks to
prompt; its local tokens are the dense reading of its attention pool (`encode_resnet_image`).
"""
import os
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ._compat import import_clip
from .errors import UserError
from .hf_models import HF_PREFIX
from .safe_load import is_torchscript, load_torch_file, load_torchscript_state_dict
from .seeding import BUILD_STATE

PRECISIONS = ("fp16", "fp32", "amp", "bf16")
OPENCLIP_PREFIX = "openclip:"  # MODEL.BACKBONE.NAME openclip:<model>/<pretrained tag or file>
TEXT_LENGTH_MULTIPLE = 16  # see encode_text
DOWNLOAD_TIMEOUT_S = 60
RESNET_KEY = "visual.attnpool.positional_embedding"  # only ResNet CLIP state dicts have it


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def clip_cache_dir() -> str:
    """Where the stock `clip` package keeps downloaded weights."""
    return os.path.expanduser("~/.cache/clip")


# State dicts read ahead by a warm process (textrefiner.sweep.local forks its runs from it), by
# (real path, size, mtime): a run then builds its model from them instead of reading the file.
_PRELOADED: dict = {}


def _file_key(path: str) -> tuple:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def preload_state_dict(name_or_path: str) -> None:
    """Read the CLIP weights of a model name (when downloaded) or file once, for every later
    `load_clip` of this process and of the processes it forks."""
    path = name_or_path
    if not os.path.isfile(path):  # a model name: only when already downloaded
        url = import_clip().clip._MODELS.get(name_or_path)
        path = os.path.join(clip_cache_dir(), os.path.basename(url)) if url else ""
        if not os.path.isfile(path):
            return
    _PRELOADED[_file_key(path)] = _read_state_dict(path)


def _read_state_dict(path: str) -> dict:
    """CLIP weights as data only (textrefiner.safe_load): OpenAI's TorchScript archives, or a
    saved state dict (or a Dassl dict holding one)."""
    preloaded = _PRELOADED.get(_file_key(path)) if _PRELOADED else None
    if preloaded is not None:
        return dict(preloaded)  # clip's build_model deletes keys; the tensors are only copied
    try:
        if is_torchscript(path):
            obj = load_torchscript_state_dict(path, openai_sha256s(), "CLIP weights")
        else:
            obj = load_torch_file(path, "CLIP weights")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"Could not read CLIP weights from {path!r} ({exc}). The file must "
                        "be an OpenAI JIT archive or a saved CLIP state dict.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not ("visual.proj" in obj or RESNET_KEY in obj):
        raise UserError(f"{path!r} does not hold a CLIP state dict (neither a ViT's 'visual.proj' "
                        f"nor a ResNet's {RESNET_KEY!r} key): point MODEL.BACKBONE.PATH to OpenAI "
                        "CLIP weights, or use 'openclip:<model>/<tag or file>' for OpenCLIP.")
    return obj


def openai_sha256s() -> set:
    """The sha256 of each file OpenAI published (the folder of its download address)."""
    return {url.rsplit("/", 2)[-2] for url in import_clip().clip._MODELS.values()}


def _locate_weights(name_or_path: str, config_key: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    clip = import_clip()
    if name_or_path not in clip.clip._MODELS:
        raise UserError(f"CLIP backbone {name_or_path!r} is neither an existing file nor a model "
                        f"name ({', '.join(sorted(clip.clip._MODELS))}): set {config_key} to a "
                        "local weights file, or use one of those names.")
    url = clip.clip._MODELS[name_or_path]
    cached = os.path.join(clip_cache_dir(), os.path.basename(url))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # offline clusters often drop, not refuse
    try:
        return clip.clip._download(url, clip_cache_dir())
    except (OSError, RuntimeError) as exc:  # urllib's URLError and timeouts are OSErrors
        raise UserError(
            f"CLIP weights {name_or_path!r} are not on this machine and could not be downloaded "
            f"({exc}). Copy the file {os.path.basename(url)} to {cached}, or set {config_key} "
            "to the path of a local CLIP checkpoint.") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def load_clip(name_or_path: str, precision: str = "fp32", device="cpu",
              config_key: str = "MODEL.BACKBONE.PATH") -> nn.Module:
    """Load a CLIP model by name (through `clip`'s download cache) or from a local file, ViT or
    ResNet; or an OpenCLIP model, "openclip:<model>/<pretrained tag or local file>"; or a
    transformers CLIPModel, "hf:<folder or org/repo>" (`textrefiner.hf_models`).

    `precision` follows CoOp's PREC: "fp16" keeps CLIP's half-precision weights, "fp32", "amp"
    and "bf16" convert them to float32. `config_key` names the setting a user should change when
    the weights cannot be found (it appears in the error message). Returns the model in eval mode on
    `device`, its weights float16 for "fp16" and float32 otherwise (`model.dtype` says which).
    """
    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}: use one of {PRECISIONS}.")
    if name_or_path.startswith(OPENCLIP_PREFIX):
        from .openclip_models import load_openclip
        return load_openclip(name_or_path[len(OPENCLIP_PREFIX):], precision, config_key).to(
            device).eval()
    if name_or_path.startswith(HF_PREFIX):
        from .hf_models import load_hf_clip
        return load_hf_clip(name_or_path[len(HF_PREFIX):], precision, config_key).to(device)
    state_dict = _read_state_dict(_locate_weights(name_or_path, config_key))
    start = torch.get_rng_state()
    model = import_clip().model.build_model(state_dict)  # fp16 weights, eval mode
    setattr(model, BUILD_STATE, start)  # where PromptSRC and PromptKD redraw it (seeding)
    if precision != "fp16":
        model.float()
    return model.to(device).eval()


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """What torch.autocast computes in for PREC `precision` on `device`, None when it is off:
    "amp" float16 on CUDA and bfloat16 on the CPU; "bf16" (LLaMP's) bfloat16 on a CUDA device
    that has it, otherwise float32 (off)."""
    if precision == "amp":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if precision == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def compute_note(precision: str, device: torch.device) -> str:
    """What PREC `precision` computes in on `device`, for the engines' logs."""
    dtype = autocast_dtype(precision, device)
    if dtype is not None:
        return f"{precision}: {str(dtype).replace('torch.', '')} autocast on {device.type}"
    if precision == "bf16":
        return f"bf16: float32 on {device.type} (bfloat16 only on CUDA devices that have it)"
    return precision


def amp_autocast(precision: str, device: torch.device):
    """torch.autocast in `autocast_dtype(precision, device)`; off where that is None."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def amp_grad_scaler(precision: str, device: torch.device):
    """The loss scaler of PREC "amp" on CUDA (float16 needs it), or None."""
    if precision != "amp" or device.type != "cuda":
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def input_resolution(visual: nn.Module) -> int:
    """The square image size the image encoder takes (OpenCLIP keeps it as `image_size`)."""
    if hasattr(visual, "input_resolution"):
        return visual.input_resolution
    size = visual.image_size
    return size if isinstance(size, int) else size[0]


def is_resnet(visual: nn.Module) -> bool:
    """Whether the image encoder is CLIP's ResNet (`ModifiedResNet`, with its attention pool)."""
    return hasattr(visual, "attnpool")


def require_vit(visual: nn.Module, method: str):
    """Methods that prompt the ViT's blocks refuse any other image encoder."""
    if is_resnet(visual):
        raise UserError(f"{method} prompts the blocks of a ViT image encoder and this CLIP's is a "
                        "ResNet: use a ViT backbone (e.g. MODEL.BACKBONE.NAME ViT-B/16), or CoOp, "
                        "CoCoOp or ZeroshotCLIP on ResNets.")


def check_image_size(cfg, clip_model: nn.Module):
    """INPUT.SIZE must be the CLIP's input resolution (CoOp asserts the same); for an OpenCLIP
    or transformers model, INPUT.PIXEL_MEAN / PIXEL_STD must be the normalisation its weights
    were trained with."""
    size = input_resolution(clip_model.visual)
    if tuple(cfg.INPUT.SIZE) != (size, size):
        raise UserError(f"INPUT.SIZE is {tuple(cfg.INPUT.SIZE)} but this CLIP takes {size}x{size} "
                        f"images: set INPUT.SIZE ({size}, {size}).")
    mean, std = getattr(clip_model, "image_mean", None), getattr(clip_model, "image_std", None)
    if mean is None or std is None:
        return
    if not (_close(cfg.INPUT.PIXEL_MEAN, mean) and _close(cfg.INPUT.PIXEL_STD, std)):
        raise UserError(f"{clip_model.name} was trained on images normalised with mean "
                        f"{list(mean)} and std {list(std)}: set INPUT.PIXEL_MEAN {list(mean)} "
                        f"and INPUT.PIXEL_STD {list(std)}.")


def backbone_input_defaults(cfg) -> dict:
    """{INPUT key: value} an "hf:" backbone's folder prescribes (SIZE, PIXEL_MEAN, PIXEL_STD;
    `textrefiner.hf_models.input_settings`), which `load_cfg` makes the defaults that config
    files and options still override; {} for any other backbone."""
    backbone = cfg.MODEL.BACKBONE.get("PATH") or cfg.MODEL.BACKBONE.NAME
    if not backbone.startswith(HF_PREFIX):
        return {}
    from .hf_models import input_settings
    return input_settings(backbone[len(HF_PREFIX):])


def _close(values, expected) -> bool:
    return len(values) == len(expected) and all(abs(a - b) < 1e-6 for a, b in zip(values, expected))


def build_random_clip(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128,
                      vision_patch_size=8, transformer_width=64, transformer_layers=3,
                      context_length=77, seed=0) -> nn.Module:
    """A small CLIP with random weights, built with the stock `clip.model.CLIP` class.

    Used by the tests, the offline demo and the benchmarks. Widths must be multiples of 64 because
    `build_model` derives head counts as width // 64 when the weights are loaded back.
    `vision_layers` as four block counts gives a ResNet (`ModifiedResNet`, `vision_width` its
    stem width, `image_resolution` a multiple of 32); its BatchNorms get random running
    statistics and weights, so that they matter (CLIP's initialisation zeroes every bn3 weight).
    """
    clip = import_clip()
    vocab_size = len(clip.clip._tokenizer.encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = clip.model.CLIP(
            embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
            context_length, vocab_size, transformer_width, transformer_width // 64,
            transformer_layers)
        if is_resnet(model.visual):
            for norm in model.visual.modules():
                if isinstance(norm, nn.BatchNorm2d):
                    norm.running_mean.normal_(0, 0.1)
                    norm.running_var.uniform_(0.5, 1.5)
                    norm.weight.data.uniform_(0.5, 1.5)
                    norm.bias.data.normal_(0, 0.1)
    return model.eval()


def save_random_clip(path: str, half: bool = False, **kwargs) -> str:
    """Write `build_random_clip(**kwargs)` as a plain state dict that `load_clip(path)` reads.

    `half`: every tensor in fp16, as OpenAI's files are (half the size); `load_clip` then gives
    the same model in fp16 and, in fp32, exactly the float32 copy of that fp16 model."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model = build_random_clip(**kwargs)
    torch.save(model.to(torch.float16 if half else torch.float32).state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------
# Image encoder
# --------------------------------------------------------------------------------------------
@dataclass
class ImageOutput:
    """What the image encoder returns.

    features:      [B, d] global feature (CLS after ln_post and proj), not normalised.
    tokens:        [B, 1+N, d] the last block's CLS + patch tokens after ln_post and proj.
    cls_attention: [B, N] the last block's attention from CLS to each patch, mean over heads.
    All three in the image encoder's dtype (CLIP's: float16 or float32).

    For a ResNet (`encode_resnet_image`): the global token is the attention pool's output, the N
    local tokens its spatial tokens' dense reading, and the attention is the pool's query's.
    """
    features: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    cls_attention: Optional[torch.Tensor] = None


def num_patches(visual: nn.Module) -> int:
    """Local tokens the image encoder gives: ViT patches, or a ResNet's spatial positions."""
    embedding = visual.attnpool.positional_embedding if is_resnet(visual) else \
        visual.positional_embedding
    return embedding.shape[0] - 1


def _batch_first(transformer: nn.Module) -> bool:
    """Whether the blocks take [B, L, w] (OpenCLIP's, since 2.23) rather than [L, B, w]."""
    return bool(getattr(transformer, "batch_first", False))


def _run_block(block: nn.Module, x: torch.Tensor, attn_mask=None, need_weights: bool = False,
               lora: Optional["QVLoRA"] = None, explicit: bool = False):
    """One residual block on x in its layout ([L, B, w], or [B, L, w] for batch-first blocks), as
    `block(x)` computes it (OpenCLIP's blocks may carry layer scales `ls_1`, `ls_2`), with `lora`'s
    low-rank updates of the query and value projections when given; returns (x, attention weights
    [B, L, L] or None). With a LoRA, or `explicit`, the attention is computed step by step as
    `transformers`' CLIP computes it (`explicit_attention`), not by torch's fused kernel."""
    h = block.ln_1(x)
    if lora is None and not explicit:
        attended, weights = block.attn(h, h, h, need_weights=need_weights, attn_mask=attn_mask)
    else:
        attended, weights = explicit_attention(block.attn, h, attn_mask, need_weights, lora)
    x = x + _layer_scale(block, "ls_1", attended)
    return x + _layer_scale(block, "ls_2", block.mlp(block.ln_2(x))), weights


class LoRALinear(nn.Module):
    """peft's LoRA update of one linear map: scale * lora_B(lora_A(dropout(x))), scale = alpha /
    rank; lora_A starts Kaiming-uniform (a = sqrt(5)), lora_B at zero."""

    def __init__(self, width: int, rank: int, alpha: float, dropout: float, dtype=None):
        super().__init__()
        self.lora_A = nn.Linear(width, rank, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(rank, width, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale


class QVLoRA(nn.Module):
    """LoRA on the query and value projections of one stock attention block (what peft does to
    `transformers`' q_proj and v_proj; the stock block packs them into `in_proj_weight`)."""

    def __init__(self, width: int, rank: int, alpha: float, dropout: float, dtype=None):
        super().__init__()
        self.q_proj = LoRALinear(width, rank, alpha, dropout, dtype)
        self.v_proj = LoRALinear(width, rank, alpha, dropout, dtype)


def explicit_attention(attn: nn.MultiheadAttention, h: torch.Tensor, attn_mask=None,
                       need_weights: bool = False, lora: Optional[QVLoRA] = None):
    """`attn(h, h, h)` computed as `transformers`' CLIPAttention does (separate q, k, v
    projections, scaled queries, softmax over keys), with q += lora.q_proj(h) and
    v += lora.v_proj(h) when `lora` is given. `attn_mask`: additive, [B * heads, L, L] or [L, L].
    Returns (output, attention weights [B, L, L] averaged over heads, or None)."""
    batch_first = bool(getattr(attn, "batch_first", False))
    x = h if batch_first else h.transpose(0, 1)                      # [B, L, w]
    batch, length, width = x.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
    q, k, v = (nn.functional.linear(x, w, b) for w, b in zip(weight, bias))
    if lora is not None:
        q = q + lora.q_proj(x)
        v = v + lora.v_proj(x)
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    scores = (q * (width // heads) ** -0.5) @ k.transpose(-2, -1)    # [B, heads, L, L]
    if attn_mask is not None:
        scores = scores + attn_mask.reshape(-1, heads, length, length) if attn_mask.dim() == 3 \
            else scores + attn_mask
    weights = scores.softmax(dim=-1)
    out = attn.out_proj((weights @ v).transpose(1, 2).reshape(batch, length, width))
    out = out if batch_first else out.transpose(0, 1)
    return out, weights.mean(dim=1) if need_weights else None


def _layer_scale(block: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(block, name, None)
    return x if scale is None else scale(x)


def _causal_mask(length: int, x: torch.Tensor) -> torch.Tensor:
    """CLIP's text mask for `length` positions: -inf above the diagonal, in x's dtype."""
    mask = torch.full((length, length), float("-inf"), device=x.device).triu_(1)
    return mask.to(x.dtype)


def _block_with_cls_attention(block: nn.Module, x: torch.Tensor, n_patches: int, lora=None):
    """Run one residual block and also return CLS-to-patch attention [B, N]."""
    x, weights = _run_block(block, x, need_weights=True, lora=lora)
    return x, weights[:, 0, 1:1 + n_patches]


def encode_image(visual: nn.Module, images: torch.Tensor,
                 prompts: Optional[Sequence[torch.Tensor]] = None,
                 return_tokens: bool = False, lora: Optional[dict] = None) -> ImageOutput:
    """Run CLIP's image encoder, optionally with deep vision prompts (ViT) and local tokens.

    prompts: per-layer prompt tokens, each [n_ctx, width]. `prompts[0]` is appended after the patch
        tokens (after the positional embedding, before ln_pre); `prompts[i]` for i >= 1 replaces the
        last n_ctx tokens before block i runs. `len(prompts)` is the prompt depth.
    lora: {block index: QVLoRA} low-rank updates of those blocks' query and value projections.
    A ResNet goes to `encode_resnet_image` (it takes no prompts).
    images: [B, 3, H, W], any float dtype (cast to the encoder's). Returns an `ImageOutput`:
    features [B, d], and with return_tokens tokens [B, 1+N, d] and cls_attention [B, N], in the
    encoder's dtype.
    """
    lora = lora or {}
    if is_resnet(visual):
        if prompts or lora:
            require_vit(visual, "Deep vision prompting")
        return encode_resnet_image(visual, images, return_tokens)
    dtype = visual.conv1.weight.dtype
    x = visual.conv1(images.to(dtype))                     # [B, width, grid, grid]
    x = x.flatten(2).transpose(1, 2)                        # [B, N, width]
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(
        x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1)                          # [B, 1 + N, width]
    x = x + visual.positional_embedding.to(x.dtype)
    n_patches = x.shape[1] - 1
    prompts = list(prompts) if prompts else []
    if prompts:
        x = torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)

    first = _batch_first(visual.transformer)
    seq = 1 if first else 0                                 # the blocks' sequence dim
    if not first:
        x = x.permute(1, 0, 2)                              # [L, B, width]
    blocks = visual.transformer.resblocks
    cls_attention = None
    for i, block in enumerate(blocks):
        if 0 < i < len(prompts):
            n_ctx = prompts[i].shape[0]
            kept = x.narrow(seq, 0, x.shape[seq] - n_ctx)
            deep = prompts[i].to(x.dtype).unsqueeze(1 - seq).expand(
                x.narrow(seq, 0, n_ctx).shape)
            x = torch.cat([kept, deep], dim=seq)
        if return_tokens and i == len(blocks) - 1:
            x, cls_attention = _block_with_cls_attention(block, x, n_patches, lora.get(i))
        else:
            x = _run_block(block, x, lora=lora.get(i))[0]
    if not first:
        x = x.permute(1, 0, 2)                              # [B, L, width]

    if not return_tokens:
        return ImageOutput(_project_image(visual, visual.ln_post(x[:, 0, :])))
    tokens = _project_image(visual, visual.ln_post(x[:, :1 + n_patches, :]))  # [B, 1 + N, d]
    return ImageOutput(tokens[:, 0, :], tokens, cls_attention)


def _project_image(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if visual.proj is None else x @ visual.proj


def encode_resnet_image(visual: nn.Module, images: torch.Tensor,
                        return_tokens: bool = False) -> ImageOutput:
    """CLIP's ResNet on images; with `return_tokens`, also its local tokens and their attention.

    The global feature g is the stock attention pool's output. The pool's input is the last
    stage's map f [B, C, H, W] as N = HW tokens f_i, with x_0 = mean_i f_i + p_0 and
    x_i = f_i + p_i (p the pool's positional embedding); its one query is x_0. The local tokens
    are the dense reading of that pool (as DenseCLIP and MaskCLIP read it): each spatial token
    through the value and output projections alone, t_i = c_proj(v_proj(x_i)), in the joint
    space. The attention is the pool's, from its query to the spatial tokens, mean over heads:
    a_i = mean_h softmax_j(q_h(x_0) . k_h(x_j) / sqrt(C / heads))[i] for j = 0..N, i = 1..N.
    Returns tokens [g, t_1..t_N] [B, 1+N, d] and attention [a_1..a_N] [B, N].
    """
    images = images.to(visual.conv1.weight.dtype)
    if not return_tokens:
        return ImageOutput(visual(images))
    fmap = _resnet_feature_map(visual, images)
    pooled = visual.attnpool(fmap)                                  # g [B, d]
    local, attention = _attention_pool_dense(visual.attnpool, fmap)
    return ImageOutput(pooled, torch.cat([pooled.unsqueeze(1), local], dim=1), attention)


def _resnet_feature_map(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The stock ResNet's stem and four stages (its forward without the attention pool)."""
    x = images
    for i in (1, 2, 3):  # OpenCLIP's copy names the stem's ReLUs act1..act3
        relu = getattr(visual, f"relu{i}", None) or getattr(visual, f"act{i}")
        x = relu(getattr(visual, f"bn{i}")(getattr(visual, f"conv{i}")(x)))
    x = visual.avgpool(x)
    for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = stage(x)
    return x                                                        # [B, C, H, W]


def _attention_pool_dense(pool: nn.Module, fmap: torch.Tensor):
    """(t [B, N, d], a [B, N]) of `encode_resnet_image` from the pool's input map [B, C, H, W]."""
    x = fmap.flatten(2).permute(2, 0, 1)                            # [N, B, C]
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)          # [1 + N, B, C]
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    local = pool.c_proj(pool.v_proj(x[1:])).permute(1, 0, 2)        # [B, N, d]
    length, batch, width = x.shape
    heads = pool.num_heads
    head_dim = width // heads
    query = pool.q_proj(x[0]).reshape(batch, heads, head_dim)       # [B, heads, C / heads]
    keys = pool.k_proj(x).reshape(length, batch, heads, head_dim)   # [1 + N, B, heads, C / heads]
    scores = torch.einsum("bhc,lbhc->bhl", query.float(), keys.float()) / head_dim ** 0.5
    attention = scores.softmax(dim=-1).mean(dim=1)[:, 1:]           # [B, N]
    return local, attention.to(local.dtype)


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------
def tokenize(texts: Sequence[str], device=None) -> torch.Tensor:
    """CLIP's tokenizer ([len(texts), 77] int tensor)."""
    tokens = import_clip().clip.tokenize(list(texts))
    return tokens if device is None else tokens.to(device)


def unknown_words(clip_model: nn.Module, classnames: Sequence[str]) -> list:
    """The words of `classnames` (as prompts read them: `_` is a space) that the CLIP's vocabulary
    does not hold: a word is unknown when one of its BPE tokens has an all-zero row in
    `token_embedding`. That is how the demo's packed tiny CLIP marks the tokens it never learned
    (`textrefiner.demo.weights.unpack` rebuilds absent rows as zeros); a trained CLIP has no zero
    row, so the answer is empty for it. Each word once, in the order met."""
    embedding = getattr(clip_model, "token_embedding", None)
    if embedding is None:
        return []
    absent = ~embedding.weight.detach().any(dim=1).cpu()             # [vocab] bool
    tokenizer = import_clip().clip._tokenizer
    unknown = {}
    for name in classnames:
        for word in str(name).replace("_", " ").split():
            ids = torch.tensor(tokenizer.encode(word), dtype=torch.long)
            if ids.numel() and bool(absent[ids[ids < absent.numel()]].any()):
                unknown.setdefault(word, None)
    return list(unknown)


def unknown_words_message(words: Sequence[str]) -> str:
    """One line for `unknown_words`' answer ("" when there are none)."""
    if not words:
        return ""
    shown = ", ".join(repr(word) for word in list(words)[:12]) + (" ..." if len(words) > 12 else "")
    return (f"this CLIP's vocabulary does not hold {shown}: those words get zero token "
            "embeddings, so classes that differ only in them get identical probabilities; name "
            "them with words the CLIP knows.")


def embed_tokens(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids [C, L] -> word embeddings [C, L, width] in the model's dtype."""
    return clip_model.token_embedding(tokens).to(clip_model.dtype)


def encode_text(clip_model: nn.Module, embeddings: torch.Tensor, eot_indices: torch.Tensor,
                deep_prompts: Optional[Sequence[torch.Tensor]] = None, *,
                checkpointing: bool = False, chunk_size: int = 0) -> torch.Tensor:
    """Run CLIP's text transformer on word embeddings [C, 77, width]; returns [C, d] in the
    model's dtype (float16 or float32; the embeddings are cast to it), not normalised.

    clip_model: a CLIP model or a `TextEncoder`.
    eot_indices: [C] position of each sequence's end token (`tokens.argmax(-1)`).
    deep_prompts: prompts for layers 1, 2, ...: `deep_prompts[i - 1]` ([n_ctx, width]) replaces the
        tokens at positions 1..n_ctx before block i runs (the layer-0 prompts are already part of
        `embeddings`, right after the start token).
    checkpointing: recompute each block's activations in the backward pass instead of keeping
        them (less memory for many classes, one more forward of the text blocks).
    chunk_size: encode at most this many sequences at a time (0: all at once).

    The blocks run on the first L positions only, with the positional embedding and the causal
    mask cut to L, where L is max(eot_indices) + 1 rounded up to a multiple of 16. The mask makes
    position t depend on positions <= t alone, so the features read at the end tokens are those of
    the full 77-position pass, at a fraction of the cost (L is 16 or 32 for typical prompts). The
    rounding keeps the attention kernels' vector blocking over the keys that carry weight as it is
    at 77 positions, so the features usually come out bit-identical on CPUs; not always (about
    2e-6 apart in PromptSRC's same-run fixture), so they are equal up to summation order.
    """
    if 0 < chunk_size < embeddings.shape[0]:
        return torch.cat([
            encode_text(clip_model, part, eot, deep_prompts, checkpointing=checkpointing)
            for part, eot in zip(embeddings.split(chunk_size), eot_indices.split(chunk_size))])
    dtype = clip_model.dtype
    length = min(-(-(int(eot_indices.max()) + 1) // TEXT_LENGTH_MULTIPLE) * TEXT_LENGTH_MULTIPLE,
                 embeddings.shape[1])
    x = embeddings[:, :length].to(dtype) + clip_model.positional_embedding[:length].to(dtype)
    first = _batch_first(clip_model.transformer)
    seq = 1 if first else 0                                 # the blocks' sequence dim
    if not first:
        x = x.permute(1, 0, 2)                              # [L, C, width]
    deep_prompts = list(deep_prompts) if deep_prompts else []
    recompute = checkpointing and torch.is_grad_enabled()
    mask = _causal_mask(length, x)
    for i, block in enumerate(clip_model.transformer.resblocks):
        if 0 < i <= len(deep_prompts):
            n_ctx = deep_prompts[i - 1].shape[0]
            ctx = deep_prompts[i - 1].to(dtype).unsqueeze(1 - seq).expand(
                x.narrow(seq, 1, n_ctx).shape)
            rest = x.narrow(seq, 1 + n_ctx, length - 1 - n_ctx)
            x = torch.cat([x.narrow(seq, 0, 1), ctx, rest], dim=seq)
        if recompute:
            x = torch.utils.checkpoint.checkpoint(_text_block, block, x, mask,
                                                  use_reentrant=False)
        else:
            x = _text_block(block, x, mask)
    rows = torch.arange(embeddings.shape[0], device=x.device)
    eot_indices = eot_indices.to(x.device)
    eot = x[rows, eot_indices] if first else x[eot_indices, rows]  # [C, width]
    return project_text(clip_model.text_projection, clip_model.ln_final(eot).to(dtype))


def _text_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _run_block(block, x, mask)[0]


def project_text(projection, x: torch.Tensor) -> torch.Tensor:
    """x [..., width] -> [..., d]: CLIP's `text_projection` matrix (OpenCLIP's may be a Linear)."""
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def text_embed_dim(projection) -> int:
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]


class TextEncoder(nn.Module):
    """The text side of a CLIP model without its token embedding (the prompts replace it).

    Holds the stock modules under the names PromptSRC/PromptKD checkpoints use
    (`transformer`, `positional_embedding`, `ln_final`, `text_projection`). `checkpointing` and
    `chunk_size` are `encode_text`'s memory options (TRAINER.TEXT_ENCODER; set by the methods).
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.checkpointing = False
        self.chunk_size = 0

    @property
    def dtype(self) -> torch.dtype:
        projection = self.text_projection
        return projection.weight.dtype if isinstance(projection, nn.Linear) else projection.dtype

    def forward(self, embeddings, eot_indices, deep_prompts=None):
        return encode_text(self, embeddings, eot_indices, deep_prompts,
                           checkpointing=self.checkpointing, chunk_size=self.chunk_size)


def encode_text_tokens(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Plain CLIP text encoding of integer token ids [C, 77] (`clip.tokenize`'s) -> [C, d] in the
    model's dtype, not normalised (same as `clip_model.encode_text`)."""
    return encode_text(clip_model, embed_tokens(clip_model, tokens), tokens.argmax(dim=-1))


def clip_dims(clip_model: nn.Module) -> dict:
    """Sizes read off a loaded CLIP: joint dim, text and vision widths, local-token count, depths
    (a ResNet has no vision blocks to prompt: vision_layers 0; its width is the pool's)."""
    visual = clip_model.visual
    resnet = is_resnet(visual)
    return {
        "embed_dim": text_embed_dim(clip_model.text_projection),
        "text_width": clip_model.ln_final.weight.shape[0],
        "vision_width": visual.attnpool.k_proj.in_features if resnet else
        visual.conv1.weight.shape[0],
        "num_patches": num_patches(visual),
        "text_layers": len(clip_model.transformer.resblocks),
        "vision_layers": 0 if resnet else len(visual.transformer.resblocks),
        "image_size": input_resolution(visual),
    }


# --------------------------------------------------------------------------------------------
# IVLP deep prompts (PromptSRC / PromptKD): independent text and vision prompts
# --------------------------------------------------------------------------------------------
def _new_prompt(n_ctx: int, width: int, dtype) -> nn.Parameter:
    prompt = torch.empty(n_ctx, width, dtype=dtype)
    nn.init.normal_(prompt, std=0.02)
    return nn.Parameter(prompt)


def attach_ivlp_prompts(encoder: nn.Module, n_ctx: int, depth: int, vision: bool):
    """Give a stock encoder IVLP prompts, registered where PromptSRC/PromptKD checkpoints keep them.

    Vision (`encoder` = `clip_model.visual`): `VPT` for layer 0 and
    `transformer.resblocks.<i>.VPT_shallow` for layers 1..depth-1. Text (`encoder` = a
    `TextEncoder`): only the deeper `transformer.resblocks.<i>.VPT_shallow`; the layer-0 text
    prompts are the prompt learner's `ctx`.
    """
    if vision and depth > 0:
        require_vit(encoder, "IVLP (PromptSRC, PromptKD)")
    blocks = encoder.transformer.resblocks
    if not 0 <= depth <= len(blocks):
        raise UserError(f"Prompt depth {depth} is outside 0..{len(blocks)} for this CLIP.")
    width = blocks[0].ln_1.weight.shape[0]
    dtype = blocks[0].mlp.c_fc.weight.dtype  # LayerNorms stay fp32 in an fp16 CLIP
    if vision and depth > 0:
        encoder.VPT = _new_prompt(n_ctx, width, dtype)
    for i in range(1, depth):
        blocks[i].VPT_shallow = _new_prompt(n_ctx, width, dtype)


def ivlp_vision_prompts(visual: nn.Module):
    """[VPT, resblocks[1].VPT_shallow, ...] for `encode_image`, or [] when there are none."""
    if not hasattr(visual, "VPT"):
        return []
    return [visual.VPT] + ivlp_deep_prompts(visual)


def ivlp_deep_prompts(encoder: nn.Module):
    """The deeper prompts [resblocks[1].VPT_shallow, ...] of an encoder, in layer order."""
    prompts = []
    for block in list(encoder.transformer.resblocks)[1:]:
        if not hasattr(block, "VPT_shallow"):
            break
        prompts.append(block.VPT_shallow)
    return prompts
