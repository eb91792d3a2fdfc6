"""PromptSRC (+ TextRefiner when TRAINER.REFINER.ENABLED) as Dassl trainer "TR_PromptSRC".

Its Gaussian prompt aggregation runs in `MethodTrainer.after_epoch` (the method's `on_epoch_end`),
before Dassl saves the epoch's checkpoint, so the last checkpoint holds the aggregated weights.
"""
from dassl.engine import TRAINER_REGISTRY

from .base import MethodTrainer, register_once


class TR_PromptSRC(MethodTrainer):
    method_name = "PromptSRC"


register_once(TRAINER_REGISTRY, TR_PromptSRC)
