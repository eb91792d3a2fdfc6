"""Training on N processes (torchrun) that ends as one process with N times the batch ends.

With DISTRIBUTED.EXACT (the default), N ranks x batch b reproduce one process x batch N*b up to
floating-point summation order:

* batches: every rank draws the batches one process draws (same shuffling generator, batches of
  N*b) and keeps its contiguous share of each (`GlobalBatchSampler`, `rank_share`);
* augmentations: for the images of the other ranks' shares a rank replays only the random draws
  (on a blank stand-in of the image's size, `ImageDataset.draw_only`), so every image is augmented
  with the random numbers one process would give it, with or without loader workers;
* BatchNorm that trains (the refiner's alignment MLP, PromptKD's projector) normalises
  over the global batch (`GlobalBatchNorm`, a differentiable all-reduce of sums; it also runs on
  the CPU with gloo, where torch's SyncBatchNorm cannot);
* losses: every term is a mean over the images of a rank's share; rank r's loss is weighted by
  N * n_r / n (`loss_weight`), so DDP's average of the gradients is the gradient of the mean over
  the global batch, also when the shares differ in size (a short last batch);
* the cache is written with the aligned tokens of all ranks in global order (`gather_rows`).

Evaluation splits the test set into contiguous shares without padding and gathers the predictions
in order (`gather_predictions`), so every image is scored exactly once.
"""
import atexit
import inspect
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler
from torch.utils.data import default_collate

from .errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_environment(use_cuda: bool):
    """(rank, world size); joins the process group torchrun describes (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda and torch.cuda.is_available() else "gloo")
        # at exit, not after the run: a process may train several runs in one group
        atexit.register(_leave_process_group)
    return dist.get_rank(), dist.get_world_size()


def _leave_process_group():
    """Leave the process group before the interpreter exits: a gloo group left to the exit's
    destructors can abort a rank ("terminate called without an active exception") once its
    peers are gone. No barrier: a rank that failed must not make the others wait."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, device: torch.device, sync_buffers: bool) -> nn.Module:
    """DistributedDataParallel around `module`; `sync_buffers` False: buffers are broadcast from
    rank 0 once, at construction, not before every forward."""
    ids = [device.index] if device.type == "cuda" else None
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, **{key: sync_buffers})


def barrier():
    if is_distributed():
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves both."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); `tensor` itself when not distributed."""
    if not is_distributed():
        return tensor
    moved = tensor.to(_comm_device(tensor)).clone()
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def rank_share(n: int, rank: int, world: int) -> slice:
    """Positions of rank `rank` among n: contiguous shares whose sizes differ by at most one
    (b each for n = world * b)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of `tensor` from every rank, concatenated in rank order; ranks may hold different
    numbers of rows. No gradient. `tensor` itself when not distributed."""
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    local = tensor.to(device).contiguous()
    counts = [torch.zeros(1, dtype=torch.long, device=device)
              for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=device))
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts),) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)]).to(tensor.device)


# ------------------------------------------------------------------------------------- batches
class GlobalBatchSampler(Sampler):
    """The batches one process draws over `num_items` (RandomSampler with `generator`, batches of
    `global_batch`), each as a list of (index, own) pairs: own for this rank's share.

    Give the same `generator` to the DataLoader: it draws its worker seed from it first, as for
    one process, so that the loader workers' random augmentations repeat too.
    """

    def __init__(self, num_items, global_batch, drop_last, generator, rank, world):
        super().__init__()
        self.batches = BatchSampler(RandomSampler(range(num_items), generator=generator),
                                    global_batch, drop_last)
        self.rank, self.world = rank, world

    def __iter__(self):
        for batch in self.batches:
            share = rank_share(len(batch), self.rank, self.world)
            yield [(index, share.start <= position < share.stop)
                   for position, index in enumerate(batch)]

    def __len__(self):
        return len(self.batches)


class RankShare(torch.utils.data.Dataset):
    """An ImageDataset read with (index, own) keys: own items load as usual; for the others only
    the random augmentation draws are made (the item is None, left out by `collate_share`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, own = key
        if own:
            return self.dataset[index]
        self.dataset.draw_only(index)
        return None


def collate_share(items):
    return default_collate([item for item in items if item is not None])


def check_share_sizes(num_items: int, world: int):
    if num_items < world:
        raise UserError(f"The training set has {num_items} images, fewer than the {world} "
                        "processes: run on fewer processes (torchrun --nproc_per_node).")


def loss_weight(local_count: int, global_count: int, world: int) -> float:
    """Weight of a rank's mean loss so that DDP's gradient average is the gradient of the mean
    over the global batch: N * n_r / n (1 when the shares are equal)."""
    return world * local_count / global_count


def reduce_step(loss: torch.Tensor, parts: dict, local_count: int):
    """(global batch size, loss and parts as means over the global batch) from every rank's means
    over its share, with one all-reduce."""
    values = torch.stack([loss.detach().float().reshape(())]
                         + [torch.as_tensor(v, dtype=torch.float32, device=loss.device).reshape(())
                            for v in parts.values()])
    summed = all_reduce_sum(torch.cat([values.new_tensor([1.0]), values]) * local_count)
    total = int(round(float(summed[0])))
    means = summed[1:] / total
    return total, means[0], dict(zip(parts, means[1:]))


# ------------------------------------------------------------------------------------- BatchNorm
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm (any input [B, C, ...]) that, in training under a process group, normalises
    with the statistics of the global batch and updates its running statistics with them, as one
    process with the whole batch does. Same parameters, buffers and state-dict keys as the
    BatchNorm it replaces (`convert_batchnorm`); otherwise it is that BatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = all_reduce_sum(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = _summed(x.sum(dims)) / count
        centered = x - mean.reshape(shape)
        var = _summed(centered.pow(2).sum(dims)) / count                    # biased, as BN's
        out = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.float().reshape(shape) + self.bias.float().reshape(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased_var.to(self.running_var.dtype))


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks: the gradient of the
    sum of all ranks' losses, which DDP then averages."""

    @staticmethod
    def forward(ctx, local):
        summed = local.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx, grad):
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed)
        return summed


def _summed(local: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(local.to(_comm_device(local))).to(local.device)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every trained BatchNorm inside `module` (the refiner's aligner, PromptKD's
    projector) with a GlobalBatchNorm holding the same parameters and buffers (the optimiser's
    parameters stay the same objects). A frozen CLIP's BatchNorms (a ResNet's) stay as they are:
    they run in eval mode, on their running statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, (GlobalBatchNorm, nn.SyncBatchNorm)) and any(
                    p.requires_grad for p in child.parameters()):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum,
                                          child.affine, child.track_running_stats)
            replacement._parameters = child._parameters
            replacement._buffers = child._buffers
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child)
    return module


# ------------------------------------------------------------------------------------- evaluation
def gather_predictions(evaluator, device):
    """Replace the evaluator's predictions and labels of this rank's share of the test set with
    those of all shares, in order (each rank evaluated a contiguous share)."""
    if not is_distributed():
        return
    for name in ("predictions", "labels"):
        local = torch.cat(getattr(evaluator, name)) if getattr(evaluator, name) else \
            torch.zeros(0, dtype=torch.long)
        setattr(evaluator, name, [gather_rows(local.to(device)).cpu()])
