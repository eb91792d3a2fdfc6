"""PromptSRC with TextRefiner on and off: every piece against a hand computation from the stock
CLIP modules and the reference's formulas (fixed embeddings, L1 terms, KL term, GPA weights and
the aggregated weights), resume equality, precisions, and the CLI end to end, including a
PromptSRC teacher trained here and distilled into a PromptKD student."""
import copy
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSNAMES, make_cfg
from test_methods import (hand_mlp, hand_refine, hand_semantic, hand_text, hand_vision,
                          prompted_embeddings, tokenize)
from test_train_cli import DATASET_CFG, DEMO_CFG, accuracy_lines, read_log
from textrefiner._compat import import_clip
from textrefiner.checkpoint import read_checkpoint
from textrefiner.clip_backbone import load_clip
from textrefiner.errors import UserError
from textrefiner.methods import PromptSRC, build_method
from textrefiner.methods.promptsrc import gpa_weights, self_consistency_kl
from textrefiner.methods.templates import IMAGENET_TEMPLATES
from textrefiner.train import main, run

TOPK = 3
ATOL = 1e-5
SRC_OPTS = ("TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2",
            "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2", "INPUT.SIZE", "(32, 32)")
REFINER_ON = ("TRAINER.REFINER.ENABLED", "True", "TRAINER.REFINER.TOPK", str(TOPK))
PROMPT_NAMES = {"prompt_learner.ctx", "text_encoder.transformer.resblocks.1.VPT_shallow",
                "image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow"}


@pytest.fixture(scope="module")
def base_clip(clip_path):
    return load_clip(clip_path, "fp32")


def build(clip, *opts, refiner=False, seed=0, classnames=CLASSNAMES):
    cfg = make_cfg(*(SRC_OPTS + tuple(opts) + (REFINER_ON if refiner else ())))
    torch.manual_seed(seed)
    return build_method("PromptSRC", cfg, classnames, copy.deepcopy(clip))


def perturb(model, scale=0.3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.trainable_parameters().items():
            if not name.startswith("refiner."):
                param.add_(scale * torch.randn(param.shape, generator=gen))


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 32, 32, generator=gen), torch.tensor([0, 2, 4])


# ------------------------------------------------------------------------------ hand computations
def hand_fixed_embeddings(clip):
    """Mean over the 60 templates of the stock `encode_text` features, then normalised."""
    names = [c.replace("_", " ") for c in CLASSNAMES]
    per_template = [clip.encode_text(tokenize([t.format(n) for n in names]))
                    for t in IMAGENET_TEMPLATES]
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def hand_prompted(model, clip, images):
    """(E, prompted global feature, tokens, attention) from the stock modules."""
    learner, blocks = model.prompt_learner, model.text_encoder.transformer.resblocks
    emb, eot = prompted_embeddings(clip, CLASSNAMES, learner.ctx, "a photo of a")
    text = hand_text(clip, emb, eot, [blocks[1].VPT_shallow])
    visual = model.image_encoder
    prompts = [visual.VPT, visual.transformer.resblocks[1].VPT_shallow]
    return (text,) + hand_vision(clip.visual, images, prompts)


def hand_kl(logits, zs_logits):
    p_zs = zs_logits.softmax(1)
    return (p_zs * (p_zs.log() - logits.log_softmax(1))).sum() / logits.numel()


# ------------------------------------------------------------------------------ the pieces
def test_templates_are_clip_imagenet_ensemble():
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 60
    assert IMAGENET_TEMPLATES[0] == "a photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "itap of the {}."
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_names_are_those_of_promptsrc_checkpoints(base_clip):
    model = build(base_clip)
    assert model.checkpoint_name == "VLPromptLearner"
    assert set(model.trainable_parameters()) == PROMPT_NAMES == set(model.checkpoint_state())
    with_refiner = build(base_clip, refiner=True)
    assert PROMPT_NAMES < set(with_refiner.checkpoint_state())
    assert "refiner.cache.entries" in with_refiner.checkpoint_state()


def test_fixed_embeddings_are_the_template_mean(base_clip):
    model = build(base_clip)
    with torch.no_grad():
        expected = hand_fixed_embeddings(base_clip)
    torch.testing.assert_close(model.zero_shot_text_features(), expected, atol=ATOL, rtol=1e-4)


def test_fp16_fixed_embeddings_are_computed_in_float32(clip_path):
    """As the codebase (a float copy of CLIP): the fp16 model gives the fp32 numbers of its
    fp16 weights, and keeps no float copy afterwards."""
    half = load_clip(clip_path, "fp16")
    model = build(half, "TRAINER.PROMPTSRC.PREC", "fp16")
    with torch.no_grad():
        expected = hand_fixed_embeddings(copy.deepcopy(half).float())
    got = model.zero_shot_text_features()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert model.text_encoder.text_projection.dtype == torch.float16


def test_zero_shot_image_features_are_plain_clip(base_clip, batch):
    """An un-prompted pass of the prompted model's frozen encoder = a separate pretrained copy."""
    model = build(base_clip)
    perturb(model)
    with torch.no_grad():
        expected = F.normalize(base_clip.encode_image(batch[0]), dim=-1)
    torch.testing.assert_close(model.zero_shot_image_features(batch[0]), expected, atol=ATOL,
                               rtol=1e-4)


def test_eval_logits_match_hand_computation(base_clip, batch):
    model = build(base_clip)
    perturb(model)
    model.eval()
    with torch.no_grad():
        text, feature, _, _ = hand_prompted(model, base_clip, batch[0])
        expected = base_clip.logit_scale.exp() * F.normalize(feature, dim=-1) @ text.t()
        torch.testing.assert_close(model(batch[0]), expected, atol=ATOL, rtol=1e-4)


def test_kl_term_is_kl_of_zero_shot_to_prompted():
    gen = torch.Generator().manual_seed(3)
    logits, zs_logits = 5 * torch.randn(4, 6, generator=gen), 5 * torch.randn(4, 6, generator=gen)
    got = self_consistency_kl(logits, zs_logits)
    p, q = logits.softmax(1).tolist(), zs_logits.softmax(1).tolist()
    explicit = sum(qi * (math.log(qi) - math.log(pi)) for pr, qr in zip(p, q)
                   for pi, qi in zip(pr, qr)) / 24
    assert float(got) == pytest.approx(explicit, rel=1e-5)
    assert float(self_consistency_kl(logits, logits)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_training_loss_matches_formula(base_clip, batch, refiner):
    weights = ("TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT", "7",
               "TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT", "3")
    model = build(base_clip, *weights, refiner=refiner)
    perturb(model)
    model.train()
    images, labels = batch
    with torch.no_grad():
        text, feature, tokens, attention = hand_prompted(model, base_clip, images)
        scale = base_clip.logit_scale.exp()
        fixed = hand_fixed_embeddings(base_clip)
        v = F.normalize(feature, dim=-1)
        v_zs = F.normalize(base_clip.encode_image(images), dim=-1)
        classifier = hand_refine(model.refiner, text, model.refiner.cache.entries.clone()) \
            if refiner else text
        logits = scale * v @ classifier.t()
        loss_text = (text - fixed).abs().mean()
        loss_image = (v - v_zs).abs().mean()
        loss_kl = hand_kl(logits, scale * v_zs @ fixed.t())
        expected = F.cross_entropy(logits, labels) + 7 * loss_text + 3 * loss_image + loss_kl
        if refiner:
            aligned = hand_mlp(model.refiner.aligner, tokens, batch_stats=True)
            semantic = hand_semantic(aligned, attention).reshape(-1, aligned.shape[-1])
            loss_sem = F.cross_entropy(scale * semantic @ text.t(),
                                       labels.repeat_interleave(TOPK + 2))
            loss_reg = (F.normalize(classifier, dim=-1) - text).abs().mean()
            expected = expected + 0.02 * loss_sem + 20 * loss_reg

    loss, parts = model.forward_train(images, labels)
    torch.testing.assert_close(parts["loss_scl_text"], loss_text, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(parts["loss_scl_image"], loss_image, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(parts["loss_scl_kl"], loss_kl, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), expected, atol=ATOL, rtol=1e-4)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(model.trainable_parameters())


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_half_precisions_train_and_evaluate_on_the_cpu(clip_path, batch, precision):
    """fp16 keeps CLIP's half weights; amp is bfloat16 autocast on the CPU. Both follow fp32."""
    images, labels = batch
    losses = {}
    for prec in ("fp32", precision):
        torch.manual_seed(0)  # the deep prompts are drawn from the state CLIP was built from
        model = build(load_clip(clip_path, prec), "TRAINER.PROMPTSRC.PREC", prec, refiner=True)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "amp"):
            loss, _ = model.forward_train(images, labels)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters().values())
        losses[prec] = float(loss.detach())
        model.on_epoch_end(0, 1)  # GPA over one epoch: the weights stay what they are
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "amp"):
            assert torch.isfinite(model(images).float()).all()
    assert losses[precision] == pytest.approx(losses["fp32"], rel=0.05)


def test_text_depth_zero_is_refused(base_clip):
    with pytest.raises(UserError, match="PROMPT_DEPTH_TEXT"):
        build(base_clip, "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "0")


# ------------------------------------------------------------------------------ GPA
def test_gpa_weights_are_normalised_gaussian_densities():
    got = gpa_weights(2.0, 1.5, 4)
    density = [math.exp(-0.5 * ((e - 2.0) / 1.5) ** 2) for e in (1, 2, 3, 4)]
    assert got.tolist() == pytest.approx([d / sum(density) for d in density], rel=1e-12)
    published = gpa_weights(15, 1, 20)  # base-to-novel: almost all weight on epochs 14..16
    assert float(published[13:16].sum()) > 0.88 and int(published.argmax()) == 14
    with pytest.raises(UserError, match="GPA_STD"):
        gpa_weights(15, 0, 20)
    with pytest.raises(UserError, match="no weight"):
        gpa_weights(1e6, 1, 20)


def test_gpa_replaces_the_weights_by_the_weighted_sum_after_the_last_epoch(base_clip):
    epochs = 3
    model = build(base_clip, "TRAINER.PROMPTSRC.GPA_MEAN", "2", "TRAINER.PROMPTSRC.GPA_STD", "1",
                  "OPTIM.MAX_EPOCH", str(epochs), refiner=True)
    g = gpa_weights(2, 1, epochs)
    snapshots = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for epoch in range(epochs):
            for value in model.checkpoint_state().values():  # "training": new values each epoch
                if value.is_floating_point():
                    value.copy_(torch.randn(value.shape, generator=gen))
            model.refiner.aligner.norm.num_batches_tracked.fill_(10 * (epoch + 1))
            snapshots.append({k: v.clone() for k, v in model.checkpoint_state().items()})
            model.on_epoch_end(epoch, epochs)
            if epoch < epochs - 1:  # nothing changes before the last epoch
                for key, value in model.checkpoint_state().items():
                    assert torch.equal(value, snapshots[-1][key]), key
    final = model.checkpoint_state()
    for key, value in final.items():
        if key == "refiner.aligner.norm.num_batches_tracked":
            assert int(value) == 30  # a count, not a weight: kept
            continue
        expected = sum(float(g[e]) * snapshots[e][key] for e in range(epochs))
        if key == "refiner.cache.entries":  # cache rows stay unit vectors
            expected = F.normalize(expected, dim=-1)
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)


def test_gpa_refuses_a_resume_without_its_running_sum(base_clip):
    model = build(base_clip, "OPTIM.MAX_EPOCH", "3")
    model.load_run_state(None)  # e.g. a checkpoint written without "method_state"
    with pytest.raises(UserError, match="GPA"):
        model.on_epoch_end(1, 3)


# ------------------------------------------------------------------------------ CLI, standalone
def command(demo, out, *opts, clip=None, refiner=False, classes="base", extra=(), epochs=2):
    args = ["--engine", "standalone", "--root", demo["root"], "--trainer", "PromptSRC",
            "--seed", "1", "--dataset-config-file", DATASET_CFG, "--config-file", DEMO_CFG,
            "--output-dir", str(out)] + (["--refiner"] if refiner else []) + list(extra)
    return args + ["MODEL.BACKBONE.PATH", clip or demo["clip"], "DATASET.NUM_SHOTS", "2",
                   "DATASET.SUBSAMPLE_CLASSES", classes, "OPTIM.MAX_EPOCH", str(epochs),
                   "TRAINER.PROMPTSRC.GPA_MEAN", "2", "TRAINER.PROMPTSRC.GPA_STD", "1",
                   *SRC_OPTS, *opts]


def state_of(out, epoch):
    return read_checkpoint(os.path.join(str(out), "VLPromptLearner", f"model.pth.tar-{epoch}"))


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_train_base_then_evaluate_new_from_the_checkpoint(demo, tmp_path, refiner):
    base, new = tmp_path / "base", tmp_path / "new"
    assert main(command(demo, base, refiner=refiner)) == 0
    assert accuracy_lines(base)
    saved = state_of(base, 2)
    assert set(saved["state_dict"]) >= PROMPT_NAMES
    assert saved["method_state"]["gpa_epochs"] == 2
    trainer = run(command(demo, new, refiner=refiner, classes="new",
                          extra=("--eval-only", "--model-dir", str(base), "--load-epoch", "2")))
    assert accuracy_lines(new) and "Loaded" in read_log(new)
    for key, value in saved["state_dict"].items():
        assert torch.equal(trainer.model.checkpoint_state()[key], value), key


def test_resumed_run_ends_with_the_same_aggregated_weights(demo, tmp_path):
    """Stop after epoch 2 of 3 (the last checkpoint of epoch 2), resume: the GPA sum restored
    from the checkpoint gives the same final weights as the uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    keep = ("TRAIN.CHECKPOINT_FREQ", "1", "TEST.NO_TEST", "True")
    assert main(command(demo, straight, *keep, refiner=True, epochs=3)) == 0
    shutil.copytree(str(straight), str(resumed))
    os.remove(resumed / "VLPromptLearner" / "model.pth.tar-3")
    assert main(command(demo, resumed, *keep, refiner=True, epochs=3)) == 0
    assert "Resumed from epoch 2" in read_log(resumed)
    expected, got = state_of(straight, 3), state_of(resumed, 3)
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    # ... and the final weights are the GPA sum, not the last epoch's weights.
    assert not torch.equal(expected["state_dict"]["prompt_learner.ctx"],
                           state_of(straight, 2)["state_dict"]["prompt_learner.ctx"])


# ------------------------------------------------------------------------------ PromptKD teacher
def test_promptsrc_teacher_trained_here_distils_a_promptkd_student(demo, tmp_path,
                                                                   teacher_clip_path):
    """PromptSRC on the teacher-shaped CLIP writes VLPromptLearner/model.pth.tar-<last epoch>;
    placed where PromptKD looks for teachers (<name>/VLPromptLearner/model-best.pth.tar) it
    loads through TRAINER.PROMPTKD.TEACHER_CKPT, with the trained prompts."""
    teacher_run = tmp_path / "teacher_run"
    assert main(command(demo, teacher_run, clip=teacher_clip_path, epochs=1)) == 0
    teacher_file = tmp_path / "teacher_model" / "SyntheticShapes" / "VLPromptLearner" \
        / "model-best.pth.tar"
    os.makedirs(teacher_file.parent)
    shutil.copy(teacher_run / "VLPromptLearner" / "model.pth.tar-1", teacher_file)

    student = tmp_path / "student"
    args = ["--engine", "standalone", "--root", demo["root"], "--trainer", "PromptKD",
            "--seed", "1", "--dataset-config-file", DATASET_CFG, "--config-file", DEMO_CFG,
            "--output-dir", str(student), "MODEL.BACKBONE.PATH", demo["clip"],
            "DATASET.NUM_SHOTS", "0", "OPTIM.MAX_EPOCH", "1", "INPUT.SIZE", "(32, 32)",
            "TRAINER.PROMPTKD.PREC", "fp32", "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2",
            "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
            "TRAINER.PROMPTKD.TEACHER_CKPT", str(teacher_file)]
    trainer = run(args)
    assert accuracy_lines(student)
    teacher_state = trainer.model.teacher.state_dict()
    for key, value in read_checkpoint(str(teacher_file))["state_dict"].items():
        assert torch.equal(teacher_state[key], value), key


def test_a_refiner_trained_promptsrc_checkpoint_is_no_teacher(base_clip, tmp_path, clip_path):
    from textrefiner.methods.promptkd import load_teacher

    path = str(tmp_path / "model-best.pth.tar")
    torch.save({"state_dict": build(base_clip, refiner=True).checkpoint_state()}, path)
    cfg = make_cfg("TRAINER.PROMPTKD.TEACHER_CKPT", path,
                   "TRAINER.PROMPTKD.TEACHER_PATH", clip_path)
    with pytest.raises(UserError, match="without --refiner"):
        load_teacher(cfg, CLASSNAMES, "fp32")
