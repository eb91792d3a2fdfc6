"""Hugging Face transformers CLIPs (`CLIPModel` folders), converted into the stock `clip` classes.

MODEL.BACKBONE.NAME "hf:<folder>" reads a `save_pretrained` folder (`config.json`,
`model.safetensors` or `pytorch_model.bin`, sharded or not, and the tokenizer's files);
"hf:<org>/<repo>" (or "hf:<org>/<repo>@<revision>") takes that folder from the local Hugging Face
cache (huggingface_hub's layout, `HF_HUB_CACHE` / `HF_HOME`), offline: nothing is downloaded.

transformers' CLIP computes what OpenAI's does, under other names: the query, key and value
projections are separate (`in_proj_weight` is their concatenation), the projections are
bias-free `nn.Linear`s (`proj` is the transpose of their weight), and the activation and the
LayerNorms' eps are settings (`hidden_act`, `layer_norm_eps`). `load_hf_clip` builds the stock
`clip.model.CLIP` (a `VisionTransformer` with the folder's head count and MLP width) with that
activation and eps, and loads the converted weights into it, so every encoder of
`clip_backbone` runs on it unchanged; transformers itself is not needed. The text tower pools at
the end token: transformers takes the first `eos_token_id` (or, for configs older than its
PR #24773 with eos_token_id 2, the arg-max id), which for CLIP's tokenizer is the arg-max id the
project takes. So the folder's tokenizer must be CLIP's BPE (its vocabulary and merges are
compared with the `clip` package's), with 77 positions.

Anything else (SigLIP's pooling head, BERT / XLM-R text towers, a folder with one tower, another
activation or tokenizer) is refused with one line naming what is not supported.
"""
import json
import os
from typing import Optional

import torch
import torch.nn as nn

from ._compat import import_clip
from .errors import UserError
from .safe_load import load_torch_file, one_line

HF_PREFIX = "hf:"  # MODEL.BACKBONE.NAME hf:<folder or org/repo>, a transformers CLIPModel

INSTALL = "pip install 'textrefiner[hf]'"
CONTEXT_LENGTH = 77  # what clip.tokenize gives
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for keys a config.json leaves out
# (tests/test_hf_clip.py checks them against transformers').
TEXT_DEFAULTS = {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                 "eos_token_id": 49407}
VISION_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                   "image_size": 224}
LEGACY_EOS = 2  # transformers then pools at the arg-max id, as here
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
NOT_CLIP = {
    "siglip": "no class token (SigLIP pools with an attention head)",
    "siglip2": "no class token (SigLIP pools with an attention head)",
    "chinese_clip": "a non-CLIP text tower (Chinese-CLIP's BERT)",
    "altclip": "a non-CLIP text tower (AltCLIP's XLM-R)",
    "clip_vision_model": "no text tower (a CLIPVisionModel alone)",
    "clip_text_model": "no image tower (a CLIPTextModel alone)",
}


# --------------------------------------------------------------------------------------------
# Finding the folder
# --------------------------------------------------------------------------------------------
def parse_repo(spec: str):
    """"org/repo@revision" -> ("org/repo", "revision" or None)."""
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def is_repo_id(spec: str) -> bool:
    repo = parse_repo(spec)[0]
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~", os.sep))


def hub_cache_dir() -> str:
    """huggingface_hub's cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def missing_line(spec: str, config_key: str) -> Optional[str]:
    """None when "hf:<spec>" names a folder or a cached repo, else the line saying what to do."""
    try:
        resolve_folder(spec, config_key)
    except UserError as exc:
        return str(exc)
    return None


def resolve_folder(spec: str, config_key: str) -> str:
    """The local folder of "hf:<spec>": the folder itself, or the cached snapshot of a repo."""
    folder = os.path.expanduser(spec)
    if os.path.isdir(folder):
        return folder
    if not is_repo_id(spec):
        raise UserError(f"{config_key} '{HF_PREFIX}{spec}' is neither a folder nor a Hugging Face "
                        "repo id (<org>/<repo>): give the folder a CLIPModel was saved to "
                        "(save_pretrained) or the repo's id.")
    repo, revision = parse_repo(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{HF_PREFIX}<org>/<repo> backbones are read from the Hugging Face cache "
                        f"with the huggingface_hub package: {INSTALL}.") from None
    try:
        return snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(),
                                 local_files_only=True)
    except Exception:  # huggingface_hub's LocalEntryNotFoundError and relatives
        cached = os.path.join(hub_cache_dir(), "models--" + repo.replace("/", "--"))
        at = f" --revision {revision}" if revision else ""
        raise UserError(f"{HF_PREFIX}{spec} is not in the Hugging Face cache (it would be in "
                        f"{cached}); nothing is downloaded: run `hf download {repo}{at}` on a "
                        f"machine online and copy that folder there, or set {config_key} to "
                        f"{HF_PREFIX}<the folder of its save_pretrained>.") from None


# --------------------------------------------------------------------------------------------
# Reading the folder
# --------------------------------------------------------------------------------------------
def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_config(folder: str, name: str) -> dict:
    """config.json, checked to be a CLIPModel's; its text and vision configs with defaults."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{name}: {folder} has no config.json (a transformers CLIPModel folder "
                        "holds config.json and model.safetensors).")
    config = read_json(path)
    model_type = config.get("model_type")
    if model_type != "clip":
        reason = NOT_CLIP.get(model_type, f"its model_type {model_type!r}")
        raise UserError(f"{name} is not supported because of {reason}: only transformers' "
                        "CLIPModel (model_type 'clip') is read.")
    return {"text": {**TEXT_DEFAULTS, **config.get("text_config", {})},
            "vision": {**VISION_DEFAULTS, **config.get("vision_config", {})}}


def read_weights(folder: str, name: str) -> dict:
    """The folder's state dict: safetensors without pickle, `.bin` through safe_load."""
    found = next((f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if found is None:
        raise UserError(f"{name}: {folder} holds none of {', '.join(WEIGHT_FILES)}.")
    files = [found]
    if found.endswith(".index.json"):
        files = sorted(set(read_json(os.path.join(folder, found))["weight_map"].values()))
    state = {}
    for file in files:
        state.update(_read_file(os.path.join(folder, file), name))
    return state


def _read_file(path: str, name: str) -> dict:
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise UserError(f"{name}'s weights are safetensors, read with the safetensors "
                                f"package: {INSTALL}.") from None
            return load_file(path)
        return load_torch_file(path, "CLIP weights")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"Could not read {name}'s weights from {path!r} ({type(exc).__name__}: "
                        f"{one_line(exc)}).") from None


def check_tokenizer(folder: str, name: str):
    """The folder's tokenizer must be CLIP's BPE: the vocabulary and merges of `clip`'s."""
    vocab, merges = _tokenizer_files(folder, name)
    clip_tokenizer = import_clip().clip._tokenizer
    clip_merges = sorted(clip_tokenizer.bpe_ranks, key=clip_tokenizer.bpe_ranks.get)
    if vocab != clip_tokenizer.encoder or merges != clip_merges:
        raise UserError(f"{name} is not supported because its tokenizer's vocabulary or merges "
                        f"({len(vocab)} tokens, {len(merges)} merges) are not CLIP's BPE "
                        f"({len(clip_tokenizer.encoder)} tokens, {len(clip_merges)} merges).")


def _tokenizer_files(folder: str, name: str):
    """(vocabulary {token: id}, merges [(a, b)]) from tokenizer.json, else vocab.json and
    merges.txt (of whose merges transformers' slow tokenizer reads the first 48,894)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        model = read_json(path).get("model", {})
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in model.get("merges", [])]
        return model.get("vocab", {}), merges
    vocab_path, merges_path = (os.path.join(folder, f) for f in ("vocab.json", "merges.txt"))
    if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
        raise UserError(f"{name}: {folder} has no tokenizer (tokenizer.json, or vocab.json and "
                        "merges.txt): copy those of the CLIP it was fine-tuned from into it.")
    with open(merges_path, encoding="utf-8") as handle:
        lines = handle.read().strip().split("\n")[1:49152 - 256 - 2 + 1]
    return read_json(vocab_path), [tuple(line.split()) for line in lines]


def read_preprocessing(folder: str):
    """(mean, std) of preprocessor_config.json, or (None, None) without one."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None, None
    config = read_json(path)
    mean, std = config.get("image_mean"), config.get("image_std")
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


def input_settings(spec: str) -> dict:
    """{INPUT key: value} the folder of "hf:<spec>" prescribes: SIZE (its vision config's
    image_size), PIXEL_MEAN and PIXEL_STD (its preprocessor_config.json); {} when the folder
    cannot be found or read (loading it says why)."""
    try:
        folder = resolve_folder(spec, "MODEL.BACKBONE.NAME")
        size = {**VISION_DEFAULTS, **read_json(os.path.join(folder, "config.json")).get(
            "vision_config", {})}["image_size"]
        mean, std = read_preprocessing(folder)
    except (UserError, OSError, ValueError):
        return {}
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    settings = {"SIZE": size}
    if mean and std:
        settings.update(PIXEL_MEAN=list(mean), PIXEL_STD=list(std))
    return settings


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def activation(name: str, hidden_act: str, tower: str) -> nn.Module:
    """transformers' `hidden_act` as a module (exactly: GELU's erf form for "gelu")."""
    if hidden_act == "quick_gelu":
        return import_clip().model.QuickGELU()
    if hidden_act == "gelu":
        return nn.GELU()
    if hidden_act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return nn.GELU(approximate="tanh")
    raise UserError(f"{name} is not supported because of its {tower} activation {hidden_act!r} "
                    "(quick_gelu, gelu, gelu_new, gelu_pytorch_tanh or gelu_fast).")


def _tower(hf: dict, prefix: str, ours: str, layers: int) -> dict:
    """One tower's encoder blocks under OpenAI's names (`prefix` transformers', `ours` clip's)."""
    out = {}
    for i in range(layers):
        src, dst = f"{prefix}.encoder.layers.{i}.", f"{ours}.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [hf.pop(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            for theirs, mine in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                                 ("layer_norm2", "ln_2")):
                out[dst + f"{mine}.{kind}"] = hf.pop(src + f"{theirs}.{kind}")
    return out


def count_layers(state: dict, head: str) -> int:
    """How many numbered blocks the keys starting with `head` ("<prefix>.<i>.") hold."""
    return len({key[len(head):].split(".")[0] for key in state if key.startswith(head)})


def convert_state_dict(hf: dict, name: str) -> dict:
    """A transformers CLIPModel state dict -> OpenAI's `clip.model.CLIP` one (every key used)."""
    hf = {k: v for k, v in hf.items() if not k.endswith(".position_ids")}
    v, t = "vision_model", "text_model"
    try:
        out = {
            "visual.class_embedding": hf.pop(f"{v}.embeddings.class_embedding"),
            "visual.conv1.weight": hf.pop(f"{v}.embeddings.patch_embedding.weight"),
            "visual.positional_embedding": hf.pop(f"{v}.embeddings.position_embedding.weight"),
            "visual.proj": hf.pop("visual_projection.weight").t(),
            "token_embedding.weight": hf.pop(f"{t}.embeddings.token_embedding.weight"),
            "positional_embedding": hf.pop(f"{t}.embeddings.position_embedding.weight"),
            "text_projection": hf.pop("text_projection.weight").t(),
            "logit_scale": hf.pop("logit_scale"),
        }
        for kind in ("weight", "bias"):
            out[f"visual.ln_pre.{kind}"] = hf.pop(f"{v}.pre_layrnorm.{kind}")
            out[f"visual.ln_post.{kind}"] = hf.pop(f"{v}.post_layernorm.{kind}")
            out[f"ln_final.{kind}"] = hf.pop(f"{t}.final_layer_norm.{kind}")
        out.update(_tower(hf, v, "visual.transformer", count_layers(hf, f"{v}.encoder.layers.")))
        out.update(_tower(hf, t, "transformer", count_layers(hf, f"{t}.encoder.layers.")))
    except KeyError as exc:
        raise UserError(f"{name} is not supported because its weights lack {exc.args[0]!r} "
                        "(not a CLIPModel with a class token and CLIP's text tower).") from None
    if hf:
        raise UserError(f"{name} is not supported because its weights hold parts CLIP has not "
                        f"({', '.join(sorted(hf)[:3])}{', ...' if len(hf) > 3 else ''}).")
    return {key: value.contiguous() for key, value in out.items()}


def build_clip(state: dict, config: dict, name: str) -> nn.Module:
    """The stock `clip.model.CLIP` of the converted `state`'s shapes and `config`'s heads,
    activations and LayerNorm eps, with those weights (float32)."""
    clip = import_clip()
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise UserError(f"{name} is not supported because its image grid is not square.")
    context, text_width = state["positional_embedding"].shape
    if context != CONTEXT_LENGTH:
        raise UserError(f"{name} is not supported because its text takes {context} positions "
                        f"(CLIP's tokenizer gives {CONTEXT_LENGTH}).")
    embed_dim = state["text_projection"].shape[1]
    text, vision = config["text"], config["vision"]
    with torch.random.fork_rng(devices=[]):  # initial values the weights overwrite
        model = clip.model.CLIP(
            embed_dim, patch, 0, 64, patch, context, state["token_embedding.weight"].shape[0],
            text_width, text["num_attention_heads"], count_layers(state, "transformer.resblocks."))
        model.visual = clip.model.VisionTransformer(
            grid * patch, patch, width, count_layers(state, "visual.transformer.resblocks."),
            vision["num_attention_heads"], embed_dim)
    for tower, settings, prefix, label in ((model.transformer, text, "transformer", "text"),
                                           (model.visual, vision, "visual.transformer", "image")):
        for i, block in enumerate(_blocks(tower)):
            hidden = state[f"{prefix}.resblocks.{i}.mlp.c_fc.weight"].shape[0]
            if hidden != block.mlp.c_fc.out_features:  # clip builds 4 x width
                block.mlp.c_fc = nn.Linear(block.mlp.c_fc.in_features, hidden)
                block.mlp.c_proj = nn.Linear(hidden, block.mlp.c_proj.out_features)
            block.mlp.gelu = activation(name, settings["hidden_act"], label)
        for norm in tower.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.eps = settings["layer_norm_eps"]
    model.ln_final.eps = text["layer_norm_eps"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def _blocks(tower: nn.Module):
    return (tower.transformer if hasattr(tower, "conv1") else tower).resblocks


def check_pooling(config: dict, name: str):
    """transformers pools the text at the first eos_token_id (or the arg-max id): with CLIP's
    tokenizer, where the end token has the largest id, that is the arg-max the project takes."""
    eos = config["text"].get("eos_token_id")
    end = import_clip().clip._tokenizer.encoder["<|endoftext|>"]
    if eos not in (LEGACY_EOS, end):
        raise UserError(f"{name} is not supported because its text tower pools at token id "
                        f"{eos} (CLIP's end token is {end}).")


def load_hf_clip(spec: str, precision: str, config_key: str) -> nn.Module:
    """Build "hf:<spec>" (see the module docstring) as a stock `clip.model.CLIP` in PREC
    `precision`, with `name`, `image_mean` and `image_std` (from preprocessor_config.json)."""
    name = HF_PREFIX + spec
    folder = resolve_folder(spec, config_key)
    config = read_config(folder, name)
    check_pooling(config, name)
    check_tokenizer(folder, name)
    state = convert_state_dict(read_weights(folder, name), name)
    model = build_clip(state, config, name)
    if precision == "fp16":
        import_clip().model.convert_weights(model)  # as clip's build_model leaves OpenAI's
    model.name = name
    model.image_mean, model.image_std = read_preprocessing(folder)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Random folders (tests, benchmarks): transformers needed
# --------------------------------------------------------------------------------------------
def write_clip_tokenizer(folder: str):
    """CLIP's BPE (the `clip` package's vocabulary and merges) as vocab.json and merges.txt, the
    files transformers' CLIPTokenizer reads."""
    tokenizer = import_clip().clip._tokenizer
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(tokenizer.encoder, handle)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def save_random_hf_clip(folder: str, text: dict, vision: dict, projection_dim: int,
                        seed: int = 0, scale: float = 0.05) -> str:
    """A transformers CLIPModel of these text / vision config values with random weights (each
    moved by `scale` x N(0, 1) off its initial value), saved with `save_pretrained` in `folder`
    with CLIP's tokenizer files; returns the folder."""
    import transformers
    config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                     projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(scale * torch.randn_like(param))
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder
