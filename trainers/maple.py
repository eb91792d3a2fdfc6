"""MaPLe (+ TextRefiner when TRAINER.REFINER.ENABLED) as Dassl trainer "TR_MaPLe"."""
from dassl.engine import TRAINER_REGISTRY

from .base import MethodTrainer, register_once


class TR_MaPLe(MethodTrainer):
    method_name = "MaPLe"


register_once(TRAINER_REGISTRY, TR_MaPLe)
