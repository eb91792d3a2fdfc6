"""LLaMP (+ TextRefiner when TRAINER.REFINER.ENABLED) as Dassl trainer "TR_LLaMP"."""
from dassl.engine import TRAINER_REGISTRY

from .base import MethodTrainer, register_once


class TR_LLaMP(MethodTrainer):
    method_name = "LLaMP"


register_once(TRAINER_REGISTRY, TR_LLaMP)
