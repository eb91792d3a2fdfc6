"""LLaMP's own training code (its train_llamp.py) on the tiny models of tests/test_llamp.py: its
optimiser, schedule and `train` loop, run by that test in an interpreter with LLaMP's pinned
packages (transformers 4.35, peft 0.4; see docs/llamp.md):

    python tests/llamp_codebase_train.py WORK_DIR LLAMP_CHECKOUT

train_llamp.py imports deepspeed and LLaMP's data code at the top, so it is not imported: its
functions (`get_cosine_schedule_with_warmup` and its lambda, `build_optimizer_parameters`, `train`)
and the statements of its `main` that build the optimiser and the schedule are read from the file
and run as they are. Its deepspeed engine is replaced by `PlainEngine`, as the test runs on a CPU:
deepspeed 0.9.5 (its pin) puts its ZeRO-2 bf16 engine on CUDA with NCCL unless DS_ACCELERATOR=cpu,
which requires Intel's intel_extension_for_pytorch (not among LLaMP's pins).

WORK_DIR/train_setup.pt holds {"schedules": [{"args", "batches"}], "steps": None or the inputs of
tests/llamp_codebase_step.py plus "args" and "batches"}; WORK_DIR/train_codebase.pt gets, per
schedule, each step's group rates and, for "steps", each step's losses, rates and gradient norm
before clipping and the state dicts before and after.
"""
import ast
import math
import os
import sys

import torch
import torch.nn as nn

# main()'s statements that build the optimiser and the schedule (the rest makes deepspeed, the
# data loaders and evaluators)
MAIN_ASSIGNS = {"parameter_group", "optimizer"}
MAIN_CONDITIONS = {"args.freeze_vit", "args.lr_scheduler"}
FUNCTIONS = {"get_cosine_schedule_lambda_with_warmup", "get_cosine_schedule_with_warmup",
             "build_optimizer_parameters", "train"}


def llamp_training_code(checkout):
    """(namespace with train_llamp.py's functions, compiled optimiser/schedule part of main)."""
    path = os.path.join(checkout, "train_llamp.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in FUNCTIONS]
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    picked = [s for s in main.body
              if (isinstance(s, ast.Assign) and len(s.targets) == 1
                  and getattr(s.targets[0], "id", None) in MAIN_ASSIGNS)
              or (isinstance(s, ast.If) and ast.unparse(s.test) in MAIN_CONDITIONS)]
    assert len(functions) == len(FUNCTIONS) and len(picked) == 4, "train_llamp.py has changed"
    from torch.optim import AdamW
    from torch.optim.lr_scheduler import LambdaLR
    from tqdm import tqdm
    from transformers import get_scheduler
    namespace = {"math": math, "torch": torch, "AdamW": AdamW, "LambdaLR": LambdaLR,
                 "tqdm": tqdm, "get_scheduler": get_scheduler}
    exec(compile(ast.Module(functions, []), path, "exec"), namespace)
    return namespace, compile(ast.Module(picked, []), path, "exec")


class PlainEngine:
    """Deepspeed's engine as train_llamp.py uses it, on a CPU in float32: its client AdamW,
    "gradient_clipping": 1.0 (ZeRO-2 scales all groups' gradients by 1 / (norm + 1e-6) when that
    norm exceeds 1, what clip_grad_norm_ does), the gradients zeroed after each step. The loop's
    `.bfloat16()` inputs come back as float32 (deepspeed's bf16 module would take them as they
    are)."""

    def __init__(self, model, optimizer, clipping, record):
        self.module, self.optimizer, self.clipping, self.record = model, optimizer, clipping, record
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def train(self):
        self.module.train()

    def __call__(self, data):
        losses, out = self.module([d.float() if d.is_floating_point() else d for d in data])
        self.record.setdefault("losses", []).append(
            {k: v.detach().clone() for k, v in losses.items()})
        return losses, out

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.record.setdefault("lrs", []).append([g["lr"] for g in self.optimizer.param_groups])
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clipping)
        self.record.setdefault("norms", []).append(float(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class TwoGroups(nn.Module):
    """A stand-in model for the schedule alone: one weight in each of LLaMP's groups."""

    def __init__(self):
        super().__init__()
        self.prompt = nn.Parameter(torch.ones(2))
        self.lora_A = nn.Parameter(torch.ones(2))

    def forward(self, data):
        loss = (self.prompt.sum() + self.lora_A.sum()) * 0
        return {k: loss for k in ("loss_total", "loss_ce", "loss_l1", "loss_dist")}, None


def run_llamp_training(code, model, args, batches, clipping):
    """main()'s optimiser and schedule, then its epoch loop's `train` calls, on `batches`."""
    namespace, main_part = code
    scope = dict(namespace, args=args, model=model)
    exec(main_part, scope)
    record = {}
    engine = PlainEngine(model, scope["optimizer"], clipping, record)
    for epoch in range(args.max_epochs):
        namespace["train"](epoch, engine, None, batches, False, scope["lr_scheduler"],
                           torch.device("cpu"))
    return record


def main(work, checkout):
    sys.path.insert(0, checkout)
    os.chdir(checkout)  # its modules import flags.py and read relative paths
    setup = torch.load(os.path.join(work, "train_setup.pt"), weights_only=False)
    from flags import parser
    code = llamp_training_code(checkout)
    result = {"schedules": []}
    for run in setup["schedules"]:
        args = parser.parse_args(run["args"])
        batches = [[torch.zeros(1), torch.zeros(1), torch.zeros(1)]] * run["batches"]
        result["schedules"].append(
            run_llamp_training(code, TwoGroups(), args, batches, 1.0)["lrs"])
    steps = setup["steps"]
    if steps is not None:
        from llamp_codebase_step import llamp_model
        model = llamp_model(steps)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.manual_seed(steps["step_seed"])
        record = run_llamp_training(code, model, parser.parse_args(steps["args"]),
                                    steps["batches"], 1.0)
        record["initial"] = initial
        record["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result["steps"] = record
    torch.save(result, os.path.join(work, "train_codebase.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
