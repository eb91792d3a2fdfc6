"""TextRefiner: refine prompt-tuned CLIP class embeddings with the model's own local image tokens.

Public API (usable from any training loop):

    LocalCache, FeatureAggregator, FeatureAligner, TextRefiner        (textrefiner.refiner)
    regularization_loss, semantic_loss, semantic_kd_loss, kd_loss,
    select_semantic_tokens                                            (textrefiner.losses)
    load_clip, encode_image, encode_text, ImageOutput                 (textrefiner.clip_backbone)
"""
from .clip_backbone import ImageOutput, encode_image, encode_text, encode_text_tokens, load_clip
from .errors import UserError
from .losses import (kd_loss, regularization_loss, select_semantic_tokens, semantic_kd_loss,
                     semantic_loss)
from .refiner import FeatureAggregator, FeatureAligner, LocalCache, TextRefiner

__version__ = "0.1.0"

__all__ = [
    "LocalCache", "FeatureAggregator", "FeatureAligner", "TextRefiner",
    "regularization_loss", "semantic_loss", "semantic_kd_loss", "kd_loss", "select_semantic_tokens",
    "load_clip", "encode_image", "encode_text", "encode_text_tokens", "ImageOutput", "UserError",
]
