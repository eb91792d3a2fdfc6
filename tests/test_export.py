"""textrefiner-export: ONNX Runtime on the CPU gives PyTorch's logits (within 1e-4) and top-1 on
the test split for every method with and without TextRefiner; the sidecar preprocesses as the
test transform does; the class embeddings are constants of the graph (CoCoOp's text path is in
it)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_cfg
from textrefiner.clip_backbone import load_clip
from textrefiner.data import build_dataset
from textrefiner.data.transforms import build_transform
from textrefiner.export import export_onnx, main as export
from textrefiner.methods import build_method

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

OPTS = {
    "ZeroshotCLIP": (),
    "CoOp": (),
    "CoCoOp": ("TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", "a photo of a"),
    "MaPLe": (),
    "PromptSRC": ("TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2",
                  "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2"),
    "PromptKD": (),
}
CASES = [(name, refiner) for name in OPTS for refiner in (False, True)
         if not (name == "ZeroshotCLIP" and refiner)]


@pytest.fixture(scope="module")
def test_split(demo):
    cfg = make_cfg("DATASET.ROOT", demo["root"], "DATASET.NAME", "SyntheticShapes",
                   "DATASET.NUM_SHOTS", "2", "SEED", "1")
    splits = build_dataset(cfg)
    transform = build_transform(make_cfg(), is_train=False)
    images = torch.stack([transform(Image.open(item.impath).convert("RGB"))
                          for item in splits.test])
    return splits.classnames, images


def ort_logits(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"image": images.numpy()})[0])


@pytest.mark.parametrize("name, refiner", CASES)
def test_onnx_runtime_gives_pytorchs_logits(name, refiner, clip_path, teacher_ckpt,
                                            teacher_clip_path, test_split, tmp_path):
    classnames, images = test_split
    opts = list(OPTS[name]) + ["TRAINER.REFINER.ENABLED", str(refiner)]
    if name == "PromptKD":
        opts += ["TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt,
                 "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path]
    cfg = make_cfg(*opts)
    model = build_method(name, cfg, classnames, load_clip(clip_path, "fp32")).eval()
    if refiner:  # a trained-looking refiner: a cache whose aggregation moves the embeddings
        with torch.no_grad():
            model.refiner.aggregator.linear.weight.mul_(4)
    with torch.no_grad():
        expected = model(images)
    path = tmp_path / "model.onnx"
    info = export_onnx(model, cfg, str(path))
    assert info["classes"] == classnames and info["textrefiner"] == refiner
    logits = ort_logits(path, images)  # exported with a batch of 2: the batch size is free
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() < 1e-4
    assert torch.equal(logits.argmax(1), expected.argmax(1))

    import onnx
    graph = onnx.load(str(path)).graph
    weights = [init.name for init in graph.initializer]
    text_side = [w for w in weights if w.startswith(("model.text_encoder.", "model.refiner."))]
    if name == "CoCoOp":  # its classifier is per image: the meta-net and text encoder run in it
        assert any("meta_net" in w for w in weights) and text_side
    else:  # the (refined) class embeddings are one constant: no text encoder, no refiner
        assert text_side == []


def test_refined_embeddings_are_what_the_graph_holds(clip_path, test_split, tmp_path):
    """The same run exported with and without its refiner scores differently: the stored
    constant is Ehat, not E."""
    classnames, images = test_split
    clip = load_clip(clip_path, "fp32")
    outputs = []
    for refiner in (False, True):
        cfg = make_cfg("TRAINER.REFINER.ENABLED", str(refiner), "SEED", "1")
        model = build_method("CoOp", cfg, classnames, clip).eval()
        export_onnx(model, cfg, str(tmp_path / f"{refiner}.onnx"))
        outputs.append(ort_logits(tmp_path / f"{refiner}.onnx", images[:4]))
        if refiner:
            with torch.no_grad():
                plain = model.logit_scale.exp() * torch.nn.functional.normalize(
                    model.encode_images(images[:4]).features, dim=-1) @ model.text_features().t()
                refined = model(images[:4])
    assert (outputs[0] - plain).abs().max() < 1e-4  # same prompts, E without the refiner
    assert (outputs[1] - refined).abs().max() < 1e-4
    assert (outputs[1] - outputs[0]).abs().max() > 1e-3


def sidecar_preprocess(path, info):
    """What a program without this package does with the sidecar: resize the shorter side,
    centre crop, scale to [0, 1], normalise."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short = info["resize_shorter_side"]
    size = (short, round(height * short / width)) if width <= height else (
        round(width * short / height), short)
    image = image.resize(size, getattr(Image, info["interpolation"].upper()))
    crop_h, crop_w = info["center_crop"]
    left, top = round((size[0] - crop_w) / 2), round((size[1] - crop_h) / 2)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(info["mean"], np.float32)) / np.array(info["std"], np.float32)
    return array.transpose(2, 0, 1)[None]


def test_cli_exports_a_trained_run_that_a_plain_program_can_use(demo, tmp_path):
    """textrefiner-export on a trained run; the ONNX model with nothing but the sidecar and
    NumPy gives textrefiner-predict's probabilities."""
    from test_predict import run_args
    from textrefiner.predict import Predictor
    from textrefiner.train import main as train

    run = tmp_path / "run"
    assert train(run_args(demo, run, "CoCoOp", True, opts=(
        "TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", "a photo of a"))) == 0
    names = ["purple moon", "red circle", "green ring"]
    output = tmp_path / "out" / "shapes.onnx"
    assert export(["--model-dir", str(run), "--output", str(output),
                   "--classnames", ",".join(names)]) == 0
    info = json.loads((tmp_path / "out" / "shapes.json").read_text())
    assert info["classes"] == names and info["method"] == "CoCoOp"
    assert info["input_size"] == [32, 32]
    predictor = Predictor.from_run(str(run), classnames=names, device="cpu")
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    folder = os.path.join(demo["root"], "synthetic_shapes", "images")
    paths = sorted(os.path.join(folder, d, f) for d in os.listdir(folder)
                   for f in os.listdir(os.path.join(folder, d)))[:6]
    batch = np.concatenate([sidecar_preprocess(p, info) for p in paths])
    np.testing.assert_allclose(batch, predictor.preprocess(paths).numpy(), atol=1e-6)
    logits = torch.from_numpy(session.run([info["output"]], {info["input"]: batch})[0])
    torch.testing.assert_close(logits.softmax(-1), predictor(paths), atol=1e-5, rtol=1e-4)


def test_without_onnx_export_says_what_to_install(monkeypatch, capsys, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert export(["--model-dir", str(tmp_path), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "textrefiner[onnx]"' in err[0]
