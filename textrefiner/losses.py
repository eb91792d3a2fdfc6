"""TextRefiner's extra losses and the knowledge-distillation loss they share with PromptKD."""
import torch
import torch.nn.functional as F


def regularization_loss(refined: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """L_reg = mean |normalize(Ehat) - E| (Eq. 11, L1 with mean reduction); E and Ehat are
    [C, d], or [B, C, d] per image (then the mean is over images too). Returns a scalar [] in
    Ehat's dtype (E is cast to it)."""
    return F.l1_loss(F.normalize(refined, dim=-1), text_features.to(refined.dtype))


def semantic_patch_indices(cls_attention: torch.Tensor, k: int = 5) -> torch.Tensor:
    """The patches `select_semantic_tokens` picks: [B, k] int64 indices into the N patches (0 =
    the first patch, CLS not counted), in decreasing CLS-attention order. cls_attention: [B, N]."""
    n_patches = cls_attention.shape[1]
    if k > n_patches:
        raise ValueError(f"top-k ({k}) is larger than the number of patches ({n_patches})")
    return cls_attention.topk(k, dim=1).indices


def select_semantic_tokens(aligned_tokens: torch.Tensor, cls_attention: torch.Tensor,
                           k: int = 5) -> torch.Tensor:
    """The k + 2 vectors of the semantic loss, per image: [CLS, top-k patches, mean] -> [B, k+2, d].

    aligned_tokens: [B, 1+N, d] (CLS first); cls_attention: [B, N] CLS-to-patch attention (any
    dtype). The top-k patches come in decreasing attention order; the mean is over all 1+N
    tokens. The result has aligned_tokens' dtype.
    """
    top = semantic_patch_indices(cls_attention, k) + 1             # [B, k], +1 skips CLS
    index = top.unsqueeze(-1).expand(-1, -1, aligned_tokens.shape[-1])
    patches = aligned_tokens.gather(1, index)                      # [B, k, d]
    mean = aligned_tokens.mean(dim=1, keepdim=True)                # [B, 1, d]
    return torch.cat([aligned_tokens[:, :1], patches, mean], dim=1)


def _semantic_logits(semantic_tokens, text_features, logit_scale):
    """[B * K, C] logits of the K vectors of each image against E [C, d], or against that
    image's own E_b when the text features are per image [B, C, d] (CoCoOp)."""
    text = text_features.to(semantic_tokens.dtype)
    if text.dim() == 3:
        logits = torch.einsum("bkd,bcd->bkc", semantic_tokens, text)
        return logit_scale * logits.reshape(-1, text.shape[1])
    flat = semantic_tokens.reshape(-1, semantic_tokens.shape[-1])  # [B * (k+2), d]
    return logit_scale * flat @ text.t()


def semantic_loss(semantic_tokens: torch.Tensor, text_features: torch.Tensor,
                  labels: torch.Tensor, logit_scale) -> torch.Tensor:
    """L_sem, CE form: CE(logit_scale * S E^T, y repeated per vector), against the un-refined E.

    semantic_tokens: [B, K, d] (not re-normalised); text_features: [C, d], or [B, C, d] per image
    (cast to the tokens' dtype); labels: [B] int64 class indices; logit_scale: the exp'd scale (a
    float or a 0-d tensor). Returns a scalar [] in the tokens' dtype.
    """
    logits = _semantic_logits(semantic_tokens, text_features, logit_scale)
    return F.cross_entropy(logits, labels.repeat_interleave(semantic_tokens.shape[1]))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(log_softmax(z_s / T) || softmax(z_t / T)) * T^2 / numel(z_s), sum reduction (PromptKD).

    student_logits, teacher_logits: [B, C] (the teacher's cast to the student's dtype). Returns a
    scalar [] in the student's dtype.
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                  F.softmax(teacher_logits.to(student_logits.dtype) / t, dim=1), reduction="sum")
    return kl * (t * t) / student_logits.numel()


def semantic_kd_loss(semantic_tokens: torch.Tensor, text_features: torch.Tensor,
                     teacher_logits: torch.Tensor, logit_scale,
                     temperature: float = 1.0) -> torch.Tensor:
    """L_sem, KD form: `kd_loss` between the K vectors' logits and the teacher's, repeated K times.

    semantic_tokens: [B, K, d]; text_features: [C, d] or [B, C, d] (cast to the tokens' dtype);
    teacher_logits: [B, C]. Returns a scalar [] in the tokens' dtype.
    """
    logits = _semantic_logits(semantic_tokens, text_features, logit_scale)
    repeated = teacher_logits.repeat_interleave(semantic_tokens.shape[1], dim=0)
    return kd_loss(logits, repeated, temperature)
