"""Zero-shot CLIP (hand-written prompts, nothing trained) as Dassl trainer "TR_ZeroshotCLIP".

Run it with --eval-only; there is nothing to load or save.
"""
from dassl.engine import TRAINER_REGISTRY

from .base import MethodTrainer, register_once


class TR_ZeroshotCLIP(MethodTrainer):
    method_name = "ZeroshotCLIP"


register_once(TRAINER_REGISTRY, TR_ZeroshotCLIP)
