"""Config names: a path, your own copy under ./configs/, else the shipped file; what a run logs of
it; `textrefiner-configs list` and `copy`. Each test runs in an empty folder, as a user of the
installed package would (tests/test_install.py runs the commands from a built wheel)."""
import os

import pytest

from textrefiner.config import load_cfg
from textrefiner.configs import CONFIG_DIR, config_names, find_config, main, shipped_configs
from textrefiner.errors import UserError
from textrefiner.train import main as train

SHIPPED_TINY = os.path.join(CONFIG_DIR, "trainers", "CoOp", "demo_tiny.yaml")
YOURS_TINY = os.path.join("configs", "trainers", "CoOp", "demo_tiny.yaml")


@pytest.fixture
def empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def your_copy(epochs: int) -> None:
    """configs/trainers/CoOp/demo_tiny.yaml of one's own: the shipped file, MAX_EPOCH changed."""
    os.makedirs(os.path.dirname(YOURS_TINY))
    with open(SHIPPED_TINY, encoding="utf-8") as f:
        text = f.read()
    assert "MAX_EPOCH: 10" in text
    with open(YOURS_TINY, "w", encoding="utf-8") as f:
        f.write(text.replace("MAX_EPOCH: 10", f"MAX_EPOCH: {epochs}"))


@pytest.mark.parametrize("name", ["configs/trainers/CoOp/demo_tiny.yaml", "CoOp/demo_tiny",
                                  "CoOp/demo_tiny.yaml", "trainers/CoOp/demo_tiny",
                                  "./configs/trainers/CoOp/demo_tiny.yaml"])
def test_a_shipped_name_is_the_shipped_file_then_your_copy(empty, name):
    assert find_config(name, "method") == SHIPPED_TINY
    assert load_cfg(name).OPTIM.MAX_EPOCH == 10
    your_copy(epochs=3)
    assert os.path.samefile(find_config(name, "method"), YOURS_TINY)
    assert load_cfg(name).OPTIM.MAX_EPOCH == 3


def test_dataset_names_are_under_datasets(empty):
    shipped = os.path.join(CONFIG_DIR, "datasets", "image_folder.yaml")
    for name in ("image_folder", "configs/datasets/image_folder.yaml", "datasets/image_folder"):
        assert find_config(name, "dataset") == shipped
    assert load_cfg(dataset_config_file="image_folder").DATASET.NAME == "ImageFolder"
    with pytest.raises(UserError, match="dataset config file not found: CoOp/demo_tiny"):
        find_config("CoOp/demo_tiny", "dataset")  # a short name is of its role's kind


def test_a_path_that_exists_is_read_whatever_its_name(empty):
    (empty / "demo_tiny.yaml").write_text("OPTIM:\n  MAX_EPOCH: 4\n")
    assert find_config("demo_tiny.yaml", "method") == "demo_tiny.yaml"
    assert load_cfg(str(empty / "demo_tiny.yaml")).OPTIM.MAX_EPOCH == 4


@pytest.mark.parametrize("name", ["CoOp/no_such_config", "configs/trainers/CoOp/../CoOp/demo_tiny",
                                  os.path.join(os.sep, "nowhere", "configs", "trainers", "CoOp",
                                               "demo_tiny.yaml"), "configs"])
def test_a_name_of_no_file_is_one_line_naming_the_list_command(empty, name):
    """Absolute paths and `..` never fall back to a shipped file."""
    with pytest.raises(UserError) as err:
        find_config(name, "method")
    assert str(err.value) == (f"method config file not found: {name} (relative to {empty}), nor "
                              "a shipped one of that name: `textrefiner-configs list` names the "
                              "shipped files.")


def test_the_names_a_sweep_checks_against_are_the_shipped_and_yours(empty):
    assert "demo_tiny" in config_names("method", "CoOp")
    assert "mine" not in config_names("method", "CoOp")
    (empty / "configs" / "trainers" / "CoOp").mkdir(parents=True)
    (empty / "configs" / "trainers" / "CoOp" / "mine.yaml").write_text("")
    assert {"demo_tiny", "mine"} <= set(config_names("method", "CoOp"))
    datasets = config_names("dataset")
    assert "image_folder" in datasets and "synthetic_shapes" in datasets and "CoOp" not in datasets


def test_list_names_every_shipped_file_with_its_short_name(empty, capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = shipped_configs()
    assert len(lines) == len(shipped) == len(set(shipped)) > 40
    assert "trainers/CoOp/demo_tiny.yaml" in shipped and "datasets/dtd.yaml" in shipped
    dtd = lines[shipped.index("datasets/dtd.yaml")]
    assert dtd.split() == ["configs/datasets/dtd.yaml", "dtd"]
    assert main(["list", "demo_tiny"]) == 0
    tiny = capsys.readouterr().out.splitlines()
    methods = sorted(m for m in os.listdir(os.path.join(CONFIG_DIR, "trainers"))
                     if os.path.isfile(os.path.join(CONFIG_DIR, "trainers", m, "demo_tiny.yaml")))
    assert "CoOp" in methods
    assert [line.split()[:2] for line in tiny] == [
        [f"configs/trainers/{m}/demo_tiny.yaml", f"{m}/demo_tiny"] for m in methods]
    your_copy(epochs=3)
    assert main(["list", "CoOp/demo_tiny"]) == 0
    assert capsys.readouterr().out.split()[-1] == f"{YOURS_TINY})"


def test_path_says_which_file_a_name_reads(empty, capsys):
    assert main(["path", "image_folder"]) == 0
    shipped = os.path.join(CONFIG_DIR, "datasets", "image_folder.yaml")
    assert capsys.readouterr().out == shipped + "\n"
    your_copy(epochs=3)
    assert main(["path", "CoOp/demo_tiny"]) == 0
    assert capsys.readouterr().out == str(empty / YOURS_TINY) + "\n"
    assert main(["path", "CoOp/nope"]) == 2
    assert capsys.readouterr().err.startswith("textrefiner-configs: error: config file not found: "
                                              "CoOp/nope (relative to ")


def test_copy_puts_the_file_where_its_name_then_reads_it(empty, capsys):
    assert main(["copy", "CoOp/demo_tiny"]) == 0
    assert capsys.readouterr().out.startswith(f"copied to {YOURS_TINY}; ")
    with open(YOURS_TINY, encoding="utf-8") as mine, open(SHIPPED_TINY, encoding="utf-8") as ours:
        assert mine.read() == ours.read()
    assert find_config("configs/trainers/CoOp/demo_tiny.yaml", "method") == YOURS_TINY
    assert main(["copy", "CoOp/demo_tiny"]) == 2  # never over one's own edits
    assert capsys.readouterr().err == (f"textrefiner-configs: error: {YOURS_TINY} exists: edit "
                                       "it, or give another DEST\n")
    (empty / "elsewhere").mkdir()
    assert main(["copy", "configs/datasets/image_folder.yaml", "elsewhere"]) == 0
    assert (empty / "elsewhere" / "image_folder.yaml").is_file()
    assert main(["copy", "image_folder", "folder.yaml"]) == 0
    assert (empty / "folder.yaml").is_file()
    assert main(["copy", "CoOp/nope"]) == 2
    assert "no shipped config named CoOp/nope" in capsys.readouterr().err


def test_the_run_logs_which_files_it_read(empty, demo):
    """A shipped file by its documented name, then one's own copy under the same name."""
    def run(out):
        argv = ["--engine", "standalone", "--root", demo["root"], "--trainer", "ZeroshotCLIP",
                "--eval-only", "--output-dir", out, "--dataset-config-file", "synthetic_shapes",
                "--config-file", "configs/trainers/CoOp/demo_tiny.yaml",
                "MODEL.BACKBONE.PATH", demo["clip"], "DATASET.SUBSAMPLE_CLASSES", "new"]
        assert train(argv) == 0
        with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
            return [line for line in f.read().splitlines() if " config file: " in line]

    dataset = os.path.join(CONFIG_DIR, "datasets", "synthetic_shapes.yaml")
    assert run("shipped") == [f"Dataset config file: {dataset} (shipped with textrefiner)",
                              f"Method config file: {SHIPPED_TINY} (shipped with textrefiner)"]
    your_copy(epochs=10)
    assert run("yours")[1] == f"Method config file: {empty / YOURS_TINY} (your file)"
