"""textrefiner-predict and `Predictor`: the evaluator's logits on a test split, for either
engine's checkpoints and a codebase's; other class names; what is refused; files it skips."""
import csv
import os

import pytest
import torch
from PIL import Image

from textrefiner.clip_backbone import load_clip
from textrefiner.config import load_cfg
from textrefiner.data import build_dataset
from textrefiner.engine.evaluator import Classification
from textrefiner.methods import build_method
from textrefiner.predict import Predictor, main as predict
from textrefiner.train import main as train

DATASET_CFG = "configs/datasets/synthetic_shapes.yaml"
COOP_CFG = "configs/trainers/CoOp/demo_cpu.yaml"
COCOOP_OPTS = ("TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", "a photo of a")
MAPLE_OPTS = ("TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", "2")


def run_args(demo, out, trainer="CoOp", refiner=True, engine="standalone", opts=()):
    return (["--engine", engine, "--root", demo["root"], "--trainer", trainer, "--seed", "1",
             "--dataset-config-file", DATASET_CFG, "--config-file", COOP_CFG, "--output-dir",
             str(out)] + (["--refiner"] if refiner else [])
            + ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "2",
               "DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.MAX_EPOCH", "1", *opts])


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """Base-trained runs, by (trainer, refiner, engine): {key: output dir}."""
    runs = {}

    def get(trainer="CoOp", refiner=True, engine="standalone", opts=()):
        key = (trainer, refiner, engine, tuple(opts))
        if key not in runs:
            out = tmp_path_factory.mktemp(f"{trainer}_{refiner}_{engine}")
            assert train(run_args(demo, out, trainer, refiner, engine, opts)) == 0
            runs[key] = str(out)
        return runs[key]
    return get


def novel_split(demo):
    """The novel classes' test split as the evaluation run reads it: (classnames, items)."""
    cfg = load_cfg(None, DATASET_CFG, ["DATASET.ROOT", demo["root"], "DATASET.NUM_SHOTS", "2",
                                       "SEED", "1", "DATASET.SUBSAMPLE_CLASSES", "new"])
    splits = build_dataset(cfg)
    return splits.classnames, splits.test


def evaluator_logits(monkeypatch, argv):
    """The logits an evaluation run's evaluator scores (ours, or Dassl's under the Dassl engine)."""
    seen = []

    def recording(original):
        def process(self, logits, labels, *rest):
            seen.append(logits.detach().float().cpu().clone())
            return original(self, logits, labels, *rest)
        return process

    monkeypatch.setattr(Classification, "process", recording(Classification.process))
    try:
        from dassl.evaluation.evaluator import Classification as DasslClassification
        monkeypatch.setattr(DasslClassification, "process",
                            recording(DasslClassification.process))
    except ImportError:
        pass
    assert train(argv) == 0
    return torch.cat(seen)


def predictor_logits(predictor, items):
    batch = predictor.preprocess([item.impath for item in items])
    return torch.cat([predictor.logits(batch[i:i + 16]) for i in range(0, len(items), 16)])


CASES = [("CoOp", True, "standalone", ()), ("CoOp", False, "standalone", ()),
         ("CoCoOp", True, "standalone", COCOOP_OPTS), ("MaPLe", True, "standalone", MAPLE_OPTS),
         pytest.param("CoOp", True, "dassl", (), marks=pytest.mark.skipif(
             not __import__("importlib").util.find_spec("dassl"), reason="needs Dassl.pytorch"))]


@pytest.mark.parametrize("trainer, refiner, engine, opts", CASES)
def test_novel_class_predictions_are_the_evaluators_logits(demo, trained, tmp_path, monkeypatch,
                                                           trainer, refiner, engine, opts):
    """Base-trained run, novel class names given only at prediction time: the logits on the
    novel test split are those `--eval-only ... SUBSAMPLE_CLASSES new` scores."""
    model_dir = trained(trainer, refiner, engine, opts)
    argv = ["--eval-only", "--model-dir", model_dir, "--load-epoch", "1"] + [
        "new" if word == "base" else word
        for word in run_args(demo, tmp_path / "eval", trainer, refiner, engine, opts)]
    expected = evaluator_logits(monkeypatch, argv)
    classnames, items = novel_split(demo)
    predictor = Predictor.from_run(model_dir, classnames=classnames, device="cpu")
    assert predictor.classnames == classnames
    logits = predictor_logits(predictor, items)
    assert logits.shape == expected.shape == (len(items), len(classnames))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the probabilities are the logits' softmax, and the CLI writes them
    probabilities = predictor([item.impath for item in items[:5]])
    torch.testing.assert_close(probabilities, expected[:5].softmax(-1), rtol=1e-5, atol=1e-6)


def test_codebase_checkpoint_without_configuration_needs_the_training_flags(
        demo, tmp_path, monkeypatch, capsys):
    """A MaPLe checkpoint as the MaPLe codebase writes it (no config, no class names): predict
    asks for the training command's flags and then gives the evaluator's logits."""
    from test_codebase_checkpoints import CASES as LAYOUTS, trained_values, \
        write_codebase_checkpoint

    case = LAYOUTS["MaPLe"]
    clip = load_clip(demo["clip"], "fp32")
    cfg = load_cfg(COOP_CFG, DATASET_CFG, list(MAPLE_OPTS))
    classnames, items = novel_split(demo)
    model = build_method("MaPLe", cfg, classnames, clip)
    model_dir = tmp_path / "maple"
    write_codebase_checkpoint(model_dir, case, trained_values(case, model), clip)

    image = items[0].impath
    assert predict([image, "--model-dir", str(model_dir)]) == 2
    assert "holds no configuration" in capsys.readouterr().err

    flags = ["--trainer", "MaPLe", "--config-file", COOP_CFG, "--dataset-config-file", DATASET_CFG]
    pairs = ["MODEL.BACKBONE.PATH", demo["clip"], *MAPLE_OPTS]
    argv = (["--eval-only", "--engine", "standalone", "--root", demo["root"], "--seed", "1",
             "--output-dir", str(tmp_path / "eval"), "--model-dir", str(model_dir),
             "--load-epoch", "3", *flags]
            + pairs + ["DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "new"])
    expected = evaluator_logits(monkeypatch, argv)
    predictor = Predictor.from_run(str(model_dir), classnames=classnames, trainer="MaPLe",
                                   config_file=COOP_CFG, opts=pairs, device="cpu")
    torch.testing.assert_close(predictor_logits(predictor, items), expected, rtol=1e-5,
                               atol=1e-5)


def test_cli_writes_top_k_csv_and_skips_unreadable_images(demo, trained, tmp_path, capsys):
    model_dir = trained()
    classnames, items = novel_split(demo)
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for item in items[:3]:
        Image.open(item.impath).save(folder / os.path.basename(item.impath))
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image and not an image name")
    names_file = tmp_path / "classes.txt"
    names_file.write_text("\n".join(classnames) + "\n")
    output = tmp_path / "predictions.csv"
    assert predict([str(tmp_path / "photos"), "--model-dir", model_dir, "--classnames",
                    str(names_file), "--topk", "3", "--output", str(output),
                    "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err
    assert "3 images classified" in err and "1 skipped" in err
    rows = list(csv.reader(output.open()))
    assert rows[0] == ["image", "top1", "prob1", "top2", "prob2", "top3", "prob3"]
    assert len(rows) == 4 and all(r[0].endswith(".png") for r in rows[1:])
    predictor = Predictor.from_run(model_dir, classnames=classnames, device="cpu")
    for row in rows[1:]:
        probabilities = predictor([row[0]])[0]
        best = probabilities.topk(3)
        assert row[1::2] == [classnames[i] for i in best.indices.tolist()]
        assert [float(p) for p in row[2::2]] == pytest.approx(best.values.tolist(), abs=1e-6)


def test_default_classes_are_the_runs_and_printed_lines_name_them(demo, trained, capsys):
    model_dir = trained()
    predictor = Predictor.from_run(model_dir, device="cpu")
    cfg = load_cfg(None, DATASET_CFG, ["DATASET.ROOT", demo["root"], "DATASET.NUM_SHOTS", "2",
                                       "SEED", "1", "DATASET.SUBSAMPLE_CLASSES", "base"])
    assert predictor.classnames == build_dataset(cfg).classnames
    image = novel_split(demo)[1][0].impath
    assert predict([image, "--model-dir", model_dir, "--topk", "2"]) == 0
    line = capsys.readouterr().out.strip()
    best = predictor([image])[0].topk(2)
    assert line == f"{image}: " + ", ".join(
        f"{predictor.classnames[i]} {p:.3f}" for p, i in zip(best.values.tolist(),
                                                             best.indices.tolist()))


def test_python_entry_point_takes_paths_and_pil_images(demo, trained):
    predictor = Predictor.from_run(trained(), classnames=["red circle", "purple moon"],
                                   device="cpu")
    path = novel_split(demo)[1][0].impath
    with Image.open(path) as img:
        by_image = predictor([img.copy()])
    by_path = predictor(path)
    assert by_path.shape == (1, 2)
    torch.testing.assert_close(by_path, by_image)
    assert float(by_path.sum()) == pytest.approx(1.0, abs=1e-6)


def test_class_specific_context_refuses_other_names(demo, trained, capsys):
    model_dir = trained("CoOp", False, opts=("TRAINER.COOP.CSC", "True"))
    image = novel_split(demo)[1][0].impath
    assert predict([image, "--model-dir", model_dir]) == 0  # its own classes
    capsys.readouterr()
    assert predict([image, "--model-dir", model_dir, "--classnames", "a,b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class-specific context (TRAINER.COOP.CSC)" in err[0]


def test_promptkd_says_it_needs_its_teacher(demo, capsys):
    image = novel_split(demo)[1][0].impath
    assert predict([image, "--trainer", "PromptKD", "--classnames", "a,b", "--set",
                    "MODEL.BACKBONE.PATH", demo["clip"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRAINER.PROMPTKD.TEACHER_CKPT" in err[0] and "teacher" in err[0]


def test_promptkd_names_new_classes_with_its_teacher(demo, clip_path, teacher_ckpt,
                                                     teacher_clip_path, tmp_path):
    """With its teacher, a PromptKD student (here a checkpoint as its codebase writes it) names
    any classes: the columns of a two-class list are those columns of a longer one."""
    from test_codebase_checkpoints import CASES as LAYOUTS, trained_values, \
        write_codebase_checkpoint

    pairs = ["MODEL.BACKBONE.PATH", clip_path, "TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt,
             "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path, "TRAINER.PROMPTKD.PREC", "fp32",
             "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2", "INPUT.SIZE", "(32, 32)"]
    clip = load_clip(clip_path, "fp32")
    case = LAYOUTS["PromptKD"]
    model = build_method("PromptKD", load_cfg(opts=pairs), ["any"], clip)
    write_codebase_checkpoint(tmp_path, case, trained_values(case, model), clip)
    image = novel_split(demo)[1][0].impath

    def predictor(classnames):
        return Predictor.from_run(str(tmp_path), trainer="PromptKD", classnames=classnames,
                                  opts=pairs, device="cpu", load_epoch=3)

    few = predictor(["red circle", "blue ring"])
    many = predictor(["green star", "red circle", "blue ring"])
    batch = few.preprocess([image])
    torch.testing.assert_close(few.logits(batch), many.logits(batch)[:, 1:], rtol=1e-5, atol=1e-5)


def test_zero_shot_needs_no_run(demo, capsys):
    image = novel_split(demo)[1][0].impath
    assert predict([image, "--trainer", "ZeroshotCLIP", "--config-file", COOP_CFG,
                    "--classnames", "red circle,blue ring", "--set", "MODEL.BACKBONE.PATH",
                    demo["clip"]]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


@pytest.mark.parametrize("argv, says", [
    (["--model-dir", "{tmp}/none", "{image}"], "is not a folder"),
    (["--model-dir", "{run}", "{tmp}/missing.png"], "neither a file nor a folder"),
    (["--model-dir", "{run}", "{image}", "--load-epoch", "7"], "--load-epoch"),
    (["--model-dir", "{run}", "{image}", "--classnames", "a,a"], "twice"),
    (["--model-dir", "{run}"], "No images"),
])
def test_mistakes_get_one_line(demo, trained, tmp_path, capsys, argv, says):
    values = {"tmp": str(tmp_path), "run": trained(), "image": novel_split(demo)[1][0].impath}
    assert predict([word.format(**values) for word in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
