"""Dassl.pytorch layer (installed as `textrefiner_trainers`): importing it registers the trainers
"TR_CoOp", "TR_CoCoOp", "TR_LLaMP", "TR_MaPLe", "TR_PromptKD", "TR_PromptSRC", "TR_ZeroshotCLIP"
and the datasets "TR_<Name>".

    import textrefiner_trainers
    cfg.TRAINER.NAME = textrefiner_trainers.TRAINER_NAMES["CoOp"]
    trainer = dassl.engine.build_trainer(cfg)

Nothing else in textrefiner imports this package, so Dassl stays optional.
"""
import logging

from textrefiner.errors import UserError


class DasslNotInstalledError(UserError, ImportError):
    """Dassl.pytorch cannot be imported."""


try:
    import dassl.engine  # noqa: F401
except ImportError as exc:
    raise DasslNotInstalledError(
        f"The Dassl engine needs Dassl.pytorch, which cannot be imported ({exc}). Install "
        "Dassl.pytorch from its GitHub repository (clone it, then `pip install -e .` inside), "
        "or use the standalone engine.") from exc
# Importing Dassl runs `logging.disable(logging.WARNING)` (dassl/data/datasets/dg/wilds, to quiet
# the wilds package), which would silence every warning of the run, e.g. that a few-shot cache
# was refused (textrefiner.safe_load): undo it.
if logging.root.manager.disable == logging.WARNING:
    logging.disable(logging.NOTSET)

from . import datasets  # noqa: E402,F401  (registers the TR_<Name> datasets)
from .base import TRAINER_NAMES, MethodTrainer  # noqa: E402
from .cocoop import TR_CoCoOp  # noqa: E402
from .coop import TR_CoOp  # noqa: E402
from .llamp import TR_LLaMP  # noqa: E402
from .maple import TR_MaPLe  # noqa: E402
from .promptkd import TR_PromptKD  # noqa: E402
from .promptsrc import TR_PromptSRC  # noqa: E402
from .zsclip import TR_ZeroshotCLIP  # noqa: E402

__all__ = ["TRAINER_NAMES", "MethodTrainer", "DasslNotInstalledError",
           "TR_CoOp", "TR_CoCoOp", "TR_LLaMP", "TR_MaPLe", "TR_PromptKD", "TR_PromptSRC",
           "TR_ZeroshotCLIP"]
