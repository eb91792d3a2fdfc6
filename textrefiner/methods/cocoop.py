"""CoCoOp: CoOp's shared context, shifted for every image by a meta-net of that image's feature.

As its codebase defines it (CoOp repository, trainers/cocoop.py): v = normalize(image feature);
bias_b = meta_net(v_b) [width]; every context vector becomes ctx + bias_b; the C class prompts
built from that context go through the text encoder; logits_b = logit_scale * v_b
normalize(text_b)^T; training loss CE over the [B, C] logits. Here the text encoder runs once on
all B x C prompts of a batch (the codebase loops over the images), in training and evaluation.
Evaluation is per image by design: no class embedding can be computed once per evaluation, so
memory grows with DATALOADER.TEST.BATCH_SIZE x the number of classes.

TextRefiner in CoCoOp (`--refiner`):
* E is per image: E_b [C, d] = normalised text features of the prompts of image b, E [B, C, d].
* The cache read and the aggregation run per image, in training and at evaluation:
  Ehat_b = alpha * Linear([E_b, softmax(E_b A^T) A]) + E_b; logits_b = logit_scale * v_b Ehat_b^T
  (Ehat not re-normalised, as in the other methods). At evaluation this is per image too; its cost
  is measured by benchmarks/cocoop.py.
* L_cls = CE over the [B, C] logits; L_sem compares the k + 2 local vectors of image b (aligned
  CLS, top-k patches, mean) with that image's un-refined E_b; L_reg = mean |normalize(Ehat_b) -
  E_b| over images, classes and dims. L = L_cls + lambda1 L_sem + lambda2 L_reg.
* The cache write is as in the other methods: once per step, after the read, with the aligned
  local tokens of every image of the batch. The meta-net reads the plain global feature v.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clip_backbone import TextEncoder
from .base import PromptMethod, image_text_logits
from .prompts import PromptLearner, context_length


class CoCoOpPromptLearner(PromptLearner):
    """CoOp's learner (shared `ctx`, class token at the end) plus `meta_net`: `linear1`
    (vis_dim -> vis_dim // 16), `relu`, `linear2` (-> text width). Names as in CoCoOp's
    checkpoints (`ctx`, `meta_net.linear1.*`, `meta_net.linear2.*`)."""

    def __init__(self, classnames, clip_model, n_ctx: int, ctx_init: str = ""):
        super().__init__(classnames, clip_model, n_ctx, ctx_init)
        vis_dim = clip_model.visual.output_dim
        width = clip_model.ln_final.weight.shape[0]
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU()),
            ("linear2", nn.Linear(vis_dim // 16, width)),
        ])).to(clip_model.dtype)

    def conditioned(self, image_features: torch.Tensor) -> torch.Tensor:
        """Prompts [B, C, L, width]: image b's context ctx + meta_net(v_b) in all C prompts."""
        bias = self.meta_net(image_features)                         # [B, width]
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)              # [B, n_ctx, width]
        batch, n_cls = ctx.shape[0], self.n_cls
        ctx = ctx.to(self.token_prefix.dtype).unsqueeze(1).expand(-1, n_cls, -1, -1)
        prefix = self.token_prefix.expand(batch, -1, -1, -1)         # [B, C, 1, width]
        suffix = self.token_suffix.expand(batch, -1, -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=2)               # [B, C, L, width]


class CoCoOp(PromptMethod):
    """CoCoOp (Zhou et al., CVPR 2022): CoOp's shared context shifted per image by `meta_net`
    from the image's normalised feature, so E is per image, [B, C, d] in CLIP's dtype, and so is
    Ehat with TextRefiner (refined per image). cfg.TRAINER.COCOOP."""
    checkpoint_name = "prompt_learner"  # the Dassl model name its codebase saves under
    config_section = "COCOOP"
    trainable_prefixes = ("prompt_learner.",)

    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg, classnames, clip_model)
        ccfg = cfg.TRAINER.COCOOP
        self.prompt_learner = CoCoOpPromptLearner(
            classnames, clip_model, context_length(ccfg.CTX_INIT, ccfg.N_CTX), ccfg.CTX_INIT)
        self.text_encoder = TextEncoder(clip_model)
        dim = self.dims["embed_dim"]
        self._attach_refiner(cfg, dim, dim, clip_model.dtype)
        self._freeze()

    def text_features(self):
        raise RuntimeError("CoCoOp's class text features depend on the image: use "
                           "batch_text_features(image_features), or the model's forward.")

    def batch_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """E [B, C, d]: the text encoder on all B x C image-conditioned prompts at once."""
        learner = self.prompt_learner
        prompts = learner.conditioned(image_features)                # [B, C, L, width]
        batch, n_cls = prompts.shape[:2]
        features = self.text_encoder(prompts.flatten(0, 1), learner.eot_indices.repeat(batch),
                                     learner.deep_prompts())         # [B * C, d]
        return F.normalize(features, dim=-1).reshape(batch, n_cls, -1)

    @property
    def num_eval_classes(self) -> int:
        return len(self.classnames)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Evaluation logits [B, C], per image: each image's own (refined) classifier, from the
        image encoder's global features [B, d] (all the image side its meta-net reads)."""
        features = F.normalize(image_features, dim=-1)
        classifier = self.refined(self.batch_text_features(features))  # [B, C, d]
        return image_text_logits(features, classifier, self.logit_scale.exp())
