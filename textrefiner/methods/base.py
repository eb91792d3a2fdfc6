"""The shape every method shares, so runners stay thin.

A method is built from (cfg, class names, CLIP model) and offers:

* `forward_train(images, labels) -> (loss, parts)`: one training forward with named loss parts;
* `forward(images) -> logits`: evaluation, using class embeddings computed once per evaluation
  (CoCoOp's depend on the image: it computes them per image);
* `class_embeddings()`: the (refined, if TextRefiner is on) classifier [C, d];
* `num_eval_classes`: how many classes evaluation scores (the columns of `forward`'s logits);
* `trainable_parameters()`: everything the optimiser updates (all of CLIP is frozen);
* `checkpoint_state()` / `load_checkpoint_state(state)`: what a checkpoint holds (prompts, refiner
  weights and cache), without the class-dependent buffers, so a base-trained checkpoint loads into
  a model built for the novel classes; `load_checkpoint_state` also reads what the method's
  original codebase saved (textrefiner.codebase_checkpoints).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clip_backbone import ImageOutput, TextEncoder, clip_dims, encode_image, require_vit
from ..codebase_checkpoints import as_own_state, is_codebase_read, what_it_is
from ..errors import UserError
from ..losses import regularization_loss, select_semantic_tokens, semantic_loss
from ..refiner import TextRefiner
from ..seeding import own_generator


def build_refiner(cfg, dim: int, token_dim: int, num_patches: int) -> Optional[TextRefiner]:
    """TextRefiner from cfg.TRAINER.REFINER, or None when it is off. Its random initial weights and
    cache come from a generator of its own seeded from SEED (textrefiner.seeding), so the global
    random stream, hence the data a run sees, is the same with and without it. dim: the size d
    of E [C, d]; token_dim: that of the local tokens [B, 1+N, token_dim]; built in float32 (the
    methods move it to CLIP's dtype)."""
    rcfg = cfg.TRAINER.REFINER
    if not rcfg.ENABLED:
        return None
    if rcfg.TOPK > num_patches:
        raise UserError(f"TRAINER.REFINER.TOPK is {rcfg.TOPK} but the image encoder has only "
                        f"{num_patches} patches: choose TOPK <= {num_patches}.")
    try:
        with own_generator(cfg.get("SEED", -1), "refiner"):
            return TextRefiner(dim, token_dim, cache_size=rcfg.CACHE_SIZE, momentum=rcfg.MOMENTUM,
                               alpha=rcfg.ALPHA, topk=rcfg.TOPK, write_rule=rcfg.WRITE_RULE)
    except ValueError as exc:
        raise UserError(f"Invalid TRAINER.REFINER setting: {exc}.") from None


class PromptMethod(nn.Module):
    """Base class: a prompt-tuned CLIP classifier with an optional TextRefiner.

    Subclasses set `config_section` (the cfg.TRAINER.<section> they read), `trainable_prefixes`
    (name prefixes of what the optimiser updates and checkpoints hold, besides "refiner.") and
    implement
    `text_features()` and, if their image side differs from plain CLIP, `encode_images()`.

    Shapes: images [B, 3, H, W] -> `forward` logits [B, C]; E and Ehat [C, d] ([B, C, d] for
    CoCoOp); labels [B] int64. Prompts, refiner and outputs are in CLIP's dtype (float16 for a
    CLIP loaded in fp16, else float32); the state the refiner and checkpoints carry is
    `checkpoint_state()`.
    """

    config_section = "COOP"
    trainable_prefixes: Tuple[str, ...] = ()
    trains_on_all_classes = False  # PromptKD's base-to-novel protocol
    prompts_vision_blocks = False  # MaPLe, PromptSRC, PromptKD: a ViT image encoder only
    checkpoint_name = None  # folder of its checkpoints in a Dassl output dir; None: nothing saved
    # How its original codebase saves it (textrefiner.codebase_checkpoints); None: as the
    # checkpoint name implies (a submodule of that name registered alone, else the whole model)
    codebase_layout = None
    max_grad_norm = None  # both engines clip the gradient norm to this when set (LLaMP: 1.0)
    scores_are_probabilities = False  # forward gives logits (LLaMP: probabilities already)

    def __init__(self, cfg, classnames: Sequence[str], clip_model: nn.Module):
        super().__init__()
        if self.prompts_vision_blocks:
            require_vit(clip_model.visual, type(self).__name__)
        self.classnames = list(classnames)
        self.precision = cfg.TRAINER[self.config_section].PREC
        self.image_encoder = clip_model.visual
        self.logit_scale = clip_model.logit_scale
        self.dims = clip_dims(clip_model)
        self.sem_weight = cfg.TRAINER.REFINER.SEM_WEIGHT
        self.reg_weight = cfg.TRAINER.REFINER.REG_WEIGHT
        self.refiner = None
        self._classifier = None  # class embeddings cached for evaluation
        self._text_memory = cfg.TRAINER.TEXT_ENCODER  # set on every text encoder by _freeze

    # ---------------------------------------------------------------- set-up helpers
    def _attach_refiner(self, cfg, dim: int, token_dim: int, dtype: torch.dtype):
        refiner = build_refiner(cfg, dim, token_dim, self.dims["num_patches"])
        self.refiner = None if refiner is None else refiner.to(dtype)

    def _is_saved(self, name: str) -> bool:
        """Whether a parameter or buffer belongs to what is trained and saved."""
        return name.startswith(tuple(self.trainable_prefixes) + ("refiner.",))

    def _freeze(self):
        """Freeze everything but the method's prompts and the refiner's weights (the last step of
        every method's set-up), and give every text encoder TRAINER.TEXT_ENCODER's options."""
        for name, param in self.named_parameters():
            param.requires_grad_(self._is_saved(name))
        for module in self.modules():
            if isinstance(module, TextEncoder):
                module.checkpointing = self._text_memory.CHECKPOINTING
                module.chunk_size = self._text_memory.CHUNK_SIZE

    # ---------------------------------------------------------------- subclass hooks
    def text_features(self) -> torch.Tensor:
        """Normalised class text features E [C, d] (recomputed while training): by default the
        prompt learner's prompts (and deep prompts) through the text encoder."""
        learner = self.prompt_learner
        features = self.text_encoder(learner(), learner.eot_indices, learner.deep_prompts())
        return F.normalize(features, dim=-1)

    def batch_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """E for one training batch: [C, d] shared by its images (this default), or [B, C, d]
        conditioned on each image's normalised feature (CoCoOp)."""
        return self.text_features()

    def encode_images(self, images: torch.Tensor, return_tokens: bool = False) -> ImageOutput:
        return encode_image(self.image_encoder, images, return_tokens=return_tokens)

    # ---------------------------------------------------------------- classifier
    def refined(self, text: torch.Tensor) -> torch.Tensor:
        """Ehat = refine(E) when TextRefiner is on, else E; E is [C, d] or [B, C, d]."""
        return text if self.refiner is None else self.refiner.refine(text)

    def classifier(self) -> torch.Tensor:
        """E, or Ehat = refine(E) when TextRefiner is on; computed afresh."""
        return self.refined(self.text_features())

    def class_embeddings(self) -> torch.Tensor:
        """The classifier; in eval mode computed once and reused until the next train()/load."""
        if self.training:
            return self.classifier()
        if self._classifier is None:
            with torch.no_grad():
                self._classifier = self.classifier()
        return self._classifier

    @property
    def num_eval_classes(self) -> int:
        return self.class_embeddings().shape[0]

    def invalidate_eval_cache(self):
        """Forget what evaluation computed once (after training steps or loading weights)."""
        self._classifier = None

    def train(self, mode: bool = True):
        self.invalidate_eval_cache()
        super().train(mode)
        # CLIP is frozen and stays in eval mode, as in the codebases (which put only their prompt
        # learners in training mode): a ResNet's BatchNorms keep their running statistics.
        self.image_encoder.eval()
        return self

    # ---------------------------------------------------------------- forward passes
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits [B, C]: plain image encoder against the (cached) classifier."""
        return self.forward_features(self.encode_images(images).features)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Evaluation logits [B, C] from the image encoder's global features [B, d] (as
        `encode_images` returns them; the feature store feeds stored ones here)."""
        features = F.normalize(image_features, dim=-1)
        return image_text_logits(features, self.class_embeddings(), self.logit_scale.exp())

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        """One training forward: returns (loss, {name: detached loss part, "acc": batch %})."""
        out = self.encode_images(images, return_tokens=self.refiner is not None)
        features = F.normalize(out.features, dim=-1)
        text = self.batch_text_features(features)                     # E [C, d] or [B, C, d]
        _, loss, parts = self.classification_losses(text, out, labels, features)
        return loss, parts

    def classification_losses(self, text: torch.Tensor, out: ImageOutput, labels: torch.Tensor,
                              features: torch.Tensor):
        """CE on the classifier (E, or Ehat with TextRefiner, whose semantic and regularisation
        losses are added and whose cache is then written). `features`: out.features normalised,
        by the caller, which uses them too: one normalisation, as in the codebases, whose backward
        then sums the gradients of every use before it runs (two would round otherwise). Returns
        (logits, loss, parts)."""
        scale = self.logit_scale.exp()
        if self.refiner is None:
            logits = image_text_logits(features, text, scale)
            loss = F.cross_entropy(logits, labels)
            return logits, loss, {"loss_cls": loss.detach(), "acc": _accuracy(logits, labels)}

        aligned = self.refiner.align(out.tokens)                      # V' [B, 1+N, d]
        refined = self.refiner.refine(text)                            # read before write
        logits = image_text_logits(features, refined, scale)
        loss_cls = F.cross_entropy(logits, labels)
        semantic = select_semantic_tokens(aligned, out.cls_attention, self.refiner.topk)
        loss_sem = semantic_loss(semantic, text, labels, scale)
        loss_reg = regularization_loss(refined, text)
        self.refiner.update(aligned)
        loss = loss_cls + self.sem_weight * loss_sem + self.reg_weight * loss_reg
        return logits, loss, {"loss_cls": loss_cls.detach(), "loss_sem": loss_sem.detach(),
                              "loss_reg": loss_reg.detach(), "acc": _accuracy(logits, labels)}

    def on_epoch_end(self, epoch: int, max_epoch: int):
        """Called by both engines after each training epoch (`epoch` 0-based), before that epoch's
        checkpoint is saved or the model evaluated. Nothing by default (PromptSRC aggregates its
        weights here)."""

    def run_state(self) -> dict:
        """Training state beyond the weights that a resumed run needs (saved beside `state_dict`
        as "method_state"); empty by default."""
        return {}

    def load_run_state(self, state: Optional[dict]):
        """Restore `run_state()` output (None when the checkpoint holds none)."""

    @property
    def skipped_cache_tokens(self) -> int:
        """Non-finite local tokens the cache refused so far (0 without TextRefiner)."""
        return 0 if self.refiner is None else self.refiner.cache.skipped_tokens

    # ---------------------------------------------------------------- parameters and state
    def trainable_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def optimizer_groups(self, params: Dict[str, nn.Parameter]):
        """What the optimiser gets for `trainable_parameters()`: one group at OPTIM.LR by default
        (LLaMP gives its LoRA weights a learning rate of their own)."""
        return list(params.values())

    def lr_scheduler(self, optimizer, ocfg):
        """The method's own learning-rate schedule over `optimizer`, or None for OPTIM's (Dassl's,
        stepped after each epoch). Both engines step it after each epoch and, when it has one,
        call its `before_batch(epoch, batch_idx, num_batches)` before each training batch."""
        return None

    def checkpoint_state(self) -> Dict[str, torch.Tensor]:
        """Trainable weights plus refiner buffers (cache, BatchNorm statistics)."""
        return {k: v for k, v in self.state_dict().items() if self._is_saved(k)}

    def load_checkpoint_state(self, state: Dict[str, torch.Tensor], source: str = "checkpoint",
                              fresh_refiner: bool = False) -> str:
        """Load `checkpoint_state()` output, or a state_dict in the layout of the method's original
        codebase; returns what was read. Any mismatch is a UserError that says why.

        `fresh_refiner` (training starts from another run's weights): a refiner the checkpoint
        lacks keeps its initial weights, and the checkpoint's refiner is left out when it is off.
        """
        loaded, read = as_own_state(self, state, source)
        if fresh_refiner:
            loaded, note = _fresh_refiner(self, loaded)
            read += note
        expected = self.checkpoint_state()
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        if missing or unexpected:
            raise UserError(_mismatch_message(type(self).__name__, source, missing, unexpected,
                                              self.refiner is not None, state, read))
        for key, value in loaded.items():
            if value.shape != expected[key].shape:
                raise UserError(_shape_message(type(self).__name__, source, key, value.shape,
                                               expected[key].shape))
        self.load_state_dict(loaded, strict=False)
        self.invalidate_eval_cache()
        return read


def _fresh_refiner(model, state):
    """`state` with the refiner as `load_checkpoint_state(fresh_refiner=True)` wants it, and a
    note for the log."""
    has_refiner = any(k.startswith("refiner.") for k in state)
    if model.refiner is None and has_refiner:
        return ({k: v for k, v in state.items() if not k.startswith("refiner.")},
                "; its TextRefiner weights are not used (TextRefiner is off)")
    if model.refiner is not None and not has_refiner:
        fresh = {k: v for k, v in model.checkpoint_state().items() if k.startswith("refiner.")}
        return {**state, **fresh}, "; TextRefiner starts fresh (the checkpoint has none)"
    return state, ""


def image_text_logits(features: torch.Tensor, classifier: torch.Tensor,
                      scale=None) -> torch.Tensor:
    """Logits [B, C] of image features [B, d] against a classifier shared by the batch [C, d] or
    one per image [B, C, d], times `scale` when given. The scale multiplies the features before
    the product, as the codebases write it (`logit_scale * image_features @ text_features.t()`):
    scaling the product instead rounds otherwise, which the logit scale and PromptSRC's and
    PromptKD's loss weights make visible in the first logged loss."""
    classifier = classifier.to(features.dtype)
    if scale is not None:
        features = scale * features
    if classifier.dim() == 2:
        return features @ classifier.t()
    return torch.einsum("bd,bcd->bc", features, classifier)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) == labels).float().mean() * 100.0


def _shape_message(method, source, key, saved, wanted):
    message = (f"{source}: {key!r} has shape {tuple(saved)} but this {method} model expects "
               f"{tuple(wanted)}.")
    if key == "refiner.cache.entries" and saved[1:] == wanted[1:]:
        return message + (f" It was trained with {saved[0]} cache entries: set "
                          f"TRAINER.REFINER.CACHE_SIZE {saved[0]} (--cache-size).")
    return message + (" The checkpoint was trained with another CLIP backbone (embedding size), "
                      "another prompt length, or class-specific prompts for another class list.")


def _mismatch_message(method, source, missing, unexpected, refiner_on, state, read):
    def show(keys):
        return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")

    hint = ""
    if any(k.startswith("refiner.") for k in missing) and is_codebase_read(read):
        hint = (f" It is {read}, and the codebases have no TextRefiner: drop --refiner, or start "
                "training TextRefiner from it with MODEL.INIT_WEIGHTS <this file>.")
    elif any(k.startswith("refiner.") for k in missing):
        hint = " It was trained without TextRefiner: drop --refiner (TRAINER.REFINER.ENABLED)."
    elif any(k.startswith("refiner.") for k in unexpected) and not refiner_on:
        hint = " It was trained with TextRefiner: add --refiner (TRAINER.REFINER.ENABLED True)."
    else:
        hint = " " + what_it_is(state, method)
    parts = [f"{source} does not fit a {method} model."]
    if missing:
        parts.append(f"Missing: {show(missing)}.")
    if unexpected:
        parts.append(f"Unexpected: {show(unexpected)}.")
    return " ".join(parts) + hint
