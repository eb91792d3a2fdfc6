"""What exact distributed training costs: run by `benchmarks/run.py --sections distributed` under
`torchrun --nproc_per_node 2` (or directly, with its own torchrun, the same way).

Per rank, alternating exact and plain rounds (A B A B ...), median of the per-round ratios:
* training step (CoOp + TR forward, backward, SGD step, the step's all-reduce of its loss parts):
  exact = BatchNorm over the global batch (GlobalBatchNorm) and no buffer broadcast; plain = DDP's
  defaults (local BatchNorm, rank 0's buffers broadcast before every forward). Both write the cache
  with every rank's tokens (that gather is needed for identical caches, not for exactness);
* one epoch of data loading over decoded PNG files: exact = the rank's share of the global
  batches plus the replayed augmentation draws of the other ranks' images; plain =
  DistributedSampler.
Wall clock (the collectives wait on the other rank).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from textrefiner.clip_backbone import build_random_clip  # noqa: E402
from textrefiner.config import load_cfg  # noqa: E402
from textrefiner.data import build_loader  # noqa: E402
from textrefiner.data.datasets import build_dataset  # noqa: E402
from textrefiner.distributed import (convert_batchnorm, init_from_environment,  # noqa: E402
                                     loss_weight, reduce_step, wrap_ddp)
from textrefiner.engine.standalone import TrainStep  # noqa: E402
from textrefiner.methods import CoOp  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="{}", help="build_random_clip arguments, JSON")
    p.add_argument("--batch-size", type=int, default=8, help="images per rank")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--data", required=True,
                   help="folder with a synthetic dataset (textrefiner.data.write_synthetic_dataset)")
    p.add_argument("--json", default="", help="rank 0 writes the results here")
    return p.parse_args(argv)


def cfg_for(shape, *opts):
    r = shape.get("image_resolution", 32)
    return load_cfg(opts=["INPUT.SIZE", f"({r}, {r})", "TRAINER.COOP.PREC", "fp32",
                          "TRAINER.COOP.CTX_INIT", "a photo of a", "TRAINER.REFINER.ENABLED",
                          "True", "USE_CUDA", "False", "DATALOADER.NUM_WORKERS", "0"] + list(opts))


def train_step(module, images, labels, optim, exact, world):
    loss, parts = module(images, labels)
    total, _, _ = reduce_step(loss, parts, images.shape[0])
    if exact:
        loss = loss * loss_weight(images.shape[0], total, world)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()


def step_runner(args, shape, exact, rank, world):
    torch.manual_seed(0)
    clip_model = build_random_clip(**shape).float()
    model = CoOp(cfg_for(shape), [f"category {i}" for i in range(args.classes)], clip_model)
    if exact:
        convert_batchnorm(model)
    module = wrap_ddp(TrainStep(model), torch.device("cpu"), sync_buffers=not exact)
    optim = torch.optim.SGD(model.trainable_parameters().values(), lr=1e-3, momentum=0.9)
    res = clip_model.visual.input_resolution
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch_size, 3, res, res, generator=generator)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=generator)

    def run():
        for _ in range(args.steps):
            train_step(module, images, labels, optim, exact, world)
    return run


def loader_runner(args, shape, exact, rank, world):
    cfg = cfg_for(shape, "DATASET.NAME", "SyntheticShapes", "DATASET.ROOT", args.data,
                  "DATASET.NUM_SHOTS", "0")
    items = build_dataset(cfg).train_x

    def run():
        generator = torch.Generator().manual_seed(1)
        if exact:
            loader = build_loader(items, cfg, True, args.batch_size, True, generator=generator,
                                  share=(rank, world))
        else:
            sampler = torch.utils.data.DistributedSampler(range(len(items)), world, rank, seed=1)
            loader = build_loader(items, cfg, True, args.batch_size, False, sampler=sampler,
                                  generator=generator)
        for _ in loader:
            pass
    return run


def alternate(runs, repeats):
    """Median seconds of each variant and the median per-round ratio exact / plain."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    ratios = [e / p for e, p in zip(times["exact"], times["plain"])]
    return {name: statistics.median(t) for name, t in times.items()}, statistics.median(ratios)


def main(argv=None):
    args = parse_args(argv)
    rank, world = init_from_environment(use_cuda=False)
    if world < 2:
        sys.exit("run under torchrun --nproc_per_node 2 (or more)")
    shape = json.loads(args.shape)
    results = {}
    steps = {name: step_runner(args, shape, name == "exact", rank, world)
             for name in ("exact", "plain")}
    for run in steps.values():  # warm-up
        run()
    seconds, ratio = alternate(steps, args.repeats)
    results.update({"dist_step_exact_vs_plain": ratio,
                    "dist_step_s_exact": seconds["exact"] / args.steps,
                    "dist_step_s_plain": seconds["plain"] / args.steps})
    loaders = {name: loader_runner(args, shape, name == "exact", rank, world)
               for name in ("exact", "plain")}
    seconds, ratio = alternate(loaders, args.repeats)
    results.update({"dist_loader_exact_vs_plain": ratio,
                    "dist_loader_s_exact": seconds["exact"],
                    "dist_loader_s_plain": seconds["plain"]})
    if rank == 0:
        print(json.dumps(results), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
