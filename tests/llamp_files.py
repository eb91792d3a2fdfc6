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
