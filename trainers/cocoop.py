"""CoCoOp (+ TextRefiner when TRAINER.REFINER.ENABLED) as Dassl trainer "TR_CoCoOp".

Registered under its own name, so the CoOp repository's "CoCoOp" trainer can live in the same
process; checkpoints go to `<output>/prompt_learner/`, as CoCoOp's do.
"""
from dassl.engine import TRAINER_REGISTRY

from .base import MethodTrainer, register_once


class TR_CoCoOp(MethodTrainer):
    method_name = "CoCoOp"


register_once(TRAINER_REGISTRY, TR_CoCoOp)
