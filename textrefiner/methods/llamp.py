"""LLaMP (Zheng et al., CVPR 2024): prompts written by the last decoder layers of an LLM.

Offline, an LLM (LLaMA-2-7B chat) read a per-dataset template with each class name; its keys and
values for those prompts, one set per template t (`release_past_key_value.pt`), and CLIP text
embeddings of the class names (`release_clip_text_embeddings.pt`) are kept per dataset. Here:

* learnable class tokens Q [S, h] (`class_token.0`, S = NUM_LLM_PROMPTS) go through copies of the
  LLM's last NUM_DECODER_LAYERS decoder layers (`class_decoder`, q/o projections and norms
  trained) attending to the cached keys and values of class c and template t, then the LLM's
  final norm (`class_norm`): H_ct [S, h];
* per text layer l < LLM_PROMPT_DEPTH, P_l = text_proj[l](H_ct) + llm_prompt_bias[l] [S, w] sits
  right before the end token of "a photo of a {class}" (the suffix form), the n words "a photo of
  a" are replaced by learnable text prompts `text_prompts[l]` (l < TEXT_PROMPT_DEPTH), and the
  end token's output through `text_projection` is the class's text feature E_ct [d];
* the image encoder carries visual prompts `visual_prompts` (appended after the patches, layers
  < VISUAL_PROMPT_DEPTH) and LoRA on the query and value projections of blocks
  V_LORA_START..V_LORA_END-1 (`vision_lora`): feature v [d]. The reference v0 is the image
  encoder without the prompts but with the LoRA, without gradients: LLaMP's code computes it
  with CLIP's vision model, into which peft has put the LoRA in place.

Training draws one template t per step. With s = exp(logit_scale) (LLaMP's own, clamped to
[0, 4.605]), z = norm(v) norm(E_t)^T, z0 = norm(v0) norm(G)^T (G the cached CLIP embeddings):

    CE(s z, y; LABEL_SMOOTHING) + 25 mean|norm(G) - norm(E_t)| + 10 mean|norm(v) - norm(v0)|
    + LAMBDA_DIST * sum softmax(s z0) (log softmax(s z0) - log softmax(s z)) / (B C)

Evaluation scores are LLaMP's: mean over all templates of softmax(z_t) (no scale).

With TextRefiner the classifier norm(E_t) becomes refine(norm(E_t)) in z (so in CE, the KL term
and evaluation); its semantic loss (scale s) and regularisation loss are added and its cache is
written from the prompted image encoder's local tokens, as for the other methods.

CLIP is the stock `clip` package's; the LLM's decoder layers are `transformers`' modules, run with
the cached keys and values as LLaMP's code runs them under transformers 4.35 (eager attention).
LLaMP's options other than its published recipe (prefix prompts, token bias, LoRA on the decoder,
hard distillation, a frozen ViT) are not offered.
"""
import json
import math
import os
import re
import warnings
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._compat import import_clip
from ..clip_backbone import QVLoRA, TextEncoder, _run_block, encode_image, project_text
from ..errors import UserError
from ..losses import regularization_loss, select_semantic_tokens, semantic_loss
from ..safe_load import load_torch_file
from .base import PromptMethod, _accuracy

PAST_KEY_VALUES_FILE = "release_past_key_value.pt"
CLIP_EMBEDDINGS_FILE = "release_clip_text_embeddings.pt"
PROMPT_WORDS = "a photo of a"
MAX_LOGIT_SCALE = 4.605  # LLaMP clamps log(s) to [0, 4.605]
TEXT_L1_WEIGHT, IMAGE_L1_WEIGHT = 25.0, 10.0
INSTALL_HINT = "LLaMP needs transformers: pip install transformers safetensors (the llamp extra)"


def require_llamp_packages():
    """One clear line when the optional packages are missing. (LLaMP's code also uses peft, for
    LoRA on transformers' CLIP; here the LoRA is on the stock CLIP's packed attention, which
    peft does not split into query and value: `clip_backbone.QVLoRA`.)"""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise UserError(f"{INSTALL_HINT} ({exc}).") from None


# ------------------------------------------------------------------------------ the cached files
def llamp_files_dir(cfg) -> str:
    """Folder of a dataset's two LLaMP files: TRAINER.LLAMP.FILES_DIR, else the dataset's folder
    under DATASET.ROOT (where LLaMP keeps them)."""
    if cfg.TRAINER.LLAMP.FILES_DIR:
        return os.path.abspath(os.path.expanduser(cfg.TRAINER.LLAMP.FILES_DIR))
    from ..data.datasets import FACTS, dataset_dir
    if cfg.DATASET.NAME not in FACTS:
        raise UserError(f"LLaMP: no dataset folder is known for DATASET.NAME "
                        f"{cfg.DATASET.NAME!r}: set TRAINER.LLAMP.FILES_DIR to the folder of its "
                        f"{PAST_KEY_VALUES_FILE} and {CLIP_EMBEDDINGS_FILE}.")
    return dataset_dir(cfg.DATASET.ROOT, cfg.DATASET.NAME)


def _read_file(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"LLaMP: {path} does not exist: write the dataset's LLM files first (or "
                        "download LLaMP's), or set TRAINER.LLAMP.FILES_DIR to their folder.")
    return load_torch_file(path, "LLaMP file")


def _subset_entry(content: dict, subset: str, path: str):
    """content[subset]; "all" is base then new when the file has no "all" entry."""
    if subset in content:
        return content[subset]
    if subset == "all" and "base" in content and "new" in content:
        return None
    raise UserError(f"LLaMP: {path} has no {subset!r} entry (it has {sorted(content)}).")


def _as_embeddings(entry) -> torch.Tensor:
    return entry["avg"] if isinstance(entry, dict) else entry


def read_clip_embeddings(folder: str, subset: str) -> torch.Tensor:
    """G [C, d]: the cached CLIP text embeddings of the subset's classes (LLaMP's "avg")."""
    content = _read_file(folder, CLIP_EMBEDDINGS_FILE)
    entry = _subset_entry(content, subset, CLIP_EMBEDDINGS_FILE)
    if entry is None:
        return torch.cat([_as_embeddings(content["base"]), _as_embeddings(content["new"])])
    return _as_embeddings(entry)


def read_past_key_values(folder: str, subset: str, num_templates: int, num_layers: int):
    """The cached LLM keys and values of the last `num_layers` layers, one set per template,
    stacked: keys/values [T, layers, 2, C, heads, P, head_dim] and mask [T, C, P]. Templates (and
    base and new, for "all") with fewer tokens are padded on the left with masked positions,
    which change neither the attention (their weight is exactly 0) nor the position ids."""
    content = _read_file(folder, PAST_KEY_VALUES_FILE)
    entry = _subset_entry(content, subset, PAST_KEY_VALUES_FILE)
    parts = [entry] if entry is not None else [content["base"], content["new"]]
    if any(len(part) < num_templates for part in parts):
        raise UserError(f"LLaMP: {PAST_KEY_VALUES_FILE} has {min(len(p) for p in parts)} "
                        f"templates, fewer than TRAINER.LLAMP.NUM_TEXT_TEMPLATE {num_templates}.")
    kvs, masks = [], []
    for t in range(num_templates):
        kv = [part[t]["past_key_values"][-num_layers:] for part in parts]
        mask = [part[t]["attn_mask"] for part in parts]
        kvs.append(kv)
        masks.append(mask)
    length = max(m.shape[-1] for row in masks for m in row)
    kv = torch.stack([torch.cat([_left_pad(k, length) for k in row], dim=2) for row in kvs])
    mask = torch.stack([torch.cat([_left_pad(m, length) for m in row], dim=0) for row in masks])
    return kv, mask


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros before the last dim (masks) or the token dim -2 (keys/values) up to `length`."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# ------------------------------------------------------------------------------ the LLM's layers
def resolve_llm_folder(name_or_path: str) -> str:
    """A local folder with the LLM's config.json and .safetensors weights: the path itself, or a
    hub name from the local hub cache (downloaded once when the hub can be reached)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    try:
        return snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached: try the hub once
        pass
    try:
        return snapshot_download(name_or_path, allow_patterns=patterns)
    except Exception as exc:
        raise UserError(f"LLaMP: the LLM {name_or_path!r} is neither a local folder nor in the "
                        f"hub cache and could not be downloaded ({type(exc).__name__}): set "
                        "TRAINER.LLAMP.LLM to a local folder (save_pretrained output).") from None


def _weight_files(folder: str, wanted: List[str]) -> Dict[str, List[str]]:
    """{safetensors file: [keys]} for the wanted keys."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: Dict[str, List[str]] = {}
        for key in wanted:
            if key in weight_map:
                files.setdefault(os.path.join(folder, weight_map[key]), []).append(key)
        return files
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise UserError(f"LLaMP: {folder} has no model.safetensors(.index.json): save the LLM "
                        "with save_pretrained (safetensors).")
    return {single: wanted}


def load_llm_tail(name_or_path: str, num_layers: int, dtype: torch.dtype):
    """(config, decoder layers [the last `num_layers`], final norm) of a LLaMA-architecture LLM,
    reading only those weights."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    folder = resolve_llm_folder(name_or_path)
    config = AutoConfig.from_pretrained(folder)
    total = config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise UserError(f"TRAINER.LLAMP.NUM_DECODER_LAYERS must be in 1..{total}, got "
                        f"{num_layers}.")
    indices = list(range(total - num_layers, total))
    layers = [LlamaDecoderLayer(config, layer_idx=i) for i in indices]
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    modules = {f"model.layers.{i}.": layer for i, layer in zip(indices, layers)}
    modules["model.norm."] = norm
    wanted = [prefix + key for prefix, module in modules.items() for key in module.state_dict()]
    state = {}
    for path, keys in _weight_files(folder, wanted).items():
        with safe_open(path, framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in keys if key in f.keys()})
    for prefix, module in modules.items():
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing = set(module.state_dict()) - set(own)
        if missing:
            raise UserError(f"LLaMP: {folder} lacks {prefix}{sorted(missing)[0]}.")
        module.load_state_dict(own)
    return config, nn.ModuleList(layers).to(dtype), norm.to(dtype)


def llama_layer(layer: nn.Module, hidden: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    """One LLaMA decoder layer on hidden [C, S, h] attending to past keys/values [C, kv heads,
    P, hd] and itself, as transformers 4.35's eager LlamaDecoderLayer computes it with a tuple
    past_key_value; `mask` [C, 1, S, P + S] is additive, (cos, sin) the rotary embedding of the
    new positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = past_key.shape[-1]
    residual = hidden
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = torch.cat([past_key.to(k.dtype), k], dim=2)
    v = torch.cat([past_value.to(v.dtype), v], dim=2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    out = attn.o_proj((weights @ v).transpose(1, 2).reshape(batch, length, -1))
    hidden = residual + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


# ------------------------------------------------------------------------------ the text prompts
def suffix_text_inputs(classnames, num_special: int, context_length: int):
    """LLaMP's suffix-form inputs of "a photo of a {class}", as `transformers`' CLIP tokenizer pads
    them (pad = end token) plus `num_special` pads: ids [C, L], key mask [C, L] (1 = attended)
    and each class's end-token position [C]."""
    tokenizer = import_clip().clip._tokenizer
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    seqs = [[sot] + tokenizer.encode(f"{PROMPT_WORDS} {name.replace('_', ' ')}") + [eot]
            for name in classnames]
    longest = max(len(seq) for seq in seqs)
    if longest + num_special > context_length:
        raise UserError(f"LLaMP: the longest class prompt has {longest} tokens; with "
                        f"{num_special} LLM prompts it exceeds CLIP's {context_length} positions: "
                        "lower TRAINER.LLAMP.NUM_LLM_PROMPTS or shorten the class names.")
    ids = torch.full((len(seqs), longest + num_special), eot, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    eos = torch.tensor([len(seq) - 1 for seq in seqs])
    mask[:, longest - 1:] = 1
    padded = eos != longest - 1
    mask[padded.nonzero().flatten(), eos[padded]] = 0
    return ids, mask, eos


def text_attention_mask(key_mask: torch.Tensor, heads: int, dtype) -> torch.Tensor:
    """Additive mask [C * heads, L, L]: causal, and no attention to masked keys."""
    length = key_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal.unsqueeze(0) & key_mask.bool().unsqueeze(1)          # [C, L, L]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return mask.repeat_interleave(heads, dim=0)


def _kaiming(*shape) -> nn.Parameter:
    """LLaMP's prompt initialisation: N(0, 1), then Kaiming-uniform with a = sqrt(5)."""
    tensor = torch.empty(shape).normal_(0, 1)
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return nn.Parameter(tensor)


# train_llamp.py's learning-rate floors: 1e-5 for the main group; the LoRA group's is as far
# below its rate, but at least 5e-6
LR_FLOOR, LORA_LR_FLOOR = 1e-5, 5e-6
MIN_HORIZON = 20  # its cosine runs over max(epochs, 20) + 1 steps


def llamp_lr_factor(step: int, floor: float, horizon: int) -> float:
    """train_llamp.py's cosine with one warm-up step (its get_cosine_schedule_with_warmup, one
    half-cycle), as a multiple of a group's rate, never below `floor` (the group's floor over its
    rate): step 0 at the floor, step 1 at the full rate, then a cosine reaching 0 at `horizon`."""
    if step < 1:
        return max(floor, float(step))
    progress = (step - 1) / max(1, horizon - 1)
    return max(floor, 0.5 * (1.0 + math.cos(math.pi * progress)))


class LLaMPSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LLaMP's schedule, as train_llamp.py steps it: once after each epoch and once before batch
    len(loader) // 10 of epoch 0, so the first tenth of epoch 0 trains at the floors and epoch
    e >= 1 at step e + 1, over a horizon of max(epochs, 20) + 1 steps (ImageNet's 10 epochs end
    near half the rate). Groups after the first are LoRA groups with LLaMP's floor for them."""

    def __init__(self, optimizer, lr: float, max_epoch: int):
        self.horizon = max(max_epoch, MIN_HORIZON) + 1
        rates = [group["lr"] for group in optimizer.param_groups]
        floors = [LR_FLOOR] + [max(rate / lr * LR_FLOOR, LORA_LR_FLOOR) for rate in rates[1:]]
        super().__init__(optimizer, [partial(llamp_lr_factor, floor=floor / rate,
                                             horizon=self.horizon)
                                     for floor, rate in zip(floors, rates)])

    def before_batch(self, epoch: int, batch_idx: int, num_batches: int):
        if epoch == 0 and batch_idx == num_batches // 10:
            with warnings.catch_warnings():  # with fewer than 10 batches: before the first step
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step",
                                        UserWarning)
                self.step()


class LLaMP(PromptMethod):
    """LLaMP (Zheng et al., CVPR 2024), the module docstring's equations: class embeddings
    E_t [C, d] per template t from LLM-written prompts (float32, or CLIP's dtype for PREC fp16),
    visual prompts and LoRA on the image encoder; `forward(images [B, 3, H, W])` gives LLaMP's
    evaluation scores [B, C] (mean over templates of softmax(z_t), float32). cfg.TRAINER.LLAMP;
    needs the dataset's LLM files (`textrefiner-llamp-cache`)."""
    checkpoint_name = "LLaMP"
    config_section = "LLAMP"
    trainable_prefixes = ("text_prompts.", "class_token.", "class_decoder.", "class_norm.",
                          "text_proj.", "llm_prompt_bias.", "visual_prompts", "vision_lora.",
                          "logit_scale")
    prompts_vision_blocks = True
    max_grad_norm = 1.0  # deepspeed's gradient_clipping in its zero2_a100_40g.json
    scores_are_probabilities = True  # the mean over templates of softmax(z_t)

    def __init__(self, cfg, classnames, clip_model):
        require_llamp_packages()
        super().__init__(cfg, classnames, clip_model)
        lcfg = cfg.TRAINER.LLAMP
        self._check(lcfg)
        dtype = clip_model.dtype
        self.n_ctx_text = lcfg.N_CTX_TEXT
        self.num_special = lcfg.NUM_LLM_PROMPTS
        self.llm_depth = lcfg.LLM_PROMPT_DEPTH
        self.text_depth = max(lcfg.LLM_PROMPT_DEPTH, lcfg.TEXT_PROMPT_DEPTH)
        self.num_templates = lcfg.NUM_TEXT_TEMPLATE
        self.label_smoothing = lcfg.LABEL_SMOOTHING
        self.lambda_dist = lcfg.LAMBDA_DIST
        self.lora_lr = lcfg.LORA_LR
        self.frozen_decoder = self._frozen_decoder_parts(lcfg)

        subset = cfg.DATASET.SUBSAMPLE_CLASSES
        folder = llamp_files_dir(cfg)
        kv, kv_mask = read_past_key_values(folder, subset, self.num_templates,
                                           lcfg.NUM_DECODER_LAYERS)
        clip_text = read_clip_embeddings(folder, subset)
        for what, count in (("past key values", kv.shape[3]), ("CLIP embeddings",
                                                                clip_text.shape[0])):
            if count != len(self.classnames):
                raise UserError(f"LLaMP: the {subset!r} {what} in {folder} are for {count} "
                                f"classes, this run has {len(self.classnames)}: write the files "
                                "for this dataset's class list.")
        self.register_buffer("past_key_values", kv.to(dtype), persistent=False)
        self.register_buffer("past_mask", kv_mask.long(), persistent=False)
        self.register_buffer("clip_text_embeddings", clip_text.to(dtype), persistent=False)

        self._build_text_side(clip_model, dtype)
        self._build_llm_side(lcfg, dtype)
        self._build_vision_side(lcfg, clip_model, dtype)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.01)], dtype=dtype))
        self.dropout = nn.Dropout(lcfg.PROMPT_DROPOUT)
        dim = self.dims["embed_dim"]
        self._attach_refiner(cfg, dim, dim, dtype)
        self._freeze()

    # ---------------------------------------------------------------- set-up
    def _check(self, lcfg):
        vision_layers = self.dims["vision_layers"]
        if not 1 <= lcfg.N_CTX_TEXT <= len(PROMPT_WORDS.split()):
            raise UserError("TRAINER.LLAMP.N_CTX_TEXT must be 1..4 (it replaces words of "
                            f"{PROMPT_WORDS!r}), got {lcfg.N_CTX_TEXT}.")
        if lcfg.LLM_PROMPT_DEPTH < 1 or lcfg.NUM_LLM_PROMPTS < 1:
            raise UserError("TRAINER.LLAMP.LLM_PROMPT_DEPTH and NUM_LLM_PROMPTS must be >= 1.")
        if not 1 <= lcfg.VISUAL_PROMPT_DEPTH <= vision_layers:
            raise UserError(f"TRAINER.LLAMP.VISUAL_PROMPT_DEPTH must be 1..{vision_layers}, got "
                            f"{lcfg.VISUAL_PROMPT_DEPTH}.")
        if not 0 <= lcfg.V_LORA_START <= lcfg.V_LORA_END <= vision_layers:
            raise UserError(f"TRAINER.LLAMP.V_LORA_START..V_LORA_END must lie in 0..{vision_layers}"
                            f", got {lcfg.V_LORA_START}..{lcfg.V_LORA_END}.")

    @staticmethod
    def _frozen_decoder_parts(lcfg):
        parts = []
        if lcfg.FREEZE_DECODER_KV:
            parts += ["self_attn.k_proj.", "self_attn.v_proj."]
        if lcfg.FREEZE_DECODER_FFN:
            parts.append("mlp.")
        return re.compile(r"class_decoder\.\d+\.(" + "|".join(map(re.escape, parts)) + ")") \
            if parts else None

    def _build_text_side(self, clip_model, dtype):
        self.text_encoder = TextEncoder(clip_model)
        self.token_embedding = clip_model.token_embedding
        context_length = clip_model.positional_embedding.shape[0]
        ids, key_mask, eos = suffix_text_inputs(self.classnames, self.num_special, context_length)
        heads = self.text_encoder.transformer.resblocks[0].attn.num_heads
        self.register_buffer("text_ids", ids, persistent=False)
        self.register_buffer("text_eos", eos, persistent=False)
        self.register_buffer("text_mask", text_attention_mask(key_mask, heads, dtype),
                             persistent=False)
        width = self.dims["text_width"]
        tokenizer = import_clip().clip._tokenizer
        start = tokenizer.encoder["<|startoftext|>"]
        words = torch.tensor([[start] + tokenizer.encode(PROMPT_WORDS)])
        with torch.no_grad():  # LLaMP: the words' embeddings with their positions
            first = self._embed(words)[0, 1:1 + self.n_ctx_text]
        deeper = [_kaiming(self.n_ctx_text, width) for _ in range(self.text_depth - 1)]
        self.text_prompts = nn.ParameterList([nn.Parameter(first.clone())] + deeper).to(dtype)

    def _build_llm_side(self, lcfg, dtype):
        config, layers, norm = load_llm_tail(lcfg.LLM, lcfg.NUM_DECODER_LAYERS, dtype)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        hidden, width = config.hidden_size, self.dims["text_width"]
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        cached = tuple(self.past_key_values.shape[-3::2])                # (kv heads, head dim)
        if cached != (config.num_key_value_heads, head_dim):
            raise UserError(f"LLaMP: the cached keys and values have (heads, head size) {cached}, "
                            f"TRAINER.LLAMP.LLM has {(config.num_key_value_heads, head_dim)}: "
                            "write the files with the same LLM.")
        self.class_token = nn.ParameterList([_kaiming(self.num_special, hidden)]).to(dtype)
        self.class_decoder = layers
        self.class_norm = norm
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.text_proj = nn.ModuleList(
            [nn.Linear(hidden, width, bias=False) for _ in range(self.llm_depth)]).to(dtype)
        self.llm_prompt_bias = nn.ParameterList(
            [_kaiming(self.num_special, width) for _ in range(self.llm_depth)]).to(dtype)

    def _build_vision_side(self, lcfg, clip_model, dtype):
        width = self.dims["vision_width"]
        self.visual_prompts = nn.Parameter(
            _kaiming(lcfg.VISUAL_PROMPT_DEPTH, lcfg.N_CTX_VISION, width).data.to(dtype))
        self.vision_lora = nn.ModuleDict({
            str(i): QVLoRA(width, lcfg.LORA_RANK, lcfg.LORA_ALPHA, lcfg.LORA_DROPOUT, dtype)
            for i in range(lcfg.V_LORA_START, lcfg.V_LORA_END)})

    def _is_saved(self, name: str) -> bool:
        if self.__dict__.get("frozen_decoder") and self.frozen_decoder.match(name):
            return False
        return super()._is_saved(name)

    def optimizer_groups(self, params: Dict[str, nn.Parameter]):
        """LLaMP's two groups: the LoRA weights at TRAINER.LLAMP.LORA_LR, the rest at OPTIM.LR."""
        lora = [p for n, p in params.items() if n.startswith("vision_lora.")]
        rest = [p for n, p in params.items() if not n.startswith("vision_lora.")]
        return [{"params": rest}] + ([{"params": lora, "lr": self.lora_lr}] if lora else [])

    def lr_scheduler(self, optimizer, ocfg):
        """OPTIM.LR_SCHEDULER cosine is LLaMP's own (`LLaMPSchedule`); other schedules are
        Dassl's."""
        if ocfg.LR_SCHEDULER != "cosine":
            return None
        if ocfg.WARMUP_EPOCH > 0:
            raise UserError("LLaMP's cosine schedule has its own warm-up step: set "
                            "OPTIM.WARMUP_EPOCH 0 (or another OPTIM.LR_SCHEDULER).")
        return LLaMPSchedule(optimizer, ocfg.LR, ocfg.MAX_EPOCH)

    # ---------------------------------------------------------------- text side
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings [C, L, w] (`transformers`' CLIPTextEmbeddings)."""
        positions = self.text_encoder.positional_embedding[:ids.shape[1]]
        return (self.token_embedding(ids) + positions).to(self.text_encoder.dtype)

    def llm_prompts(self, template: int) -> torch.Tensor:
        """P [LLM_PROMPT_DEPTH, C, S, w] from the class tokens and the cached keys and values of
        one template."""
        kv = self.past_key_values[template]                           # [layers, 2, C, kvh, P, hd]
        past_mask = self.past_mask[template]                          # [C, P]
        classes, past = past_mask.shape
        tokens = self.class_token[0].unsqueeze(0).expand(classes, -1, -1)
        full = torch.cat([past_mask, past_mask.new_ones(classes, self.num_special)], dim=1)
        positions = (full.cumsum(dim=-1) - 1).clamp(min=0)[:, -self.num_special:]
        queries = torch.arange(self.num_special, device=full.device).unsqueeze(1)
        keys = torch.arange(past + self.num_special, device=full.device).unsqueeze(0)
        allowed = full.bool().unsqueeze(1) & (keys <= queries + past).unsqueeze(0)
        mask = torch.zeros(allowed.shape, dtype=tokens.dtype, device=tokens.device)
        mask = mask.masked_fill(~allowed, torch.finfo(tokens.dtype).min).unsqueeze(1)
        cos, sin = self.rotary(tokens, positions)
        hidden = tokens
        for layer, (keys_l, values_l) in zip(self.class_decoder, kv):
            hidden = llama_layer(layer, hidden, keys_l, values_l, mask, cos, sin)
        hidden = self.dropout(self.class_norm(hidden)[:, -self.num_special:])
        return torch.stack([proj(hidden) + bias
                            for proj, bias in zip(self.text_proj, self.llm_prompt_bias)])

    def encode_with_llm_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        """Text features [C, d] (not normalised) of the suffix-form prompts."""
        n, special = self.n_ctx_text, self.num_special
        x = self._embed(self.text_ids)                                # [C, L, w]
        classes = x.shape[0]
        end = x[torch.arange(classes, device=x.device), self.text_eos].unsqueeze(1)
        ctx = self.text_prompts[0].to(x.dtype).unsqueeze(0).expand(classes, -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + n:-special - 1], prompts[0].to(x.dtype), end], 1)
        blocks = self.text_encoder.transformer.resblocks
        first = bool(getattr(self.text_encoder.transformer, "batch_first", False))
        for i, block in enumerate(blocks):
            if 0 < i < self.text_depth:
                ctx = self.text_prompts[i].to(x.dtype).unsqueeze(0).expand(classes, -1, -1)
                if i < self.llm_depth:
                    x = torch.cat([x[:, :1], ctx, x[:, 1 + n:-special - 1],
                                   prompts[i].to(x.dtype), x[:, -1:]], dim=1)
                else:
                    x = torch.cat([x[:, :1], ctx, x[:, 1 + n:]], dim=1)
            mask = self.text_mask.to(x.dtype)
            x = _run_block(block, x if first else x.transpose(0, 1), mask, explicit=True)[0]
            x = x if first else x.transpose(0, 1)
        last = self.text_encoder.ln_final(x[:, -1])
        return project_text(self.text_encoder.text_projection, last)

    def template_text_features(self, template: int) -> torch.Tensor:
        """E_t [C, d], not normalised."""
        return self.encode_with_llm_prompts(self.llm_prompts(template))

    def classifier(self) -> torch.Tensor:
        """Every template's normalised (refined, with TextRefiner) classifier [T, C, d]."""
        features = torch.stack([F.normalize(self.template_text_features(t), dim=-1)
                                for t in range(self.num_templates)])
        return self.refined(features)

    @property
    def num_eval_classes(self) -> int:
        return self.class_embeddings().shape[-2]

    # ---------------------------------------------------------------- image side
    def _lora_blocks(self) -> Dict[int, QVLoRA]:
        return {int(i): lora for i, lora in self.vision_lora.items()}

    def encode_images(self, images, return_tokens=False):
        return encode_image(self.image_encoder, images, list(self.visual_prompts),
                            return_tokens=return_tokens, lora=self._lora_blocks())

    def _clamp_logit_scale(self):
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # ---------------------------------------------------------------- forward passes
    def forward_features(self, image_features):
        """LLaMP's evaluation scores [B, C]: the mean over templates of softmax(norm(v) E_t^T)."""
        self._clamp_logit_scale()
        features = F.normalize(image_features, dim=-1)
        classifier = self.class_embeddings().to(features.dtype)       # [T, C, d]
        sims = torch.einsum("bd,tcd->tbc", features, classifier)
        return sims.float().softmax(dim=-1).mean(dim=0)

    def forward_train(self, images, labels):
        self._clamp_logit_scale()
        template = int(torch.randint(self.num_templates, (1,)).item())
        text = self.template_text_features(template)                  # E_t
        out = self.encode_images(images, return_tokens=self.refiner is not None)
        with torch.no_grad():  # v0; LLaMP's LoRA sits in CLIP's vision model, so v0 carries it
            frozen = encode_image(self.image_encoder, images, lora=self._lora_blocks()).features
        scale = self.logit_scale.exp().float().reshape(())  # 0-dim: promotes no fp16 tensor
        features = F.normalize(out.features, dim=-1)
        normalized = F.normalize(text, dim=-1)
        classifier = self.refined(normalized)
        clip_text = F.normalize(self.clip_text_embeddings, dim=-1)
        sims = (features @ classifier.to(features.dtype).t()).float()
        frozen_sims = (F.normalize(frozen, dim=-1) @ clip_text.to(frozen.dtype).t()).float()
        loss_ce = F.cross_entropy(sims * scale, labels, label_smoothing=self.label_smoothing)
        loss_l1 = (F.l1_loss(clip_text.float(), normalized.float()) * TEXT_L1_WEIGHT
                   + F.l1_loss(features.float(), F.normalize(frozen, dim=-1).float())
                   * IMAGE_L1_WEIGHT)
        loss_dist = F.kl_div(F.log_softmax(sims * scale, dim=-1),
                             F.log_softmax(frozen_sims * scale, dim=-1), reduction="sum",
                             log_target=True) / sims.numel() * self.lambda_dist
        loss = loss_ce + loss_l1 + loss_dist
        parts = {"loss_ce": loss_ce.detach(), "loss_l1": loss_l1.detach(),
                 "loss_dist": loss_dist.detach(), "acc": _accuracy(sims, labels)}
        if self.refiner is not None:
            loss = loss + self._refiner_losses(out, normalized, classifier, labels, scale, parts)
        return loss, parts

    def _refiner_losses(self, out, text, refined, labels, scale, parts):
        aligned = self.refiner.align(out.tokens)
        semantic = select_semantic_tokens(aligned, out.cls_attention, self.refiner.topk)
        loss_sem = semantic_loss(semantic, text, labels, scale)
        loss_reg = regularization_loss(refined, text)
        self.refiner.update(aligned)
        parts.update({"loss_sem": loss_sem.detach(), "loss_reg": loss_reg.detach()})
        return self.sem_weight * loss_sem + self.reg_weight * loss_reg

    # ---------------------------------------------------------------- LLaMP's checkpoints
    def load_checkpoint_state(self, state, source="checkpoint", fresh_refiner=False):
        if isinstance(state.get("net"), dict):  # LLaMP's {"net": state_dict, "epoch": e}
            state = state["net"]
        if any(key.startswith(("clip_model.", "lora_model.")) for key in state):
            state = from_llamp_state(state, self._is_saved)
        return super().load_checkpoint_state(state, source, fresh_refiner)


# peft puts the LoRA into CLIP's vision model in place: its state dict names each weight twice
_LLAMP_LORA = re.compile(
    r"(?:lora_model\.default\.model|clip_model\.vision_model)\.encoder\.layers\.(\d+)"
    r"\.self_attn\.([qv]_proj)\.(lora_[AB])\.default\.weight")


def from_llamp_state(state: dict, keep) -> dict:
    """Our state from a state dict of LLaMP's model (its checkpoints' "net"): the same names for
    the prompts, class decoder and projections; its peft LoRA names to `vision_lora.*`; what
    `keep(name)` refuses (frozen CLIP, cached files, frozen decoder parts) is left out."""
    own = {}
    for key, value in state.items():
        match = _LLAMP_LORA.fullmatch(key)
        if match:
            key = f"vision_lora.{match[1]}.{match[2]}.{match[3]}.weight"
        if keep(key):
            own[key] = value
    return own
