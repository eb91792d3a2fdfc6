"""Tiny LLaMP inputs for the tests: a random-weight LLaMA saved through `save_pretrained`, and a
dataset's two cached files in LLaMP's format (what its tools write), from random numbers.

    release_past_key_value.pt:
        {"base": [{"past_key_values": [layers, 2, C, heads, P_t, head_dim],
                   "attn_mask": [C, P_t]} for each template t], "new": [...]}
    release_clip_text_embeddings.pt:
        {"base": {"avg": [C, d]}, "new": {"avg": [C, d]}}

The masks are left-padded, as a left-padding tokenizer writes them (different lengths per class).
"""
import os

import torch

LLM_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)


def save_tiny_llama(folder: str, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLM_SIZES))
    for norm in [m for n, m in model.named_modules() if n.endswith("norm")]:
        norm.weight.data.uniform_(0.5, 1.5)  # not all ones, so that a wrong norm shows
    model.save_pretrained(folder)
    return folder


def _template(generator, classes, tokens, layers=2):
    heads = LLM_SIZES["num_attention_heads"]
    head_dim = LLM_SIZES["hidden_size"] // heads
    kv = torch.randn(layers, 2, classes, heads, tokens, head_dim, generator=generator)
    lengths = torch.randint(tokens // 2, tokens + 1, (classes,), generator=generator)
    lengths[0] = tokens
    mask = (torch.arange(tokens).unsqueeze(0) >= tokens - lengths.unsqueeze(1)).long()
    return {"past_key_values": kv, "attn_mask": mask}


def write_llamp_files(folder: str, num_base: int, num_new: int, embed_dim: int,
                      templates: int = 3, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    kv = {subset: [_template(g, count, 5 + 2 * t) for t in range(templates)]
          for subset, count in (("base", num_base), ("new", num_new))}
    torch.save(kv, os.path.join(folder, "release_past_key_value.pt"))
    embeddings = {subset: {"avg": torch.randn(count, embed_dim, generator=g)}
                  for subset, count in (("base", num_base), ("new", num_new))}
    torch.save(embeddings, os.path.join(folder, "release_clip_text_embeddings.pt"))
    return folder


# ------------------------------------------------------------------ CLIP in transformers' layout
def hf_clip_configs(clip_model) -> dict:
    """transformers' CLIPConfig arguments (text_config, vision_config, projection_dim) for a stock
    CLIP ViT; fields both transformers 4.35 and 5.x read."""
    text_width = clip_model.ln_final.weight.shape[0]
    visual = clip_model.visual
    vision_width = visual.conv1.weight.shape[0]
    return {
        "text_config": dict(hidden_size=text_width, intermediate_size=4 * text_width,
                            num_hidden_layers=len(clip_model.transformer.resblocks),
                            num_attention_heads=clip_model.transformer.resblocks[0].attn.num_heads,
                            max_position_embeddings=clip_model.positional_embedding.shape[0],
                            vocab_size=clip_model.token_embedding.weight.shape[0],
                            hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=1, projection_dim=clip_model.text_projection.shape[1]),
        "vision_config": dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=len(visual.transformer.resblocks),
                              num_attention_heads=visual.transformer.resblocks[0].attn.num_heads,
                              image_size=visual.input_resolution,
                              patch_size=visual.conv1.weight.shape[-1], hidden_act="quick_gelu",
                              projection_dim=visual.proj.shape[1]),
        "projection_dim": clip_model.text_projection.shape[1],
    }


def _blocks_to_hf(state, source, target):
    converted = {}
    for key, value in state.items():
        if not key.startswith(source):
            continue
        layer, name = key[len(source):].split(".", 1)
        prefix = f"{target}{layer}."
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                converted[f"{prefix}self_attn.{proj}.{kind}"] = part
            continue
        for ours, theirs in (("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."),
                             ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                             ("mlp.c_proj.", "mlp.fc2.")):
            if name.startswith(ours):
                converted[prefix + theirs + name[len(ours):]] = value
    return converted


def openai_to_hf_clip(state: dict) -> dict:
    """A stock CLIP ViT's state dict in transformers' CLIPModel layout."""
    hf = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "logit_scale": state["logit_scale"],
    }
    hf.update(_blocks_to_hf(state, "transformer.resblocks.", "text_model.encoder.layers."))
    hf.update(_blocks_to_hf(state, "visual.transformer.resblocks.",
                            "vision_model.encoder.layers."))
    return {key: value.detach().clone().contiguous() for key, value in hf.items()}


def write_clip_tokenizer_files(folder: str) -> tuple:
    """vocab.json and merges.txt of transformers' CLIPTokenizer, from the stock `clip` package's
    BPE vocabulary (the files OpenAI's hub models carry hold the same)."""
    import json

    from textrefiner._compat import import_clip
    tokenizer = import_clip().simple_tokenizer.SimpleTokenizer()
    os.makedirs(folder, exist_ok=True)
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        json.dump(tokenizer.encoder, f)
    ranked = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    with open(merges, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in ranked) + "\n")
    return vocab, merges
