"""Learnable text prompts: context vectors spliced into each class's token embeddings.

Shared by CoOp (context only at the input), MaPLe and IVLP (plus deeper prompts). The class-
dependent parts (start token, class-name and end tokens) are non-persistent buffers: they are
rebuilt from the class names and never saved, so learned prompts move between class lists.
"""
from typing import Sequence

import torch
import torch.nn as nn

from .._compat import import_clip
from ..clip_backbone import embed_tokens, tokenize

POSITIONS = ("end", "middle", "front")


def init_context(clip_model, n_ctx: int, ctx_init: str, n_copies: int = 0):
    """Initial context vectors and the words that stand for them in the tokenised prompts.

    With `ctx_init` the vectors are the embeddings of its first `n_ctx` tokens (after the start
    token) and the prompts keep all of its words (MaPLe uses 2 vectors from "a photo of a");
    otherwise they are drawn from N(0, 0.02) and written as "X X ...". `n_copies` > 0 gives
    class-specific contexts [n_copies, n_ctx, width], each starting from the same words.
    """
    width = clip_model.ln_final.weight.shape[0]
    if ctx_init:
        words = ctx_init.replace("_", " ")
        with torch.no_grad():
            embedding = embed_tokens(clip_model, tokenize([words]))
        ctx = embedding[0, 1:1 + n_ctx].clone()
        if n_copies:
            ctx = ctx.unsqueeze(0).repeat(n_copies, 1, 1)
        return ctx, words
    shape = (n_copies, n_ctx, width) if n_copies else (n_ctx, width)
    ctx = torch.empty(shape, dtype=clip_model.dtype)
    nn.init.normal_(ctx, std=0.02)
    return ctx, " ".join(["X"] * n_ctx)


def context_length(ctx_init: str, n_ctx: int) -> int:
    """As CoOp and CoCoOp: initial words fix the context length, else N_CTX."""
    return len(ctx_init.replace("_", " ").split()) if ctx_init else n_ctx


def _position_order(name_lens: Sequence[int], n_ctx: int, length: int, position: str):
    """Per-class permutation [C, L] mapping output slots to slots of [SOS, ctx, name, rest]."""
    orders = []
    for name_len in name_lens:
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + name_len))
        rest = list(range(1 + n_ctx + name_len, length))
        if position == "middle":
            half = n_ctx // 2
            order = [0] + ctx[:half] + name + ctx[half:] + rest
        else:  # front
            order = [0] + name + ctx + rest
        orders.append(order)
    return torch.tensor(orders, dtype=torch.long)


class PromptLearner(nn.Module):
    """Context vectors `ctx` ([n_ctx, width], or [C, n_ctx, width] class-specific) and the class
    token buffers; `forward()` returns the prompt embeddings [C, L, width]."""

    def __init__(self, classnames: Sequence[str], clip_model, n_ctx: int, ctx_init: str = "",
                 class_specific: bool = False, position: str = "end"):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class token position must be one of {POSITIONS}, got {position!r}")
        names = [name.replace("_", " ") for name in classnames]
        ctx, prefix_words = init_context(clip_model, n_ctx, ctx_init,
                                         len(names) if class_specific else 0)
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_ctx
        tokens = tokenize([f"{prefix_words} {name}." for name in names])
        with torch.no_grad():
            embedding = embed_tokens(clip_model, tokens)            # [C, L, width]
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:], persistent=False)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)
        self.register_buffer("eot_indices", tokens.argmax(dim=-1), persistent=False)
        order = None
        if position != "end":
            tokenizer = import_clip().clip._tokenizer
            name_lens = [len(tokenizer.encode(name)) for name in names]
            order = _position_order(name_lens, n_ctx, tokens.shape[1], position)
        self.register_buffer("order", order, persistent=False)

    def deep_prompts(self):
        """Text prompts for layers 1.. (none: context only at the input)."""
        return []

    @property
    def n_cls(self) -> int:
        return self.token_prefix.shape[0]

    def forward(self) -> torch.Tensor:
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype),
                             self.token_suffix], dim=1)               # [C, L, width]
        if self.order is None:
            return prompts
        index = self.order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1])
        return prompts.gather(1, index)
