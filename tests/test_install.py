"""The package as a user installs it: `python -m build` (an sdist, then a wheel built from that
sdist), the wheel installed into a fresh venv, and the commands run from an empty folder with the
checkout nowhere on sys.path.

The fresh venv gets this environment's third-party packages (torch, ...) from a .pth file naming
their site-packages folders: Python puts those folders on sys.path but does not run the .pth files
inside them, so this environment's editable install of the checkout stays invisible there.
Slow (the demo sweep runs in full): `python -m pytest -q -m slow`.
"""
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import textrefiner
from conftest import HANG_TIMEOUT

# minutes: left to `python -m pytest -q -m slow` (CI runs it); one build and venv per worker
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DIST_INFO = f"textrefiner-{textrefiner.__version__}.dist-info"


def run(argv, cwd, env=None):
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=HANG_TIMEOUT)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def checkout_files(folder: str, suffixes) -> set:
    """The checkout's files under `folder` (relative to the repository) ending in `suffixes`."""
    return {str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*")
            if p.name.endswith(suffixes) and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """{"sdist", "wheel"}: `python -m build` of the checkout (offline: this environment's
    setuptools, no isolated build environment)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO], cwd=out)
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def fresh_venv(root: Path) -> dict:
    """{"root", "site": its site-packages, "env": a user's environment there}: a venv at `root`
    that borrows this environment's third-party packages (not the checkout: see the module's
    docstring)."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=root).strip())
    shared = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith(
        ("site-packages", "dist-packages")) and os.path.isdir(p))}
    dassl = importlib.util.find_spec("dassl")
    if dassl is not None:  # an editable Dassl.pytorch is on sys.path through a .pth: borrow it too
        shared.add(str(Path(dassl.origin).parents[1]))
    (site / "zz_third_party.pth").write_text("".join(p + "\n" for p in sorted(shared)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               VIRTUAL_ENV=str(root))
    return {"root": root, "site": site, "env": env}


def pip_install(venv_: dict, *argv) -> None:
    """pip (this environment's, which the venv borrows) installing into the venv, offline."""
    run(["python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", *argv],
        cwd=venv_["root"], env=venv_["env"])


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> dict:
    """A fresh venv (see fresh_venv) with the wheel installed in it."""
    user = fresh_venv(tmp_path_factory.mktemp("venv"))
    pip_install(user, built["wheel"])
    return user


@pytest.fixture
def empty(tmp_path_factory):
    """An empty folder outside the checkout."""
    folder = tmp_path_factory.mktemp("user")
    assert REPO not in folder.parents
    return folder


def test_the_wheel_holds_the_packages_and_their_data_and_nothing_else(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    assert {name.split("/")[0] for name in names} == {"textrefiner", "textrefiner_trainers",
                                                      DIST_INFO}
    code = checkout_files("textrefiner", ".py") | {
        "textrefiner_trainers" + name[len("trainers"):]
        for name in checkout_files("trainers", ".py")}
    data = checkout_files("textrefiner/configs", (".yaml", ".yml")) | checkout_files(
        "textrefiner/sweep", ".yaml") | {"textrefiner/demo/clip_tiny.pt",
                                         "textrefiner/serve/page.html"}
    assert len(checkout_files("textrefiner/configs", ".yaml")) > 40
    assert {"textrefiner/sweep/specs/demo.yaml", "textrefiner/sweep/paper_numbers.yaml"} <= data
    assert set(names) - {n for n in names if n.startswith(DIST_INFO + "/")} == code | data
    with zipfile.ZipFile(built["wheel"]) as wheel:
        tiny = wheel.read("textrefiner/demo/clip_tiny.pt")
    assert tiny == (REPO / "textrefiner" / "demo" / "clip_tiny.pt").read_bytes()


def test_the_sdist_holds_the_sources_and_the_data(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        links = [m.name for m in sdist.getmembers() if m.issym() or m.islnk()]
    assert not links  # the checkout's configs link is not in it; its files are
    assert {"setup.py", "pyproject.toml", "README.md", "textrefiner/demo/clip_tiny.pt",
            "textrefiner/configs/trainers/CoOp/demo_tiny.yaml",
            "textrefiner/sweep/specs/paper-table1.yaml", "trainers/coop.py"} <= names
    assert "configs/trainers/CoOp/demo_tiny.yaml" not in names


def test_the_installed_package_is_not_the_checkout(installed, empty):
    out = run(["python", "-c", "import importlib.util, sys, textrefiner; "  # the Dassl layer
               "print(textrefiner.__file__); "                             # imports Dassl: found,
               "print(importlib.util.find_spec('textrefiner_trainers').origin); "  # not imported
               "print(*sys.path, sep='\\n')"], cwd=empty, env=installed["env"]).splitlines()
    root = installed["root"]
    assert root in Path(out[0]).parents and root in Path(out[1]).parents
    # (CI's venv, whose packages the fresh one borrows, may live inside the checkout)
    entries = [Path(p).resolve() for p in out[2:] if p]
    assert REPO not in entries
    assert [p for p in entries if (p / "textrefiner").is_dir()] == [installed["site"].resolve()]
    for stray in ("configs", "tests", "trainers", "benchmarks", "scripts"):
        run(["python", "-c", f"import importlib.util as u; assert u.find_spec({stray!r}) is None"],
            cwd=empty, env=installed["env"])


def readme_block(heading: str) -> str:
    """The first bash block after `heading` in the README."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.search(r"```bash\n(.*?)```", text[text.index(heading):], flags=re.S).group(1)


def table_cells(line: str) -> list:
    """The cells of a Markdown table's row, stripped; [] for any other line."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")] \
        if line.startswith("|") else []


def test_the_readme_commands_run_from_an_empty_folder(installed, empty):
    """The user's install as the README's set-up has it: the demo sweep, whose table is the
    README's; then its own-images walk-through, as written; the shipped sweeps' plans; a config a
    user copies out and edits, read in its place by a sweep."""
    env = installed["env"]
    bash = ["bash", "-euo", "pipefail", "-c"]
    setup = [line for line in readme_block("### Install").splitlines()  # after its pip installs
             if not line.startswith("pip install")]
    assert setup and setup[0].startswith("textrefiner-sweep demo")
    table = run(bash + ["\n".join(setup)], cwd=empty, env=env)
    readme_rows = re.findall(r"^\| (?:ZeroshotCLIP|CoOp|CoOp\+TR) \|.*$",
                             (REPO / "README.md").read_text(encoding="utf-8"), flags=re.M)
    assert len(readme_rows) == 3
    rows = {cells[0]: cells for cells in map(table_cells, table.splitlines()) if cells}
    for row in map(table_cells, readme_rows):  # method, base, novel, HM
        assert rows.get(row[0], [])[:4] == row[:4], table
    run(bash + [readme_block("### Your own images")], cwd=empty, env=env)
    log = (empty / "output" / "shapes" / "log.txt").read_text()
    assert_read_shipped(log, installed)
    assert (empty / "predictions.csv").is_file() and (empty / "shapes.onnx").is_file()
    assert "red circle" in run(["textrefiner-data", "ImageFolder", "--root", "shapes"],
                               cwd=empty, env=env)

    demo = run(["textrefiner-sweep", "demo", "--out", "sweepdemo", "--dry-run"], cwd=empty, env=env)
    assert demo.splitlines()[-1] == "14 runs in all: 0 finished, 14 to do"
    for spec in ("paper-table1", "paper-table2", "paper-table3", "paper-table4", "paper-fig4",
                 "paper-fig5"):
        plan = run(["textrefiner-sweep", spec, "--root", "data", "--dry-run"], cwd=empty, env=env)
        assert re.search(r"^\d+ runs in all: 0 finished, \d+ to do$", plan, re.M), plan[-2000:]

    run(["textrefiner-configs", "copy", "CoOp/demo_tiny"], cwd=empty, env=env)
    mine = empty / "configs" / "trainers" / "CoOp" / "demo_tiny.yaml"
    mine.write_text(mine.read_text().replace("MAX_EPOCH: 10", "MAX_EPOCH: 1"))
    (empty / "small.yaml").write_text(
        "protocol: base2new\ndatasets: [synthetic_shapes]\nmethods: [CoOp+TR]\nseeds: [1]\n"
        "config: demo_tiny\nshots: 2\nroot: output/demo/data\n"
        "overrides: {MODEL.BACKBONE.PATH: output/demo/clip_tiny.pt}\n")
    run(["textrefiner-sweep", "small.yaml", "--out", "small"], cwd=empty, env=env)
    train_log = next((empty / "small").rglob("train_base/**/log.txt")).read_text()
    assert f"Method config file: {mine} (your file)" in train_log
    assert "CoOp+TR" in run(["textrefiner-results", "small"], cwd=empty, env=env)


def assert_read_shipped(log: str, installed: dict) -> None:
    """The run's log says it read both config files from the installed package."""
    for role in ("Dataset", "Method"):
        read = re.search(rf"^{role} config file: (.*) \(shipped with textrefiner\)$", log, re.M)
        assert read and installed["site"] in Path(read.group(1)).parents, log[:2000]


@pytest.mark.skipif(importlib.util.find_spec("dassl") is None,
                    reason="the Dassl engine needs Dassl.pytorch (not on PyPI)")
def test_the_dassl_engine_reads_the_shipped_configs_from_an_empty_folder(installed, empty):
    env = installed["env"]
    run(["python", "-m", "textrefiner.demo", "prepare", "output/demo"], cwd=empty, env=env)
    run(["textrefiner-train", "--engine", "dassl", "--root", "output/demo/data", "--seed", "1",
         "--trainer", "CoOp", "--refiner", "--output-dir", "output/dassl",
         "--dataset-config-file", "configs/datasets/synthetic_shapes.yaml",
         "--config-file", "CoOp/demo_tiny", "MODEL.BACKBONE.PATH", "output/demo/clip_tiny.pt",
         "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "1"], cwd=empty, env=env)
    assert_read_shipped((empty / "output" / "dassl" / "log.txt").read_text(), installed)


def test_the_drop_in_reads_a_shipped_config_in_a_codebase_checkout(installed, empty):
    """A CoOp checkout has its own configs/, without ours: the drop-in's line finds a shipped
    file by the documented name, and the checkout's own file where it has one of that name (one
    we ship too: rn50_ep50)."""
    (empty / "configs" / "trainers" / "CoOp").mkdir(parents=True)
    (empty / "configs" / "trainers" / "CoOp" / "rn50_ep50.yaml").write_text("")
    found = run(["python", "-c", "from textrefiner.config import tr_config_file as f; "
                 "print(f('configs/trainers/TR_CoOp/demo_tiny.yaml')); print(f('CoOp/demo_tiny'))"
                 "; print(f('configs/trainers/TR_CoOp/rn50_ep50.yaml'))"],
                cwd=empty, env=installed["env"]).splitlines()
    assert found[0] == found[1] and installed["site"] in Path(found[0]).parents
    assert Path(found[0]).read_bytes() == (
        REPO / "textrefiner" / "configs" / "trainers" / "CoOp" / "demo_tiny.yaml").read_bytes()
    assert found[2] == os.path.join("configs", "trainers", "CoOp", "rn50_ep50.yaml")


def test_the_developers_editable_install_reads_the_checkouts_configs(tmp_path_factory, empty):
    """`pip install -e .` (here offline, with this environment's setuptools) still works: the
    commands run from any folder and read the checkout's files."""
    developer = fresh_venv(tmp_path_factory.mktemp("venv-editable"))
    pip_install(developer, "--no-build-isolation", "-e", REPO)
    found = run(["textrefiner-configs", "path", "CoOp/demo_tiny"], cwd=empty,
                env=developer["env"]).strip()
    assert found == str(REPO / "textrefiner" / "configs" / "trainers" / "CoOp" / "demo_tiny.yaml")
