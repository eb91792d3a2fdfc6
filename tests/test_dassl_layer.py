"""The Dassl layer (`textrefiner_trainers`): registration, training through Dassl's own loop,
checkpoints in Dassl's layout, and eval-only loading on the novel classes."""
import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("dassl")

from dassl.data.datasets import DATASET_REGISTRY  # noqa: E402
from dassl.engine import TRAINER_REGISTRY, build_trainer  # noqa: E402

import textrefiner_trainers  # noqa: E402
from textrefiner.checkpoint import read_checkpoint  # noqa: E402
from textrefiner.config import CONFIG_DIR, ConfigError, load_cfg  # noqa: E402
from textrefiner.data import DATASETS, synthetic_classnames, write_synthetic_dataset  # noqa: E402
from textrefiner.errors import UserError  # noqa: E402

CACHE_KEY = "refiner.cache.entries"
FOLDERS = {"CoOp": "prompt_learner", "CoCoOp": "prompt_learner",
           "MaPLe": "MultiModalPromptLearner", "PromptKD": "VLPromptLearner",
           "PromptSRC": "VLPromptLearner"}
SMALL_OPTS = ["INPUT.SIZE", "(32, 32)", "USE_CUDA", "False", "SEED", "1",
              "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "2",
              "TRAINER.COOP.PREC", "fp32", "TRAINER.MAPLE.PREC", "fp32",
              "TRAINER.PROMPTKD.PREC", "fp32", "TRAINER.COCOOP.PREC", "fp32",
              "TRAINER.MAPLE.PROMPT_DEPTH", "2",
              "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2", "TRAINER.PROMPTSRC.PREC", "fp32",
              "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dassl_data"))
    write_synthetic_dataset(root, num_classes=4, per_class_train=4, per_class_val=2,
                            per_class_test=3, image_size=32)
    return root


def dassl_cfg(trainer, output_dir, clip_path, data_root, *opts):
    """The CPU demo config on the synthetic dataset, for Dassl trainer `trainer` ("CoOp")."""
    cfg = load_cfg(os.path.join(CONFIG_DIR, "trainers", "CoOp", "demo_cpu.yaml"),
                   os.path.join(CONFIG_DIR, "datasets", "synthetic_shapes.yaml"),
                   SMALL_OPTS + ["DATASET.ROOT", data_root, "MODEL.BACKBONE.PATH", clip_path,
                                 "OUTPUT_DIR", str(output_dir),
                                 "TRAINER.NAME", textrefiner_trainers.TRAINER_NAMES[trainer]]
                   + list(opts))
    cfg.freeze()
    return cfg


def saved_state(output_dir, trainer, epoch=2):
    path = os.path.join(output_dir, FOLDERS[trainer], f"model.pth.tar-{epoch}")
    assert os.path.isfile(path), os.listdir(output_dir)
    return read_checkpoint(path)


def assert_state_equal(model, state):
    current = model.checkpoint_state()
    assert sorted(current) == sorted(state)
    for key, value in state.items():
        assert torch.equal(current[key].cpu(), value), key


# ------------------------------------------------------------------------------ registration
def test_names_are_registered():
    for registered in textrefiner_trainers.TRAINER_NAMES.values():
        assert registered in TRAINER_REGISTRY.registered_names()
    for name in DATASETS:
        assert "TR_" + name in DATASET_REGISTRY.registered_names()


def test_importing_twice_raises_nothing():
    for name in ("datasets", "coop", "cocoop", "maple", "promptkd", "zsclip"):
        importlib.reload(importlib.import_module(f"textrefiner_trainers.{name}"))
    importlib.reload(textrefiner_trainers)
    assert TRAINER_REGISTRY.get("TR_CoOp").method_name == "CoOp"


def _forget_our_package(monkeypatch):
    for key in [k for k in sys.modules if k.split(".")[0] == "textrefiner_trainers"]:
        monkeypatch.delitem(sys.modules, key)


def test_original_codebase_registered_first(monkeypatch):
    """CoOp's codebase registers "CoOp" and "OxfordPets" in the same process: ours still load."""
    monkeypatch.setattr(TRAINER_REGISTRY, "_obj_map", {
        k: v for k, v in TRAINER_REGISTRY._obj_map.items() if not k.startswith("TR_")})
    monkeypatch.setattr(DATASET_REGISTRY, "_obj_map", {
        k: v for k, v in DATASET_REGISTRY._obj_map.items() if not k.startswith("TR_")})

    @TRAINER_REGISTRY.register()
    class CoOp:  # noqa: N801  (the original trainer's registry name)
        pass

    @DATASET_REGISTRY.register()
    class OxfordPets:
        pass

    _forget_our_package(monkeypatch)
    fresh = importlib.import_module("textrefiner_trainers")
    assert TRAINER_REGISTRY.get("CoOp") is CoOp
    assert TRAINER_REGISTRY.get("TR_CoOp") is fresh.TR_CoOp
    assert DATASET_REGISTRY.get("OxfordPets") is OxfordPets
    assert "TR_OxfordPets" in DATASET_REGISTRY.registered_names()


def test_without_dassl_the_import_error_says_what_to_install(monkeypatch):
    _forget_our_package(monkeypatch)
    monkeypatch.setitem(sys.modules, "dassl", None)
    with pytest.raises(ImportError, match="install|Install") as info:
        importlib.import_module("textrefiner_trainers")
    assert "Dassl.pytorch" in str(info.value)
    assert isinstance(info.value, UserError)


# ------------------------------------------------------------------------------ train + eval-only
@pytest.mark.parametrize("trainer,refiner", [("CoOp", False), ("CoOp", True), ("MaPLe", True),
                                             ("CoCoOp", True)])
def test_train_then_eval_on_novel_classes(trainer, refiner, clip_path, data_root, tmp_path,
                                          capsys):
    out = tmp_path / "base"
    cfg = dassl_cfg(trainer, out, clip_path, data_root, "DATASET.SUBSAMPLE_CLASSES", "base",
                    "TRAINER.REFINER.ENABLED", str(refiner))
    base = build_trainer(cfg)
    assert cfg.DATASET.NAME == "SyntheticShapes"  # the user's config is left as it was
    assert base.dm.dataset.classnames == synthetic_classnames(4)[:2]
    initial_cache = base.model.checkpoint_state().get(CACHE_KEY, torch.empty(0)).clone()
    base.train()
    assert "* accuracy:" in capsys.readouterr().out

    checkpoint = saved_state(out, trainer)
    assert checkpoint["epoch"] == 2 and checkpoint["optimizer"] is not None
    assert os.path.isfile(os.path.join(out, FOLDERS[trainer], "checkpoint"))
    state = checkpoint["state_dict"]
    if refiner or trainer == "MaPLe":  # our names
        assert all(k.startswith(("prompt_learner.", "refiner.")) for k in state)
    else:  # CoOp's and CoCoOp's codebase names, relative to the prompt learner
        assert "ctx" in state and not any(k.startswith("prompt_learner.") for k in state)
        state = {"prompt_learner." + k: v for k, v in state.items()
                 if k not in ("token_prefix", "token_suffix")}
    assert (CACHE_KEY in state) == refiner
    if refiner:  # the cache was written during training and saved
        assert not torch.equal(state[CACHE_KEY], initial_cache)

    novel = build_trainer(dassl_cfg(trainer, tmp_path / "novel", clip_path, data_root,
                                    "DATASET.SUBSAMPLE_CLASSES", "new",
                                    "TRAINER.REFINER.ENABLED", str(refiner)))
    assert novel.dm.dataset.classnames == synthetic_classnames(4)[2:]
    novel.load_model(str(out), epoch=2)
    assert_state_equal(novel.model, state)
    novel.test()
    assert "* accuracy:" in capsys.readouterr().out


def test_missing_checkpoint_names_the_path(clip_path, data_root, tmp_path):
    trainer = build_trainer(dassl_cfg("CoOp", tmp_path / "out", clip_path, data_root))
    with pytest.raises(UserError, match=r"model\.pth\.tar-7"):
        trainer.load_model(str(tmp_path / "nowhere"), epoch=7)


def test_invalid_precision_is_a_config_error(clip_path, data_root, tmp_path):
    cfg = dassl_cfg("CoOp", tmp_path, clip_path, data_root).clone()
    cfg.defrost()
    cfg.TRAINER.COOP.PREC = "fp8"
    with pytest.raises(ConfigError, match="TRAINER.COOP.PREC"):
        build_trainer(cfg)


def test_zeroshot_clip_evaluates(clip_path, data_root, tmp_path, capsys):
    trainer = build_trainer(dassl_cfg("ZeroshotCLIP", tmp_path / "out", clip_path, data_root))
    trainer.load_model("", epoch=None)
    trainer.test()
    assert "* accuracy:" in capsys.readouterr().out


# ------------------------------------------------------------------------------ PromptKD
def test_promptkd_trains_on_all_classes_and_tests_on_novel(clip_path, teacher_clip_path,
                                                           teacher_ckpt, data_root, tmp_path,
                                                           capsys):
    out = tmp_path / "kd"
    cfg = dassl_cfg("PromptKD", out, clip_path, data_root, "DATASET.NUM_SHOTS", "0",
                    "OPTIM.MAX_EPOCH", "1", "TRAINER.REFINER.ENABLED", "True",
                    "TEST.FINAL_MODEL", "best_val",  # as the published PromptKD config
                    "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
                    "TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt)
    trainer = build_trainer(cfg)
    assert len(trainer.dm.dataset.classnames) == 4  # all classes, unlabelled training
    trainer.train()
    assert "* accuracy:" in capsys.readouterr().out
    assert trainer.model.class_slice == slice(2, None)  # the test split is the novel half

    assert os.path.isfile(os.path.join(out, "VLPromptLearner", "model-best.pth.tar"))
    state = saved_state(out, "PromptKD", epoch=1)["state_dict"]
    assert CACHE_KEY in state and "image_encoder.VPT" in state
    assert not any(k.startswith("teacher.") for k in state)
    again = build_trainer(cfg)
    again.load_model(str(out), epoch=1)
    assert_state_equal(again.model, state)
    assert again.test() == pytest.approx(trainer.test())


def test_training_resumes_from_the_output_dir(clip_path, data_root, tmp_path, capsys):
    """Dassl resumes from OUTPUT_DIR; with warm-up the scheduler state pickles a successor."""
    opts = ["TRAINER.REFINER.ENABLED", "True", "OPTIM.WARMUP_EPOCH", "1"]
    first = build_trainer(dassl_cfg("CoOp", tmp_path, clip_path, data_root,
                                    "OPTIM.MAX_EPOCH", "1", *opts))
    first.train()
    state = saved_state(tmp_path, "CoOp", epoch=1)["state_dict"]

    second = build_trainer(dassl_cfg("CoOp", tmp_path, clip_path, data_root, *opts))
    assert second.resume_model_if_exist(str(tmp_path)) == 1
    assert_state_equal(second.model, state)
    second.train()
    assert "Found checkpoint" in capsys.readouterr().out
    assert saved_state(tmp_path, "CoOp", epoch=2)["epoch"] == 2


# ------------------------------------------------------------------------------ command line
def cli_args(trainer, out, clip_path, data_root, classes, flags=(), opts=()):
    """`textrefiner-train --engine dassl ...` on the synthetic data; flags go before KEY VALUE."""
    return (["--engine", "dassl", "--root", data_root, "--trainer", trainer, "--seed", "1",
             "--dataset-config-file", os.path.join(CONFIG_DIR, "datasets", "synthetic_shapes.yaml"),
             "--config-file", os.path.join(CONFIG_DIR, "trainers", "CoOp", "demo_cpu.yaml"),
             "--output-dir", str(out)] + list(flags)
            + SMALL_OPTS + ["MODEL.BACKBONE.PATH", clip_path, "DATASET.SUBSAMPLE_CLASSES", classes]
            + list(opts))


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("trainer", ["CoOp", "CoCoOp", "MaPLe", "PromptKD", "PromptSRC"])
def test_command_line_on_the_dassl_engine(tmp_path, clip_path, data_root,
                                          teacher_ckpt, teacher_clip_path, trainer, refiner):
    from textrefiner.train import main

    flags = ["--refiner"] if refiner else []
    opts = []
    if trainer == "PromptKD":
        opts = ["TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt, "TRAINER.PROMPTKD.TEACHER_PATH",
                teacher_clip_path, "DATASET.NUM_SHOTS", "0", "TRAINER.MODAL", "base2novel"]
    base, new = tmp_path / "base", tmp_path / "new"
    assert main(cli_args(trainer, base, clip_path, data_root, "base", flags, opts)) == 0
    state = saved_state(str(base), trainer)["state_dict"]
    assert (CACHE_KEY in state) == refiner
    eval_flags = flags + ["--eval-only", "--model-dir", str(base), "--load-epoch", "2"]
    assert main(cli_args(trainer, new, clip_path, data_root, "new", eval_flags, opts)) == 0
    for out in (base, new):
        log = (out / "log.txt").read_text()
        assert "* accuracy:" in log
    assert "Loaded" in (new / "log.txt").read_text()


def test_amp_trains_on_the_cpu_through_dassl(tmp_path, clip_path, data_root):
    from textrefiner.train import main

    args = cli_args("MaPLe", tmp_path, clip_path, data_root, "base", ["--refiner"],
                    ["TRAINER.MAPLE.PREC", "amp", "OPTIM.MAX_EPOCH", "1"])
    assert main(args) == 0
    assert "* accuracy:" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("freq", [0, 2])
def test_textrefiner_train_checkpoints_every_epoch_the_drop_in_as_dassl(tmp_path, clip_path,
                                                                      data_root, monkeypatch,
                                                                      freq):
    """textrefiner-train --engine dassl leaves a checkpoint after every epoch (seen where the
    run stops after each), the previous one removed unless TRAIN.CHECKPOINT_FREQ keeps it; a
    finished run leaves the files Dassl leaves. The drop-in (Dassl's build_trainer, as a
    codebase's train.py calls it) keeps Dassl's behaviour."""
    from textrefiner import faults
    from textrefiner.train import main
    opts = ["OPTIM.MAX_EPOCH", "3", "TRAIN.CHECKPOINT_FREQ", str(freq), "TEST.NO_TEST", "True"]
    seen = {}

    def after_epoch(name):
        def record(epoch):
            folder = tmp_path / name / "prompt_learner"
            seen.setdefault(name, []).append(sorted(os.listdir(folder)) if folder.is_dir()
                                             else [])
        return record

    monkeypatch.setattr(faults, "after_epoch", after_epoch("cli"))
    assert main(cli_args("CoOp", tmp_path / "cli", clip_path, data_root, "base", (), opts)) == 0
    monkeypatch.setattr(faults, "after_epoch", after_epoch("dropin"))
    dropin = build_trainer(dassl_cfg("CoOp", tmp_path / "dropin", clip_path, data_root, *opts))
    assert dropin.checkpoint_every_epoch is False
    dropin.train()
    kept = ["model.pth.tar-2"] if freq == 2 else []
    assert seen["cli"] == [["checkpoint", "model.pth.tar-1"], ["checkpoint", *sorted(
        {"model.pth.tar-2", *kept})], ["checkpoint", *kept, "model.pth.tar-3"]]
    assert seen["dropin"] == [[], ["checkpoint", *kept] if kept else [],
                              ["checkpoint", *kept, "model.pth.tar-3"]]


def test_promptsrc_gpa_sum_survives_a_resume_through_dassl(clip_path, data_root, tmp_path):
    """GPA runs in after_epoch before Dassl saves. A run resumed after epoch 1 of 2 restores the
    running sum from the checkpoint: its final weights are g_1 w_1 (epoch 1 of the first run) +
    g_2 w_2 (its own epoch 2)."""
    gpa = ["TRAINER.PROMPTSRC.GPA_MEAN", "1", "TRAINER.PROMPTSRC.GPA_STD", "1",
           "TRAIN.CHECKPOINT_FREQ", "1", "TEST.NO_TEST", "True"]
    first = tmp_path / "first"
    build_trainer(dassl_cfg("PromptSRC", first, clip_path, data_root, *gpa)).train()
    folder = first / "VLPromptLearner"
    os.remove(folder / "model.pth.tar-2")
    (folder / "checkpoint").write_text("model.pth.tar-1\n")  # as if stopped after epoch 1
    resumed = build_trainer(dassl_cfg("PromptSRC", first, clip_path, data_root, *gpa))
    before_gpa = {}
    aggregate = resumed.model.on_epoch_end

    def record_then_aggregate(epoch, max_epoch):
        before_gpa[epoch] = {k: v.clone() for k, v in resumed.model.checkpoint_state().items()}
        aggregate(epoch, max_epoch)

    resumed.model.on_epoch_end = record_then_aggregate
    resumed.train()
    assert sorted(before_gpa) == [1]
    g = torch.exp(-0.5 * (torch.tensor([1.0, 2.0]) - 1) ** 2)
    g = g / g.sum()
    w1 = saved_state(str(first), "PromptSRC", epoch=1)["state_dict"]
    final = saved_state(str(first), "PromptSRC")["state_dict"]
    for key, value in final.items():
        expected = g[0] * w1[key] + g[1] * before_gpa[1][key]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ feature store
def recorded_test_logits(cfg):
    """The logits Dassl's evaluator receives in `test()` (prompts perturbed the same way)."""
    torch.manual_seed(0)  # the refiner's initial cache
    trainer = build_trainer(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in trainer.model.trainable_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    outputs, process = [], trainer.evaluator.process
    trainer.evaluator.process = lambda mo, gt: (outputs.append(mo.clone()), process(mo, gt))
    trainer.test()
    return torch.cat(outputs)


@pytest.mark.parametrize("trainer", ["CoOp", "CoCoOp"])
def test_feature_store_gives_dassl_the_same_logits(trainer, clip_path, data_root, tmp_path,
                                                   capsys):
    opts = ["TRAINER.REFINER.ENABLED", "True", "TRAINER.COCOOP.N_CTX", "4",
            "DATALOADER.TEST.BATCH_SIZE", "5"]
    plain = recorded_test_logits(dassl_cfg(trainer, tmp_path / "a", clip_path, data_root, *opts))
    store = ["TEST.FEATURE_STORE", str(tmp_path / "store")]
    cold = recorded_test_logits(dassl_cfg(trainer, tmp_path / "b", clip_path, data_root,
                                          *opts, *store))
    warm = recorded_test_logits(dassl_cfg(trainer, tmp_path / "c", clip_path, data_root,
                                          *opts, *store))
    assert torch.equal(plain, cold) and torch.equal(plain, warm)
    out = capsys.readouterr().out
    n = plain.shape[0]
    assert f"0 of {n} images read, {n} computed" in out
    assert f"{n} of {n} images read, 0 computed" in out


def test_maple_through_dassl_says_it_does_not_use_the_feature_store(clip_path, data_root,
                                                                    tmp_path, capsys):
    store = tmp_path / "store"
    trainer = build_trainer(dassl_cfg("MaPLe", tmp_path / "a", clip_path, data_root,
                                      "TEST.FEATURE_STORE", str(store)))
    trainer.test()
    assert "feature store: not used: MaPLe prompts or trains the image encoder" in \
        capsys.readouterr().out
    assert not store.exists()
