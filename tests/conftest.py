"""Shared fixtures: small random-weight CLIP checkpoints and configs, all on the CPU."""
import os

import atexit
import shutil
import tempfile

# Idle OpenMP threads must not spin on a shared 2-core machine (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _private_home():
    """The tests' own home folder, for this process and every process it starts: nothing they
    write lands in the user's ~/.cache (split files of read-only folders, Hugging Face, CLIP,
    matplotlib), and the suite runs the same for a user whose home is missing or read-only."""
    home = tempfile.mkdtemp(prefix="textrefiner-tests-home-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    for name, sub in (("HOME", ""), ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                      ("HF_HOME", ".cache/huggingface"), ("MPLCONFIGDIR", ".config/matplotlib")):
        os.environ[name] = os.path.join(home, sub) if sub else home
    os.environ.pop("TEXTREFINER_CACHE", None)  # the default, under the private home


_private_home()

import pytest  # noqa: E402
import torch  # noqa: E402

from textrefiner.clip_backbone import load_clip, save_random_clip  # noqa: E402
from textrefiner.config import load_cfg  # noqa: E402

# Student-sized and teacher-sized toy CLIPs: the vision and text widths and the joint dims all
# differ, so a mixed-up dimension fails loudly.
SMALL_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128,
                  vision_patch_size=8, transformer_width=64, transformer_layers=3)
TEACHER_CLIP = dict(embed_dim=48, image_resolution=32, vision_layers=2, vision_width=192,
                    vision_patch_size=8, transformer_width=128, transformer_layers=2, seed=1)
# A ResNet CLIP (`ModifiedResNet`): 96 px images give a 3 x 3 map, 9 local tokens.
RESNET_CLIP = dict(embed_dim=32, image_resolution=96, vision_layers=(1, 2, 1, 1), vision_width=16,
                   transformer_width=64, transformer_layers=2, seed=2)

# The one wall-clock limit on the subprocesses tests start; it only stops a hung test, never
# decides a result. The longest test that starts them (two evaluations at once in
# tests/test_feature_store.py) took 27 s on a 2-core machine with two busy loops beside the suite,
# and whole files ran 2.5 times slower at a load average of 10: 30 minutes lets a machine ten
# times slower than that pass.
HANG_TIMEOUT = 1800

CLASSNAMES = ["red circle", "blue square", "green_triangle", "yellow star", "striped disc"]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The toy models are too small to gain from threads; one avoids oversubscribing 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The offline demo's synthetic dataset and small random CLIP: {"root", "clip"}."""
    from textrefiner.demo import prepare
    return prepare(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    return save_random_clip(str(tmp_path_factory.mktemp("clip") / "small_clip.pt"), **SMALL_CLIP)


@pytest.fixture(scope="session")
def resnet_clip_path(tmp_path_factory):
    return save_random_clip(str(tmp_path_factory.mktemp("clip") / "resnet_clip.pt"),
                            **RESNET_CLIP)


@pytest.fixture(scope="session")
def teacher_clip_path(tmp_path_factory):
    return save_random_clip(str(tmp_path_factory.mktemp("clip") / "teacher_clip.pt"),
                            **TEACHER_CLIP)


def write_teacher_checkpoint(path, teacher_clip_path, scale=0.5, seed=7):
    """A PromptSRC-layout teacher checkpoint (a Dassl dict, as PromptKD publishes them) for the
    toy teacher CLIP: 4 text + 4 vision prompt tokens, depth 2, and the CLIP weights."""
    from textrefiner.demo import save_random_teacher

    return save_random_teacher(str(path), teacher_clip_path, scale, seed)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory, teacher_clip_path):
    folder = tmp_path_factory.mktemp("teacher") / "VLPromptLearner"
    return write_teacher_checkpoint(folder / "model-best.pth.tar", teacher_clip_path)


@pytest.fixture
def small_clip(clip_path):
    return load_clip(clip_path, "fp32")


def make_cfg(*opts, **overrides):
    """The published defaults plus `KEY VALUE` overrides, sized for the toy CLIPs."""
    base = ["INPUT.SIZE", "(32, 32)", "TRAINER.COOP.PREC", "fp32", "TRAINER.MAPLE.PREC", "fp32",
            "TRAINER.PROMPTKD.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", "2",
            "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2", "TRAINER.COOP.CTX_INIT", "a photo of a"]
    return load_cfg(opts=base + list(opts), **overrides)


@pytest.fixture
def cfg_factory():
    return make_cfg


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(4, 3, 32, 32)


def run_killed(argv, kill_at, cwd):
    """Run `python -m textrefiner.train ARGV` with TEXTREFINER_KILL_AT=`kill_at`, which makes the
    run SIGKILL itself at exactly that point (textrefiner/faults.py), and check that it did: the
    exit status is -9 and the run printed the kill's line. Returns the run's output."""
    import signal
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TEXTREFINER_KILL_AT=kill_at)
    proc = subprocess.run([sys.executable, "-m", "textrefiner.train"] + list(argv), cwd=cwd,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=HANG_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
    assert f"TEXTREFINER_KILL_AT={kill_at}: killed process" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


TINY_RUN_CLASSES = ["red circle", "green square", "blue triangle", "yellow cross"]
TINY_RUN_NEW = ["red square", "blue cross"]  # never trained on


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained CoOp + TextRefiner run on the demo's tiny pretrained CLIP (4 classes of synthetic
    shapes, 4 shots, 2 epochs) and images of two classes it never saw:
    {"run", "clip", "new": folder of <class>/*.png, "classes", "new_classes"}."""
    from textrefiner.data.synthetic import write_image_folder
    from textrefiner.demo import prepare_pretrained
    from textrefiner.train import main as train

    folder = tmp_path_factory.mktemp("tiny_run")
    clip = prepare_pretrained(str(folder / "demo"), log=None)["clip"]
    shapes = write_image_folder(str(folder / "shapes"), TINY_RUN_CLASSES, 10, 32, 0)
    new = write_image_folder(str(folder / "new"), TINY_RUN_NEW, 2, 32, 1)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = str(folder / "run")
    assert train(["--root", shapes, "--trainer", "CoOp", "--refiner", "--seed", "1",
                  "--dataset-config-file", f"{repo}/configs/datasets/image_folder.yaml",
                  "--config-file", f"{repo}/configs/trainers/CoOp/demo_tiny.yaml",
                  "--output-dir", run, "MODEL.BACKBONE.PATH", clip, "DATASET.NUM_SHOTS", "4",
                  "OPTIM.MAX_EPOCH", "2"]) == 0
    return {"run": run, "clip": clip, "new": new, "classes": sorted(TINY_RUN_CLASSES),  # labels
            "new_classes": TINY_RUN_NEW}


# ---------------------------------------------------------------- the slow end-to-end tests

SLOW_NOTE = ("tests marked `slow` (end-to-end, minutes each) are left out of this run: "
             "`python -m pytest -q -m slow` runs them (CI runs both), --slow runs everything")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the slow end-to-end tests (marked `slow`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end test of a minute or more; left out "
                            "of `python -m pytest -q` unless -m selects it or --slow is given")


def _slow_left_out(config) -> bool:
    """Slow tests run when asked for: by --slow, by a -m expression, or by naming a test."""
    named = any("::" in arg for arg in config.args)
    return not (config.getoption("--slow") or config.option.markexpr or named)


def pytest_collection_modifyitems(config, items):
    if not _slow_left_out(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_terminal_summary(terminalreporter, config):
    if _slow_left_out(config) and not hasattr(config, "workerinput"):
        terminalreporter.write_line(SLOW_NOTE)
