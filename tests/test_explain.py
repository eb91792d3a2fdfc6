"""textrefiner-explain: its numbers are the model's (recomputed here another way), its pictures
say what holds on the demo's world, where the truth is known (each class is a colour and a
shape), and its report opens in a real browser.

The demo's CoOp + TR run (its recipe, base classes, seed 1) is trained once per session; the
other methods are checked on random-weight CLIPs (conftest)."""
import contextlib
import copy
import importlib.util
import json
import io
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CLASSNAMES, make_cfg
from textrefiner.checkpoint import checkpoint_path, read_checkpoint, save_method_checkpoint
from textrefiner.clip_backbone import load_clip
from textrefiner.data import build_transform
from textrefiner.data.synthetic import COLORS, SHAPES
from textrefiner.demo import prepare_pretrained
from textrefiner.explain import (attribute_purity, class_entry_match, draw_image_explanation,
                                 explain_image, explain_image_figure, explain_images,
                                 refiner_off, similar_order, write_report)
from textrefiner.explain.cli import main, split_images
from textrefiner.explain.numbers import classifier_space
from textrefiner.losses import select_semantic_tokens
from textrefiner.methods import build_method
from textrefiner.predict import Predictor, run_checkpoint
from textrefiner.train import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEAREST = 16
ATOL = 1e-5


def demo_attributes(classnames):
    """[2, C]: each class's colour and shape index, the demo world's known truth."""
    colours, shapes = list(COLORS), list(SHAPES)
    return torch.tensor([[colours.index(name.split()[0]) for name in classnames],
                         [shapes.index(name.split()[1]) for name in classnames]])


@pytest.fixture(scope="session")
def tr_run(tmp_path_factory):
    """The demo's CoOp + TR run: its recipe (configs/trainers/CoOp/demo_tiny.yaml), base
    classes, seed 1, without the final test pass."""
    tiny = prepare_pretrained(str(tmp_path_factory.mktemp("tiny")), log=None)
    out = tmp_path_factory.mktemp("tr_run")
    assert train_main([
        "--root", tiny["root"], "--trainer", "CoOp", "--seed", "1", "--refiner",
        "--dataset-config-file", os.path.join(REPO, "configs", "datasets", "synthetic_shapes.yaml"),
        "--config-file", os.path.join(REPO, "configs", "trainers", "CoOp", "demo_tiny.yaml"),
        "--output-dir", str(out), "MODEL.BACKBONE.PATH", tiny["clip"],
        "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base",
        "TEST.NO_TEST", "True"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def predictor(tr_run):
    return Predictor.from_run(tr_run, device="cpu")


@pytest.fixture(scope="session")
def explained(predictor):
    paths, labels = split_images(predictor.cfg, "test", predictor.classnames)
    return explain_images(predictor, paths, labels, nearest=NEAREST)


def test_scores_with_and_without_refinement_are_the_evaluators(tr_run, predictor, explained):
    paths = explained.paths[:40]
    batch = predictor.preprocess(paths)
    torch.testing.assert_close(explained.logits[:40], predictor.logits(batch), atol=ATOL, rtol=0)
    # Without the refiner: a CoOp built with TextRefiner off, holding the run's prompts alone.
    plain = build_method("CoOp", _without_refiner(predictor.cfg), predictor.classnames,
                         load_clip(predictor.cfg.MODEL.BACKBONE.PATH, "fp32")).eval()
    state = read_checkpoint(run_checkpoint(tr_run)[0])["state_dict"]
    plain.load_checkpoint_state({k: v for k, v in state.items() if not k.startswith("refiner.")})
    with torch.no_grad():
        torch.testing.assert_close(explained.logits_plain[:40], plain(batch), atol=ATOL, rtol=0)
    assert (explained.logits - explained.logits_plain).abs().max() > 1e-3  # the refiner acts


def _without_refiner(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TRAINER.REFINER.ENABLED = False
    return cfg


def test_marked_patches_are_the_ones_select_semantic_tokens_takes(predictor, explained):
    model, k = predictor.model, predictor.model.refiner.topk
    batch = predictor.preprocess(explained.paths[:20])
    with torch.no_grad():
        out = model.encode_images(batch, return_tokens=True)
        aligned = model.refiner.align(out.tokens)
        semantic = select_semantic_tokens(aligned, out.cls_attention, k)      # [B, k+2, d]
    marked = explained.semantic_patches[:20]
    assert marked.shape == (20, k)
    torch.testing.assert_close(explained.cls_attention[:20], out.cls_attention, atol=ATOL, rtol=0)
    picked = aligned.gather(1, (marked + 1).unsqueeze(-1).expand(-1, -1, aligned.shape[-1]))
    assert torch.equal(picked, semantic[:, 1:k + 1])


def test_nearest_patches_counts_and_reads_are_recomputed_alike(predictor, explained):
    """All images at once, brute force (the explanation keeps a running top-n over batches)."""
    model = predictor.model
    batch = predictor.preprocess(explained.paths)
    with torch.no_grad():
        aligned = F.normalize(model.refiner.align(model.encode_images(
            batch, return_tokens=True).tokens), dim=-1)
        text = model.text_features() if hasattr(model, "text_features") else None
    entries = model.refiner.cache.entries
    scores = aligned[:, 1:].reshape(-1, aligned.shape[-1]) @ entries.t()     # [I * N, M]
    best = scores.topk(NEAREST, dim=0)
    torch.testing.assert_close(explained.nearest_similarity, best.values.t(), atol=ATOL, rtol=0)
    assert (explained.nearest == best.indices.t()).float().mean() > 0.99    # ties may swap
    assigned = scores.argmax(dim=1)
    assert torch.equal(explained.token_counts(), torch.bincount(assigned, minlength=len(entries)))
    expected = (F.normalize(text, dim=-1) @ entries.t()).softmax(dim=-1)     # Eq. 5
    torch.testing.assert_close(explained.read_weights, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(explained.read_weights.sum(dim=1),
                               torch.ones(len(explained.classnames)))


def test_entries_nearest_patches_share_a_colour_or_shape(explained):
    """Measured on the demo run (base test split, 180 images, 16 nearest patches per entry):
    purity 0.66 against 0.37 by chance."""
    purity, chance = attribute_purity(explained, demo_attributes(explained.classnames))
    print(f"entry purity (colour or shape) {purity.mean():.3f}, chance {chance:.3f}")
    assert purity.mean() > chance + 0.15
    assert (purity > chance).float().mean() > 0.6


def test_a_class_top_entry_holds_patches_of_its_own_colour_or_shape(explained):
    """Measured on the demo run: 0.375 of the nearest patches of a class's most-read entry come
    from images of its colour or shape, 0.222 by chance. The reads are nearly uniform on this
    toy (0.033 to 0.051 against 1/25 = 0.04): the 2nd and 3rd entries are near chance."""
    match, chance = class_entry_match(explained, demo_attributes(explained.classnames))
    print(f"class top entry: own colour or shape {match.mean():.3f}, chance {chance.mean():.3f}")
    assert match.mean() > chance.mean() + 0.08


def test_one_image_figure_and_numbers_for_a_web_page(predictor, explained):
    """What a page showing one prediction calls: the picture and its numbers, for a PIL image,
    equal to the same image's numbers in the whole set's explanation."""
    i = int(explained.changed()[2][0]) if len(explained.changed()[2]) else 0
    with Image.open(explained.paths[i]) as image:
        figure = explain_image_figure(predictor, image.convert("RGB"), int(explained.labels[i]))
    assert Image.open(io.BytesIO(figure.png)).size[0] > 800
    numbers = json.loads(json.dumps(figure.numbers))                # plain Python throughout
    names = explained.classnames
    assert numbers["label"] == names[explained.labels[i]] and numbers["has_refiner"]
    assert numbers["predicted"] == names[explained.predictions[i]]
    assert numbers["predicted_plain"] == names[explained.predictions_plain[i]]
    refined, plain = explained.logits[i].softmax(dim=0), explained.logits_plain[i].softmax(dim=0)
    top = refined.topk(5).indices.tolist()
    assert [row["class"] for row in numbers["top"]] == [names[c] for c in top]
    assert [row["probability"] for row in numbers["top"]] == pytest.approx(
        refined[top].tolist(), abs=1e-5)
    assert [row["probability_plain"] for row in numbers["top"]] == pytest.approx(
        plain[top].tolist(), abs=1e-5)
    columns = explained.grid[1]
    assert numbers["semantic_patches"] == [[p // columns, p % columns]
                                           for p in explained.semantic_patches[i].tolist()]
    assert torch.tensor(numbers["cls_attention"]).flatten().tolist() == pytest.approx(
        explained.cls_attention[i].tolist(), abs=1e-5)
    assert torch.tensor(numbers["patch_similarity"]).shape == explained.grid


def test_per_class_accuracy_and_changed_images(explained):
    refined, plain, count = explained.per_class_accuracy()
    for c in range(len(explained.classnames)):
        mine = explained.labels == c
        assert count[c] == int(mine.sum())
        assert refined[c] == pytest.approx(
            100.0 * float((explained.predictions[mine] == c).float().mean()))
        assert plain[c] == pytest.approx(
            100.0 * float((explained.predictions_plain[mine] == c).float().mean()))
    worse, better, changed = explained.changed()
    for i in changed.tolist():
        assert explained.predictions[i] != explained.predictions_plain[i]
    labels = explained.labels
    assert all(explained.predictions_plain[i] == labels[i] != explained.predictions[i]
               for i in worse.tolist())
    assert all(explained.predictions[i] == labels[i] != explained.predictions_plain[i]
               for i in better.tolist())
    # The totals agree with the per-class accuracies.
    gained = float((refined - plain).mul(count).sum()) / 100.0
    assert gained == pytest.approx(len(better) - len(worse), abs=1e-3)


def test_similar_order_puts_blocks_together():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.cat([torch.eye(3)[b].repeat(4, 1) for b in range(3)])   # 3 groups of 4 rows
    rows = blocks + 0.05 * torch.rand(12, 3, generator=gen)
    shuffled = torch.randperm(12, generator=gen)
    order = similar_order(rows[shuffled])
    groups = blocks[shuffled].argmax(dim=1)[order]
    assert sorted(order.tolist()) == list(range(12))
    assert int((groups[1:] != groups[:-1]).sum()) == 2


# ---------------------------------------------------------------------------- every method
def _method_cases():
    cases = ["CoOp", "CoCoOp", "MaPLe", "PromptSRC", "PromptKD", "ResNet"]
    return cases + (["LLaMP"] if importlib.util.find_spec("transformers") else [])


def _method_model(case, request):
    refiner = ("TRAINER.REFINER.ENABLED", "True", "TRAINER.REFINER.TOPK", "3")
    if case == "LLaMP":
        from llamp_files import save_tiny_llama, write_llamp_files
        from test_llamp import build as build_llamp
        folder = request.getfixturevalue("tmp_path")
        tiny = {"llm": save_tiny_llama(str(folder / "llm")),
                "files": write_llamp_files(str(folder / "files"), 3, 2, 32)}
        return build_llamp(tiny, refiner=True)
    if case == "PromptKD":
        refiner += ("TRAINER.PROMPTKD.TEACHER_CKPT", request.getfixturevalue("teacher_ckpt"),
                    "TRAINER.PROMPTKD.TEACHER_PATH",
                    request.getfixturevalue("teacher_clip_path"),
                    "TRAINER.PROMPTKD.N_CTX_VISION", "4")
    clip = request.getfixturevalue("resnet_clip_path" if case == "ResNet" else "clip_path")
    size = "(96, 96)" if case == "ResNet" else "(32, 32)"
    cfg = make_cfg(*refiner, "INPUT.SIZE", size, "TRAINER.COCOOP.PREC", "fp32",
                   "TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2",
                   "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2")
    torch.manual_seed(0)
    method = "CoOp" if case == "ResNet" else case
    return build_method(method, cfg, CLASSNAMES, load_clip(clip, "fp32")), cfg


@pytest.mark.parametrize("case", _method_cases())
def test_every_method_explains_with_the_evaluators_scores(case, request):
    built = _method_model(case, request)
    model, cfg = built if isinstance(built, tuple) else (built, None)
    model.eval()
    size = 96 if case == "ResNet" else 32
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # a little learned content in the cache, so reads differ between classes
        model.refiner.update(model.refiner.align(model.encode_images(
            images, return_tokens=True).tokens))
        model.invalidate_eval_cache()
    classnames = model.classnames
    predictor = Predictor(model, None, classnames, device="cpu", batch_size=2)
    with _counting(model, "encode_images") as encoded, _counting(model, "classifier") as built:
        ex = explain_images(predictor, images, nearest=4)
    # Each image encoded once (3 batches of 2, 2, 1); E and Ehat built once for all batches.
    assert [call[0].shape[0] for call in encoded] == [2, 2, 1]
    assert len(built) == (0 if case == "CoCoOp" else 2)
    _assert_attention_similarity_and_reads(case, model, images, ex)
    with torch.no_grad():
        expected = model(images).float()
        plain_model = copy.deepcopy(model)
        plain_model.refiner = None
        plain_model.invalidate_eval_cache()
        expected_plain = plain_model(images).float()
    torch.testing.assert_close(ex.logits, expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ex.logits_plain, expected_plain, atol=ATOL, rtol=1e-5)
    n_patches = 9 if case == "ResNet" else 16
    assert ex.grid == ((3, 3) if case == "ResNet" else (4, 4))
    assert ex.cls_attention.shape == ex.patch_similarity.shape == (5, n_patches)
    assert ex.read_weights.shape == (len(classnames), model.refiner.cache.entries.shape[0])
    torch.testing.assert_close(ex.read_weights.sum(dim=1), torch.ones(len(classnames)))
    assert ex.nearest.shape == (model.refiner.cache.entries.shape[0], 4)
    assert int(ex.token_counts().sum()) == 5 * n_patches
    assert (ex.patch_similarity.abs() <= 1 + 1e-5).all()
    probabilities = ex.probabilities()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5))
    if case == "LLaMP":  # its scores are probabilities already: not passed through a softmax again
        assert ex.scores_are_probabilities and torch.equal(probabilities, ex.logits)
    # ... and so are Predictor's (textrefiner-predict's, textrefiner-serve's) probabilities
    with torch.no_grad():
        torch.testing.assert_close(predictor(images), probabilities, atol=ATOL, rtol=1e-5)
    png = draw_image_explanation(ex, 0, image=_pil(images[0]))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if case in ("CoCoOp", "LLaMP"):  # read weights over per-image classes; probabilities
        ex.sources = [_pil(image) for image in images]
        folder = request.getfixturevalue("tmp_path") / "report"
        page = open(write_report(ex, str(folder), per_image=2, changed=1)).read()
        drawn = sorted(os.listdir(folder / "images"))
        assert "class_reads.png" in page and "atlas.png" in page
        assert len([n for n in drawn if n.startswith("entry_")]) == len(ex.entries)


@contextlib.contextmanager
def _counting(model, name):
    """The positional arguments of every call of model.`name` while inside."""
    calls, original = [], getattr(model, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    setattr(model, name, counted)
    try:
        yield calls
    finally:
        delattr(model, name)


@torch.no_grad()
def _assert_attention_similarity_and_reads(case, model, images, ex):
    """Recomputed on all images at once: the attention is the encoder's; the patch similarity is
    the patch tokens' cosine with the predicted class's refined embedding, in the space where
    the CLS token is the image feature and meets the classifier (its cosine, scaled, is the
    predicted logit); the read weights are Eq. 5's softmax over the entries of the plain E."""
    out = model.encode_images(images, return_tokens=True)
    torch.testing.assert_close(ex.cls_attention, out.cls_attention.float(), atol=ATOL, rtol=0)
    tokens = F.normalize(classifier_space(model, out.tokens).float(), dim=-1)     # [B, 1+N, d]
    features = F.normalize(out.features.float(), dim=-1)
    torch.testing.assert_close(tokens[:, 0], features, atol=ATOL, rtol=0)
    rows = torch.arange(len(images))
    if case == "CoCoOp":
        plain = model.batch_text_features(F.normalize(out.features, dim=-1))     # [B, C, d]
        refined = model.refined(plain)
    else:
        refined = model.class_embeddings()
        with refiner_off(model):
            plain = model.class_embeddings()
        if case == "LLaMP":  # templates [T, C, d]: their mean direction
            refined = F.normalize(F.normalize(refined, dim=-1).mean(dim=0), dim=-1)
        refined = refined.expand(len(images), -1, -1)
    chosen = refined.float()[rows, ex.predictions]                                 # [B, d]
    similarity = torch.einsum("bnd,bd->bn", tokens, F.normalize(chosen, dim=-1))
    torch.testing.assert_close(ex.patch_similarity, similarity[:, 1:], atol=ATOL, rtol=0)
    if case != "LLaMP":  # LLaMP's scores are a mean of softmaxes over templates
        logit = model.logit_scale.exp().float() * (tokens[:, 0] * chosen).sum(dim=-1)
        torch.testing.assert_close(logit, ex.logits[rows, ex.predictions], atol=1e-4, rtol=1e-5)
    entries = model.refiner.cache.entries.float()
    reads = (F.normalize(plain.float(), dim=-1) @ entries.t()).softmax(dim=-1)
    reads = reads.mean(dim=0) if reads.dim() == 3 else reads   # CoCoOp's images, LLaMP's templates
    torch.testing.assert_close(ex.read_weights, reads, atol=ATOL, rtol=0)


def _pil(tensor):
    from torchvision.transforms.functional import to_pil_image
    return to_pil_image((tensor - tensor.min()) / (tensor.max() - tensor.min()))


def test_a_run_without_textrefiner_gets_per_image_pictures(demo, clip_path, tmp_path, capsys):
    cfg = make_cfg("MODEL.BACKBONE.PATH", clip_path, "TRAINER.NAME", "CoOp")
    model = build_method("CoOp", cfg, CLASSNAMES, load_clip(clip_path, "fp32")).eval()
    predictor = Predictor(model, build_transform(cfg, is_train=False), CLASSNAMES, device="cpu")
    folder = os.path.join(demo["root"], "synthetic_shapes", "images")
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)[:6]
    ex = explain_images(predictor, paths)
    assert not ex.has_refiner and ex.read_weights is None
    assert torch.equal(ex.logits, ex.logits_plain)
    assert ex.semantic_patches.shape == (6, 5)   # the published top-k
    # One in-memory image, as a web page would explain it: the same numbers, and its picture.
    with Image.open(paths[2]) as image:
        one = explain_image(predictor, image.convert("RGB"))
    torch.testing.assert_close(one.logits, ex.logits[2:3], atol=ATOL, rtol=0)
    assert torch.equal(one.semantic_patches, ex.semantic_patches[2:3])
    png = draw_image_explanation(one)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] > 800
    # The command on the saved run says what the report lacks, and the page says it too.
    run = tmp_path / "run"
    save_method_checkpoint(model, checkpoint_path(str(run), model.checkpoint_name, 1), 0,
                           classnames=CLASSNAMES, config=cfg.dump())
    assert main(["--model-dir", str(run), *paths, "--output-dir", str(tmp_path / "report"),
                 "--per-image", "3", "--device", "cpu"]) == 0
    assert "this run has no TextRefiner" in capsys.readouterr().err
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "need a run trained with --refiner" in page
    assert page.count("images/image_") == 3 and "class_reads.png" not in page
    assert len(os.listdir(tmp_path / "report" / "images")) == 3


# ---------------------------------------------------------------------------- the report
def _browser():
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install playwright)"
    if not shutil.which("chromium") and not os.path.exists("/usr/bin/chromium"):
        return "no chromium on this machine (apt-get install chromium)"
    return None


def test_report_opens_in_a_browser_and_every_picture_loads(tr_run, tmp_path, capsys):
    output = tmp_path / "report"
    assert main(["--model-dir", tr_run, "--output-dir", str(output), "--per-image", "4",
                 "--changed", "2", "--device", "cpu"]) == 0
    assert f"report written to {output / 'index.html'}" in capsys.readouterr().err
    page = (output / "index.html").read_text(encoding="utf-8")
    for section in ("The cache atlas", "Class reads", "What refinement changed", "Per image"):
        assert section in page
    reason = _browser()
    if reason:
        pytest.skip(f"the report is written; opening it needs a browser: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium")
                                    or "/usr/bin/chromium", args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        tab.goto((output / "index.html").as_uri())
        tab.wait_for_load_state("load")
        sizes = tab.eval_on_selector_all(
            "img", "all => all.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        screenshot = tmp_path / "report.png"
        tab.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    print(f"screenshot of the report: {screenshot}")
    assert len(sizes) >= 25 + 1 + 1 + 4   # entries, usage, class reads, per-image pictures
    broken = [src for src, complete, width in sizes if not complete or width == 0]
    assert not broken, broken
    assert screenshot.stat().st_size > 10_000
