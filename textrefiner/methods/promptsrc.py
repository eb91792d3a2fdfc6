"""PromptSRC: independent vision-language (IVLP) deep prompts, self-regularised towards frozen
CLIP, with Gaussian prompt aggregation (GPA) of the weights over the epochs.

Notation: E [C, d] the normalised prompted text features (text prompts `prompt_learner.ctx` at
layer 0, `text_encoder...VPT_shallow` deeper), v [B, d] the normalised prompted image feature
(`image_encoder.VPT`, deeper `VPT_shallow`), s = logit_scale.exp(). Frozen references from the same
CLIP without prompts: F [C, d], the normalised mean of the un-normalised text features over CLIP's
60 ImageNet templates (`fixed_embeddings`), and v_zs, the normalised image feature of an
un-prompted pass of the same frozen image encoder. The prompts are separate parameters and CLIP's
weights never train, so that pass gives exactly what the codebase's second copy of the image
encoder (`ZS_image_encoder`) gives, without holding a second copy of the weights.

Loss (TextRefiner off), weights from TRAINER.PROMPTSRC:

    CE(s v E^T, y) + TEXT_LOSS_WEIGHT * mean|E - F| + IMAGE_LOSS_WEIGHT * mean|v - v_zs|
    + sum p_zs (log p_zs - log p) / (B C),   p = softmax(s v E^T), p_zs = softmax(s v_zs F^T)

GPA: g_e = N(e; GPA_MEAN, GPA_STD) for e = 1..MAX_EPOCH, normalised to sum 1. After epoch e the
running sum gets g_e times every trained weight; after the last epoch the weights are replaced by
the sum. The sum is part of what a checkpoint holds (`run_state`), so a resumed run ends with the
same weights as an uninterrupted one.

With TextRefiner (--refiner) it attaches to E, the prompted text features above: the classifier
is Ehat = refine(E), so the CE and the KL term use p = softmax(s v Ehat^T) (the model's
predictions), while the text L1 term keeps pulling the prompts' own E towards F. TextRefiner's
semantic loss compares the aligned local tokens of the prompted image encoder with E (CE form),
its regularisation loss normalize(Ehat) with E; both are added with their usual weights. GPA
covers everything the checkpoint holds: prompts, the refiner's alignment MLP and aggregation
linear, its BatchNorm statistics (not its integer batch counter, which is a count) and the cache,
whose averaged rows are re-normalised (every cache row is a unit vector; the cache read uses
them as such).
"""
import copy
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..clip_backbone import (TextEncoder, attach_ivlp_prompts, encode_image, encode_text,
                             ivlp_deep_prompts, ivlp_vision_prompts, tokenize)
from ..errors import UserError
from ..seeding import clip_build_shapes, draw_clip_build, rewind_to_clip_build
from .base import PromptMethod
from .prompts import PromptLearner
from .templates import IMAGENET_TEMPLATES

CACHE_KEY = "refiner.cache.entries"


class IVLPLayout:
    """The IVLP model laid out as PromptSRC/PromptKD checkpoints name it: `prompt_learner.ctx`,
    `text_encoder.*` with deeper `VPT_shallow` prompts, `image_encoder.*` with `VPT`, and
    `logit_scale`. Shared by PromptSRC and PromptKD's (PromptSRC-trained) teacher."""

    def build_ivlp(self, classnames, clip_model, n_ctx_text: int, depth_text: int,
                   n_ctx_vision: int, depth_vision: int, ctx_init: str):
        # As PromptSRC, the initial words are used only for short contexts (n_ctx <= 4).
        self.prompt_learner = PromptLearner(classnames, clip_model, n_ctx_text,
                                            ctx_init if n_ctx_text <= 4 else "")
        self.text_encoder = TextEncoder(clip_model)
        self.image_encoder = clip_model.visual
        self.logit_scale = clip_model.logit_scale
        attach_ivlp_prompts(self.text_encoder, n_ctx_text, depth_text, vision=False)
        attach_ivlp_prompts(self.image_encoder, n_ctx_vision, depth_vision, vision=True)

    def load_initial_prompts(self, text, vision):
        """Set the deep prompts' values: text [layers 1..], vision [layers 0..]
        (`draw_clip_build`)."""
        set_values(ivlp_deep_prompts(self.text_encoder), text)
        set_values(ivlp_vision_prompts(self.image_encoder), vision)

    def text_features(self) -> torch.Tensor:
        """Normalised prompted class text features E [C, d]."""
        learner = self.prompt_learner
        features = self.text_encoder(learner(), learner.eot_indices,
                                     ivlp_deep_prompts(self.text_encoder))
        return F.normalize(features, dim=-1)

    def encode_images(self, images, return_tokens=False):
        return encode_image(self.image_encoder, images, ivlp_vision_prompts(self.image_encoder),
                            return_tokens=return_tokens)


@torch.no_grad()
def set_values(params, values):
    """Copy `values` into `params`, one for one."""
    for param, value in zip(params, values, strict=True):
        param.copy_(value)


def gpa_weights(mean: float, std: float, max_epoch: int) -> torch.Tensor:
    """g_e = N(e; mean, std) for epochs e = 1..max_epoch, normalised to sum 1 (float64)."""
    if not std > 0:
        raise UserError(f"TRAINER.PROMPTSRC.GPA_STD must be > 0, got {std}.")
    epochs = torch.arange(1, max_epoch + 1, dtype=torch.float64)
    density = torch.exp(-0.5 * ((epochs - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    total = density.sum()
    if not (torch.isfinite(total) and total > 0):
        raise UserError(f"GPA_MEAN {mean} and GPA_STD {std} give no weight to any of the "
                        f"{max_epoch} epochs: choose GPA_MEAN within them or a wider GPA_STD.")
    return density / total


def self_consistency_kl(logits: torch.Tensor, zero_shot_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_zs || p) summed over all entries and divided by logits.numel() (T = 1), in fp32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_p_zs = F.log_softmax(zero_shot_logits.float(), dim=1)
    return F.kl_div(log_p, log_p_zs, reduction="sum", log_target=True) / logits.numel()


class PromptSRC(IVLPLayout, PromptMethod):
    """PromptSRC (Khattak et al., ICCV 2023): independent text and vision deep prompts (IVLP,
    each [n_ctx, width] per prompted layer), trained with L1 self-regularisation towards frozen
    CLIP's features (F [C, d], computed once in float32; v_zs [B, d]) and Gaussian prompt
    aggregation; E [C, d] in CLIP's dtype. cfg.TRAINER.PROMPTSRC."""
    checkpoint_name = "VLPromptLearner"  # the Dassl model name its codebase saves under
    config_section = "PROMPTSRC"
    trainable_prefixes = ("prompt_learner.", "image_encoder.VPT")
    prompts_vision_blocks = True

    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg, classnames, clip_model)
        scfg = cfg.TRAINER.PROMPTSRC
        if scfg.PROMPT_DEPTH_TEXT < 1:
            raise UserError("TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT must be >= 1 (PromptSRC always "
                            f"prompts the text input), got {scfg.PROMPT_DEPTH_TEXT}.")
        self.build_ivlp(classnames, clip_model, scfg.N_CTX_TEXT, scfg.PROMPT_DEPTH_TEXT,
                        scfg.N_CTX_VISION, scfg.PROMPT_DEPTH_VISION, scfg.CTX_INIT)
        if rewind_to_clip_build(clip_model):
            self._draw_as_codebase(clip_model, scfg)
        self.text_weight = scfg.TEXT_LOSS_WEIGHT
        self.image_weight = scfg.IMAGE_LOSS_WEIGHT
        self.gpa_mean, self.gpa_std = scfg.GPA_MEAN, scfg.GPA_STD
        gpa_weights(self.gpa_mean, self.gpa_std, cfg.OPTIM.MAX_EPOCH)  # refuse bad values now
        self.token_embedding = clip_model.token_embedding  # frozen; for the template ensemble
        # F: computed on first use (in training only, on the device the model then lives on).
        self.register_buffer("fixed_embeddings", None, persistent=False)
        self._gpa_sum: Dict[str, torch.Tensor] = {}
        self._gpa_epochs = 0  # epochs folded into the running sum
        dim = self.dims["embed_dim"]
        self._attach_refiner(cfg, dim, dim, clip_model.dtype)
        self._freeze()

    def _draw_as_codebase(self, clip_model, scfg):
        """From the state CLIP was built from, draw what PromptSRC's codebase draws (textrefiner.
        seeding): its CLIP with the deep prompts inside, a random context if it has no initial
        words, then the two plain CLIP copies of its frozen references."""
        shapes = clip_build_shapes(clip_model)
        self.load_initial_prompts(*draw_clip_build(
            shapes, scfg.N_CTX_TEXT, scfg.PROMPT_DEPTH_TEXT, scfg.N_CTX_VISION,
            scfg.PROMPT_DEPTH_VISION))
        if not (scfg.CTX_INIT and scfg.N_CTX_TEXT <= 4):
            with torch.no_grad():
                self.prompt_learner.ctx.normal_(std=0.02)
        draw_clip_build(shapes)  # the CLIP that computes its fixed_embeddings
        draw_clip_build(shapes)  # its ZS_image_encoder's CLIP

    def _is_saved(self, name: str) -> bool:
        deep_prompt = name.startswith(("text_encoder.", "image_encoder.")) and name.endswith(
            ".VPT_shallow")
        return deep_prompt or super()._is_saved(name)

    # ---------------------------------------------------------------- frozen references
    @torch.no_grad()
    def zero_shot_text_features(self) -> torch.Tensor:
        """F [C, d]: normalised mean over the 60 templates of plain CLIP's un-normalised text
        features, computed once in float32 (as the codebase does, from a float copy of CLIP)."""
        if self.fixed_embeddings is None:
            device = self.logit_scale.device
            encoder = self.text_encoder
            if encoder.dtype != torch.float32:  # a temporary float32 copy, freed on return
                encoder = copy.deepcopy(encoder).float()
            names = [name.replace("_", " ") for name in self.classnames]
            features = []
            with torch.autocast(device.type, enabled=False):
                for template in IMAGENET_TEMPLATES:
                    tokens = tokenize([template.format(name) for name in names], device)
                    embeddings = self.token_embedding(tokens).float()
                    features.append(encode_text(encoder, embeddings, tokens.argmax(dim=-1)))
            # the mean of the stack [C, templates, d], as the codebase takes it (a running sum
            # rounds otherwise)
            self.fixed_embeddings = F.normalize(torch.stack(features, dim=1).mean(dim=1), dim=-1)
        return self.fixed_embeddings

    @torch.no_grad()
    def zero_shot_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """v_zs [B, d]: the frozen image encoder without prompts, normalised."""
        return F.normalize(encode_image(self.image_encoder, images).features, dim=-1)

    # ---------------------------------------------------------------- training
    def forward_train(self, images, labels):
        text = self.text_features()                                   # E
        out = self.encode_images(images, return_tokens=self.refiner is not None)
        features = F.normalize(out.features, dim=-1)                  # v
        logits, loss, parts = self.classification_losses(text, out, labels, features)
        fixed = self.zero_shot_text_features()                        # F (float32)
        zs_features = self.zero_shot_image_features(images)           # v_zs
        zs_logits = self.logit_scale.exp() * zs_features @ fixed.to(zs_features.dtype).t()
        loss_text = F.l1_loss(text.float(), fixed)
        loss_image = F.l1_loss(features, zs_features.to(features.dtype))
        loss_kl = self_consistency_kl(logits, zs_logits)
        # summed in the codebase's order (the logged loss to its last digit)
        loss = loss + (loss_kl + self.text_weight * loss_text + self.image_weight * loss_image)
        parts.update({"loss_scl_text": loss_text.detach(), "loss_scl_image": loss_image.detach(),
                      "loss_scl_kl": loss_kl.detach()})
        return loss, parts

    # ---------------------------------------------------------------- Gaussian prompt aggregation
    def _aggregated_state(self) -> Dict[str, torch.Tensor]:
        """What GPA averages: every floating-point entry of the checkpoint state."""
        return {k: v for k, v in self.checkpoint_state().items() if v.is_floating_point()}

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, max_epoch: int):
        if epoch != self._gpa_epochs:
            raise UserError(
                f"PromptSRC's running GPA sum covers {self._gpa_epochs} epochs but epoch "
                f"{epoch + 1} just ended: the run was resumed from a checkpoint without its GPA "
                "state (\"method_state\"). Train again from the start.")
        weight = float(gpa_weights(self.gpa_mean, self.gpa_std, max_epoch)[epoch])
        for key, value in self._aggregated_state().items():
            term = weight * value.float()
            self._gpa_sum[key] = term if key not in self._gpa_sum else self._gpa_sum[key] + term
        self._gpa_epochs = epoch + 1
        if epoch + 1 == max_epoch:
            self._load_aggregate()

    def _load_aggregate(self):
        current = self.state_dict()
        aggregate = {k: v.to(current[k].dtype) for k, v in self._gpa_sum.items()}
        if CACHE_KEY in aggregate:
            aggregate[CACHE_KEY] = F.normalize(self._gpa_sum[CACHE_KEY], dim=-1).to(
                current[CACHE_KEY].dtype)
        self.load_state_dict(aggregate, strict=False)
        self.invalidate_eval_cache()

    def run_state(self) -> dict:
        return {"gpa_epochs": self._gpa_epochs,
                "gpa_sum": {k: v.detach().clone() for k, v in self._gpa_sum.items()}}

    def load_run_state(self, state: Optional[dict]):
        state = state or {}
        device = self.logit_scale.device
        self._gpa_epochs = int(state.get("gpa_epochs", 0))
        self._gpa_sum = {k: v.to(device) for k, v in state.get("gpa_sum", {}).items()}
