"""Zero-shot CLIP, the baseline row: hand-written prompts, nothing trained."""
import torch
import torch.nn.functional as F

from ..clip_backbone import encode_text_tokens, tokenize
from ..errors import UserError
from .base import PromptMethod
from .templates import template_for


class ZeroshotCLIP(PromptMethod):
    """Zero-shot CLIP with CoOp's hand-written prompt per dataset: E [C, d] in CLIP's dtype,
    nothing trained (TextRefiner refused). Reads its precision from cfg.TRAINER.COOP.PREC."""
    config_section = "COOP"  # CoOp's zero-shot baseline reads its precision there

    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg, classnames, clip_model)
        if cfg.TRAINER.REFINER.ENABLED:
            raise UserError("ZeroshotCLIP trains nothing, so TextRefiner (which learns its cache "
                            "and weights in training) cannot be added: drop --refiner.")
        template = template_for(cfg.DATASET.NAME)
        prompts = [template.format(name.replace("_", " ")) for name in classnames]
        with torch.no_grad():
            features = encode_text_tokens(clip_model, tokenize(prompts))
        self.register_buffer("text_feature_bank", F.normalize(features, dim=-1), persistent=False)
        self._freeze()

    def text_features(self) -> torch.Tensor:
        return self.text_feature_bank

    def forward_train(self, images, labels):
        raise RuntimeError("ZeroshotCLIP has nothing to train: run it with --eval-only.")
