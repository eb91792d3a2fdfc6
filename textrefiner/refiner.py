"""TextRefiner's three modules (local cache, aggregation, alignment) and their composition.

Notation follows the paper: E [C, d] normalised class text features, A [M, d] the cache,
V [B, 1+N, d] local tokens in the joint space.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import gather_rows

WRITE_RULES = ("released", "paper")


class LocalCache(nn.Module):
    """M unit-norm entries that summarise local visual attributes (Eq. 2-6).

    The cache is a registered buffer (`entries`), so it follows `.to()` and is saved and restored
    with the model's state dict. It changes only through `write`, never through gradients.

    entries: [M, d] unit rows, float32 when built (`.to(dtype)` converts them like any buffer).
    write_rule: how much each token adds to the entry it is assigned to.
        "released": w_i = P[i, j] / max_k P[k, j] with P = softmax over tokens (the authors' code,
                    which produced the published numbers);
        "paper":    w_i = softmax over entries [i, j] (Eq. 4).
    """

    def __init__(self, num_entries: int, dim: int, momentum: float = 0.8,
                 write_rule: str = "released"):
        super().__init__()
        if num_entries < 1:
            raise ValueError(f"num_entries must be >= 1, got {num_entries}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if write_rule not in WRITE_RULES:
            raise ValueError(f"write_rule must be one of {WRITE_RULES}, got {write_rule!r}")
        self.momentum = momentum
        self.write_rule = write_rule
        self.register_buffer("entries", F.normalize(torch.rand(num_entries, dim), dim=-1))
        self.skipped_tokens = 0  # non-finite tokens refused by `write`, for the log

    def read(self, text_features: torch.Tensor) -> torch.Tensor:
        """Ebar = softmax(cos(E, A), over entries) A  -> [C, d]  (Eq. 5-6); E may carry leading
        dims ([B, C, d] per image, as in CoCoOp), each row reads the cache on its own. Ebar has
        E's shape and dtype (the entries are read in E's dtype)."""
        entries = self.entries.to(text_features.dtype)
        if torch.is_grad_enabled() and entries is self.entries:
            # The backward pass needs A as read, and this step's write changes it in place.
            entries = entries.clone()
        return self.read_weights(text_features, entries) @ entries

    def read_weights(self, text_features: torch.Tensor, entries: torch.Tensor = None):
        """Eq. 5's read weights softmax(cos(E, A), over entries): E [..., C, d] -> [..., C, M],
        in E's dtype; each class's weights sum to 1. `entries` defaults to the cache's own."""
        entries = self.entries.to(text_features.dtype) if entries is None else entries
        return (F.normalize(text_features, dim=-1) @ entries.t()).softmax(dim=-1)

    @torch.no_grad()
    def write(self, tokens: torch.Tensor) -> int:
        """Fold tokens [B, T, d] or [T, d] (any float dtype) into the cache; returns how many
        were assigned (an int). Computed in float32, stored in the entries' dtype.

        Each token goes to its most similar entry; every entry that received tokens becomes
        g * A_j + (1 - g) * sum_i w_i X_i, then all rows are re-normalised. Tokens with a
        non-finite value are skipped (counted in `skipped_tokens`).
        """
        x = tokens.detach().reshape(-1, self.entries.shape[1]).float()
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            self.skipped_tokens += int((~finite).sum())
            x = x[finite]
        if x.shape[0] == 0:
            return 0
        x = F.normalize(x, dim=-1)                                   # [T, d]
        entries = self.entries.float()                               # [M, d]
        scores = x @ entries.t()                                     # [T, M]
        assigned = scores.argmax(dim=1, keepdim=True)                # [T, 1]
        weights = self._token_weights(scores, assigned)              # [T]
        gathered = torch.zeros_like(entries).index_add_(0, assigned[:, 0], weights[:, None] * x)
        hit = torch.bincount(assigned[:, 0], minlength=entries.shape[0]) > 0
        moved = self.momentum * entries + (1.0 - self.momentum) * gathered
        updated = torch.where(hit[:, None], moved, entries)
        self.entries.copy_(F.normalize(updated, dim=-1))
        return x.shape[0]

    def _token_weights(self, scores: torch.Tensor, assigned: torch.Tensor) -> torch.Tensor:
        if self.write_rule == "paper":
            return scores.softmax(dim=1).gather(1, assigned)[:, 0]
        per_entry = scores.softmax(dim=0)                            # over tokens, per column
        column_max = per_entry.max(dim=0).values                     # [M]
        return per_entry.gather(1, assigned)[:, 0] / column_max[assigned[:, 0]]

    def extra_repr(self) -> str:
        m, d = self.entries.shape
        return f"entries={m}, dim={d}, momentum={self.momentum}, write_rule={self.write_rule!r}"


class FeatureAggregator(nn.Module):
    """Ehat = alpha * Linear([E, Ebar]) + E  (Eq. 7); the linear has no bias.

    forward(E, Ebar): E [..., C, d] in the module's dtype, Ebar of the same shape (cast to E's
    dtype) -> Ehat [..., C, d] in E's dtype.
    """

    def __init__(self, dim: int, alpha: float = 0.2):
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.linear = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, text_features: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        fused = self.linear(torch.cat([text_features, detail.to(text_features.dtype)], dim=-1))
        return self.alpha * fused + text_features

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class FeatureAligner(nn.Module):
    """Per-token MLP Linear -> BatchNorm -> ReLU -> Linear (Eq. 8): tokens [..., in_dim] in the
    module's dtype -> [..., out_dim] in that dtype.

    BatchNorm statistics are taken over every token of the batch.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.norm = nn.BatchNorm1d(out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1, tokens.shape[-1])                  # [B * T, in_dim]
        hidden = F.relu(self.norm(self.fc1(flat)))
        return self.fc2(hidden).reshape(*tokens.shape[:-1], -1)


class TextRefiner(nn.Module):
    """Local cache + aggregation + alignment with the published defaults.

    In a custom training step (E normalised text features, tokens from `encode_image(...,
    return_tokens=True)`):

        aligned = refiner.align(out.tokens)          # V' [B, 1+N, dim]
        refined = refiner.refine(E)                  # Ehat, read before this step's write
        ... losses on refined / aligned ...
        refiner.update(aligned)                      # write into the cache, no gradient

    At inference only `refine(E)` is needed, once per evaluation. dim: the joint embedding size
    d (`clip_model.text_projection.shape[1]`); token_dim: the local tokens' size (default d).
    Built in float32; move it to CLIP's dtype with `.to(clip_model.dtype)`.
    """

    def __init__(self, dim: int, token_dim: int = None, cache_size: int = 25,
                 momentum: float = 0.8, alpha: float = 0.2, topk: int = 5,
                 write_rule: str = "released"):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = topk
        self.aligner = FeatureAligner(token_dim or dim, dim)
        self.cache = LocalCache(cache_size, dim, momentum, write_rule)
        self.aggregator = FeatureAggregator(dim, alpha)

    def refine(self, text_features: torch.Tensor) -> torch.Tensor:
        """Ehat = aggregation(E, cache read): E [C, d] or [B, C, d] -> the same shape, in E's
        dtype (the refiner's dtype). Reads the cache, never writes it."""
        return self.aggregator(text_features, self.cache.read(text_features))

    def align(self, local_tokens: torch.Tensor) -> torch.Tensor:
        """V' = alignment MLP(V): local tokens [B, 1+N, token_dim] -> [B, 1+N, d], in the
        refiner's dtype."""
        return self.aligner(local_tokens)

    def update(self, aligned_tokens: torch.Tensor) -> int:
        """Write aligned tokens [B, 1+N, d] (any float dtype, detached) into the cache; returns
        the number written (an int). Under torchrun every rank writes the tokens of all ranks in
        rank (= global batch) order, so the caches stay identical and equal to one process's."""
        return self.cache.write(gather_rows(aligned_tokens.detach()))
