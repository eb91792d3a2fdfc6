"""A sweep's YAML spec, its validation, and its expansion into runs (textrefiner.sweep.plan.Run).

    protocol: base2new          # base2new (scripts/base2new.sh) or xd (scripts/xd.sh)
    datasets: [eurosat, dtd]    # configs/datasets/<name>.yaml (xd: the training set, imagenet),
                                # or folders of one's own images ("~/photos/pets", "{out}/shapes":
                                # an entry with a "/"), named after the folder
    targets: [imagenetv2, ...]  # xd only: the test sets (default: xd.sh's 14)
    methods:                    # a trainer, "<trainer>+TR" (--refiner), or a mapping:
      - CoOp
      - CoOp+TR
      - {method: ZeroshotCLIP, seeds: [1]}
      - {method: CoOp+TR, variant: no_losses, overrides: {TRAINER.REFINER.SEM_WEIGHT: 0}}
    seeds: [1, 2, 3]
    config: vit_b16_ep10_ctxv1  # configs/trainers/<trainer>/<config>.yaml, or {trainer: name};
                                # default: the scripts' per trainer
    shots: 16                   # default: the scripts' per trainer
    engine: standalone          # textrefiner-train --engine (default: its own, auto)
    root: "{out}/data"          # datasets folder (default: --root); {out} is the sweep's OUT
    overrides: {KEY: VALUE}     # config overrides of every run ({out} and {root} replaced)
    grid:                       # every combination of these values; a list of mappings is the
      TRAINER.REFINER.CACHE_SIZE: [5, 10, 25, 50, 100]   # union of their grids
    paper: table1               # the published numbers the report puts beside each cell
    prepare: demo               # make the demo's data and tiny CLIP in OUT first

Config names resolve as textrefiner-train's (textrefiner.configs.find_config): your own file
under ./configs/ where there is one, else the shipped file; the runs get its absolute path.

The run folders are the scripts': OUT/base2new/{train_base,test_new}/<dataset>/shots_<K>/<method>/
<config>/seed<S> and OUT/xd/{train,test}/<dataset>/shots_<K>/<method>/<config>/seed<S>. A method
entry's `variant` and a grid point are added to the <config> folder name after "@"
("vit_b16_ep10_ctxv1@CACHE_SIZE=5"), so each setting has its own folder at the depth
`textrefiner-results` and the codebases' parse_test_res.py read.

LLaMP's runs need their datasets' LLM files: the plan puts one `textrefiner-llamp-cache` run per
dataset (OUT/llamp_cache/<DATASET.NAME>) before the first run that reads them; it is finished,
and skipped, when the files exist in the dataset's folder.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..configs import CONFIG_DIR, ROLES, config_names, find_config
from ..errors import UserError
from .plan import LLAMP_CACHE_PROGRAM, TRAIN_PROGRAM, TRAINERS, Run

PROTOCOLS = ("base2new", "xd")
TR_SUFFIX = "+TR"  # scripts/common.sh set_method: the folder name of a method with --refiner
XD_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
              "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
              "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# scripts/common.sh set_trainer_defaults: trainer -> (config, shots)
TRAINER_DEFAULTS = {
    "CoOp": ("vit_b16_ep10_ctxv1", 16),
    "CoCoOp": ("vit_b16_c4_ep10_batch1_ctxv1", 16),
    "LLaMP": ("{dataset}_llama_7b", 16),  # per dataset (LLAMP_CONFIG_NAMES); 16 shots
    "MaPLe": ("vit_b16_c2_ep5_batch4_2ctx", 16),
    "PromptKD": ("vit_b16_c2_ep20_batch8_4+4ctx", 0),
    "PromptSRC": ("vit_b16_c2_ep20_batch4_4+4ctx", 16),
    "ZeroshotCLIP": ("vit_b16", 0),
}
XD_CONFIG_SUFFIX = {"MaPLe": "_cross_datasets", "PromptSRC": "_cross_datasets"}  # xd.sh
FOLDER_CONFIG = "image_folder"  # configs/datasets/image_folder.yaml: a folder of one's own images
LLAMP = "LLaMP"  # its runs read the LLM step's files (textrefiner/llamp_cache.py)
# LLaMP's recipe is per dataset, named as its configs/llava/zero-shot/<name>_llama_7b.yml
LLAMP_CONFIG_NAMES = {"caltech101": "caltech", "food101": "food", "oxford_flowers": "flowers",
                      "oxford_pets": "pets", "stanford_cars": "stanfordcars"}
PROMPTKD_FINE_GRAINED = ("fgvc_aircraft", "oxford_flowers", "dtd")  # KD_WEIGHT 200, else 1000
SPEC_KEYS = {"protocol", "datasets", "targets", "methods", "seeds", "config", "shots", "engine",
             "root", "overrides", "grid", "paper", "prepare", "teachers", "description"}
METHOD_KEYS = {"method", "seeds", "variant", "overrides", "config"}
SHIPPED = ("paper-table1", "paper-table2", "paper-table3", "paper-table4", "paper-fig4",
           "paper-fig5", "demo")


@dataclass(frozen=True)
class Method:
    name: str  # folder name: "CoOp" or "CoOp+TR"
    trainer: str
    refiner: bool
    seeds: tuple
    variant: str = ""  # added to the config folder name
    overrides: tuple = ()  # (KEY, VALUE) pairs of this method only
    config: str = ""  # "" -> spec's config or the trainer's default


@dataclass
class Spec:
    name: str
    protocol: str
    datasets: list
    methods: list  # of Method
    targets: list = field(default_factory=list)
    config: dict = field(default_factory=dict)  # trainer -> config name ("*": every trainer)
    shots: int | None = None
    engine: str = ""
    root: str = ""
    overrides: list = field(default_factory=list)  # (KEY, VALUE) pairs
    grid: list = field(default_factory=list)  # list of {KEY: [values]}
    paper: str = ""
    prepare: str = ""
    teachers: str = "teacher_model"


def spec_error(name: str, message: str) -> UserError:
    return UserError(f"sweep spec {name}: {message}")


# ----------------------------------------------------------------------------- loading


def load_spec(name_or_path: str) -> Spec:
    """A shipped spec by name (see SHIPPED) or a YAML file; checked for shape (not yet for the
    datasets, configs and keys: `validate` does that)."""
    if name_or_path in SHIPPED:
        text = resources.files(__package__).joinpath("specs", f"{name_or_path}.yaml").read_text()
        name = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"no sweep spec {name_or_path!r}: give a YAML file or one of the "
                            f"shipped sweeps ({', '.join(SHIPPED)})")
        text, name = path.read_text(), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise spec_error(name, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_spec(data, name)


def parse_spec(data, name: str = "<spec>") -> Spec:
    if not isinstance(data, dict):
        raise spec_error(name, "must be a YAML mapping of keys (protocol, datasets, methods, ...)")
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise spec_error(name, f"unknown key {unknown[0]!r} (known: "
                               f"{', '.join(sorted(SPEC_KEYS))})")
    protocol = data.get("protocol", "base2new")
    if protocol not in PROTOCOLS:
        raise spec_error(name, f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    datasets = _names(data.get("datasets", ["imagenet"] if protocol == "xd" else None),
                      "datasets", name)
    seeds = _seeds(data.get("seeds", [1, 2, 3]), "seeds", name)
    config = data.get("config") or {}
    if isinstance(config, str):
        config = {"*": config}
    if not isinstance(config, dict):
        raise spec_error(name, "config must be a config name or a mapping trainer -> name")
    spec = Spec(
        name=name, protocol=protocol, datasets=datasets,
        methods=[_method(entry, seeds, name) for entry in _list(data.get("methods"), "methods",
                                                                 name)],
        targets=_names(data.get("targets", list(XD_TARGETS)), "targets", name)
        if protocol == "xd" else [],
        config={str(k): str(v) for k, v in config.items()},
        shots=data.get("shots"), engine=str(data.get("engine") or ""),
        root=str(data.get("root") or ""), overrides=_pairs(data.get("overrides"), name),
        grid=_grid(data.get("grid"), name), paper=str(data.get("paper") or ""),
        prepare=str(data.get("prepare") or ""),
        teachers=str(data.get("teachers") or "teacher_model"))
    if spec.shots is not None and (not isinstance(spec.shots, int) or spec.shots < 0):
        raise spec_error(name, f"shots must be a number >= 0, got {spec.shots!r}")
    if protocol == "xd" and any(m.trainer == "PromptKD" for m in spec.methods):
        raise spec_error(name, "PromptKD has no xd run here: its cross-dataset recipe distils on "
                               "each target set (scripts/xd.sh refuses it too)")
    if protocol == "xd" and datasets != ["imagenet"]:
        raise spec_error(name, "the xd protocol trains on imagenet: datasets: [imagenet]")
    if spec.prepare not in ("", "demo"):
        raise spec_error(name, f"prepare {spec.prepare!r}: only 'demo' is known")
    return spec


def _list(value, what, name):
    if not isinstance(value, list) or not value:
        raise spec_error(name, f"{what} must be a non-empty list")
    return value


def _names(value, what, name):
    return [str(v) for v in _list(value, what, name)]


def _seeds(value, what, name):
    seeds = _list(value, what, name)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in seeds):
        raise spec_error(name, f"{what} must be positive integers, got {seeds}")
    return tuple(seeds)


def _method(entry, seeds, name) -> Method:
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict) or "method" not in entry:
        raise spec_error(name, f"a methods entry must be a name or a mapping with 'method', got "
                               f"{entry!r}")
    unknown = sorted(set(entry) - METHOD_KEYS)
    if unknown:
        raise spec_error(name, f"methods entry {entry['method']!r}: unknown key {unknown[0]!r} "
                               f"(known: {', '.join(sorted(METHOD_KEYS))})")
    label = str(entry["method"])
    refiner = label.endswith(TR_SUFFIX)
    trainer = label[:-len(TR_SUFFIX)] if refiner else label
    if trainer not in TRAINERS:
        raise spec_error(name, f"unknown method {label!r}: use one of {', '.join(TRAINERS)}, "
                               f"with '{TR_SUFFIX}' for TextRefiner (e.g. CoOp{TR_SUFFIX})")
    if refiner and trainer == "ZeroshotCLIP":
        raise spec_error(name, f"{label}: ZeroshotCLIP has nothing to refine; drop {TR_SUFFIX}")
    variant = str(entry.get("variant") or "")
    if variant and not all(c.isalnum() or c in "_-.=," for c in variant):
        raise spec_error(name, f"variant {variant!r}: use letters, digits and _-.=, only (it "
                               "names a folder)")
    return Method(label, trainer, refiner,
                  _seeds(entry["seeds"], f"{label}'s seeds", name) if "seeds" in entry else seeds,
                  variant, tuple(_pairs(entry.get("overrides"), name)),
                  str(entry.get("config") or ""))


def _pairs(mapping, name) -> list:
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise spec_error(name, f"overrides must be a mapping KEY: VALUE, got {mapping!r}")
    return [(str(k), v) for k, v in mapping.items()]


def _grid(grid, name) -> list:
    if grid is None:
        return []
    grids = grid if isinstance(grid, list) else [grid]
    for g in grids:
        if not isinstance(g, dict) or not g:
            raise spec_error(name, f"grid must be a mapping KEY: [values] (or a list of them), "
                                   f"got {g!r}")
        for key, values in g.items():
            if not isinstance(values, list) or not values:
                raise spec_error(name, f"grid {key}: empty grid, give a non-empty list of values")
    return grids


# ----------------------------------------------------------------------------- expansion


def config_file(role: str, name: str) -> Path:
    """configs/<trainers|datasets>/<name>.yaml: your own copy (./configs/) or the shipped file
    (textrefiner.configs.find_config); where neither exists, the shipped file's path (`validate`
    says what is missing)."""
    try:
        return Path(find_config(f"configs/{ROLES[role]}/{name}.yaml", role)).absolute()
    except UserError:
        return Path(CONFIG_DIR, ROLES[role], f"{name}.yaml")


def value_text(value) -> str:
    """A YAML value as textrefiner-train's KEY VALUE word (yacs reads it back)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return str([v for v in value])
    return str(value)


def grid_points(spec: Spec) -> list:
    """Each point: a tuple of (KEY, VALUE) pairs; [()] without a grid."""
    points = []
    for g in spec.grid or [{}]:
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            point = tuple(zip(keys, values))
            if point not in points:
                points.append(point)
    return points


def point_label(pairs) -> str:
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value_text(value)}" for key, value in pairs)


def config_name(spec: Spec, method: Method, dataset: str = "") -> str:
    name = method.config or spec.config.get(method.trainer) or spec.config.get("*")
    if not name:
        name = TRAINER_DEFAULTS[method.trainer][0].format(
            dataset=LLAMP_CONFIG_NAMES.get(dataset, dataset))
        if spec.protocol == "xd":
            name += XD_CONFIG_SUFFIX.get(method.trainer, "")
    return name


def shots_of(spec: Spec, method: Method) -> int:
    if spec.shots is not None:
        return spec.shots
    return 16 if spec.protocol == "xd" else TRAINER_DEFAULTS[method.trainer][1]


def expand(spec: Spec, out_dir, root: str = "", gpus: int = 1, feature_store: str = "") -> list:
    """The sweep's runs in dependency order (each test run after its training run)."""
    out_dir = os.path.abspath(out_dir)
    root = _template(spec.root or root or "data", out_dir, "")
    runs, steps = [], {}
    for method in spec.methods:
        for point in grid_points(spec):
            for dataset in spec.datasets:
                for seed in method.seeds:
                    method_runs = _method_runs(spec, method, point, dataset, seed, out_dir, root,
                                               gpus, feature_store)
                    if method.trainer == LLAMP:
                        new_steps, method_runs = _after_llm_steps(
                            spec, method, point, dataset, method_runs, steps, out_dir, root)
                        runs += new_steps
                    runs += method_runs
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise spec_error(spec.name, f"two runs write {twice}: give the methods entries that "
                                    "differ only in overrides a different 'variant'")
    return runs


def _after_llm_steps(spec, method, point, dataset, method_runs, steps, out_dir, root):
    """(LLM steps not yet in `steps`, the method's runs made to wait for them). The steps of
    several datasets (xd: the training set and each target) wait for one another in turn, and
    the runs that wait for nothing else wait for the last. None with TRAINER.LLAMP.FILES_DIR
    (the files are the user's)."""
    extra = dict([*spec.overrides, *method.overrides, *point])
    if extra.get("TRAINER.LLAMP.FILES_DIR"):
        return [], method_runs
    if is_folder_entry(dataset) and not config_file("dataset", dataset).is_file():
        raise spec_error(spec.name, f"{method.name} on the folder {dataset}: write its LLM files "
                                    "first (textrefiner-llamp-cache) and give their folder as "
                                    "TRAINER.LLAMP.FILES_DIR in the method's overrides")
    cfg_file = config_file("method", f"{method.trainer}/{config_name(spec, method, dataset)}")
    names = [dataset_name(config_file("dataset", d), d) for d in [dataset, *spec.targets]]
    new, last = [], None
    for name in names:
        if name not in steps:
            steps[name] = _llm_step(name, last, extra, cfg_file, out_dir, root)
            new.append(steps[name])
        last = steps[name].key
    return new, [dataclasses.replace(r, after=last) if r.after is None else r for r in method_runs]


def _llm_step(name, after, extra, cfg_file, out_dir, root) -> Run:
    """`textrefiner-llamp-cache` for one dataset, with the LLM and CLIP its runs use."""
    from ..llamp_cache import cache_paths

    argv = ["--root", root, "--dataset", name]
    for option, key in (("--llm", "TRAINER.LLAMP.LLM"), ("--clip", "MODEL.BACKBONE.PATH"),
                        ("--clip", "MODEL.BACKBONE.NAME")):
        value = _template(extra.get(key), out_dir, root) or _config_value(cfg_file, key)
        if value and option not in argv:
            argv += [option, str(value)]
    key = f"llamp_cache/{name}"
    return Run(key, os.path.join(out_dir, key), tuple(argv), after, LLAMP, "llm",
               program=LLAMP_CACHE_PROGRAM, outputs=cache_paths(root, name))


def _config_value(cfg_file: Path, key: str):
    """KEY's value in a trainer config file (None where it does not set it)."""
    try:
        node = yaml.safe_load(cfg_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _template(value, out_dir, root):
    return value.replace("{out}", out_dir).replace("{root}", root) if isinstance(value, str) \
        else value


def _method_runs(spec, method, point, dataset, seed, out_dir, root, gpus, feature_store):
    cfg = config_name(spec, method, dataset)
    cfg_file = config_file("method", f"{method.trainer}/{cfg}")
    shots = shots_of(spec, method)
    extra = []
    for key, value in [*spec.overrides, *method.overrides, *point]:
        extra += [key, value_text(_template(value, out_dir, root))]
    folder = cfg + ("@" + ",".join(filter(None, [method.variant, point_label(point)]))
                    if method.variant or point else "")
    common = ["--root", root, "--trainer", method.trainer, "--config-file", str(cfg_file)]
    if feature_store:
        common += ["--feature-store", feature_store]
    if spec.engine:
        common += ["--engine", spec.engine]
    refiner = ["--refiner"] if method.refiner else []
    load_epoch = _max_epoch(cfg_file, extra)
    load = ["--load-epoch", str(load_epoch)] if load_epoch else []
    sub = f"shots_{shots}/{method.name}/{folder}/seed{seed}"

    def run(key, argv, after, kind):
        output_dir = os.path.join(out_dir, key)
        return Run(key, output_dir, tuple(_argv(argv, output_dir)), after, method.trainer,
                   kind, gpus)

    if spec.protocol == "base2new":
        dataset_file, dataset, folder_opts = _dataset(dataset, out_dir, root)
        data = ["--dataset-config-file", str(dataset_file)]
        opts = ["DATASET.NUM_SHOTS", str(shots), *folder_opts]
        if method.trainer == "PromptKD":
            opts += ["TRAINER.MODAL", "base2novel", "TRAINER.PROMPTKD.KD_WEIGHT",
                     "200" if dataset in PROMPTKD_FINE_GRAINED and not folder_opts else "1000"]
            if "TRAINER.PROMPTKD.TEACHER_CKPT" not in extra[0::2]:
                opts += ["TRAINER.PROMPTKD.TEACHER_CKPT", _teacher(spec, dataset_file, dataset)]
        train_key = f"base2new/train_base/{dataset}/{sub}"
        test_key = f"base2new/test_new/{dataset}/{sub}"
        seed_args = ["--seed", str(seed)]
        if method.trainer == "ZeroshotCLIP":
            return [run(train_key, [*common, *data, *seed_args, "--eval-only", *opts,
                                    "DATASET.SUBSAMPLE_CLASSES", "base", *extra], None, "test"),
                    run(test_key, [*common, *data, *seed_args, "--eval-only", *opts,
                                   "DATASET.SUBSAMPLE_CLASSES", "new", *extra], None, "test")]
        train_dir = os.path.join(out_dir, train_key)
        return [run(train_key, [*common, *data, *seed_args, *refiner, *opts,
                                "DATASET.SUBSAMPLE_CLASSES", "base", *extra], None, "train"),
                run(test_key, [*common, *data, *seed_args, "--model-dir", train_dir, *load,
                               "--eval-only", *refiner, *opts, "DATASET.SUBSAMPLE_CLASSES",
                               "new", *extra], train_key, "test")]
    # xd: train on ImageNet (all classes), test the same model on every target
    runs, model, after = [], [], None
    seed_args = ["--seed", str(seed)]
    tests = spec.targets
    if method.trainer == "ZeroshotCLIP":
        tests = ["imagenet", *spec.targets]
    else:
        train_key = f"xd/train/imagenet/{sub}"
        runs.append(run(train_key, [*common, *seed_args, "--dataset-config-file",
                                    str(config_file("dataset", "imagenet")), *refiner,
                                    "DATASET.NUM_SHOTS", str(shots),
                                    "DATASET.SUBSAMPLE_CLASSES", "all", *extra], None, "train"))
        model = ["--model-dir", os.path.join(out_dir, train_key), *load]
        after = train_key
    for target in tests:
        runs.append(run(f"xd/test/{target}/{sub}",
                        [*common, *seed_args, "--dataset-config-file",
                         str(config_file("dataset", target)), *model, "--eval-only",
                         *refiner, *extra], after, "test"))
    return runs


def _argv(argv, output_dir):
    """--output-dir after --seed, where the scripts put it."""
    i = argv.index("--seed") + 2
    return [*argv[:i], "--output-dir", output_dir, *argv[i:]]


def _max_epoch(cfg_file: Path, extra: list):
    """scripts/common.sh max_epoch: the epoch the test run loads (OPTIM.MAX_EPOCH)."""
    for key, value in zip(extra[0::2], extra[1::2]):
        if key == "OPTIM.MAX_EPOCH":
            return int(value)
    try:
        data = yaml.safe_load(cfg_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return (data.get("OPTIM") or {}).get("MAX_EPOCH")


def is_folder_entry(dataset: str) -> bool:
    """A `datasets` entry naming a folder of one's own images rather than a dataset config."""
    return "/" in dataset or dataset.startswith("~")


def _dataset(dataset: str, out_dir: str, root: str):
    """(dataset config file, the runs' folder name, overrides) of a `datasets` entry: a dataset
    config's name (configs/datasets/<name>.yaml), or a folder of one's own images
    (image_folder.yaml with DATASET.FOLDER), named after the folder (scripts/common.sh
    dataset_config)."""
    named = config_file("dataset", dataset)
    if named.is_file() or not is_folder_entry(dataset):
        return named, dataset, []
    folder = os.path.abspath(os.path.expanduser(_template(dataset, out_dir, root)))
    return (config_file("dataset", FOLDER_CONFIG), os.path.basename(folder),
            ["DATASET.FOLDER", folder])


def dataset_name(dataset_file: Path, dataset: str) -> str:
    """DATASET.NAME of a dataset config file (`dataset`, its name, where it sets none)."""
    data = yaml.safe_load(dataset_file.read_text()) or {}
    return (data.get("DATASET") or {}).get("NAME", dataset)


def _teacher(spec: Spec, dataset_file: Path, dataset: str) -> str:
    """PromptKD's teacher where its code looks: <teachers>/<DATASET.NAME>/VLPromptLearner/...;
    a folder's teacher under the folder's name."""
    name = dataset if dataset_file.stem == FOLDER_CONFIG else dataset_name(dataset_file, dataset)
    return os.path.join(spec.teachers, name, "VLPromptLearner", "model-best.pth.tar")


# ----------------------------------------------------------------------------- validation


def validate(spec: Spec, runs: list) -> list:
    """One UserError naming what to fix, before anything runs: a dataset with no config file
    (yours under ./configs/datasets/ or a shipped one), a trainer config file that does not
    exist, or a config key / value that textrefiner-train would refuse (checked once per distinct
    setting, as it will read it). Returns the config of each distinct setting."""
    known = config_names("dataset")
    for dataset in [*spec.datasets, *spec.targets]:
        folders_allowed = spec.protocol == "base2new" and dataset in spec.datasets
        if dataset not in known and not (folders_allowed and is_folder_entry(dataset)):
            hint = "; or a folder of your own images, e.g. ~/photos/pets" if folders_allowed else ""
            raise spec_error(spec.name, f"unknown dataset {dataset!r} (no config file "
                                        f"configs/datasets/{dataset}.yaml, yours or shipped; "
                                        f"known: {', '.join(known)}{hint})")
    for method, dataset in itertools.product(spec.methods, spec.datasets):
        name = f"{method.trainer}/{config_name(spec, method, dataset)}"
        if not config_file("method", name).is_file():
            have = config_names("method", method.trainer)
            raise spec_error(spec.name, f"{method.name}: no config file configs/trainers/{name}"
                                        f".yaml, yours or shipped (available: {', '.join(have)})")
    from ..train import build_parser, setup_cfg  # imports torch: after the cheap checks

    seen, cfgs = set(), []
    parser = build_parser()
    for run in runs:
        if run.program != TRAIN_PROGRAM:  # an LLM step: its command checks its own arguments
            continue
        argv = _without_seed_and_dirs(run.argv)
        if argv in seen:
            continue
        seen.add(argv)
        try:
            cfgs.append(setup_cfg(parser.parse_args(list(run.argv))))
        except UserError as exc:
            raise spec_error(spec.name, f"{run.key}: {exc}") from None
    return cfgs


def _without_seed_and_dirs(argv) -> tuple:
    out, skip = [], 0
    for word in argv:
        if skip:
            skip -= 1
        elif word in ("--seed", "--output-dir", "--model-dir"):
            skip = 1
        else:
            out.append(word)
    return tuple(out)
