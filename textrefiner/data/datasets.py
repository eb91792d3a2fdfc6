"""Readers for the datasets in CoOp's folder layout, and `build_dataset(cfg)`.

Each dataset is one row of facts (its folders and split file); four small readers turn a row
into (train, val, test) lists of `Datum`.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass

from textrefiner.data.base import (
    Datum,
    DatasetSplits,
    classnames_of,
    fewshot_splits,
    read_split_json,
    require_path,
    subsample_classes,
    write_split_json,
)
from textrefiner.data.folder import (FOLDER_DATASET, check_shots, fewshot_home,
                                     read_image_folder, resolve_folder)
from textrefiner.errors import UserError


@dataclass(frozen=True)
class DatasetFacts:
    """Where a dataset lives under DATASET.ROOT, in CoOp's layout."""

    folder: str  # under DATASET.ROOT
    image_dir: str  # under `folder`; "" = `folder` itself
    split_file: str = ""  # CoOp's split json, under `folder`


_DTD = ("dtd", "images", "split_zhou_DescribableTextures.json")

# Datasets whose splits are one `split_zhou_*.json` ([rel impath, label, classname] rows)
SPLIT_JSON_DATASETS = {
    "Caltech101": DatasetFacts("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "OxfordPets": DatasetFacts("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "StanfordCars": DatasetFacts("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "OxfordFlowers": DatasetFacts("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "Food101": DatasetFacts("food-101", "images", "split_zhou_Food101.json"),
    "SUN397": DatasetFacts("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DescribableTextures": DatasetFacts(*_DTD),  # CoOp's name for DTD
    "DTD": DatasetFacts(*_DTD),
    "EuroSAT": DatasetFacts("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": DatasetFacts("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "SyntheticShapes": DatasetFacts(
        "synthetic_shapes", "images", "split_zhou_SyntheticShapes.json"  # synthetic.py
    ),
}
# FGVCAircraft: variants.txt + images_variant_{train,val,test}.txt
FGVC_AIRCRAFT = DatasetFacts("fgvc_aircraft", "images")
# ImageNet: images/{train,val}/<wnid>/ + classnames.txt
IMAGENET = DatasetFacts("imagenet", "images")
# Test-only ImageNet variants with their own classnames.txt; class folders are wnids, except
# ImageNet-V2's, which are label numbers.
IMAGENET_VARIANTS = {
    "ImageNetV2": DatasetFacts("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "ImageNetSketch": DatasetFacts("imagenet-sketch", "images"),
    "ImageNetA": DatasetFacts("imagenet-adversarial", "imagenet-a"),
    "ImageNetR": DatasetFacts("imagenet-rendition", "imagenet-r"),
}
# A folder of the user's own class folders (textrefiner.data.folder): its "root" is the folder
IMAGE_FOLDER = DatasetFacts("", "")
FACTS = {
    **SPLIT_JSON_DATASETS, "FGVCAircraft": FGVC_AIRCRAFT, "ImageNet": IMAGENET, **IMAGENET_VARIANTS,
    FOLDER_DATASET: IMAGE_FOLDER,
}
# our cache of ImageNet's folder listing (CoOp's preprocessed.pkl needs Dassl to unpickle)
IMAGENET_LISTING_FILE = "split_textrefiner_ImageNet.json"


def dataset_dir(root, name):
    root = os.path.abspath(os.path.expanduser(root))
    return os.path.join(root, FACTS[name].folder) if FACTS[name].folder else root


def image_dir(root, name):
    return os.path.join(dataset_dir(root, name), FACTS[name].image_dir)


def list_images(folder):
    """Non-hidden file names in `folder`, sorted."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def list_class_folders(folder):
    """Non-hidden sub-folders of `folder`, sorted (skips files such as README.txt)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def read_classnames(path):
    """ImageNet's classnames.txt, lines "<wnid> <class name>" -> OrderedDict wnid -> name."""
    classnames = OrderedDict()
    with open(path) as f:
        for line in f:
            if line.strip():
                wnid, _, name = line.strip().partition(" ")
                classnames[wnid] = name
    return classnames


def read_class_folders(folder, classname_of, class_folders):
    """Items of the given class folders; label = position in `class_folders`."""
    items = []
    for label, name in enumerate(class_folders):
        class_dir = os.path.join(folder, name)
        items += [
            Datum(impath=os.path.join(class_dir, f), label=label, classname=classname_of[name])
            for f in list_images(class_dir)
        ]
    return items


def read_split_json_dataset(root, name):
    """(train, val, test) of a dataset stored with CoOp's split json."""
    folder = require_path(dataset_dir(root, name), name)
    split_path = require_path(os.path.join(folder, FACTS[name].split_file), name, "split file")
    return read_split_json(split_path, image_dir(root, name))


def read_fgvc_aircraft(root, name):
    """(train, val, test) from variants.txt and images_variant_<split>.txt.

    Split lines are "<image id> <variant>"; labels follow the order of variants.txt.
    """
    folder = require_path(dataset_dir(root, name), name)
    with open(require_path(os.path.join(folder, "variants.txt"), name, "class list")) as f:
        classnames = [line.strip() for line in f if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    images = image_dir(root, name)

    def read(split):
        path = os.path.join(folder, f"images_variant_{split}.txt")
        require_path(path, name, "split file")
        items = []
        with open(path) as f:
            for line in f:
                if line.strip():
                    imname, _, classname = line.strip().partition(" ")
                    impath = os.path.join(images, imname + ".jpg")
                    label = label_of[classname]
                    items.append(Datum(impath=impath, label=label, classname=classname))
        return items

    return read("train"), read("val"), read("test")


def read_imagenet(root, name):
    """(train, None, test) from images/train and images/val (the test split, as in CoOp).

    The folder listing is cached as a split json next to the images.
    """
    folder = require_path(dataset_dir(root, name), name)
    images = image_dir(root, name)
    listing = os.path.join(folder, IMAGENET_LISTING_FILE)
    if os.path.exists(listing):
        train, _, test = read_split_json(listing, images)
        return train, None, test
    classnames = read_classnames(
        require_path(os.path.join(folder, "classnames.txt"), name, "class names file")
    )

    def read(split):
        split_dir = require_path(os.path.join(images, split), name, "image folder")
        return read_class_folders(split_dir, classnames, list_class_folders(split_dir))

    train, test = read("train"), read("val")
    try:
        write_split_json(listing, train, [], test, images)
    except OSError:
        pass  # read-only dataset folder: list it again next time
    return train, None, test


def read_imagenet_variant(root, name):
    """(data, None, data) of a test-only ImageNet variant."""
    folder = require_path(dataset_dir(root, name), name)
    classnames = read_classnames(
        require_path(os.path.join(folder, "classnames.txt"), name, "class names file")
    )
    images = require_path(image_dir(root, name), name, "image folder")
    if name == "ImageNetV2":
        # folders "0".."999" are labels in classnames.txt order
        by_number = {str(i): cname for i, cname in enumerate(classnames.values())}
        data = read_class_folders(images, by_number, [str(i) for i in range(len(by_number))])
    else:
        # ImageNet-A/R hold a 200-class subset: labels follow the sorted folders present
        data = read_class_folders(images, classnames, list_class_folders(images))
    return data, None, data


DATASETS = {
    **{name: read_split_json_dataset for name in SPLIT_JSON_DATASETS},
    "FGVCAircraft": read_fgvc_aircraft,
    "ImageNet": read_imagenet,
    **{name: read_imagenet_variant for name in IMAGENET_VARIANTS},
    FOLDER_DATASET: lambda folder, name: read_image_folder(folder),
}
TEST_ONLY = frozenset(IMAGENET_VARIANTS)


# Splits read ahead by a warm process (textrefiner.sweep.local forks its runs from it), by
# (absolute root, name): the runs of a sweep then do not read a dataset's index files again.
_PRELOADED: dict = {}


def dataset_root(cfg):
    """The `root` that `read_dataset` takes for cfg's dataset: DATASET.ROOT, or for a folder of
    the user's images (ImageFolder) that folder (DATASET.FOLDER, or DATASET.ROOT itself)."""
    if cfg.DATASET.NAME == FOLDER_DATASET:
        return resolve_folder(cfg.DATASET.ROOT, cfg.DATASET.get("FOLDER", ""))
    return cfg.DATASET.ROOT


def read_dataset(root, name, log=print):
    """(train, val, test) of dataset `name` under `root` (for ImageFolder: the folder itself);
    val is None for ImageNet and variants. `log` gets the folder reader's lines for the run's
    log."""
    if name not in DATASETS:
        raise UserError(
            f"Unknown dataset {name!r} (DATASET.NAME). "
            f"Known datasets: {', '.join(sorted(DATASETS))}"
        )
    preloaded = _PRELOADED.get((os.path.abspath(root), name)) if _PRELOADED else None
    if preloaded is not None:  # new lists of the same (frozen) Datums
        return tuple(None if split is None else list(split) for split in preloaded)
    if name == FOLDER_DATASET:
        return read_image_folder(root, log)
    return DATASETS[name](root, name)


def preload_dataset(root, name) -> None:
    """Read dataset `name`'s splits once, for every later `read_dataset` of this process and of
    the processes it forks. A folder of one's own images is only split here (its split file
    written once, before the runs start): each run still lists it, to see that it is unchanged
    and to say in its log where the split is."""
    splits = read_dataset(root, name, log=lambda line: None)
    if name != FOLDER_DATASET:
        _PRELOADED[(os.path.abspath(root), name)] = splits


def build_dataset(cfg, all_classes_for_training=False, log=print):
    """The splits to train and test on, from cfg.DATASET.{ROOT,NAME,NUM_SHOTS,SUBSAMPLE_CLASSES}
    and cfg.SEED.

    Default (CoOp): few-shot train/val (cached per shots and seed), then the base or new half
    of the classes in every split. `all_classes_for_training` (PromptKD's base2novel): train on
    all classes; val = test split of the base classes, test = test split of the novel classes
    (of the base classes when SUBSAMPLE_CLASSES is "base"), each relabelled from 0;
    classnames = all classes. Test-only datasets ignore both. `log`: as `read_dataset`'s.
    """
    root, name = dataset_root(cfg), cfg.DATASET.NAME
    train, val, test = read_dataset(root, name, log)
    if name in TEST_ONLY:
        return DatasetSplits(train_x=train, val=None, test=test)

    folder, cache_dir = dataset_dir(root, name), None
    if name == FOLDER_DATASET:
        check_shots(folder, train, cfg.DATASET.NUM_SHOTS)
        cache_dir = fewshot_home(folder)
    train, val = fewshot_splits(folder, train, val, cfg.DATASET.NUM_SHOTS, cfg.SEED, cache_dir)
    subsample = cfg.DATASET.get("SUBSAMPLE_CLASSES", "all")
    if all_classes_for_training:
        _, base_test = subsample_classes(train, test, subsample="base")
        _, novel_test = subsample_classes(train, test, subsample="new")
        return DatasetSplits(
            train_x=train, val=base_test, test=base_test if subsample == "base" else novel_test,
            classnames=classnames_of(train),
        )
    train, val, test = subsample_classes(train, val, test, subsample=subsample)
    if val is None:  # ImageNet validates on its test split
        val = test
    return DatasetSplits(train_x=train, val=val, test=test)
