"""Optimisers and learning-rate schedules as Dassl defines them (OPTIM.* keys).

Dassl's warm-up wraps its cosine schedule: during the warm-up epochs the learning rate is
WARMUP_CONS_LR ("constant") or ramps linearly ("linear"); afterwards the cosine schedule resumes
from its first step, so epoch e >= W trains at cosine(e - W + 1). Without warm-up epoch e trains at
cosine(e).
"""
import contextlib
import math

import torch

from ..errors import UserError


def build_optimizer(params, ocfg) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise UserError("This method has no trainable parameters: run it with --eval-only.")
    name = ocfg.NAME.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=ocfg.LR, momentum=ocfg.MOMENTUM,
                               weight_decay=ocfg.WEIGHT_DECAY, dampening=ocfg.SGD_DAMPNING,
                               nesterov=ocfg.SGD_NESTEROV)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=ocfg.LR, weight_decay=ocfg.WEIGHT_DECAY,
                   betas=(ocfg.ADAM_BETA1, ocfg.ADAM_BETA2))
    raise UserError(f"OPTIM.NAME {ocfg.NAME!r} is not supported: use sgd, adam or adamw.")


def lr_factor(epoch: int, ocfg) -> float:
    """Learning rate of `epoch` (0-based) as a multiple of OPTIM.LR."""
    warmup = ocfg.WARMUP_EPOCH if ocfg.WARMUP_EPOCH > 0 else 0
    if epoch < warmup:
        if ocfg.WARMUP_TYPE == "constant":
            return ocfg.WARMUP_CONS_LR / ocfg.LR
        if ocfg.WARMUP_TYPE == "linear":
            return max(epoch / warmup, ocfg.WARMUP_MIN_LR / ocfg.LR)
        raise UserError(f"OPTIM.WARMUP_TYPE {ocfg.WARMUP_TYPE!r}: use constant or linear.")
    step = epoch - warmup + 1 if warmup else epoch
    scheduler = ocfg.LR_SCHEDULER
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / ocfg.MAX_EPOCH))
    if scheduler == "single_step":
        stepsize = ocfg.STEPSIZE[-1] if isinstance(ocfg.STEPSIZE, (list, tuple)) else ocfg.STEPSIZE
        stepsize = stepsize if stepsize > 0 else ocfg.MAX_EPOCH  # Dassl: -1 means MAX_EPOCH
        return ocfg.GAMMA ** (step // stepsize)
    if scheduler == "multi_step":
        return ocfg.GAMMA ** sum(step >= m for m in ocfg.STEPSIZE)
    raise UserError(f"OPTIM.LR_SCHEDULER {scheduler!r}: use cosine, single_step or multi_step.")


def build_scheduler(optimizer, ocfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch, like Dassl's schedulers."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, ocfg))


def before_batch(scheduler, epoch: int, batch_idx: int, num_batches: int):
    """Both engines call this before each training batch: a method's own schedule may step
    within an epoch (LLaMP's steps once a tenth into the first); Dassl's schedules do not."""
    hook = getattr(scheduler, "before_batch", None)
    if hook is not None:
        hook(epoch, batch_idx, num_batches)


def backward_and_step(loss, optimizer, scaler=None, max_grad_norm=None):
    """Backward pass and optimiser step (the caller zeroes the gradients). With `max_grad_norm`
    the gradient norm over the optimiser's parameters is clipped to it first, as
    torch.nn.utils.clip_grad_norm_ (amp's scaled gradients are unscaled before)."""
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if max_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def _divergence_advice(precision: str) -> str:
    fp16 = " or use PREC fp32/amp instead of fp16" if precision == "fp16" else ""
    return "lower OPTIM.LR" + fp16


def check_loss(loss, precision: str):
    """A non-finite training loss stops the run before the step spreads it into the weights."""
    if not torch.isfinite(loss.detach()).all():
        raise UserError(f"The training loss became {float(loss.detach())}: "
                        f"{_divergence_advice(precision)}.")


@contextlib.contextmanager
def explained_step_errors(precision: str, optimizer):
    """Around the backward pass and optimiser step: torch's overflow error (fp16 weights cannot
    take a step of lr * grad, e.g. OPTIM.LR 1e6) becomes the same clear message as a NaN loss."""
    try:
        yield
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else float("nan")
        raise UserError(f"The training step overflowed {precision} at learning rate {lr:g} "
                        f"({exc}): {_divergence_advice(precision)}.") from None
