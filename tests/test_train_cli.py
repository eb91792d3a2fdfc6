"""The `textrefiner-train` command on the standalone engine, end to end on the offline demo data.

Each method trains for two epochs on base classes and is then evaluated on the new classes from
its saved checkpoint, with and without `--refiner`; the parse-level tests check that a mistake on
the command line is an exit code 2 with a message naming what to fix.
"""
import glob
import importlib.util
import os

import pytest
import torch

from textrefiner.codebase_checkpoints import as_codebase_state
from textrefiner.train import build_parser, main, run, setup_cfg

DATASET_CFG = "configs/datasets/synthetic_shapes.yaml"
DEMO_CFG = "configs/trainers/CoOp/demo_cpu.yaml"
CACHE_KEY = "refiner.cache.entries"
CHECKPOINT_NAMES = {"CoOp": "prompt_learner", "CoCoOp": "prompt_learner",
                    "MaPLe": "MultiModalPromptLearner", "PromptKD": "VLPromptLearner"}
METHOD_OPTS = {
    "CoOp": (),
    "CoCoOp": ("TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", "a photo of a"),
    "MaPLe": ("TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", "2",
              "INPUT.SIZE", "(32, 32)"),
}


def command(demo, trainer, out, *opts, refiner=False, classes="base", extra=(), shots=2,
            seed=1):
    args = ["--engine", "standalone", "--root", demo["root"], "--trainer", trainer,
            "--seed", str(seed), "--dataset-config-file", DATASET_CFG, "--config-file", DEMO_CFG,
            "--output-dir", str(out)]
    args += (["--refiner"] if refiner else []) + list(extra)
    args += ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", str(shots),
             "DATASET.SUBSAMPLE_CLASSES", classes, "OPTIM.MAX_EPOCH", "2"]
    return args + list(opts)


def read_log(out):
    with open(os.path.join(str(out), "log.txt"), encoding="utf-8") as f:
        return f.read()


def accuracy_lines(out):
    return [line for line in read_log(out).splitlines() if line.startswith("* accuracy:")]


def saved_state(out, name, epoch=2):
    path = os.path.join(str(out), name, f"model.pth.tar-{epoch}")
    assert os.path.isfile(path), f"no checkpoint {path}"
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def check_train_then_eval(demo, tmp_path, trainer, refiner, opts):
    name = CHECKPOINT_NAMES[trainer]
    out = tmp_path / "train_base"
    assert main(command(demo, trainer, out, *opts, refiner=refiner)) == 0
    assert accuracy_lines(out), read_log(out)
    state = saved_state(out, name)
    assert (CACHE_KEY in state) == refiner
    assert glob.glob(os.path.join(str(out), "tensorboard", "events.out.tfevents.*"))

    new = tmp_path / "test_new"
    trainer_obj = run(command(demo, trainer, new, *opts, refiner=refiner, classes="new",
                              extra=("--eval-only", "--model-dir", str(out), "--load-epoch", "2")))
    log = read_log(new)
    assert f"Loaded {os.path.join(str(out), name, 'model.pth.tar-2')}" in log
    assert accuracy_lines(new)
    assert not os.path.exists(os.path.join(str(new), name)), "evaluation must not save weights"
    reloaded = trainer_obj.model.checkpoint_state()
    if refiner:
        assert torch.equal(reloaded[CACHE_KEY].cpu(), state[CACHE_KEY])
    else:
        assert CACHE_KEY not in reloaded
    # without TextRefiner, files use their codebase's names and shapes (CoOp's "ctx", PromptKD's
    # projector as 1x1 convolutions)
    reloaded = as_codebase_state(trainer_obj.model, reloaded)
    for key, value in state.items():
        if "token_prefix" in key or "token_suffix" in key:
            continue  # rebuilt for the new class names
        assert torch.equal(reloaded[key].cpu(), value), key


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("trainer", ["CoOp", "CoCoOp", "MaPLe"])
def test_train_base_then_evaluate_new(demo, tmp_path, trainer, refiner):
    check_train_then_eval(demo, tmp_path, trainer, refiner, METHOD_OPTS[trainer])


# ------------------------------------------------------------------------------ PromptKD
def kd_opts(teacher_ckpt, teacher_clip_path):
    return ("TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt,
            "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
            "TRAINER.PROMPTKD.PREC", "fp32", "TRAINER.PROMPTKD.N_CTX_VISION", "4",
            "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2", "TRAINER.MODAL", "base2novel",
            "INPUT.SIZE", "(32, 32)")


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_promptkd_train_then_evaluate_new(demo, tmp_path, teacher_ckpt, teacher_clip_path,
                                         refiner):
    opts = kd_opts(teacher_ckpt, teacher_clip_path) + ("DATASET.NUM_SHOTS", "0")
    check_train_then_eval(demo, tmp_path, "PromptKD", refiner, opts)


# ------------------------------------------------------------------------------ parsing
def test_unknown_trainer_is_exit_2(demo, tmp_path, capsys):
    assert main(command(demo, "NoSuchMethod", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "NoSuchMethod" in err and "CoOp" in err
    assert not (tmp_path / "out" / "log.txt").exists()


def test_missing_trainer_is_exit_2(capsys):
    assert main(["--engine", "standalone"]) == 2
    assert "--trainer" in capsys.readouterr().err


def test_refiner_flags_set_the_config():
    args = build_parser().parse_args(["--trainer", "CoOp", "--refiner", "--alpha", "0.3",
                                      "--topk", "3", "--cache-size", "7"])
    cfg = setup_cfg(args)
    assert cfg.TRAINER.REFINER.ENABLED is True
    assert cfg.TRAINER.REFINER.ALPHA == pytest.approx(0.3)
    assert cfg.TRAINER.REFINER.TOPK == 3 and cfg.TRAINER.REFINER.CACHE_SIZE == 7
    plain = setup_cfg(build_parser().parse_args(["--trainer", "CoOp"]))
    assert plain.TRAINER.REFINER.ENABLED is False
    assert plain.TRAINER.REFINER.ALPHA == pytest.approx(0.2)


def test_flag_order_defaults_yaml_flags_pairs():
    """KEY VALUE pairs win over the YAML files, which win over the defaults."""
    args = build_parser().parse_args(["--trainer", "CoOp", "--config-file", DEMO_CFG,
                                      "OPTIM.MAX_EPOCH", "7"])
    cfg = setup_cfg(args)
    assert cfg.OPTIM.MAX_EPOCH == 7
    assert cfg.TRAINER.COOP.N_CTX == 4  # from the YAML


def test_unknown_config_key_is_exit_2(demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(command(demo, "CoOp", out, "TRAINER.COOP.NOT_A_KEY", "3")) == 2
    assert "TRAINER.COOP.NOT_A_KEY" in capsys.readouterr().err
    assert not (out / "log.txt").exists()


def test_missing_dataset_root_is_exit_2_and_writes_nothing(demo, tmp_path, capsys):
    out = tmp_path / "out"
    missing = str(tmp_path / "no_such_data")
    args = command(demo, "CoOp", out)
    args[args.index("--root") + 1] = missing
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no_such_data" in err
    assert not (out / "log.txt").exists()
    assert not glob.glob(os.path.join(str(out), "**", "model.pth.tar-*"), recursive=True)
    assert not (out / "tensorboard").exists()


def test_engine_dassl_without_dassl_is_a_clear_error(demo, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "dassl" or name.startswith("dassl.") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    args = command(demo, "CoOp", tmp_path / "out")
    args[args.index("--engine") + 1] = "dassl"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Dassl" in err and "--engine standalone" in err
