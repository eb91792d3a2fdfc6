"""Config keys (yacs), their defaults, validation, and the command-line flags of the refiner.

Order of precedence, as in Dassl's runners: defaults < dataset YAML < method YAML < `KEY VALUE`
pairs from the command line. `load_cfg` does all of it and turns yacs' errors into `UserError`s.
"""

import copy
import difflib
import os
import re

import yaml
from yacs.config import CfgNode as CN

from .clip_backbone import PRECISIONS, backbone_input_defaults
from .configs import CONFIG_DIR, find_config, not_found
from .errors import UserError
from .methods.prompts import POSITIONS as CLASS_TOKEN_POSITIONS
from .refiner import WRITE_RULES

__all__ = [
    "ConfigError",
    "CONFIG_DIR",
    "get_cfg_default",
    "build_base_cfg",
    "extend_cfg",
    "validate_cfg",
    "load_cfg",
    "add_refiner_args",
    "apply_refiner_args",
    "tr_config_file",
]

SUBSAMPLE_CHOICES = ("all", "base", "new")
MODALS = ("base2novel", "cross")


class ConfigError(UserError):
    """A config value, key or file the user has to fix."""


# Dassl's base keys and defaults, for when Dassl is not installed. The names and values must stay
# those of `dassl.config.get_cfg_default()` (tests/test_config.py compares the two). Dassl's
# per-method nodes (TRAINER.MCD, TRAINER.FIXMATCH, ...) are left out: no method here reads them.
_DASSL_BASE = {
    "VERSION": 1,
    "OUTPUT_DIR": "./output",
    "RESUME": "",
    "SEED": -1,
    "USE_CUDA": True,
    "VERBOSE": True,
    "INPUT": {
        "SIZE": (224, 224),
        "INTERPOLATION": "bilinear",
        "TRANSFORMS": (),
        "NO_TRANSFORM": False,
        "PIXEL_MEAN": [0.485, 0.456, 0.406],
        "PIXEL_STD": [0.229, 0.224, 0.225],
        "CROP_PADDING": 4,
        "RRCROP_SCALE": (0.08, 1.0),
        "CUTOUT_N": 1,
        "CUTOUT_LEN": 16,
        "GN_MEAN": 0.0,
        "GN_STD": 0.15,
        "RANDAUGMENT_N": 2,
        "RANDAUGMENT_M": 10,
        "COLORJITTER_B": 0.4,
        "COLORJITTER_C": 0.4,
        "COLORJITTER_S": 0.4,
        "COLORJITTER_H": 0.1,
        "RGS_P": 0.2,
        "GB_P": 0.5,
        "GB_K": 21,
    },
    "DATASET": {
        "ROOT": "",
        "NAME": "",
        "SOURCE_DOMAINS": (),
        "TARGET_DOMAINS": (),
        "NUM_LABELED": -1,
        "NUM_SHOTS": -1,
        "VAL_PERCENT": 0.1,
        "STL10_FOLD": -1,
        "CIFAR_C_TYPE": "",
        "CIFAR_C_LEVEL": 1,
        "ALL_AS_UNLABELED": False,
    },
    "DATALOADER": {
        "NUM_WORKERS": 4,
        "K_TRANSFORMS": 1,
        "RETURN_IMG0": False,
        "TRAIN_X": {"SAMPLER": "RandomSampler", "BATCH_SIZE": 32, "N_DOMAIN": 0, "N_INS": 16},
        "TRAIN_U": {
            "SAME_AS_X": True,
            "SAMPLER": "RandomSampler",
            "BATCH_SIZE": 32,
            "N_DOMAIN": 0,
            "N_INS": 16,
        },
        "TEST": {"SAMPLER": "SequentialSampler", "BATCH_SIZE": 32},
    },
    "MODEL": {
        "INIT_WEIGHTS": "",
        "BACKBONE": {"NAME": "", "PRETRAINED": True},
        "HEAD": {"NAME": "", "HIDDEN_LAYERS": (), "ACTIVATION": "relu", "BN": True, "DROPOUT": 0.0},
    },
    "OPTIM": {
        "NAME": "adam",
        "LR": 0.0003,
        "WEIGHT_DECAY": 5e-4,
        "MOMENTUM": 0.9,
        "SGD_DAMPNING": 0,
        "SGD_NESTEROV": False,
        "RMSPROP_ALPHA": 0.99,
        "ADAM_BETA1": 0.9,
        "ADAM_BETA2": 0.999,
        "STAGED_LR": False,
        "NEW_LAYERS": (),
        "BASE_LR_MULT": 0.1,
        "LR_SCHEDULER": "single_step",
        "STEPSIZE": (-1,),
        "GAMMA": 0.1,
        "MAX_EPOCH": 10,
        "WARMUP_EPOCH": -1,
        "WARMUP_TYPE": "linear",
        "WARMUP_CONS_LR": 1e-5,
        "WARMUP_MIN_LR": 1e-5,
        "WARMUP_RECOUNT": True,
    },
    "TRAIN": {"CHECKPOINT_FREQ": 0, "PRINT_FREQ": 10, "COUNT_ITER": "train_x"},
    "TEST": {
        "EVALUATOR": "Classification",
        "PER_CLASS_RESULT": False,
        "COMPUTE_CMAT": False,
        "NO_TEST": False,
        "SPLIT": "test",
        "FINAL_MODEL": "last_step",
    },
    "TRAINER": {"NAME": ""},
}

# Keys of the prompt-learning codebases (named as their train.py files name them, so their YAML
# files load unchanged) and of the refiner.
_EXTENSIONS = {
    "TRAINER": {
        "MODAL": "base2novel",
        "COOP": {
            "N_CTX": 16,
            "CSC": False,
            "CTX_INIT": "",
            "PREC": "fp16",
            "CLASS_TOKEN_POSITION": "end",
        },
        "COCOOP": {"N_CTX": 16, "CTX_INIT": "", "PREC": "fp16"},
        "MAPLE": {"N_CTX": 2, "CTX_INIT": "a photo of a", "PREC": "fp16", "PROMPT_DEPTH": 9},
        "IVLP": {
            "N_CTX_VISION": 2,
            "N_CTX_TEXT": 2,
            "CTX_INIT": "a photo of a",
            "PREC": "fp16",
            "PROMPT_DEPTH_VISION": 9,
            "PROMPT_DEPTH_TEXT": 9,
        },
        "VPT": {"N_CTX_VISION": 2, "CTX_INIT": "a photo of a", "PREC": "fp16", "PROMPT_DEPTH_VISION": 1},
        "PROMPTSRC": {
            "N_CTX_VISION": 4,
            "N_CTX_TEXT": 4,
            "CTX_INIT": "a photo of a",
            "PREC": "fp16",
            "PROMPT_DEPTH_VISION": 9,
            "PROMPT_DEPTH_TEXT": 9,
            "TEXT_LOSS_WEIGHT": 25,
            "IMAGE_LOSS_WEIGHT": 10,
            "GPA_MEAN": 15,
            "GPA_STD": 1,
        },
        "PROMPTKD": {
            "N_CTX_VISION": 4,
            "N_CTX_TEXT": 4,
            "CTX_INIT": "a photo of a",
            "PREC": "fp16",
            "PROMPT_DEPTH_VISION": 9,
            "PROMPT_DEPTH_TEXT": 9,
            "PROJECT_LAYER": 2,
            "CE_WEIGHT": 0.0,
            "KD_WEIGHT": 1.0,
            "TEMPERATURE": 1.0,
            "TEACHER_NAME": "ViT-L/14",
            "TEACHER_PATH": "",  # local teacher CLIP file; empty = download by TEACHER_NAME
            "TEACHER_CKPT": "",  # teacher prompt checkpoint (model-best.pth.tar)
        },
        # LLaMP's base-to-new recipe (its scripts/launch/launch.sh); textrefiner.methods.llamp
        "LLAMP": {
            "PREC": "bf16",  # deepspeed's bf16: bfloat16 where the device has it, else float32
            "LLM": "meta-llama/Llama-2-7b-chat-hf",  # local folder or hub name
            "FILES_DIR": "",  # folder of the two cached files; empty = the dataset's folder
            "NUM_DECODER_LAYERS": 1,
            "NUM_LLM_PROMPTS": 16,
            "LLM_PROMPT_DEPTH": 9,
            "TEXT_PROMPT_DEPTH": 9,
            "N_CTX_TEXT": 4,
            "N_CTX_VISION": 4,
            "VISUAL_PROMPT_DEPTH": 6,
            "NUM_TEXT_TEMPLATE": 11,
            "LORA_RANK": 8,
            "LORA_ALPHA": 16.0,
            "LORA_DROPOUT": 0.1,
            "LORA_LR": 2e-5,
            "V_LORA_START": 6,
            "V_LORA_END": 12,
            "FREEZE_DECODER_KV": True,
            "FREEZE_DECODER_FFN": True,
            "LAMBDA_DIST": 2.5,
            "LABEL_SMOOTHING": 0.0,
            "PROMPT_DROPOUT": 0.0,
        },
        # Memory of the text encoder for many classes (exact either way): recompute its blocks'
        # activations in the backward pass, and / or encode at most CHUNK_SIZE prompts at a time.
        "TEXT_ENCODER": {"CHECKPOINTING": False, "CHUNK_SIZE": 0},
        "REFINER": {
            "ENABLED": False,
            "CACHE_SIZE": 25,
            "MOMENTUM": 0.8,
            "ALPHA": 0.2,
            "TOPK": 5,
            "SEM_WEIGHT": 0.02,
            "REG_WEIGHT": 20.0,
            "WRITE_RULE": "released",
            # PromptKD form: the two loss weights are multiples of TRAINER.PROMPTKD.KD_WEIGHT
            "KD_SEM_WEIGHT": 0.01,
            "KD_REG_WEIGHT": 0.02,
        },
    },
    # FOLDER: DATASET.NAME "ImageFolder"'s folder of class folders, absolute or under ROOT;
    # "" = ROOT itself (textrefiner.data.folder)
    "DATASET": {"SUBSAMPLE_CLASSES": "all", "FOLDER": ""},
    "MODEL": {"BACKBONE": {"PATH": ""}},  # local CLIP file; empty = download by NAME
    # Under torchrun, end as one process with the global batch ends (textrefiner.distributed);
    # False: plain DDP (per-rank sampling, augmentation RNG and BatchNorm statistics).
    "DISTRIBUTED": {"EXACT": True},
    # Folder of the feature store: evaluation reads the frozen image encoder's features of each
    # test image from it, computing only what is missing (textrefiner.feature_store); "": off
    "TEST": {"NO_TEST": False, "FEATURE_STORE": ""},
}


# ---------------------------------------------------------------------------- defaults


def build_base_cfg():
    """Our copy of Dassl's base config (used when Dassl is not importable)."""
    return CN(copy.deepcopy(_DASSL_BASE))


def get_cfg_default():
    """Dassl's default config when Dassl is installed, else our copy of its base keys."""
    try:
        from dassl.config import get_cfg_default as dassl_default
    except ImportError:
        return build_base_cfg()
    return dassl_default()


def _add_missing(node, defaults):
    for key, value in defaults.items():
        if key not in node:
            node[key] = CN(copy.deepcopy(value)) if isinstance(value, dict) else copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(node[key], CN):
            _add_missing(node[key], value)


def extend_cfg(cfg):
    """Add the method and refiner keys that `cfg` lacks; existing keys keep their values."""
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    _add_missing(cfg, _EXTENSIONS)
    if was_frozen:
        cfg.freeze()
    return cfg


# ---------------------------------------------------------------------------- validation


def _node(cfg, dotted):
    """The sub-node at `dotted`, or None when the config does not have it."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, CN) or part not in node:
            return None
        node = node[part]
    return node


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refiner_problems(refiner):
    rules = [
        ("CACHE_SIZE", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
         "an integer >= 1", "--cache-size"),
        ("MOMENTUM", lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)", "--cache-momentum"),
        ("ALPHA", lambda v: _is_number(v) and v >= 0, ">= 0", "--alpha"),
        ("TOPK", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
         "an integer >= 1", "--topk"),
        ("SEM_WEIGHT", lambda v: _is_number(v) and v >= 0, ">= 0", "--sem-weight"),
        ("REG_WEIGHT", lambda v: _is_number(v) and v >= 0, ">= 0", "--reg-weight"),
        ("KD_SEM_WEIGHT", lambda v: _is_number(v) and v >= 0, ">= 0", None),
        ("KD_REG_WEIGHT", lambda v: _is_number(v) and v >= 0, ">= 0", None),
        ("WRITE_RULE", lambda v: v in WRITE_RULES, "one of " + ", ".join(WRITE_RULES), "--write-rule"),
    ]
    problems = []
    for key, ok, expected, flag in rules:
        if key in refiner and not ok(refiner[key]):
            how = f" (flag {flag})" if flag else ""
            problems.append(f"TRAINER.REFINER.{key} must be {expected}, got {refiner[key]!r}{how}")
    return problems


def _choice_problem(cfg, dotted, choices):
    parent, _, key = dotted.rpartition(".")
    node = _node(cfg, parent) if parent else cfg
    if node is None or key not in node or node[key] in choices:
        return []
    return [f"{dotted} must be one of {', '.join(choices)}, got {node[key]!r}"]


def validate_cfg(cfg):
    """Raise ConfigError listing every out-of-range value; return `cfg` when all are fine."""
    problems = []
    refiner = _node(cfg, "TRAINER.REFINER")
    if refiner is not None:
        problems += _refiner_problems(refiner)
    trainer = _node(cfg, "TRAINER")
    for name, sub in (trainer.items() if trainer is not None else []):
        if isinstance(sub, CN) and "PREC" in sub:
            problems += _choice_problem(cfg, f"TRAINER.{name}.PREC", PRECISIONS)
    problems += _choice_problem(cfg, "DATASET.SUBSAMPLE_CLASSES", SUBSAMPLE_CHOICES)
    problems += _choice_problem(cfg, "TRAINER.MODAL", MODALS)
    problems += _choice_problem(cfg, "TRAINER.COOP.CLASS_TOKEN_POSITION", CLASS_TOKEN_POSITIONS)
    chunk = _node(cfg, "TRAINER.TEXT_ENCODER.CHUNK_SIZE")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
        problems.append(f"TRAINER.TEXT_ENCODER.CHUNK_SIZE must be an integer >= 0 (0: all "
                        f"prompts at once), got {chunk!r}")
    if problems:
        raise ConfigError(
            "Invalid config value(s):\n  " + "\n  ".join(problems)
            + "\nFix them in the YAML file or on the command line (KEY VALUE)."
        )
    return cfg


# ---------------------------------------------------------------------------- loading


def _flat_keys(node, prefix=""):
    keys = []
    for key, value in node.items():
        full = prefix + key
        keys += _flat_keys(value, full + ".") if isinstance(value, CN) else [full]
    return keys


def _suggest(cfg, key):
    """Up to three existing keys close to `key` (same leaf name first, then by spelling)."""
    keys = _flat_keys(cfg)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    ranked = list(dict.fromkeys(close + same_leaf))[:3]
    if ranked:
        return "Did you mean: " + ", ".join(ranked) + "?"
    return "Run with a valid key; see textrefiner/config.py for the list of keys."


def _default_of(cfg, key):
    parent, _, leaf = key.rpartition(".")
    node = _node(cfg, parent) if parent else cfg
    return node[leaf] if node is not None and leaf in node else None


def _friendly_error(cfg, err, source):
    """Turn a yacs KeyError/AssertionError/ValueError into a ConfigError naming key and source."""
    text = err.args[0] if err.args else str(err)
    unknown = re.search(r"Non-existent (?:config )?key: (\S+)", str(text))
    if unknown:
        key = unknown.group(1)
        return ConfigError(f"Unknown config key {key} in {source}. {_suggest(cfg, key)}")
    mismatch = re.search(r"for config key: (\S+)", str(text))
    if mismatch:
        key = mismatch.group(1)
        default = _default_of(cfg, key)
        kind = type(default).__name__
        return ConfigError(
            f"Wrong type for {key} in {source}: expected {kind} like the default {default!r}. "
            f"Write the value in that type (e.g. 1000.0 for a float, quoted text for a str). "
            f"yacs said: {text}"
        )
    return ConfigError(f"Cannot merge {source}: {text}")


def _widen_ints(new, base):
    """Let an int stand for a float default (yacs alone rejects `KD_WEIGHT: 1000`)."""
    for key, value in new.items():
        if key not in base:
            continue
        if isinstance(value, CN) and isinstance(base[key], CN):
            _widen_ints(value, base[key])
        elif isinstance(base[key], float) and isinstance(value, int) and not isinstance(value, bool):
            new[key] = float(value)


def _merge_yaml(cfg, name, role):
    try:
        path = find_config(name, role)
    except UserError as err:
        raise ConfigError(str(err)) from None
    source = f"{role} config file {path}"
    try:
        with open(path, "r") as f:
            loaded = CN.load_cfg(f)
    except (yaml.YAMLError, AssertionError, ValueError, SyntaxError) as err:
        raise ConfigError(f"Cannot read {source}: {err}") from err
    _widen_ints(loaded, cfg)
    try:
        cfg.merge_from_other_cfg(loaded)
    except (KeyError, AssertionError, ValueError) as err:
        raise _friendly_error(cfg, err, source) from err


def _merge_saved(cfg, text: str):
    """Merge a dumped configuration; keys this installation does not know (one saved where another
    Dassl version added keys) are left out, since nothing here reads them."""
    loaded = CN.load_cfg(text)
    _drop_unknown(loaded, cfg)
    _widen_ints(loaded, cfg)
    cfg.merge_from_other_cfg(loaded)


def _drop_unknown(new, base):
    for key in list(new):
        if key not in base:
            del new[key]
        elif isinstance(new[key], CN) and isinstance(base[key], CN):
            _drop_unknown(new[key], base[key])


def _merge_pairs(cfg, pairs, source):
    pairs = list(pairs)
    if len(pairs) % 2:
        raise ConfigError(f"{source} must be KEY VALUE pairs, got an odd number of items: {pairs}")
    widened = []
    for key, value in zip(pairs[0::2], pairs[1::2]):
        value = CN._decode_cfg_value(value)
        default = _default_of(cfg, key) if isinstance(key, str) else None
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        widened += [key, value]
    try:
        cfg.merge_from_list(widened)
    except (KeyError, AssertionError, ValueError) as err:
        raise _friendly_error(cfg, err, source) from err


def load_cfg(config_file=None, dataset_config_file=None, opts=(), saved=None, **overrides):
    """Defaults -> extend -> `saved` -> dataset YAML -> method YAML -> `opts` -> `overrides`;
    validated. For an "hf:" backbone, its folder's input size and normalisation replace the
    defaults (`backbone_input_defaults`), so what a config file or option sets still wins (and
    `check_image_size` stops a run where that contradicts the folder). `saved` is a configuration
    a run saved (`cfg.dump()`, in its checkpoints). The YAML files are found by
    `textrefiner.configs.find_config`: a path, your own copy under ./configs/, or a shipped file
    by name (`CoOp/demo_tiny`, `image_folder`).

    `opts` is the command line's list of `KEY VALUE` pairs. `overrides` are keyword pairs with
    `__` in place of dots, e.g. `load_cfg(f, OUTPUT_DIR="out", TRAINER__REFINER__ENABLED=True)`.
    Returns an unfrozen CfgNode. Raises ConfigError (a UserError) for unknown keys, wrong types,
    missing files and out-of-range values.
    """
    sources = (config_file, dataset_config_file, opts, saved, overrides)
    cfg = _merge_sources(extend_cfg(get_cfg_default()), *sources)
    inputs = backbone_input_defaults(cfg)
    if inputs:  # merged again over the folder's values, which only the defaults give way to
        base = extend_cfg(get_cfg_default())
        for key, value in inputs.items():
            base.INPUT[key] = type(base.INPUT[key])(value)
        cfg = _merge_sources(base, *sources)
    return validate_cfg(cfg)


def _merge_sources(cfg, config_file, dataset_config_file, opts, saved, overrides):
    if saved:
        _merge_saved(cfg, saved)
    if dataset_config_file:
        _merge_yaml(cfg, str(dataset_config_file), "dataset")
    if config_file:
        _merge_yaml(cfg, str(config_file), "method")
    if opts:
        _merge_pairs(cfg, opts, "command-line options")
    if overrides:
        pairs = []
        for key, value in overrides.items():
            pairs += [key.replace("__", "."), value]
        _merge_pairs(cfg, pairs, "keyword overrides")
    return cfg


# ---------------------------------------------------------------------------- command line

# flag dest -> (TRAINER.REFINER key, argparse type, help)
_REFINER_FLAGS = {
    "cache_size": ("CACHE_SIZE", int, "number of local-cache entries M (default 25)"),
    "cache_momentum": ("MOMENTUM", float, "cache update momentum in [0, 1) (default 0.8)"),
    "alpha": ("ALPHA", float, "weight of the refined text features (default 0.2)"),
    "topk": ("TOPK", int, "patches kept by attention for the semantic loss (default 5)"),
    "sem_weight": ("SEM_WEIGHT", float, "semantic loss weight lambda1 (default 0.02)"),
    "reg_weight": ("REG_WEIGHT", float, "regularisation loss weight lambda2 (default 20)"),
    "write_rule": ("WRITE_RULE", str, "cache write weights: released (default) or paper (Eq. 4)"),
}


def add_refiner_args(parser):
    """Add `--refiner` and the refiner's hyper-parameter flags to an argparse parser.

    A CoOp-style train.py gains them in two lines:

        add_refiner_args(parser)            # where the parser is built
        apply_refiner_args(cfg, args)       # in setup_cfg, after the YAML files, before freeze()

    Flags left out keep the config's values. Returns the argument group.
    """
    group = parser.add_argument_group("TextRefiner")
    group.add_argument("--refiner", action="store_true", help="plug the TextRefiner into the method")
    for dest, (_, kind, help_text) in _REFINER_FLAGS.items():
        extra = {"choices": WRITE_RULES} if dest == "write_rule" else {}
        group.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, default=None,
                           help=help_text, **extra)
    return group


def apply_refiner_args(cfg, args, check_trainer: bool = True):
    """Copy the flags of `add_refiner_args` that were given into TRAINER.REFINER; validated.

    With TextRefiner on, the trainer (TRAINER.NAME, or `args.trainer`) must be one of ours
    ("TR_CoOp", ...): a codebase's own "CoOp" would train without it. `check_trainer=False` is
    for runners that map plain method names to ours (textrefiner-train)."""
    extend_cfg(cfg)
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    refiner = cfg.TRAINER.REFINER
    if getattr(args, "refiner", False):
        refiner.ENABLED = True
    for dest, (key, kind, _) in _REFINER_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            refiner[key] = kind(value)
    if was_frozen:
        cfg.freeze()
    if check_trainer and refiner.ENABLED:
        _require_refiner_trainer(cfg.TRAINER.NAME or getattr(args, "trainer", "") or "")
    return validate_cfg(cfg)


TRAINER_PREFIX = "TR_"  # the Dassl layer's registry names: TR_CoOp, TR_MaPLe, ...


def _require_refiner_trainer(name: str):
    from .methods import METHODS

    trained = [method for method in METHODS if method != "ZeroshotCLIP"]
    if not name or (name.startswith(TRAINER_PREFIX) and name[len(TRAINER_PREFIX):] in METHODS):
        return
    ours = ", ".join(TRAINER_PREFIX + method for method in trained)
    if name in METHODS:
        raise ConfigError(
            f"--refiner with --trainer {name}: that is the codebase's own {name} trainer, which "
            f"ignores TRAINER.REFINER and would train without TextRefiner. Use --trainer "
            f"{TRAINER_PREFIX}{name} (import textrefiner_trainers first).")
    raise ConfigError(f"--refiner with --trainer {name}: TextRefiner runs only in the trainers "
                      f"of textrefiner_trainers ({ours}).")


def tr_config_file(path: str) -> str:
    """The file a codebase's train.py should read for `--config-file path`: the path itself when
    it exists; for a CoOp-style script's `configs/trainers/${TRAINER}/<file>.yaml` with
    TRAINER=TR_<Method>, the method's own `configs/trainers/<Method>/<file>.yaml`; for a name of a
    file shipped with textrefiner that the repository lacks (`CoOp/demo_tiny`,
    `configs/trainers/CoOp/demo_tiny.yaml`), the shipped file (see `textrefiner.configs`).
    Raises ConfigError when none exists."""
    if not path or os.path.isfile(path):
        return path
    renamed = os.sep.join(part[len(TRAINER_PREFIX):] if part.startswith(TRAINER_PREFIX) else part
                          for part in os.path.normpath(path).split(os.sep))
    try:
        return find_config(renamed, "method")
    except UserError:
        shown = path if renamed == path else f"{path} (nor {renamed})"
        raise ConfigError(not_found(shown, "method")) from None
