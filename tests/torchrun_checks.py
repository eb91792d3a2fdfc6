"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_distributed.py: the pieces of
textrefiner.distributed against one process holding the whole batch. Exits non-zero on a mismatch.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from textrefiner.distributed import (GlobalBatchNorm, convert_batchnorm, gather_rows,
                                     init_from_environment, loss_weight, rank_share)

TOL = dict(atol=1e-6, rtol=1e-5)


def whole_batch_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def check_batchnorm_and_loss_weight(rank, world):
    """Unequal shares (7 rows over 2 ranks: 4 and 3): outputs, DDP-averaged gradients and running
    statistics equal one process's on the whole batch."""
    torch.manual_seed(1)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    reference = whole_batch_model()
    reference_out = reference(x)
    nn.functional.cross_entropy(reference_out, y).backward()

    model = convert_batchnorm(whole_batch_model())
    assert isinstance(model[1], GlobalBatchNorm)
    frozen = whole_batch_model().requires_grad_(False)
    assert type(convert_batchnorm(frozen)[1]) is nn.BatchNorm1d  # a frozen CLIP's stay as they are
    share = rank_share(len(x), rank, world)
    out = model(x[share])
    weight = loss_weight(out.shape[0], len(x), world)
    (nn.functional.cross_entropy(out, y[share]) * weight).backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad)  # what DDP does: the mean over ranks
        assert torch.allclose(grad / world, ref.grad, **TOL), name
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(model[1], name), getattr(reference[1], name), **TOL), name
    assert int(model[1].num_batches_tracked) == 1
    assert torch.allclose(out, reference_out[share], **TOL)
    model.eval(), reference.eval()
    assert torch.allclose(model(x), reference(x), **TOL)  # evaluation: the running statistics


def check_gather_rows(rank, world):
    rows = torch.full((rank + 1, 2), float(rank))  # rank r holds r + 1 rows
    gathered = gather_rows(rows)
    expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(world)])
    assert torch.equal(gathered, expected)
    assert gather_rows(torch.zeros(0, 3)).shape == (0, 3)


def main():
    rank, world = init_from_environment(use_cuda=False)
    assert world == 2, world
    check_batchnorm_and_loss_weight(rank, world)
    check_gather_rows(rank, world)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main()
