"""PromptKD: a ViT-B/16 student with IVLP vision prompts, distilled from a frozen ViT-L/14
PromptSRC (IVLP) teacher on unlabelled images.

The teacher's text features for all classes never change, so they are computed once when the model
is built; only the teacher's image encoder runs per batch. In base-to-novel, the classifier spans
all classes and evaluation scores a slice of them (`class_slice`): the first ceil(C/2) classes for
validation (base), the rest for testing (novel).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import read_checkpoint
from ..clip_backbone import (attach_ivlp_prompts, encode_image, ivlp_vision_prompts, load_clip,
                             text_embed_dim)
from ..codebase_checkpoints import CodebaseLayout
from ..errors import UserError
from ..losses import kd_loss, regularization_loss, select_semantic_tokens, semantic_kd_loss
from ..refiner import FeatureAligner
from ..seeding import clip_build_shapes, draw_clip_build, rewind_to_clip_build
from .base import PromptMethod
from .promptsrc import IVLPLayout, set_values

# A teacher is a whole PromptSRC model; its class buffers and zero-shot image encoder are dropped.
TEACHER_LAYOUT = CodebaseLayout("PromptSRC")
# PromptKD's codebase builds its teacher's CLIP with these prompts (N_CTX_TEXT, PROMPT_DEPTH_TEXT,
# N_CTX_VISION, PROMPT_DEPTH_VISION) whatever the checkpoint holds; they only matter for what the
# build draws (the checkpoint's prompts replace them).
TEACHER_BUILD = (4, 9, 4, 9)


class IVLPTeacher(IVLPLayout, nn.Module):
    """A PromptSRC/IVLP CLIP laid out like its checkpoints (`IVLPLayout`), frozen. Prompt sizes
    are read from the checkpoint's own tensors."""

    def __init__(self, classnames, clip_model, state_dict: dict, ctx_init: str = "a photo of a"):
        super().__init__()
        has_vision = "image_encoder.VPT" in state_dict
        self.build_ivlp(classnames, clip_model, state_dict["prompt_learner.ctx"].shape[0],
                        _depth(state_dict, "text_encoder"),
                        state_dict["image_encoder.VPT"].shape[0] if has_vision else 0,
                        _depth(state_dict, "image_encoder") if has_vision else 0, ctx_init)
        self.requires_grad_(False)

    def image_features(self, images) -> torch.Tensor:
        return F.normalize(self.encode_images(images).features, dim=-1)


class ConvProjector(FeatureAligner):
    """PromptKD's projector `VPT_image_trans` [..., d_student] -> [..., d_teacher]: Linear ->
    BatchNorm -> ReLU -> Linear, each linear computed as its codebase computes it, a 1x1
    convolution over [B, d, 1, 1]. A matrix product rounds otherwise (about 4e-6 on ViT-B/16-wide
    features), which the batch statistics and KD_WEIGHT make visible in the first logged loss."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(-1, features.shape[-1])  # [B, d] (or tokens [B * T, d])
        hidden = F.relu(self.norm(_conv1x1(self.fc1, flat)))
        return _conv1x1(self.fc2, hidden).reshape(*features.shape[:-1], -1)


def _conv1x1(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` for x [B, in] as a 1x1 convolution; the weight stays the linear's."""
    weight = linear.weight[:, :, None, None]
    return F.conv2d(x[:, :, None, None], weight, linear.bias).flatten(1)


def _depth(state_dict: dict, encoder: str) -> int:
    prefix = f"{encoder}.transformer.resblocks."
    deeper = [k for k in state_dict if k.startswith(prefix) and k.endswith(".VPT_shallow")]
    return len(deeper) + 1


def load_teacher(cfg, classnames, precision: str) -> IVLPTeacher:
    """Teacher CLIP (TEACHER_PATH or TEACHER_NAME) with the prompts of TEACHER_CKPT."""
    kcfg = cfg.TRAINER.PROMPTKD
    if not kcfg.TEACHER_CKPT:
        raise UserError(
            "PromptKD needs a teacher: set TRAINER.PROMPTKD.TEACHER_CKPT to a PromptSRC teacher "
            "checkpoint (<dataset>/VLPromptLearner/model-best.pth.tar, as PromptKD publishes them).")
    checkpoint = read_checkpoint(kcfg.TEACHER_CKPT, "teacher checkpoint")
    state = {k: v for k, v in checkpoint.get("state_dict", checkpoint).items()
             if not TEACHER_LAYOUT.is_dropped(k)}
    if any(k.startswith("refiner.") for k in state):
        raise UserError(f"{kcfg.TEACHER_CKPT!r} is a PromptSRC checkpoint trained with "
                        "TextRefiner: a PromptKD teacher is plain PromptSRC (train it without "
                        "--refiner).")
    if "prompt_learner.ctx" not in state:
        raise UserError(f"{kcfg.TEACHER_CKPT!r} is not a PromptSRC/IVLP teacher checkpoint (it has "
                        "no 'prompt_learner.ctx').")
    clip_model = load_clip(kcfg.TEACHER_PATH or kcfg.TEACHER_NAME, precision,
                           config_key="TRAINER.PROMPTKD.TEACHER_PATH")
    teacher = IVLPTeacher(classnames, clip_model, state, kcfg.CTX_INIT)
    teacher.clip_shapes = clip_build_shapes(clip_model)  # what its build drew (PromptKD's seeding)
    expected = teacher.state_dict()
    missing = [k for k in expected if k not in state and ("VPT" in k or "prompt_learner" in k)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(f"Teacher checkpoint {kcfg.TEACHER_CKPT!r} does not fit the teacher CLIP "
                        f"{kcfg.TEACHER_PATH or kcfg.TEACHER_NAME!r}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}.")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"Teacher checkpoint {kcfg.TEACHER_CKPT!r}: {key!r} has shape "
                            f"{tuple(value.shape)}, the teacher CLIP expects "
                            f"{tuple(expected[key].shape)}. Check TRAINER.PROMPTKD.TEACHER_NAME/PATH.")
    teacher.load_state_dict(state, strict=False)
    return teacher.eval()


class PromptKD(PromptMethod):
    """Student image encoder (IVLP vision prompts + projector `VPT_image_trans`) against the
    teacher's text features, refined by TextRefiner when it is on.

    The student's features [B, d_student] are projected to the teacher's size, [B, d_teacher]
    (768 for a ViT-L/14 teacher, read from its weights); E [C, d_teacher] comes from the frozen
    PromptSRC teacher. The refiner aligns student tokens [B, 1+N, d_student] into the teacher's
    space. Everything trained is in the student CLIP's dtype. cfg.TRAINER.PROMPTKD.
    """
    checkpoint_name = "VLPromptLearner"  # the Dassl model name its codebase saves under
    # Its codebase saves the whole student; its projector is a Conv2d(1x1)-BN-ReLU-Conv2d(1x1)
    # `conv1` Sequential where ours has the equivalent linears fc1, norm, fc2. Checkpoints without
    # TextRefiner are written with its names and shapes; files of earlier versions (fc1, norm,
    # fc2) are read as ours.
    codebase_layout = CodebaseLayout("PromptKD", renames=(
        ("VPT_image_trans.conv1.0.", "VPT_image_trans.fc1."),
        ("VPT_image_trans.conv1.1.", "VPT_image_trans.norm."),
        ("VPT_image_trans.conv1.3.", "VPT_image_trans.fc2.")),
        convolutions=("VPT_image_trans.conv1.0.weight", "VPT_image_trans.conv1.3.weight"))

    config_section = "PROMPTKD"
    trainable_prefixes = ("image_encoder.VPT", "VPT_image_trans.")
    trains_on_all_classes = True
    prompts_vision_blocks = True

    def __init__(self, cfg, classnames, clip_model, teacher: Optional[IVLPTeacher] = None):
        super().__init__(cfg, classnames, clip_model)
        kcfg = cfg.TRAINER.PROMPTKD
        self.kd_weight = kcfg.KD_WEIGHT
        self.temperature = kcfg.TEMPERATURE
        self.kd_sem_weight = cfg.TRAINER.REFINER.KD_SEM_WEIGHT
        self.kd_reg_weight = cfg.TRAINER.REFINER.KD_REG_WEIGHT
        attach_ivlp_prompts(self.image_encoder, kcfg.N_CTX_VISION, kcfg.PROMPT_DEPTH_VISION, True)
        teacher = teacher or load_teacher(cfg, classnames, self.precision)
        teacher_dim = text_embed_dim(teacher.text_encoder.text_projection)
        self.teacher = teacher.eval()  # loaded in this precision; .to() would cast its LayerNorms
        with torch.no_grad():
            self.register_buffer("teacher_text", self.teacher.text_features(), persistent=False)
        if rewind_to_clip_build(clip_model) and hasattr(teacher, "clip_shapes"):
            self._draw_as_codebase(clip_model, kcfg)
        # Its codebase's projector is Conv2d(1x1)-BatchNorm-ReLU-Conv2d(1x1): these linears draw
        # the same initial values (same fan-in, same order) from where the stream now is.
        self.VPT_image_trans = ConvProjector(self.dims["embed_dim"], teacher_dim).to(clip_model.dtype)
        self._attach_refiner(cfg, teacher_dim, self.dims["embed_dim"], clip_model.dtype)
        self.class_slice = slice(None)  # which classes evaluation scores
        self._freeze()

    def _draw_as_codebase(self, clip_model, kcfg):
        """From the state the student's CLIP was built from, draw what PromptKD's codebase draws
        before its projector (textrefiner.seeding): the student's CLIP with its IVLP prompts inside
        (text ones too, which the student never uses), then the teacher's CLIP with its own."""
        _, vision = draw_clip_build(clip_build_shapes(clip_model), kcfg.N_CTX_TEXT,
                                    kcfg.PROMPT_DEPTH_TEXT, kcfg.N_CTX_VISION,
                                    kcfg.PROMPT_DEPTH_VISION)
        set_values(ivlp_vision_prompts(self.image_encoder), vision)
        draw_clip_build(self.teacher.clip_shapes, *TEACHER_BUILD)

    # The teacher is frozen and rebuilt from its own checkpoint: never train it, never save it.
    def _freeze(self):
        super()._freeze()
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def _is_saved(self, name: str) -> bool:
        deep_vision_prompt = name.startswith("image_encoder.") and name.endswith(".VPT_shallow")
        return deep_vision_prompt or super()._is_saved(name)

    def set_eval_classes(self, split: str, modal: str = "base2novel", subsample: str = "all"):
        """Which classes evaluation scores. In base2novel the classifier spans all classes: "val"
        scores the base half (first ceil(C/2)), "test" the novel half, or the base half when
        SUBSAMPLE_CLASSES is "base". Otherwise all classes."""
        m = math.ceil(len(self.classnames) / 2)
        if modal != "base2novel":
            self.class_slice = slice(None)
        elif split == "val" or subsample == "base":
            self.class_slice = slice(None, m)
        else:
            self.class_slice = slice(m, None)

    def text_features(self) -> torch.Tensor:
        return self.teacher_text

    def class_embeddings(self) -> torch.Tensor:
        return super().class_embeddings()[self.class_slice]

    def encode_images(self, images, return_tokens=False):
        out = encode_image(self.image_encoder, images, ivlp_vision_prompts(self.image_encoder),
                           return_tokens=return_tokens)
        out.features = self.VPT_image_trans(out.features)
        return out

    def forward_train(self, images, labels=None):
        with torch.no_grad():
            teacher_logits = (self.teacher.logit_scale.exp() * self.teacher.image_features(images)
                              @ self.teacher_text.t())
        out = self.encode_images(images, return_tokens=self.refiner is not None)
        features = F.normalize(out.features, dim=-1)
        scale = self.logit_scale.exp()
        text = self.teacher_text.to(features.dtype)
        t, w = self.temperature, self.kd_weight
        if self.refiner is None:
            loss_kd = kd_loss(scale * features @ text.t(), teacher_logits, t)
            return w * loss_kd, {"loss_kd": loss_kd.detach()}

        aligned = self.refiner.align(out.tokens)                      # [B, 1+N, d_teacher]
        refined = self.refiner.refine(text)
        loss_kd = kd_loss(scale * features @ refined.t(), teacher_logits, t)
        semantic = select_semantic_tokens(aligned, out.cls_attention, self.refiner.topk)
        loss_sem = semantic_kd_loss(semantic, text, teacher_logits, scale, t)
        loss_reg = regularization_loss(refined, text)
        self.refiner.update(aligned)
        loss = w * (loss_kd + self.kd_sem_weight * loss_sem + self.kd_reg_weight * loss_reg)
        return loss, {"loss_kd": loss_kd.detach(), "loss_sem": loss_sem.detach(),
                      "loss_reg": loss_reg.detach()}

