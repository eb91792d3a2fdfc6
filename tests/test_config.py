"""Config defaults, YAML loading, validation and the refiner's command-line flags."""

import argparse
import glob
import os

import pytest
from yacs.config import CfgNode as CN

from textrefiner import config as C
from textrefiner.errors import UserError

# Checkouts of the CoOp, MaPLe, PromptKD, PromptSRC (and TextRefiner) codebases whose own YAML files must
# load unchanged, separated by os.pathsep; the test skips when none is given. (Dassl's own trainer
# configs are for its DA/DG/SSL methods and are not part of this.)
EXTERNAL_CODEBASES = [p for p in os.environ.get("TEXTREFINER_CODEBASES", "").split(os.pathsep)
                      if p]

DATASET_NAMES = {
    "imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars", "oxford_flowers": "OxfordFlowers", "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DescribableTextures",
    "eurosat": "EuroSAT", "ucf101": "UCF101", "imagenetv2": "ImageNetV2",
    "imagenet_sketch": "ImageNetSketch", "imagenet_a": "ImageNetA", "imagenet_r": "ImageNetR",
    "synthetic_shapes": "SyntheticShapes",
}

# Same key sets as the three codebases' trainer configs (values of the published files).
COOP_EP50_YAML = """
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 32
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8
INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]
OPTIM:
  NAME: "sgd"
  LR: 0.002
  MAX_EPOCH: 50
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5
TRAIN:
  PRINT_FREQ: 5
MODEL:
  BACKBONE:
    NAME: "ViT-B/16"
"""

MAPLE_YAML = """
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 4
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8
INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]
OPTIM:
  NAME: "sgd"
  LR: 0.0035
  MAX_EPOCH: 5
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5
TRAIN:
  PRINT_FREQ: 20
MODEL:
  BACKBONE:
    NAME: "ViT-B/16"
TRAINER:
  MAPLE:
    N_CTX: 2
    CTX_INIT: "a photo of a"
    PREC: "fp16"
    PROMPT_DEPTH: 9
"""

PROMPTKD_YAML = """
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 8
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8
INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]
OPTIM:
  NAME: "sgd"
  LR: 0.005
  MAX_EPOCH: 20
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5
TRAIN:
  PRINT_FREQ: 20
MODEL:
  BACKBONE:
    NAME: "ViT-B/16"
TEST:
  FINAL_MODEL: "best_val"
  NO_TEST: False
TRAINER:
  PROMPTKD:
    N_CTX_VISION: 4
    N_CTX_TEXT: 4
    CTX_INIT: "a photo of a"
    PREC: "fp16"
    PROMPT_DEPTH_VISION: 9
    PROMPT_DEPTH_TEXT: 9
    TEACHER_NAME: "ViT-L/14"
    PROJECT_LAYER: 2
    CE_WEIGHT: 0.0
    KD_WEIGHT: 1.0
"""


def _cfg_path(*parts):
    return os.path.join(C.CONFIG_DIR, *parts)


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, CN):
            out.update(_flat(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize("base", [C.build_base_cfg, C.get_cfg_default])
def test_defaults_are_the_published_ones(base):
    cfg = C.extend_cfg(base())
    ref = cfg.TRAINER.REFINER
    assert (ref.ENABLED, ref.CACHE_SIZE, ref.MOMENTUM, ref.ALPHA, ref.TOPK) == (False, 25, 0.8, 0.2, 5)
    assert (ref.SEM_WEIGHT, ref.REG_WEIGHT, ref.WRITE_RULE) == (0.02, 20.0, "released")
    assert (ref.KD_SEM_WEIGHT, ref.KD_REG_WEIGHT) == (0.01, 0.02)
    coop = cfg.TRAINER.COOP
    assert (coop.N_CTX, coop.CSC, coop.CTX_INIT, coop.PREC, coop.CLASS_TOKEN_POSITION) == (
        16, False, "", "fp16", "end")
    maple = cfg.TRAINER.MAPLE
    assert (maple.N_CTX, maple.CTX_INIT, maple.PREC, maple.PROMPT_DEPTH) == (2, "a photo of a", "fp16", 9)
    kd = cfg.TRAINER.PROMPTKD
    assert (kd.N_CTX_VISION, kd.N_CTX_TEXT, kd.PROMPT_DEPTH_VISION, kd.PROMPT_DEPTH_TEXT) == (4, 4, 9, 9)
    assert (kd.PROJECT_LAYER, kd.CE_WEIGHT, kd.KD_WEIGHT, kd.TEMPERATURE) == (2, 0.0, 1.0, 1.0)
    assert (kd.TEACHER_NAME, kd.TEACHER_PATH, kd.TEACHER_CKPT) == ("ViT-L/14", "", "")
    assert cfg.TRAINER.MODAL == "base2novel"
    assert cfg.DATASET.SUBSAMPLE_CLASSES == "all"
    assert cfg.MODEL.BACKBONE.PATH == "" and cfg.TEST.NO_TEST is False
    cocoop = cfg.TRAINER.COCOOP  # CoOp repository's train.py
    assert (cocoop.N_CTX, cocoop.CTX_INIT, cocoop.PREC) == (16, "", "fp16")
    for name in ("COCOOP", "IVLP", "PROMPTSRC"):
        assert cfg.TRAINER[name].PREC == "fp16"
    C.validate_cfg(cfg)


def test_fallback_used_without_dassl(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dassl(name, *args, **kwargs):
        if name == "dassl" or name.startswith("dassl."):
            raise ImportError("no dassl here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dassl)
    cfg = C.get_cfg_default()
    assert _flat(cfg) == _flat(C.build_base_cfg())
    assert "MCD" not in cfg.TRAINER


def test_fallback_base_matches_dassl():
    dassl_config = pytest.importorskip("dassl.config")
    dassl = _flat(dassl_config.get_cfg_default())
    ours = _flat(C.build_base_cfg())
    extra = sorted(set(ours) - set(dassl))
    assert not extra, f"keys not in Dassl's defaults: {extra}"
    for key, value in ours.items():
        assert value == dassl[key] and type(value) is type(dassl[key]), key
    # Every Dassl key outside its per-method nodes (TRAINER.MCD, TRAINER.FIXMATCH, ...) is ours too.
    missing = sorted(k for k in dassl if not k.startswith("TRAINER.") and k not in ours)
    assert not missing and "TRAINER.NAME" in ours, f"Dassl keys missing from the fallback: {missing}"


# ---------------------------------------------------------------- extend_cfg


def test_extend_cfg_is_idempotent():
    once = C.extend_cfg(C.build_base_cfg())
    twice = C.extend_cfg(C.extend_cfg(C.build_base_cfg()))
    assert _flat(once) == _flat(twice)


def test_extend_cfg_keeps_existing_keys():
    cfg = C.build_base_cfg()
    cfg.TRAINER.COOP = CN()
    cfg.TRAINER.COOP.N_CTX = 8  # as another codebase's extend_cfg (or a user) left it
    cfg.TRAINER.COOP.PREC = "fp32"
    cfg.TRAINER.MY_METHOD = CN({"X": 1})
    cfg.DATASET.SUBSAMPLE_CLASSES = "base"
    C.extend_cfg(cfg)
    assert cfg.TRAINER.COOP.N_CTX == 8 and cfg.TRAINER.COOP.PREC == "fp32"
    assert cfg.TRAINER.COOP.CLASS_TOKEN_POSITION == "end"  # missing key added
    assert cfg.TRAINER.MY_METHOD.X == 1
    assert cfg.DATASET.SUBSAMPLE_CLASSES == "base"
    assert cfg.TRAINER.REFINER.CACHE_SIZE == 25


def test_extend_cfg_on_frozen_cfg_keeps_it_frozen():
    cfg = C.build_base_cfg()
    cfg.freeze()
    C.extend_cfg(cfg)
    assert cfg.is_frozen() and cfg.TRAINER.REFINER.ALPHA == 0.2


# ---------------------------------------------------------------- shipped YAML files


@pytest.mark.parametrize("name", sorted(DATASET_NAMES))
def test_dataset_configs_load(name):
    cfg = C.load_cfg(dataset_config_file=_cfg_path("datasets", name + ".yaml"))
    assert cfg.DATASET.NAME == DATASET_NAMES[name]


def test_every_shipped_config_loads():
    trainer_files = glob.glob(_cfg_path("trainers", "*", "*.yaml"))
    assert len(trainer_files) >= 7
    for path in trainer_files:
        C.load_cfg(path, _cfg_path("datasets", "imagenet.yaml"))


def _common_published(cfg, batch, lr, epochs):
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == batch and cfg.DATALOADER.TEST.BATCH_SIZE == 100
    assert cfg.OPTIM.NAME == "sgd" and cfg.OPTIM.LR == lr and cfg.OPTIM.MAX_EPOCH == epochs
    assert cfg.OPTIM.LR_SCHEDULER == "cosine"
    assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR) == (1, "constant", 1e-5)
    assert tuple(cfg.INPUT.SIZE) == (224, 224) and cfg.INPUT.INTERPOLATION == "bicubic"
    assert list(cfg.INPUT.PIXEL_MEAN) == [0.48145466, 0.4578275, 0.40821073]
    assert list(cfg.INPUT.PIXEL_STD) == [0.26862954, 0.26130258, 0.27577711]
    assert list(cfg.INPUT.TRANSFORMS) == ["random_resized_crop", "random_flip", "normalize"]
    assert cfg.MODEL.BACKBONE.NAME == "ViT-B/16"


def test_coop_config_is_published():
    cfg = C.load_cfg(_cfg_path("trainers", "CoOp", "vit_b16_ep10_ctxv1.yaml"))
    _common_published(cfg, 32, 0.002, 10)
    coop = cfg.TRAINER.COOP
    assert (coop.N_CTX, coop.CTX_INIT, coop.PREC, coop.CLASS_TOKEN_POSITION, coop.CSC) == (
        4, "a photo of a", "fp16", "end", False)


@pytest.mark.parametrize("suffix, lr, epochs, depth", [("", 0.0035, 5, 9), ("_cross_datasets", 0.0026, 2, 3)])
def test_maple_configs_are_published(suffix, lr, epochs, depth):
    cfg = C.load_cfg(_cfg_path("trainers", "MaPLe", f"vit_b16_c2_ep5_batch4_2ctx{suffix}.yaml"))
    _common_published(cfg, 4, lr, epochs)
    maple = cfg.TRAINER.MAPLE
    assert (maple.N_CTX, maple.CTX_INIT, maple.PREC, maple.PROMPT_DEPTH) == (2, "a photo of a", "fp16", depth)


def test_cocoop_config_is_published():
    cfg = C.load_cfg(_cfg_path("trainers", "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1.yaml"))
    _common_published(cfg, 1, 0.002, 10)
    cocoop = cfg.TRAINER.COCOOP
    assert (cocoop.N_CTX, cocoop.CTX_INIT, cocoop.PREC) == (4, "a photo of a", "fp16")


def _codebase_file(relative):
    found = [os.path.join(repo, relative) for repo in EXTERNAL_CODEBASES
             if os.path.isfile(os.path.join(repo, relative))]
    if not found:
        pytest.skip(f"no checkout in TEXTREFINER_CODEBASES holds {relative}")
    return found[0]


@pytest.mark.parametrize("name, codebase_name", [
    ("CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", None), ("CoOp/rn50_ep50.yaml", None),
    ("CoOp/rn50_ep50_ctxv1.yaml", None), ("CoOp/rn101_ep50.yaml", None),
    ("ZeroshotCLIP/rn50.yaml", "CoOp/rn50.yaml")])  # CoOp's zeroshot.sh reads CoOp/rn50.yaml
def test_configs_equal_the_codebase_files_of_the_same_name(name, codebase_name):
    """configs/trainers/<name> loads to the same config as the codebase's file of that name."""
    published = _flat(C.load_cfg(_codebase_file("configs/trainers/" + (codebase_name or name))))
    assert _flat(C.load_cfg(_cfg_path("trainers", *name.split("/")))) == published


@pytest.mark.parametrize("suffix, depth, modal", [("", 9, "base2novel"), ("_cross_datasets", 3, "cross")])
def test_promptkd_configs_are_published(suffix, depth, modal):
    cfg = C.load_cfg(_cfg_path("trainers", "PromptKD", f"vit_b16_c2_ep20_batch8_4+4ctx{suffix}.yaml"))
    _common_published(cfg, 8, 0.005, 20)
    kd = cfg.TRAINER.PROMPTKD
    assert (kd.KD_WEIGHT, kd.TEMPERATURE, kd.TEACHER_NAME, kd.CE_WEIGHT) == (1000.0, 1.0, "ViT-L/14", 0.0)
    assert (kd.N_CTX_VISION, kd.N_CTX_TEXT, kd.PROMPT_DEPTH_VISION, kd.PROMPT_DEPTH_TEXT) == (4, 4, depth, depth)
    assert cfg.TRAINER.MODAL == modal


@pytest.mark.parametrize("name, batch, lr, backbone, depth, gpa", [
    ("vit_b16_c2_ep20_batch4_4+4ctx", 4, 0.0025, "ViT-B/16", 9, (15, 1)),
    ("vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets", 4, 0.0025, "ViT-B/16", 3, (6, 10)),
    ("vit_l14_c2_ep20_batch8_4+4ctx", 8, 0.005, "ViT-L/14", 9, (15, 1))])
def test_promptsrc_configs_are_published(name, batch, lr, backbone, depth, gpa):
    cfg = C.load_cfg(_cfg_path("trainers", "PromptSRC", f"{name}.yaml"))
    assert cfg.MODEL.BACKBONE.NAME == backbone
    cfg.MODEL.BACKBONE.NAME = "ViT-B/16"  # the rest is shared with the ViT-B/16 recipes
    _common_published(cfg, batch, lr, 20)
    src = cfg.TRAINER.PROMPTSRC
    assert (src.N_CTX_TEXT, src.N_CTX_VISION, src.CTX_INIT, src.PREC) == (4, 4, "a photo of a", "fp16")
    assert (src.PROMPT_DEPTH_TEXT, src.PROMPT_DEPTH_VISION) == (depth, depth)
    assert (src.TEXT_LOSS_WEIGHT, src.IMAGE_LOSS_WEIGHT, src.GPA_MEAN, src.GPA_STD) == (25, 10) + gpa


def test_demo_config_is_tiny():
    cfg = C.load_cfg(_cfg_path("trainers", "CoOp", "demo_cpu.yaml"),
                     _cfg_path("datasets", "synthetic_shapes.yaml"))
    assert tuple(cfg.INPUT.SIZE) == (32, 32) and cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 8
    assert cfg.OPTIM.MAX_EPOCH == 2 and cfg.OPTIM.LR == 0.002 and cfg.DATALOADER.NUM_WORKERS == 0
    assert cfg.TRAINER.COOP.PREC == "fp32" and cfg.TRAINER.COOP.CTX_INIT == "a photo of a"
    assert cfg.DATASET.NAME == "SyntheticShapes"


@pytest.mark.parametrize("text", [COOP_EP50_YAML, MAPLE_YAML, PROMPTKD_YAML], ids=["coop", "maple", "promptkd"])
def test_codebase_style_yaml_loads(tmp_path, text):
    cfg = C.load_cfg(_write(tmp_path, text), _cfg_path("datasets", "oxford_pets.yaml"))
    assert cfg.MODEL.BACKBONE.NAME == "ViT-B/16" and cfg.DATASET.NAME == "OxfordPets"


def _ext_yaml_files():
    files = []
    for repo in EXTERNAL_CODEBASES:
        files += glob.glob(os.path.join(repo, "**", "configs", "**", "*.yaml"), recursive=True)
    return [f for f in sorted(files) if "Dassl.pytorch" not in f]


@pytest.mark.skipif(not EXTERNAL_CODEBASES,
                    reason="set TEXTREFINER_CODEBASES to checkouts of the original codebases")
def test_original_codebase_yamls_load_unchanged():
    files = _ext_yaml_files()
    assert files
    for path in files:
        cfg = C.load_cfg(path)
        if os.sep + "CoCoOp" + os.sep in path:  # CoCoOp's keys reach TRAINER.COCOOP as written
            with open(path) as f:
                written = CN.load_cfg(f).TRAINER.COCOOP
            assert {k: cfg.TRAINER.COCOOP[k] for k in written} == dict(written), path


# ---------------------------------------------------------------- loading errors


def test_unknown_key_in_yaml_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, "TRAINER:\n  REFINER:\n    ALPH: 0.3\n")
    with pytest.raises(UserError) as info:
        C.load_cfg(path)
    msg = str(info.value)
    assert "TRAINER.REFINER.ALPH" in msg and path in msg and "TRAINER.REFINER.ALPHA" in msg


def test_unknown_key_in_opts_suggests_same_leaf():
    with pytest.raises(UserError) as info:
        C.load_cfg(opts=["TRAINER.COOP.KD_WEIGHT", "2.0"])
    msg = str(info.value)
    assert "TRAINER.COOP.KD_WEIGHT" in msg and "TRAINER.PROMPTKD.KD_WEIGHT" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = _write(tmp_path, "TRAINER:\n  COOP:\n    N_CTX: \"four\"\n")
    with pytest.raises(UserError) as info:
        C.load_cfg(path)
    msg = str(info.value)
    assert "TRAINER.COOP.N_CTX" in msg and path in msg and "int" in msg
    with pytest.raises(UserError, match="TRAINER.REFINER.ENABLED"):
        C.load_cfg(opts=["TRAINER.REFINER.ENABLED", "yes"])


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="nope.yaml"):
        C.load_cfg(missing)
    with pytest.raises(UserError, match="nope.yaml"):
        C.load_cfg(dataset_config_file=missing)


def test_odd_opts_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="pairs"):
        C.load_cfg(opts=["SEED"])
    with pytest.raises(UserError, match="bad.yaml"):
        C.load_cfg(_write(tmp_path, "OPTIM: [unclosed\n", "bad.yaml"))


def test_merge_order_and_int_for_float(tmp_path):
    dataset = _write(tmp_path, "DATASET:\n  NAME: A\nOPTIM:\n  LR: 0.1\n", "d.yaml")
    method = _write(tmp_path, "OPTIM:\n  LR: 0.2\nTRAINER:\n  PROMPTKD:\n    KD_WEIGHT: 200\n", "m.yaml")
    cfg = C.load_cfg(method, dataset, opts=["OPTIM.MAX_EPOCH", "3", "TRAINER.REFINER.ALPHA", "0"])
    assert cfg.DATASET.NAME == "A" and cfg.OPTIM.LR == 0.2 and cfg.OPTIM.MAX_EPOCH == 3
    assert cfg.TRAINER.PROMPTKD.KD_WEIGHT == 200.0 and isinstance(cfg.TRAINER.PROMPTKD.KD_WEIGHT, float)
    assert cfg.TRAINER.REFINER.ALPHA == 0.0 and isinstance(cfg.TRAINER.REFINER.ALPHA, float)
    cfg = C.load_cfg(method, opts=["OPTIM.LR", "0.3"], OPTIM__LR=0.4, TRAINER__REFINER__ENABLED=True)
    assert cfg.OPTIM.LR == 0.4 and cfg.TRAINER.REFINER.ENABLED is True


# ---------------------------------------------------------------- validate_cfg


def _valid():
    return C.extend_cfg(C.build_base_cfg())


@pytest.mark.parametrize("key, value", [
    ("TRAINER.REFINER.CACHE_SIZE", 0),
    ("TRAINER.REFINER.MOMENTUM", 1.0),
    ("TRAINER.REFINER.MOMENTUM", -0.1),
    ("TRAINER.REFINER.ALPHA", -0.5),
    ("TRAINER.REFINER.TOPK", 0),
    ("TRAINER.REFINER.SEM_WEIGHT", -1.0),
    ("TRAINER.REFINER.REG_WEIGHT", -1.0),
    ("TRAINER.REFINER.KD_SEM_WEIGHT", -1.0),
    ("TRAINER.REFINER.KD_REG_WEIGHT", -1.0),
    ("TRAINER.REFINER.WRITE_RULE", "eq4"),
    ("TRAINER.COOP.PREC", "fp8"),
    ("TRAINER.PROMPTKD.PREC", "fp64"),
    ("DATASET.SUBSAMPLE_CLASSES", "novel"),
    ("TRAINER.MODAL", "b2n"),
    ("TRAINER.COOP.CLASS_TOKEN_POSITION", "start"),
])
def test_validate_rejects_out_of_range(key, value):
    cfg = _valid()
    cfg.merge_from_list([key, value])
    with pytest.raises(UserError) as info:
        C.validate_cfg(cfg)
    assert key in str(info.value) and repr(value) in str(info.value)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        C.load_cfg(opts=[key, str(value)])


def test_validate_accepts_edges_and_partial_cfgs():
    cfg = _valid()
    cfg.merge_from_list(["TRAINER.REFINER.MOMENTUM", 0.0, "TRAINER.REFINER.ALPHA", 0.0,
                         "TRAINER.REFINER.WRITE_RULE", "paper", "TRAINER.COOP.PREC", "amp"])
    assert C.validate_cfg(cfg) is cfg
    C.validate_cfg(C.build_base_cfg())  # no refiner / method keys: nothing to check


# ---------------------------------------------------------------- command-line flags


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-file", default="")
    C.add_refiner_args(parser)
    return parser.parse_args(argv)


def test_refiner_flags_default_to_none():
    args = _parse([])
    assert args.refiner is False
    for dest in ("cache_size", "cache_momentum", "alpha", "topk", "sem_weight", "reg_weight", "write_rule"):
        assert getattr(args, dest) is None


def test_apply_refiner_args_sets_only_given_flags():
    cfg = C.load_cfg()
    C.apply_refiner_args(cfg, _parse(["--refiner", "--alpha", "0.3"]))
    ref = cfg.TRAINER.REFINER
    assert ref.ENABLED is True and ref.ALPHA == 0.3
    assert (ref.CACHE_SIZE, ref.MOMENTUM, ref.TOPK, ref.SEM_WEIGHT, ref.REG_WEIGHT, ref.WRITE_RULE) == (
        25, 0.8, 5, 0.02, 20.0, "released")


def test_apply_refiner_args_all_flags_on_a_bare_dassl_style_cfg():
    cfg = C.build_base_cfg()  # as a codebase's setup_cfg would hold it, without our keys
    cfg.freeze()
    args = _parse(["--cache-size", "10", "--cache-momentum", "0.5", "--alpha", "0.1", "--topk", "3",
                   "--sem-weight", "0.1", "--reg-weight", "5", "--write-rule", "paper"])
    C.apply_refiner_args(cfg, args)
    ref = cfg.TRAINER.REFINER
    assert ref.ENABLED is False and cfg.is_frozen()
    assert (ref.CACHE_SIZE, ref.MOMENTUM, ref.ALPHA, ref.TOPK, ref.SEM_WEIGHT, ref.REG_WEIGHT, ref.WRITE_RULE) == (
        10, 0.5, 0.1, 3, 0.1, 5.0, "paper")


def test_bad_flag_values_are_rejected():
    with pytest.raises(UserError, match="MOMENTUM"):
        C.apply_refiner_args(C.load_cfg(), _parse(["--cache-momentum", "1.5"]))
    with pytest.raises(SystemExit):
        _parse(["--write-rule", "eq4"])
