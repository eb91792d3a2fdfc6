"""CoOp: learnable context words shared by all classes (or one set per class), CLIP frozen."""
from ..clip_backbone import TextEncoder
from .base import PromptMethod
from .prompts import PromptLearner, context_length


class CoOp(PromptMethod):
    """CoOp (Zhou et al., IJCV 2022): learned context vectors `ctx` [n_ctx, width] (or
    [C, n_ctx, width] class-specific, `CSC`) around each class name, CLIP frozen; E [C, d] from
    the text encoder, in CLIP's dtype (float16 for PREC fp16, else float32). cfg.TRAINER.COOP."""
    checkpoint_name = "prompt_learner"  # the Dassl model name its codebase saves under
    config_section = "COOP"
    trainable_prefixes = ("prompt_learner.",)

    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg, classnames, clip_model)
        ccfg = cfg.TRAINER.COOP
        self.prompt_learner = PromptLearner(
            classnames, clip_model, context_length(ccfg.CTX_INIT, ccfg.N_CTX), ccfg.CTX_INIT,
            class_specific=ccfg.CSC, position=ccfg.CLASS_TOKEN_POSITION)
        self.text_encoder = TextEncoder(clip_model)
        dim = self.dims["embed_dim"]
        self._attach_refiner(cfg, dim, dim, clip_model.dtype)
        self._freeze()
