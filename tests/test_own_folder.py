"""A folder of one's own images as a dataset (DATASET.NAME "ImageFolder"): the layouts, CoOp's
split rule and split file, class names, config paths, both engines, and one clear line for each
kind of bad folder."""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from unittest import mock

import pytest
from PIL import Image

from textrefiner.config import load_cfg
from textrefiner.data import build_dataset, read_split_json
from textrefiner.data.datasets import DATASETS, dataset_root
from textrefiner.data.folder import (CACHE_ENV, SPLIT_FILE, SPLIT_SEED, cache_home,
                                     read_image_folder)
from textrefiner.data.synthetic import write_image_folder
from textrefiner.errors import UserError

from conftest import HANG_TIMEOUT

FOLDER_CFG = "configs/datasets/image_folder.yaml"
HAS_DASSL = importlib.util.find_spec("dassl") is not None


def write_images(folder, counts, ext=".png"):
    """counts: {class folder: number of images}; tiny images named 0.png, 1.png, ..."""
    for name, count in counts.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (i * 10 % 255, 0, 0)).save(os.path.join(folder, name,
                                                                             f"{i}{ext}"))
    return str(folder)


def folder_cfg(*opts, shots=-1, subsample="all", seed=1):
    return load_cfg(dataset_config_file=FOLDER_CFG, opts=[
        "DATASET.NUM_SHOTS", str(shots), "DATASET.SUBSAMPLE_CLASSES", subsample,
        "SEED", str(seed), *opts])


def names(items):
    return sorted(os.path.basename(d.impath) for d in items)


def one_line_error(match, call, *args, **kwargs):
    """The UserError `call` raises: one line, matching `match`."""
    with pytest.raises(UserError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- the one-level layout


def test_folder_is_split_per_class_by_coops_rule_and_the_split_file_is_read_back(tmp_path):
    folder = write_images(tmp_path / "pets", {"cat": 10, "dog": 7, "sea_lion": 4})
    lines = []
    train, val, test = read_image_folder(folder, log=lines.append)
    # CoOp's read_and_split_data: round(n / 2) train, round(n / 5) val, the rest test
    for label, (name, n, (n_train, n_val, n_test)) in enumerate(
            [("cat", 10, (5, 2, 3)), ("dog", 7, (4, 1, 2)), ("sea lion", 4, (2, 1, 1))]):
        per_split = [[d for d in split if d.label == label] for split in (train, val, test)]
        assert [len(items) for items in per_split] == [n_train, n_val, n_test]
        assert {d.classname for items in per_split for d in items} == {name}
        assert sorted(names(sum(per_split, []))) == sorted(f"{i}.png" for i in range(n))
    # seeded: each class's images shuffled in label order with one random.Random(SPLIT_SEED)
    rng = random.Random(SPLIT_SEED)
    expected = []
    for name, n in (("cat", 10), ("dog", 7), ("sea_lion", 4)):
        paths = [os.path.join(folder, name, f) for f in sorted(f"{i}.png" for i in range(n))]
        rng.shuffle(paths)
        expected += paths[:round(n / 2)]
    assert [d.impath for d in train] == expected
    # the split file is CoOp's format, beside the images, and what later reads see
    split_path = os.path.join(folder, SPLIT_FILE)
    with open(split_path) as f:
        rows = json.load(f)
    assert rows["train"][0] == [os.path.relpath(train[0].impath, folder), 0, "cat"]
    assert read_split_json(split_path, folder) == (train, val, test)
    assert any(split_path in line for line in lines)
    lines.clear()
    assert read_image_folder(folder, log=lines.append) == (train, val, test)
    assert lines == [f"{folder}: reading the split in {split_path}"]


def test_split_does_not_depend_on_the_run_seed_and_is_the_same_on_another_copy(tmp_path):
    first = write_images(tmp_path / "a", {"cat": 9, "dog": 9})
    second = write_images(tmp_path / "b", {"cat": 9, "dog": 9})
    split_a = build_dataset(folder_cfg("DATASET.FOLDER", first, seed=1))
    split_b = build_dataset(folder_cfg("DATASET.FOLDER", second, seed=3))
    assert names(split_a.test) == names(split_b.test)
    assert [os.path.relpath(d.impath, first) for d in split_a.test] == [
        os.path.relpath(d.impath, second) for d in split_b.test]


def test_classnames_txt_names_the_classes(tmp_path):
    folder = write_images(tmp_path / "imgs", {"n01": 4, "n02": 4})
    (tmp_path / "imgs" / "classnames.txt").write_text("n02 golden retriever\nn01 tabby cat\n"
                                                      "n99 not in the folder\n")
    train, _, _ = read_image_folder(folder, log=lambda line: None)
    assert sorted({(d.label, d.classname) for d in train}) == [(0, "tabby cat"),
                                                              (1, "golden retriever")]


# ---------------------------------------------------------------- train/val/test folders


def test_train_val_test_folders_are_the_split(tmp_path):
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        write_images(tmp_path / "d" / split, {"cat": n, "dog": n})
    train, val, test = read_image_folder(str(tmp_path / "d"), log=lambda line: None)
    assert [len(train), len(val), len(test)] == [10, 4, 6]
    assert {os.path.basename(os.path.dirname(os.path.dirname(d.impath))) for d in val} == {"val"}
    assert [d.label for d in test] == [0, 0, 0, 1, 1, 1]


def test_train_and_test_folders_draw_val_from_train_and_val_alone_is_the_test_split(tmp_path):
    write_images(tmp_path / "d" / "train", {"cat": 10, "dog": 5})
    write_images(tmp_path / "d" / "test", {"cat": 2, "dog": 2})
    train, val, test = read_image_folder(str(tmp_path / "d"), log=lambda line: None)
    # CoOp's split_trainval: round(n / 5) of each class to val
    assert [sum(d.label == c for d in val) for c in (0, 1)] == [2, 1]
    assert len(train) == 12 and len(test) == 4
    assert not {d.impath for d in train} & {d.impath for d in val}

    write_images(tmp_path / "e" / "train", {"cat": 3, "dog": 3})
    write_images(tmp_path / "e" / "val", {"cat": 2, "dog": 2})
    lines = []
    train, val, test = read_image_folder(str(tmp_path / "e"), log=lines.append)
    assert val == test and len(val) == 4
    assert any("val/ is the test split too" in line for line in lines)


# ---------------------------------------------------------------- config, few-shot, base/new


def test_folder_given_by_root_absolute_or_relative_folder(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "photos" / "mine", {"a": 4, "b": 4})
    by_root = load_cfg(dataset_config_file=FOLDER_CFG, opts=["DATASET.ROOT", folder])
    by_path = load_cfg(dataset_config_file=FOLDER_CFG, opts=["DATASET.FOLDER", folder])
    under_root = load_cfg(dataset_config_file=FOLDER_CFG, opts=[
        "DATASET.ROOT", str(tmp_path / "photos"), "DATASET.FOLDER", "mine"])
    monkeypatch.chdir(tmp_path)
    relative = load_cfg(dataset_config_file=FOLDER_CFG, opts=["DATASET.FOLDER", "photos/mine"])
    assert {dataset_root(c) for c in (by_root, by_path, under_root, relative)} == {folder}
    assert names(build_dataset(by_root).test) == names(build_dataset(relative).test)


def test_fewshot_and_base_new_halves_work_as_for_every_dataset(tmp_path):
    folder = write_images(tmp_path / "d", {f"class_{i}": 8 for i in range(5)})
    base = build_dataset(folder_cfg("DATASET.FOLDER", folder, shots=2, subsample="base"))
    new = build_dataset(folder_cfg("DATASET.FOLDER", folder, shots=2, subsample="new"))
    assert base.classnames == ["class 0", "class 1", "class 2"]
    assert new.classnames == ["class 3", "class 4"]
    assert [d.label for d in base.train_x].count(0) == 2 and len(base.train_x) == 6
    assert sorted({d.label for d in new.test}) == [0, 1]
    # the few-shot draw is cached beside the split, as CoOp caches it
    assert os.path.isfile(os.path.join(folder, "split_fewshot", "shot_2-seed_1.pkl"))
    again = build_dataset(folder_cfg("DATASET.FOLDER", folder, shots=2, subsample="base"))
    assert again.train_x == base.train_x


@pytest.mark.skipif(not HAS_DASSL, reason="Dassl.pytorch is not installed")
def test_dassl_registry_reads_the_same_folder(tmp_path):
    from dassl.data.datasets import DATASET_REGISTRY

    import textrefiner_trainers  # noqa: F401 - registers TR_ImageFolder

    assert "ImageFolder" in DATASETS
    folder = write_images(tmp_path / "d", {"cat": 6, "dog": 6, "cow": 6})
    cfg = folder_cfg("DATASET.FOLDER", folder, shots=2, subsample="base")
    ours = build_dataset(cfg)
    dassl = DATASET_REGISTRY.get("TR_ImageFolder")(cfg)
    assert [(d.impath, d.label) for d in dassl.train_x] == [(d.impath, d.label)
                                                            for d in ours.train_x]
    assert [d.impath for d in dassl.test] == [d.impath for d in ours.test]
    assert dassl.classnames == ours.classnames == ["cat", "cow"]


def test_demo_writes_a_class_folder_tree_that_reads_as_a_dataset(tmp_path):
    from textrefiner.demo import main

    assert main(["images", str(tmp_path / "shapes"), "--classes", "red circle", "blue ring",
                 "--per-class", "6"]) == 0
    assert sorted(os.listdir(tmp_path / "shapes")) == ["blue_ring", "red_circle"]
    train, val, test = read_image_folder(str(tmp_path / "shapes"), log=lambda line: None)
    assert sorted({d.classname for d in test}) == ["blue ring", "red circle"]
    assert len(train) + len(val) + len(test) == 12
    with pytest.raises(ValueError, match="not a demo class"):
        write_image_folder(str(tmp_path / "x"), ["pink circle"])


# ---------------------------------------------------------------- one line per bad folder


def test_missing_folder_and_no_folder_given(tmp_path):
    one_line_error(f"folder not found: {tmp_path / 'nope'}. Point DATASET.FOLDER",
                   build_dataset, folder_cfg("DATASET.FOLDER", str(tmp_path / "nope")))
    one_line_error("no folder given. Set DATASET.FOLDER", build_dataset, folder_cfg())


def test_no_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    one_line_error(f"{tmp_path / 'flat'} has no class folders: put each class's images in a "
                   "subfolder", read_image_folder, str(tmp_path / "flat"))


def test_one_class(tmp_path):
    folder = write_images(tmp_path / "d", {"cat": 5})
    one_line_error(r"has one class folder \(cat\): a classifier needs at least two classes",
                   read_image_folder, folder)


def test_empty_class(tmp_path):
    folder = write_images(tmp_path / "d", {"cat": 5, "dog": 0})
    one_line_error(f"{os.path.join(folder, 'dog')} holds no images", read_image_folder, folder)


def test_class_too_small_to_split(tmp_path):
    folder = write_images(tmp_path / "d", {"cat": 5, "dog": 3})
    one_line_error(f"{os.path.join(folder, 'dog')} holds 3 image.*needs at least 4",
                   read_image_folder, folder)
    assert not os.path.exists(os.path.join(folder, SPLIT_FILE))


def test_fewer_images_than_shots(tmp_path):
    folder = write_images(tmp_path / "d", {"cat": 20, "dog": 6})
    msg = one_line_error(r"Class 'dog' .* has 3 training image\(s\), fewer than "
                         "DATASET.NUM_SHOTS 4", build_dataset,
                         folder_cfg("DATASET.FOLDER", folder, shots=4))
    assert os.path.join(folder, "dog") in msg


def test_files_that_are_not_images_are_skipped_and_counted(tmp_path):
    folder = write_images(tmp_path / "d", {"cat": 4, "dog": 4})
    (tmp_path / "d" / "cat" / "notes.txt").write_text("taken in May")
    (tmp_path / "d" / "dog" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "d" / "README").write_text("my pets")
    (tmp_path / "d" / "cat" / ".hidden.png").write_bytes(b"")  # hidden: not even counted
    lines = []
    train, val, test = read_image_folder(folder, log=lines.append)
    assert len(train + val + test) == 8
    skipped = [line for line in lines if "skipped" in line]
    assert len(skipped) == 1 and "skipped 3 file(s) that are not images" in skipped[0]


def test_unreadable_image_is_refused(tmp_path):
    folder = write_images(tmp_path / "d", {"cat": 4, "dog": 4})
    bad = os.path.join(folder, "dog", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    one_line_error(f"{bad} is not a readable image .*: delete or replace it", read_image_folder,
                   folder)
    assert not os.path.exists(os.path.join(folder, SPLIT_FILE))


@pytest.mark.parametrize("second", ["sea lion", "Sea_Lion"])
def test_two_folders_giving_one_class_name(tmp_path, second):
    folder = write_images(tmp_path / "d", {"sea_lion": 4, second: 4, "cat": 4})
    one_line_error("both give the class name .*: rename one folder", read_image_folder, folder)


def test_classnames_txt_without_a_folder(tmp_path):
    folder = write_images(tmp_path / "d", {"n01": 4, "n02": 4})
    (tmp_path / "d" / "classnames.txt").write_text("n01 cat\n")
    one_line_error("classnames.txt gives no class name for the folder 'n02'", read_image_folder,
                   folder)


def test_train_and_test_with_different_classes(tmp_path):
    write_images(tmp_path / "d" / "train", {"cat": 4, "dog": 4})
    write_images(tmp_path / "d" / "test", {"cat": 2, "cow": 2})
    one_line_error(r"train and .*test have different class folders \(only in train: dog; only "
                   r"in test: cow\)", read_image_folder, str(tmp_path / "d"))


def test_split_folders_beside_class_folders(tmp_path):
    write_images(tmp_path / "d" / "train", {"cat": 4, "dog": 4})
    write_images(tmp_path / "d" / "test", {"cat": 2, "dog": 2})
    write_images(tmp_path / "d", {"horse": 2})
    one_line_error(r"beside other folders \(horse\)", read_image_folder, str(tmp_path / "d"))


@pytest.mark.parametrize("alone, missing", [(("train",), "test/ or val/"),
                                             (("val", "test"), "train/")])
def test_incomplete_split_folders(tmp_path, alone, missing):
    for split in alone:
        write_images(tmp_path / "d" / split, {"cat": 4, "dog": 4})
    one_line_error(f"without {missing} beside it", read_image_folder, str(tmp_path / "d"))


def test_images_added_after_the_split_was_written(tmp_path):
    folder = write_images(tmp_path / "d", {"cat": 4, "dog": 4})
    read_image_folder(folder, log=lambda line: None)
    write_images(tmp_path / "d", {"cow": 4})
    one_line_error(f"changed since its split file {os.path.join(folder, SPLIT_FILE)} was written"
                   ".*delete", read_image_folder, folder)


# ---------------------------------------------------------------- read-only folders

READ_ONLY_CHILD = """
import sys
from textrefiner.config import load_cfg
from textrefiner.data import build_dataset
cfg = load_cfg(dataset_config_file=sys.argv[2], opts=["DATASET.FOLDER", sys.argv[1],
               "DATASET.NUM_SHOTS", "2", "SEED", "1"])
print(len(build_dataset(cfg).train_x))
"""


def without_root_override():
    """The command prefix that makes a child see file modes as their owner does. Root writes
    anywhere, so as root the child runs without the capabilities that override file modes
    (util-linux's setpriv): it still reads everything root owns (the checkout, wherever it is,
    the Python installation), but a folder of mode 0555 is read-only to it, as to any user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: no way to make a folder "
                    "read-only to a child process (install util-linux, or run as another user)")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_read_only_folder_keeps_its_split_in_the_cache_and_says_where(tmp_path):
    folder = write_images(str(tmp_path / "photos"), {"cat": 6, "dog": 6})
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    try:
        for path, dirs, _ in os.walk(folder):
            os.chmod(path, 0o555)
        env = dict(os.environ, **{CACHE_ENV: cache})
        child = without_root_override() + [sys.executable, "-c", READ_ONLY_CHILD, folder,
                                           FOLDER_CFG]
        runs = [subprocess.run(child, capture_output=True, text=True, env=env,
                               timeout=HANG_TIMEOUT) for _ in range(2)]
        for out in runs:
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines()[-1] == "4"
        with mock.patch.dict(os.environ, {CACHE_ENV: cache}):
            env_home = cache_home(folder)
        split_path = os.path.join(env_home, SPLIT_FILE)
        assert f"{folder} is not writable: its split file is kept in {split_path}" in runs[0].stdout
        assert f"reading the split in {split_path}" in runs[1].stdout
        assert os.path.isfile(os.path.join(env_home, "split_fewshot", "shot_2-seed_1.pkl"))
        assert not os.path.exists(os.path.join(folder, SPLIT_FILE))
    finally:
        for path, dirs, _ in os.walk(folder):
            os.chmod(path, 0o755)  # tmp_path's clean-up deletes it


# ---------------------------------------------------------------- one run, every way to start it


@pytest.mark.skipif(not HAS_DASSL, reason="Dassl.pytorch is not installed")
def test_a_folder_gives_the_same_run_on_both_engines_and_in_the_drop_in(demo, tmp_path):
    """textrefiner-train on the Dassl and the built-in engine, and a CoOp checkout's train.py with
    the drop-in lines (where TEXTREFINER_CODEBASES holds one), train on the same folder: the same
    batches, crops and random states, the same learned context."""
    from test_codebase_runs import CODEBASES, assert_same_tensors, learned, run, stream

    folder = write_image_folder(str(tmp_path / "shapes"), ["red circle", "green square",
                                                          "blue triangle", "yellow cross"],
                                per_class=8, image_size=32)
    args = ["--root", folder, "--seed", "1", "--dataset-config-file", FOLDER_CFG,
            "--config-file", "configs/trainers/CoOp/demo_cpu.yaml"]
    opts = ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "2",
            "DATALOADER.NUM_WORKERS", "0", "DATASET.SUBSAMPLE_CLASSES", "base"]
    runs = {"dassl": ("ours", ["--engine", "dassl", "--trainer", "CoOp"], ""),
            "standalone": ("ours-nodassl", ["--engine", "standalone", "--trainer", "CoOp"], "")}
    coop = [repo for repo in CODEBASES if os.path.isfile(os.path.join(repo, "trainers", "coop.py"))]
    if coop:
        runs["drop-in"] = ("dropin", ["--trainer", "TR_CoOp"], coop[0])
    results = {}
    for name, (mode, flags, codebase) in runs.items():
        out = tmp_path / name
        lines = run(mode, tmp_path / f"{name}.txt", demo["clip"],
                    flags + args + ["--output-dir", str(out)] + opts, codebase)
        with open(out / "log.txt", encoding="utf-8") as f:
            log = f.read()
        accuracy = [line for line in log.splitlines() if line.startswith("* accuracy")]
        results[name] = (stream(lines), learned(str(out / "prompt_learner" / "model.pth.tar-2")),
                         accuracy)
        assert f"reading the split in {os.path.join(folder, SPLIT_FILE)}" in log or (
            "split file written to" in log), name
    (main, _), theirs, accuracy = results.pop("dassl")
    assert sum(line.startswith("batch ") for line in main) >= 2 and accuracy
    for name, ((our_main, _), ours, our_accuracy) in results.items():
        assert our_main == main, f"{name}: other batches, crops or random states"
        assert_same_tensors(ours, theirs, name)
        assert our_accuracy == accuracy, name


@pytest.mark.parametrize("engine", ["standalone", "dassl"])
def test_textrefiner_train_reports_a_bad_folder_in_one_line(demo, tmp_path, capsys, engine):
    if engine == "dassl" and not HAS_DASSL:
        pytest.skip("Dassl.pytorch is not installed")
    from textrefiner.train import main

    folder = write_images(tmp_path / "photos", {"cat": 6})
    code = main(["--engine", engine, "--root", folder, "--trainer", "CoOp",
                 "--dataset-config-file", FOLDER_CFG, "--config-file",
                 "configs/trainers/CoOp/demo_cpu.yaml",
                 "--output-dir", str(tmp_path / "out"), "MODEL.BACKBONE.PATH", demo["clip"]])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"textrefiner-train: error: {folder} has one class folder (cat): a classifier "
                   "needs at least two classes; add a folder per class."]


def test_textrefiner_data_checks_a_folder_and_lists_its_classes(tmp_path, capsys):
    from textrefiner.data.prepare import main

    folder = write_images(tmp_path / "pets", {"cat": 10, "sea_lion": 4})
    assert main(["ImageFolder", "--root", folder]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == ["    0      5     2     3  cat (cat)",
                        "    1      2     1     1  sea lion (sea_lion)",
                        "2 classes; train 7, val 3, test 4 images"]
    assert os.path.isfile(os.path.join(folder, SPLIT_FILE))
    write_images(tmp_path / "one", {"cat": 4})
    assert main(["ImageFolder", "--root", str(tmp_path / "one")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'one'} has one class folder (cat): a classifier needs at least two "
        "classes; add a folder per class."]
