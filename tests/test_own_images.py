"""docs/own-images.md's walk-through, run exactly as written (offline, CPU): the demo's folder of
shapes, CoOp + TextRefiner trained on six classes, four new classes named only at prediction
time, the ONNX export; and its Python snippet."""
import csv
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import HANG_TIMEOUT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "own-images.md")
# The walk-through trains, predicts and exports (minutes on a loaded machine): CI runs it with -m slow.
pytestmark = pytest.mark.slow



def page_block(heading: str, language: str) -> str:
    """The first ```language block after `heading` in docs/own-images.md."""
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture(scope="session")  # kept on its pytest-xdist worker, never rebuilt
def walked(tmp_path_factory):
    """The walk-through's bash block, run in an empty folder (the configs it names are shipped)."""
    folder = tmp_path_factory.mktemp("walk")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    script = page_block("## Train, predict, export", "bash")
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=folder, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return folder


NEW = ["red square", "green triangle", "blue cross", "yellow ring"]


def predictions(folder):
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def true_class(path):
    return os.path.basename(os.path.dirname(path)).replace("_", " ")


def test_new_classes_are_named_well_above_chance(walked):
    rows = predictions(walked)
    assert len(rows) == 80 and {row["top1"] for row in rows} <= set(NEW)
    accuracy = sum(true_class(row["image"]) == row["top1"] for row in rows) / len(rows)
    # 82.5% measured (66 of 80); chance is 25%: the margin absorbs other CPUs' kernels
    assert accuracy > 0.6, accuracy


def test_exported_model_gives_the_same_top1(walked):
    ort = pytest.importorskip("onnxruntime")
    from test_export import sidecar_preprocess
    import json
    import numpy as np

    info = json.loads((walked / "shapes.json").read_text())
    assert info["classes"] == NEW
    session = ort.InferenceSession(str(walked / "shapes.onnx"), providers=["CPUExecutionProvider"])
    rows = predictions(walked)
    batch = np.concatenate([sidecar_preprocess(walked / row["image"], info) for row in rows])
    logits = session.run(None, {info["input"]: batch})[0]
    assert [info["classes"][i] for i in logits.argmax(1)] == [row["top1"] for row in rows]


def test_python_snippet_runs(walked, monkeypatch):
    monkeypatch.chdir(walked)
    snippet = page_block("From Python", "python")
    with Image.open("new_shapes/blue_cross/blue_cross_000.png") as image:
        namespace = {"pil_image": image.convert("RGB")}
    exec(compile(snippet, "docs/own-images.md", "exec"), namespace)
    probabilities = namespace["probabilities"]
    assert probabilities.shape == (2, 2)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2))
    assert namespace["best"] in ("red square", "blue cross")
