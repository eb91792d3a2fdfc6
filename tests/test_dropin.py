"""Drop-in use inside CoOp-style repositories: files shared with the codebases, the --refiner
flag with their own trainers, their config paths, and the docs' drop-in lines."""
import argparse
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from textrefiner.config import (CONFIG_DIR, ConfigError, add_refiner_args, apply_refiner_args,
                                load_cfg, tr_config_file)
from textrefiner.data import Datum, build_dataset
from textrefiner.data.base import fewshot_cache_path, load_fewshot_cache, save_fewshot_cache

from conftest import make_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DASSL = importlib.util.find_spec("dassl") is not None

# A stand-in for Dassl's Datum where Dassl is not installed: the same pickled attributes.
FAKE_DASSL = {
    "dassl/__init__.py": "",
    "dassl/data/__init__.py": "",
    "dassl/data/datasets/__init__.py": "",
    "dassl/data/datasets/base_dataset.py": textwrap.dedent("""\
        class Datum:
            impath = property(lambda self: self._impath)
            label = property(lambda self: self._label)
            domain = property(lambda self: self._domain)
            classname = property(lambda self: self._classname)
        """),
}

# What a CoOp-style dataset reader does with the cache, without textrefiner importable.
CODEBASE_READER = textwrap.dedent("""\
    import pickle, sys
    sys.modules["textrefiner"] = None  # as in an environment without textrefiner
    from dassl.data.datasets.base_dataset import Datum
    with open(sys.argv[1], "rb") as f:
        data = pickle.load(f)
    for key in sorted(data):
        for item in data[key]:
            assert type(item) is Datum, type(item)
            print(key, item.impath, item.label, item.domain, item.classname)
    """)


def codebase_env(tmp_path):
    env = dict(os.environ)
    if not HAS_DASSL:
        for name, text in FAKE_DASSL.items():
            path = tmp_path / "fake" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        env["PYTHONPATH"] = str(tmp_path / "fake")
    return env


def write_images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"{i}.png"
        path.write_bytes(b"")
        items.append(Datum(str(path), i % 2, f"class {i % 2}"))
    return items


# ------------------------------------------------------------------------------------------
def test_fewshot_cache_is_read_by_the_codebases_without_textrefiner(tmp_path):
    items = write_images(tmp_path / "data" / "images")
    path = fewshot_cache_path(str(tmp_path / "data"), 2, 1)
    save_fewshot_cache(path, {"train": items, "val": items[:1]})
    out = subprocess.run([sys.executable, "-c", CODEBASE_READER, path], capture_output=True,
                         text=True, env=codebase_env(tmp_path), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == [f"train {d.impath} {d.label} 0 {d.classname}" for d in items] + [
        f"val {items[0].impath} 0 0 class 0"]
    # ... and read back here, with or without Dassl
    assert load_fewshot_cache(path, str(tmp_path / "data")) == {"train": items, "val": items[:1]}


def test_fewshot_cache_of_earlier_versions_loads_and_is_rewritten(tmp_path):
    items = write_images(tmp_path / "data" / "images")
    path = fewshot_cache_path(str(tmp_path / "data"), 2, 1)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:  # what textrefiner wrote before: its own Datum
        pickle.dump({"train": items}, f)
    assert b"textrefiner" in open(path, "rb").read()
    assert load_fewshot_cache(path, str(tmp_path / "data")) == {"train": items}
    assert b"textrefiner" not in open(path, "rb").read()  # rewritten in Dassl's format
    assert load_fewshot_cache(path, str(tmp_path / "data")) == {"train": items}


@pytest.mark.skipif(not HAS_DASSL, reason="Dassl.pytorch is not installed")
def test_fewshot_cache_written_by_dassl_loads(tmp_path):
    from dassl.data.datasets import Datum as DasslDatum

    items = write_images(tmp_path / "data" / "images")
    path = fewshot_cache_path(str(tmp_path / "data"), 2, 1)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        pickle.dump({"train": [DasslDatum(d.impath, d.label, 0, d.classname) for d in items]}, f)
    assert load_fewshot_cache(path, str(tmp_path / "data")) == {"train": items}
    save_fewshot_cache(path, {"train": items})  # and ours unpickles as Dassl's Datum there
    with open(path, "rb") as f:
        assert all(type(d) is DasslDatum for d in pickle.load(f)["train"])


# ------------------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainer", default="")
    add_refiner_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("method", ["CoOp", "CoCoOp", "MaPLe", "PromptSRC", "PromptKD"])
def test_refiner_with_a_codebase_trainer_names_the_tr_trainer(method):
    cfg = load_cfg(opts=["TRAINER.NAME", method])
    with pytest.raises(ConfigError, match=f"--trainer TR_{method}"):
        apply_refiner_args(cfg, parse(["--trainer", method, "--refiner"]))
    # with the TR_ trainer, or without --refiner, nothing to say
    assert apply_refiner_args(load_cfg(opts=["TRAINER.NAME", f"TR_{method}"]),
                              parse(["--refiner"])).TRAINER.REFINER.ENABLED
    assert not apply_refiner_args(load_cfg(opts=["TRAINER.NAME", method]),
                                  parse([])).TRAINER.REFINER.ENABLED


def test_refiner_with_another_trainer_lists_ours():
    with pytest.raises(ConfigError, match="TR_CoOp, .*TR_PromptKD"):
        apply_refiner_args(load_cfg(), parse(["--trainer", "VPT", "--refiner"]))


def test_tr_config_path_of_a_codebase_script_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "trainers" / "CoOp").mkdir(parents=True)
    (tmp_path / "configs" / "trainers" / "CoOp" / "vit_b16_ep10_ctxv1.yaml").write_text("")
    assert tr_config_file("configs/trainers/TR_CoOp/vit_b16_ep10_ctxv1.yaml") == os.path.join(
        "configs", "trainers", "CoOp", "vit_b16_ep10_ctxv1.yaml")
    for unchanged in ("configs/trainers/CoOp/vit_b16_ep10_ctxv1.yaml", ""):
        assert tr_config_file(unchanged) == unchanged
    with pytest.raises(ConfigError, match=r"^method config file not found: configs/trainers/"
                                          r"TR_CoOp/missing.yaml \(nor configs/trainers/CoOp/"
                                          r"missing.yaml\).*textrefiner-configs list"):
        tr_config_file("configs/trainers/TR_CoOp/missing.yaml")


@pytest.mark.parametrize("name", ["configs/trainers/TR_CoOp/demo_tiny.yaml",
                                  "configs/trainers/CoOp/demo_tiny.yaml", "CoOp/demo_tiny"])
def test_a_shipped_config_the_repository_lacks_is_the_shipped_file(tmp_path, monkeypatch, name):
    """In a codebase's checkout (its own configs/, without our demo configs)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "trainers" / "CoOp").mkdir(parents=True)
    assert tr_config_file(name) == os.path.join(CONFIG_DIR, "trainers", "CoOp", "demo_tiny.yaml")


def test_drop_in_patch_has_the_lines_the_docs_count():
    with open(os.path.join(REPO, "docs", "codebase-repos.md"), encoding="utf-8") as f:
        page = f.read()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = page[page.index("## Six lines in `train.py`"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
    assert f"{words[len(lines)]} lines" in section.split("```python")[0]
    readme_way_in = readme[readme.index("### Inside a CoOp or MaPLe repository"):]
    assert f"{words[len(lines)]} lines in its" in readme_way_in.replace("\n", " ")
