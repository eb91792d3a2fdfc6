"""CoOp (+ TextRefiner when TRAINER.REFINER.ENABLED) as Dassl trainer "TR_CoOp"."""
from dassl.engine import TRAINER_REGISTRY

from .base import MethodTrainer, register_once


class TR_CoOp(MethodTrainer):
    method_name = "CoOp"


register_once(TRAINER_REGISTRY, TR_CoOp)
