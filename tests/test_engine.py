"""The standalone engine's pieces: Dassl's schedule, the evaluator's output, precisions (torchrun:
tests/test_distributed.py)."""
import math

import pytest
import torch

from textrefiner.config import load_cfg
from textrefiner.engine.evaluator import Classification, macro_f1
from textrefiner.engine.optim import build_optimizer, build_scheduler, lr_factor
from textrefiner.train import main



def schedule(*opts):
    cfg = load_cfg(opts=["OPTIM.NAME", "sgd", "OPTIM.LR", "0.002", "OPTIM.MAX_EPOCH", "10",
                         "OPTIM.LR_SCHEDULER", "cosine"] + list(opts))
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.OPTIM)
    scheduler = build_scheduler(optimizer, cfg.OPTIM)
    rates = []
    for _ in range(cfg.OPTIM.MAX_EPOCH):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_constant_warmup_then_cosine_as_dassl_steps_it():
    rates = schedule("OPTIM.WARMUP_EPOCH", "1", "OPTIM.WARMUP_TYPE", "constant",
                     "OPTIM.WARMUP_CONS_LR", "1e-5")
    # Dassl: epoch 0 at the constant rate; its cosine then resumes at step e - W + 1
    expected = [1e-5] + [0.002 * 0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(1, 10)]
    assert rates == pytest.approx(expected, rel=1e-12)


def test_cosine_without_warmup_matches_torch():
    rates = schedule("OPTIM.WARMUP_EPOCH", "0")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    expected = []
    for _ in range(10):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert rates == pytest.approx(expected, rel=1e-9)


def test_single_step_defaults_to_max_epoch_as_dassl():
    rates = schedule("OPTIM.LR_SCHEDULER", "single_step", "OPTIM.WARMUP_EPOCH", "0")
    assert rates == pytest.approx([0.002] * 10)  # STEPSIZE -1: one step, after the last epoch
    cfg = load_cfg(opts=["OPTIM.LR_SCHEDULER", "multi_step", "OPTIM.STEPSIZE", "(2, 4)",
                         "OPTIM.WARMUP_EPOCH", "0"])
    assert [lr_factor(e, cfg.OPTIM) for e in range(5)] == pytest.approx([1, 1, .1, .1, .01])


def test_sgd_takes_dassl_keys():
    cfg = load_cfg(opts=["OPTIM.NAME", "sgd", "OPTIM.MOMENTUM", "0.8", "OPTIM.WEIGHT_DECAY",
                         "0.001"])
    group = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.OPTIM).param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 0.001, False)


def test_evaluator_prints_dassl_lines(capsys):
    evaluator = Classification(3)
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    evaluator.process(logits, torch.tensor([0, 1, 2, 2]))
    results = evaluator.evaluate()
    out = capsys.readouterr().out
    assert "* total: 4\n* correct: 3\n* accuracy: 75.0%\n* error: 25.0%" in out
    # per-class F1: class 0: 1, class 1: p=1/2 r=1 -> 2/3, class 2: p=1 r=1/2 -> 2/3
    assert results["macro_f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3)


def test_macro_f1_skips_absent_classes():
    assert macro_f1(torch.tensor([0, 0]), torch.tensor([0, 0]), 5) == pytest.approx(1.0)


def demo_args(demo, out, *opts, trainer="CoOp"):
    return ["--engine", "standalone", "--root", demo["root"], "--trainer", trainer, "--seed", "1",
            "--refiner", "--dataset-config-file", "configs/datasets/synthetic_shapes.yaml",
            "--config-file", "configs/trainers/CoOp/demo_cpu.yaml", "--output-dir",
            str(out), "MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "2",
            "DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.MAX_EPOCH", "1"] + list(opts)


@pytest.mark.parametrize("trainer, opts", [
    ("CoOp", ("TRAINER.COOP.PREC", "fp16")),
    ("CoOp", ("TRAINER.COOP.PREC", "amp")),
    ("MaPLe", ("TRAINER.MAPLE.PREC", "amp", "TRAINER.MAPLE.PROMPT_DEPTH", "2")),
])
def test_precisions_train_and_evaluate(demo, tmp_path, trainer, opts):
    assert main(demo_args(demo, tmp_path, *opts, trainer=trainer)) == 0
    log = (tmp_path / "log.txt").read_text()
    assert "* accuracy:" in log and "nan" not in log.split("Config:")[-1].lower()
