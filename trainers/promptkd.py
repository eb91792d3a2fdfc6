"""PromptKD (+ TextRefiner when TRAINER.REFINER.ENABLED) as Dassl trainer "TR_PromptKD".

In base2novel, training uses all classes; evaluation scores the base half on "val" and the novel
half on "test" (the base half with SUBSAMPLE_CLASSES base); `MethodTrainer.test` tells the model
which split it evaluates.
"""
from dassl.engine import TRAINER_REGISTRY

from .base import MethodTrainer, register_once


class TR_PromptKD(MethodTrainer):
    method_name = "PromptKD"


register_once(TRAINER_REGISTRY, TR_PromptKD)
