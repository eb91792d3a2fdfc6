"""Data layer: readers on miniature CoOp layouts, splits, few-shot, transforms, loaders."""

import json
import os
import pickle
import random

import pytest
import torch
from PIL import Image

from textrefiner.data import (
    DATASETS,
    Datum,
    ImageDataset,
    build_dataset,
    build_loader,
    build_transform,
    generate_fewshot,
    read_dataset,
    read_split_json,
    subsample_classes,
    synthetic_classnames,
    write_synthetic_dataset,
)
from textrefiner.data.base import load_fewshot_cache
from textrefiner.data.datasets import FACTS, SPLIT_JSON_DATASETS
from textrefiner.errors import UserError


# ---------------------------------------------------------------- helpers

def make_cfg(root="", name="", shots=-1, subsample="all", seed=1, **input_keys):
    """A config with the keys the data layer reads."""
    try:
        from textrefiner.config import extend_cfg, get_cfg_default

        cfg = get_cfg_default()
        extend_cfg(cfg)
    except ImportError:  # before textrefiner.config existed
        cfg = fallback_cfg()
    cfg.defrost()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = name
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.SEED = seed
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.SIZE = (32, 32)
    for key, value in input_keys.items():
        cfg.INPUT[key] = value
    return cfg


def fallback_cfg():
    from yacs.config import CfgNode as CN

    cfg = CN(new_allowed=True)
    cfg.DATASET = CN(new_allowed=True)
    cfg.INPUT = CN(new_allowed=True)
    cfg.INPUT.INTERPOLATION = "bilinear"
    cfg.INPUT.TRANSFORMS = ()
    cfg.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
    cfg.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
    cfg.INPUT.RRCROP_SCALE = (0.08, 1.0)
    cfg.INPUT.CROP_PADDING = 4
    cfg.DATALOADER = CN(new_allowed=True)
    cfg.USE_CUDA = False
    return cfg


def write_png(path, color=(255, 0, 0), size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def write_split_dataset(root, name, labels_per_split=None):
    """A miniature split-json dataset: classes c0..c4, images under its image folder."""
    facts = FACTS[name]
    image_dir = os.path.join(root, facts.folder, facts.image_dir)
    counts = labels_per_split or {"train": 3, "val": 2, "test": 2}
    split = {key: [] for key in counts}
    for label in range(5):
        for key, count in counts.items():
            for i in range(count):
                rel = f"c{label}/{key}_{i}.png"
                write_png(os.path.join(image_dir, rel), (label * 50, i * 30, 0))
                split[key].append([rel, label, f"class {label}"])
    with open(os.path.join(root, facts.folder, facts.split_file), "w") as f:
        json.dump(split, f)
    return image_dir


def items_of(labels_and_counts):
    return [
        Datum(impath=f"/x/{label}_{i}.png", label=label, classname=f"c{label}")
        for label, count in labels_and_counts
        for i in range(count)
    ]


# ---------------------------------------------------------------- split files and readers

@pytest.mark.parametrize("name", sorted(SPLIT_JSON_DATASETS))
def test_split_json_readers(tmp_path, name):
    image_dir = write_split_dataset(tmp_path, name)
    train, val, test = read_dataset(tmp_path, name)
    assert (len(train), len(val), len(test)) == (15, 10, 10)
    assert all(os.path.isfile(item.impath) for item in train + val + test)
    assert train[0] == Datum(os.path.join(image_dir, "c0/train_0.png"), 0, "class 0")
    splits = build_dataset(make_cfg(tmp_path, name))
    assert splits.classnames == [f"class {i}" for i in range(5)]
    assert splits.num_classes == 5 and splits.lab2cname[4] == "class 4"


def test_read_split_json_format(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [["a/1.jpg", "2", "cat"]], "val": [], "test": []}))
    train, val, test = read_split_json(str(path), "/data/images")
    assert train == [Datum("/data/images/a/1.jpg", 2, "cat")] and val == [] and test == []


def test_fgvc_aircraft_reader(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    lines = {"train": ["0001 A300B4", "0002 Cessna 172"], "val": ["0003 707-320"], "test": []}
    for split, rows in lines.items():
        (folder / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            write_png(str(folder / "images" / (row.split(" ")[0] + ".jpg")))
    train, val, test = read_dataset(tmp_path, "FGVCAircraft")
    assert [(i.label, i.classname) for i in train] == [(1, "A300B4"), (2, "Cessna 172")]
    assert train[0].impath == str(folder / "images" / "0001.jpg")
    assert [i.label for i in val] == [0] and test == []


def write_imagenet_classnames(folder, wnids):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.writelines(f"{wnid} name of {wnid}\n" for wnid in wnids)


def test_imagenet_reader_reads_folders_and_caches_listing(tmp_path):
    folder = tmp_path / "imagenet"
    write_imagenet_classnames(folder, ["n02", "n01", "n03"])
    for split in ("train", "val"):
        for wnid in ("n01", "n02", "n03"):
            for i in range(3):
                write_png(str(folder / "images" / split / wnid / f"{i}.JPEG"))
    train, val, test = read_dataset(tmp_path, "ImageNet")
    assert val is None and len(train) == len(test) == 9
    # labels follow the sorted folder names, names come from classnames.txt
    assert [(i.label, i.classname) for i in train[::3]] == [
        (0, "name of n01"), (1, "name of n02"), (2, "name of n03")
    ]
    assert (folder / "split_textrefiner_ImageNet.json").is_file()
    assert read_dataset(tmp_path, "ImageNet") == (train, None, test)

    splits = build_dataset(make_cfg(tmp_path, "ImageNet", shots=2, subsample="base"))
    assert splits.val == splits.test and splits.classnames == ["name of n01", "name of n02"]
    assert len(splits.train_x) == 4 and len(splits.test) == 6
    cached = load_fewshot_cache(str(folder / "split_fewshot" / "shot_2-seed_1.pkl"), str(folder))
    assert set(cached) == {"train"}


def test_imagenet_v2_reader(tmp_path):
    folder = tmp_path / "imagenetv2"
    write_imagenet_classnames(folder, ["n09", "n01", "n05"])
    for label in range(3):
        write_png(str(folder / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg"))
    splits = build_dataset(make_cfg(tmp_path, "ImageNetV2", shots=16, subsample="base"))
    assert splits.classnames == ["name of n09", "name of n01", "name of n05"]
    assert splits.train_x == splits.test and splits.val is None and len(splits.test) == 3


@pytest.mark.parametrize(
    "name, folder, image_dir",
    [
        ("ImageNetSketch", "imagenet-sketch", "images"),
        ("ImageNetA", "imagenet-adversarial", "imagenet-a"),
        ("ImageNetR", "imagenet-rendition", "imagenet-r"),
    ],
)
def test_imagenet_variants_read_their_class_subset(tmp_path, name, folder, image_dir):
    write_imagenet_classnames(tmp_path / folder, ["n01", "n02", "n03", "n04"])
    images = tmp_path / folder / image_dir
    for wnid in ("n04", "n02"):
        write_png(str(images / wnid / "x.jpg"))
    (images / "README.txt").write_text("not a class")
    splits = build_dataset(make_cfg(tmp_path, name))
    assert splits.classnames == ["name of n02", "name of n04"]
    assert [item.label for item in splits.test] == [0, 1]


def test_every_known_dataset_has_a_test_layout():
    tested = set(SPLIT_JSON_DATASETS) | {
        "FGVCAircraft", "ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR",
        "ImageFolder",  # tests/test_own_folder.py
    }
    assert set(DATASETS) == tested


# ---------------------------------------------------------------- user errors

def test_missing_dataset_folder_names_path_and_preparation(tmp_path):
    with pytest.raises(UserError) as err:
        build_dataset(make_cfg(tmp_path, "OxfordPets"))
    assert str(tmp_path / "oxford_pets") in str(err.value)
    assert "textrefiner-data OxfordPets --root" in str(err.value)


def test_missing_split_file_names_it(tmp_path):
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(UserError, match="split_zhou_EuroSAT.json") as err:
        build_dataset(make_cfg(tmp_path, "EuroSAT"))
    assert str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json") in str(err.value)


def test_missing_imagenet_classnames(tmp_path):
    (tmp_path / "imagenet" / "images" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="classnames.txt"):
        read_dataset(tmp_path, "ImageNet")


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(UserError, match="OxfordPets") as err:
        build_dataset(make_cfg(tmp_path, "NoSuchSet"))
    assert "NoSuchSet" in str(err.value)


@pytest.mark.parametrize("content", [None, b"not an image"])
def test_unreadable_image_names_its_path(tmp_path, content):
    path = tmp_path / "broken.png"
    if content is not None:
        path.write_bytes(content)
    dataset = ImageDataset([Datum(str(path), 0, "c")])
    with pytest.raises(UserError) as err:
        dataset[0]
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- base/novel and few-shot

def test_subsample_base_and_new_halves():
    items = items_of([(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)])
    (base,) = subsample_classes(items, subsample="base")
    (new,) = subsample_classes(items, subsample="new")
    assert [(i.label, i.classname) for i in base] == [(0, "c0"), (1, "c1"), (2, "c2")]
    assert [(i.label, i.classname) for i in new] == [(0, "c3"), (1, "c4")]
    assert subsample_classes(items, subsample="all") == [items]


def test_subsample_uses_classes_of_first_split_and_sorted_labels():
    train = items_of([(7, 1), (2, 1), (5, 1), (9, 1)])  # sorted: 2 5 | 7 9
    test = items_of([(9, 2), (2, 1), (7, 1)])
    new_train, new_test = subsample_classes(train, test, subsample="new")
    assert [(i.label, i.classname) for i in new_train] == [(0, "c7"), (1, "c9")]
    assert [(i.label, i.classname) for i in new_test] == [(1, "c9"), (1, "c9"), (0, "c7")]
    with pytest.raises(UserError):
        subsample_classes(train, subsample="half")


def test_fewshot_matches_seeded_random_sample():
    items = items_of([(1, 5), (0, 6), (2, 2)])
    chosen = generate_fewshot(items, 3, random.Random(4))
    random.seed(4)
    expected = (
        random.sample(items[0:5], 3) + random.sample(items[5:11], 3) + items[11:13]
    )  # groups in order of first appearance; too small a class keeps all its items
    assert chosen == expected
    assert generate_fewshot(items, 0) is items and generate_fewshot(items, -1) is items


def test_fewshot_repeat_draws_with_replacement():
    items = items_of([(0, 2)])
    random.seed(0)
    expected = random.choices(items, k=5)
    assert generate_fewshot(items, 5, random.Random(0), repeat=True) == expected


def test_fewshot_matches_dassl(tmp_path):
    base_dataset = pytest.importorskip("dassl.data.datasets.base_dataset")
    paths = [write_png(str(tmp_path / f"{i}.png")) for i in range(20)]
    ours = [Datum(p, i % 3, f"c{i % 3}") for i, p in enumerate(paths)]
    theirs = [base_dataset.Datum(impath=p, label=i % 3, classname=f"c{i % 3}")
              for i, p in enumerate(paths)]
    random.seed(2)
    dassl_dataset = base_dataset.DatasetBase(train_x=theirs)
    expected = dassl_dataset.generate_fewshot_dataset(theirs, num_shots=4)
    assert [d.impath for d in generate_fewshot(ours, 4, random.Random(2))] == [
        d.impath for d in expected
    ]


def test_fewshot_cache_is_written_and_reused(tmp_path):
    write_split_dataset(tmp_path, "OxfordPets", {"train": 10, "val": 6, "test": 2})
    cfg = make_cfg(tmp_path, "OxfordPets", shots=8, seed=3)
    splits = build_dataset(cfg)
    assert len(splits.train_x) == 40 and len(splits.val) == 20  # val: min(8, 4) shots

    # the draw is what CoOp draws: random.seed(SEED), then train, then val
    all_train, all_val, _ = read_dataset(tmp_path, "OxfordPets")
    random.seed(3)
    expected_train = [x for c in range(5) for x in random.sample(all_train[10 * c:10 * (c + 1)], 8)]
    expected_val = [x for c in range(5) for x in random.sample(all_val[6 * c:6 * c + 6], 4)]
    assert splits.train_x == expected_train and splits.val == expected_val

    cache = tmp_path / "oxford_pets" / "split_fewshot" / "shot_8-seed_3.pkl"
    assert load_fewshot_cache(str(cache), str(tmp_path / "oxford_pets")) == {
        "train": expected_train, "val": expected_val}
    with open(cache, "wb") as f:  # a cache written earlier (older format) wins over a new draw
        pickle.dump({"train": expected_train[:2], "val": expected_val[:1]}, f)
    again = build_dataset(cfg)
    assert again.train_x == expected_train[:2] and again.val == expected_val[:1]


def test_fewshot_cache_outside_dataset_folder_is_redrawn(tmp_path):
    write_split_dataset(tmp_path, "DTD")
    cfg = make_cfg(tmp_path, "DTD", shots=2, seed=1)
    first = build_dataset(cfg)
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_1.pkl"
    with open(cache, "wb") as f:
        pickle.dump({"train": [Datum("/elsewhere/a.png", 0, "x")], "val": []}, f)
    assert build_dataset(cfg).train_x == first.train_x


def test_build_dataset_base_and_new(tmp_path):
    write_split_dataset(tmp_path, "Caltech101")
    base = build_dataset(make_cfg(tmp_path, "Caltech101", shots=2, subsample="base"))
    new = build_dataset(make_cfg(tmp_path, "Caltech101", shots=2, subsample="new"))
    assert base.classnames == ["class 0", "class 1", "class 2"]
    assert new.classnames == ["class 3", "class 4"]
    assert len(base.train_x) == 6 and len(base.val) == 6 and len(base.test) == 6
    assert sorted({i.label for i in new.test}) == [0, 1] and len(new.test) == 4


def test_build_dataset_all_classes_for_training(tmp_path):
    write_split_dataset(tmp_path, "Food101")
    splits = build_dataset(make_cfg(tmp_path, "Food101", shots=0), all_classes_for_training=True)
    assert splits.classnames == [f"class {i}" for i in range(5)] and len(splits.train_x) == 15
    assert [(i.label, i.classname) for i in splits.val[::2]] == [
        (0, "class 0"), (1, "class 1"), (2, "class 2")
    ]
    assert [(i.label, i.classname) for i in splits.test[::2]] == [(0, "class 3"), (1, "class 4")]


# ---------------------------------------------------------------- transforms

def test_train_transform_shapes_and_normalization():
    cfg = make_cfg(TRANSFORMS=["random_resized_crop", "random_flip", "normalize"],
                   INTERPOLATION="bicubic", RRCROP_SCALE=(0.5, 1.0))
    tfm = build_transform(cfg, is_train=True)
    names = [type(t).__name__ for t in tfm.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert tfm.transforms[0].scale == (0.5, 1.0)
    assert tfm.transforms[0].interpolation.value == "bicubic"
    out = tfm(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    mean, std = cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD
    expected = torch.tensor([(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)


def test_train_transform_without_crop_resizes():
    tfm = build_transform(make_cfg(TRANSFORMS=["random_flip"]), is_train=True)
    names = [type(t).__name__ for t in tfm.transforms]
    assert names == ["Resize", "RandomHorizontalFlip", "ToTensor"]


def test_test_transform_resizes_shorter_side_then_center_crops():
    tfm = build_transform(make_cfg(TRANSFORMS=["random_resized_crop", "normalize"]), is_train=False)
    assert [type(t).__name__ for t in tfm.transforms] == [
        "Resize", "CenterCrop", "ToTensor", "Normalize"
    ]
    assert tfm.transforms[0].size == 32
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 32))  # white left quarter is cropped away
    out = build_transform(make_cfg(TRANSFORMS=[]), is_train=False)(img)
    assert out.shape == (3, 32, 32) and out.max().item() == 0.0


def test_unknown_transform_or_interpolation_is_user_error():
    with pytest.raises(UserError, match="cutmix"):
        build_transform(make_cfg(TRANSFORMS=["cutmix"]), is_train=True)
    with pytest.raises(UserError, match="lanczos"):
        build_transform(make_cfg(INTERPOLATION="lanczos"), is_train=False)


# ---------------------------------------------------------------- loaders

def image_items(tmp_path, n):
    return [Datum(write_png(str(tmp_path / f"{i}.png"), (i, 0, 0)), i % 2, f"c{i % 2}")
            for i in range(n)]


def test_loader_batches_and_drop_last(tmp_path):
    items = image_items(tmp_path, 5)
    cfg = make_cfg(TRANSFORMS=["normalize"])
    batches = list(build_loader(items, cfg, is_train=True, batch_size=2, shuffle=True))
    assert len(batches) == 2  # the last incomplete batch is dropped in training
    batch = batches[0]
    assert set(batch) == {"img", "label", "domain", "impath", "index"}
    assert batch["img"].shape == (2, 3, 32, 32)
    assert len(list(build_loader(items, cfg, is_train=False, batch_size=2, shuffle=False))) == 3
    # fewer items than a batch: kept in training too
    assert len(list(build_loader(items[:1], cfg, is_train=True, batch_size=2, shuffle=True))) == 1
    with pytest.raises(UserError, match="empty"):
        build_loader([], cfg, is_train=True, batch_size=2, shuffle=True)


def test_loader_sequential_order_and_labels(tmp_path):
    items = image_items(tmp_path, 3)
    loader = build_loader(items, make_cfg(), is_train=False, batch_size=3, shuffle=False)
    batch = next(iter(loader))
    assert batch["impath"] == [i.impath for i in items]
    assert batch["label"].tolist() == [0, 1, 0] and batch["index"].tolist() == [0, 1, 2]


def epoch_of(items, cfg, seed):
    generator = torch.Generator().manual_seed(seed)
    loader = build_loader(items, cfg, True, batch_size=2, shuffle=True, generator=generator)
    return [(b["impath"], b["img"]) for b in loader]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_is_deterministic_given_generator(tmp_path, workers):
    items = image_items(tmp_path, 8)
    cfg = make_cfg(TRANSFORMS=["random_resized_crop", "random_flip"])
    cfg.DATALOADER.NUM_WORKERS = workers
    first, second = epoch_of(items, cfg, 0), epoch_of(items, cfg, 0)
    assert [p for p, _ in first] == [p for p, _ in second]
    if workers:  # worker seeds come from the generator, so the augmentations repeat too
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second))
    orders = {tuple(p for batch, _ in epoch_of(items, cfg, s) for p in batch) for s in range(4)}
    assert len(orders) > 1


# ---------------------------------------------------------------- synthetic dataset

def test_synthetic_dataset_is_deterministic_and_readable(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_classes=4, per_class_train=3,
                                per_class_val=1, per_class_test=2, image_size=32, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", num_classes=4, per_class_train=3,
                                per_class_val=1, per_class_test=2, image_size=32, seed=5)
    c = write_synthetic_dataset(tmp_path / "c", num_classes=4, per_class_train=3,
                                per_class_val=1, per_class_test=2, image_size=32, seed=6)
    rel = os.path.join("images", "red_circle", "train_000.png")
    read = lambda root: open(os.path.join(root, rel), "rb").read()  # noqa: E731
    assert read(a) == read(b) != read(c)
    with open(os.path.join(a, "split_zhou_SyntheticShapes.json")) as f1, \
            open(os.path.join(b, "split_zhou_SyntheticShapes.json")) as f2:
        assert f1.read() == f2.read()

    cfg = make_cfg(tmp_path / "a", "SyntheticShapes", shots=2, subsample="base")
    splits = build_dataset(cfg)
    assert splits.classnames == synthetic_classnames(4)[:2] == ["red circle", "green square"]
    assert len(splits.train_x) == 4 and len(splits.val) == 2 and len(splits.test) == 4
    loader = build_loader(splits.test, cfg, is_train=False, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch["img"].shape == (4, 3, 32, 32)


def test_synthetic_default_size_is_small_and_distinct(tmp_path):
    """Small enough to write in a few seconds: 10 classes x 30 images of 64 px (asserted by
    size, not by the clock, which a busy machine stretches)."""
    from PIL import Image

    folder = write_synthetic_dataset(tmp_path)
    images = sorted(os.path.join(root, f) for root, _, files in os.walk(folder)
                    for f in files if f.endswith(".png"))
    assert len(images) == 10 * (16 + 4 + 10)
    with Image.open(images[0]) as image:
        assert image.size == (64, 64)
    names = synthetic_classnames(30)
    assert len(set(names)) == 30
    with pytest.raises(ValueError):
        synthetic_classnames(31)
