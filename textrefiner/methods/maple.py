"""MaPLe: coupled vision-language prompts. Text prompts at layers 0..depth-1; the vision prompts
are learned linear projections (text width -> vision width) of them, one linear per layer."""
import copy

import torch
import torch.nn as nn

from ..clip_backbone import TextEncoder, encode_image
from ..errors import UserError
from .base import PromptMethod
from .prompts import PromptLearner


class MaPLePromptLearner(PromptLearner):
    """Layer-0 text context `ctx`, `compound_prompts_text` for layers 1..depth-1, and the linears
    `proj` (layer 0) and `compound_prompt_projections` (deeper) to the vision width.
    Names as in MaPLe's checkpoints."""

    def __init__(self, classnames, clip_model, n_ctx: int, ctx_init: str, depth: int):
        # MaPLe takes its initial words only for short contexts (n_ctx <= 4).
        super().__init__(classnames, clip_model, n_ctx, ctx_init if n_ctx <= 4 else "")
        text_width = clip_model.ln_final.weight.shape[0]
        vision_width = clip_model.visual.conv1.weight.shape[0]
        dtype = clip_model.dtype
        self.proj = nn.Linear(text_width, vision_width).to(dtype)
        deeper = [torch.empty(n_ctx, text_width, dtype=dtype) for _ in range(depth - 1)]
        for prompt in deeper:
            nn.init.normal_(prompt, std=0.02)
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(p) for p in deeper])
        # MaPLe clones one linear, so every deeper projection starts from the same weights.
        one = nn.Linear(text_width, vision_width).to(dtype)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(one) for _ in range(depth - 1)])

    def deep_prompts(self):
        return list(self.compound_prompts_text)

    def vision_prompts(self):
        """Per-layer vision prompts [n_ctx, vision width] for layers 0..depth-1."""
        deeper = [proj(prompt) for proj, prompt in
                  zip(self.compound_prompt_projections, self.compound_prompts_text)]
        return [self.proj(self.ctx)] + deeper


class MaPLe(PromptMethod):
    """MaPLe (Khattak et al., CVPR 2023): text prompts [n_ctx, width] in the first `PROMPT_DEPTH`
    layers, projected to vision prompts [n_ctx, vision width] for the image encoder's layers; E
    [C, d] in CLIP's dtype. cfg.TRAINER.MAPLE."""
    checkpoint_name = "MultiModalPromptLearner"  # the Dassl model name its codebase saves under
    config_section = "MAPLE"
    trainable_prefixes = ("prompt_learner.",)
    prompts_vision_blocks = True

    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg, classnames, clip_model)
        mcfg = cfg.TRAINER.MAPLE
        layers = min(self.dims["text_layers"], self.dims["vision_layers"])
        if not 1 <= mcfg.PROMPT_DEPTH <= layers:
            raise UserError(f"TRAINER.MAPLE.PROMPT_DEPTH must be between 1 and {layers} for this "
                            f"CLIP, got {mcfg.PROMPT_DEPTH}.")
        self.prompt_learner = MaPLePromptLearner(classnames, clip_model, mcfg.N_CTX,
                                                 mcfg.CTX_INIT, mcfg.PROMPT_DEPTH)
        self.text_encoder = TextEncoder(clip_model)
        self._eval_vision_prompts = None
        dim = self.dims["embed_dim"]
        self._attach_refiner(cfg, dim, dim, clip_model.dtype)
        self._freeze()

    def encode_images(self, images, return_tokens=False):
        return encode_image(self.image_encoder, images, self._vision_prompts(),
                            return_tokens=return_tokens)

    def _vision_prompts(self):
        """The projected vision prompts; in eval mode projected once, like the classifier."""
        if self.training:
            return self.prompt_learner.vision_prompts()
        if self._eval_vision_prompts is None:
            with torch.no_grad():
                self._eval_vision_prompts = self.prompt_learner.vision_prompts()
        return self._eval_vision_prompts

    def invalidate_eval_cache(self):
        super().invalidate_eval_cache()
        self._eval_vision_prompts = None
