"""The methods (CoOp, MaPLe, PromptKD, zero-shot CLIP) with TextRefiner on and off.

Every expected value is recomputed here from the stock CLIP modules (token embedding, transformer
blocks, ln_post, proj, ...) and the formulas of the reference, never through the library's own
encoders, so a slip in either place shows up as a mismatch.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSNAMES, make_cfg
from textrefiner._compat import import_clip
from textrefiner.clip_backbone import encode_image, load_clip
from textrefiner.errors import UserError
from textrefiner.methods import CoOp, PromptKD, build_method
from textrefiner.methods.promptkd import load_teacher

TOPK = 3          # the toy CLIP has 4 x 4 = 16 patches
N_SEM = TOPK + 2  # CLS, top-k patches, mean
ATOL = 1e-5
REFINER_ON = ("TRAINER.REFINER.ENABLED", "True", "TRAINER.REFINER.TOPK", str(TOPK))
REFINER_NAMES = {"refiner.aligner.fc1.weight", "refiner.aligner.fc1.bias",
                 "refiner.aligner.norm.weight", "refiner.aligner.norm.bias",
                 "refiner.aligner.fc2.weight", "refiner.aligner.fc2.bias",
                 "refiner.aggregator.linear.weight"}
PROJECTOR_NAMES = {f"VPT_image_trans.{layer}.{p}" for layer in ("fc1", "norm", "fc2")
                   for p in ("weight", "bias")}
OWN_PARAMS = {
    "CoOp": {"prompt_learner.ctx"},
    "MaPLe": {"prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias",
              "prompt_learner.compound_prompts_text.0",
              "prompt_learner.compound_prompt_projections.0.weight",
              "prompt_learner.compound_prompt_projections.0.bias"},
    "PromptKD": {"image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow"}
    | PROJECTOR_NAMES,
}
TRAINED = ("CoOp", "MaPLe", "PromptKD")
KD_OPTS = ("TRAINER.PROMPTKD.KD_WEIGHT", "3.0", "TRAINER.PROMPTKD.TEMPERATURE", "2.0")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base_clip(clip_path):
    return load_clip(clip_path, "fp32")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, teacher_clip_path):
    """A PromptSRC-style teacher checkpoint (Dassl dict) for the toy teacher CLIP.

    Its CLIP weights differ from the TEACHER_PATH file (text projection and logit scale changed):
    the checkpoint's weights are the teacher's. Returns (path, the CLIP it holds, its prompts).
    """
    gen = torch.Generator().manual_seed(123)
    tclip = load_clip(teacher_clip_path, "fp32")
    with torch.no_grad():
        tclip.text_projection.add_(0.05 * torch.randn(tclip.text_projection.shape, generator=gen))
        tclip.logit_scale.fill_(math.log(30.0))
    text_w, vision_w = 128, 192
    prompts = {
        "prompt_learner.ctx": 0.5 * torch.randn(4, text_w, generator=gen),
        "text_encoder.transformer.resblocks.1.VPT_shallow":
            0.5 * torch.randn(4, text_w, generator=gen),
        "image_encoder.VPT": 0.5 * torch.randn(4, vision_w, generator=gen),
        "image_encoder.transformer.resblocks.1.VPT_shallow":
            0.5 * torch.randn(4, vision_w, generator=gen),
    }
    state = dict(prompts)
    # Built from other class names: must be ignored and rebuilt.
    state["prompt_learner.token_prefix"] = torch.randn(7, 1, text_w, generator=gen)
    state["prompt_learner.token_suffix"] = torch.randn(7, 72, text_w, generator=gen)
    state.update(teacher_clip_weights(tclip))
    path = tmp_path_factory.mktemp("teacher") / "model-best.pth.tar"
    torch.save({"state_dict": state, "epoch": 20}, str(path))
    return str(path), tclip, prompts


def teacher_clip_weights(tclip):
    state = {"image_encoder." + k: v.clone() for k, v in tclip.visual.state_dict().items()}
    for name in ("transformer", "ln_final"):
        state.update({f"text_encoder.{name}.{k}": v.clone()
                      for k, v in getattr(tclip, name).state_dict().items()})
    state["text_encoder.positional_embedding"] = tclip.positional_embedding.detach().clone()
    state["text_encoder.text_projection"] = tclip.text_projection.detach().clone()
    state["logit_scale"] = tclip.logit_scale.detach().clone()
    return state


def kd_opts(teacher_file, teacher_clip_path):
    return ("TRAINER.PROMPTKD.TEACHER_CKPT", teacher_file[0],
            "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
            "TRAINER.PROMPTKD.N_CTX_VISION", "4", "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2")


@pytest.fixture(scope="module")
def teachers(teacher_file, teacher_clip_path):
    """Teachers loaded from `teacher_file`, one per class list, shared by the models of this
    module (a teacher is frozen) so that not every test reads the teacher checkpoint again."""
    cache = {}

    def _teacher(classnames):
        key = tuple(classnames)
        if key not in cache:
            cfg = make_cfg(*kd_opts(teacher_file, teacher_clip_path))
            cache[key] = load_teacher(cfg, classnames, "fp32")
        return cache[key]

    return _teacher


@pytest.fixture
def build(base_clip, teacher_file, teacher_clip_path, teachers):
    """build(method, *opts, refiner=False, classnames=CLASSNAMES, seed=0, clip=None,
    shared_teacher=True); PromptKD reads its teacher from the file when shared_teacher is False."""

    def _build(method, *opts, refiner=False, classnames=CLASSNAMES, seed=0, clip=None,
               shared_teacher=True):
        if method == "PromptKD":
            opts = kd_opts(teacher_file, teacher_clip_path) + tuple(opts)
        cfg = make_cfg(*(tuple(opts) + (REFINER_ON if refiner else ())))
        clip = clip if clip is not None else copy.deepcopy(base_clip)
        torch.manual_seed(seed)
        if method == "PromptKD" and shared_teacher:
            return PromptKD(cfg, classnames, clip, teacher=teachers(classnames))
        return build_method(method, cfg, classnames, clip)

    return _build


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 32, 32, generator=gen), torch.tensor([0, 2, 4])


def perturb_prompts(model, scale=0.3, seed=5):
    """Move the method's own parameters away from their initial values (initial MaPLe projections
    are all clones, initial CoOp context equals word embeddings: both hide mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.trainable_parameters().items():
            if not name.startswith("refiner.") and "norm" not in name:
                param.add_(scale * torch.randn(param.shape, generator=gen))


# ------------------------------------------------------------------------------ hand computations
def tokenize(texts):
    return import_clip().tokenize(list(texts))


def name_token_count(name):
    return int(tokenize([name]).argmax(-1)) - 1


def hand_text(clip, embeddings, eot, deep=()):
    """Stock text transformer block by block; deep[i-1] replaces positions 1..n before block i."""
    x = (embeddings + clip.positional_embedding).permute(1, 0, 2)
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = x.clone()
            x[1:1 + deep[i - 1].shape[0]] = deep[i - 1].unsqueeze(1)
        x = block(x)
    x = clip.ln_final(x.permute(1, 0, 2))
    return F.normalize(x[torch.arange(x.shape[0]), eot] @ clip.text_projection, dim=-1)


def prompted_embeddings(clip, classnames, ctx, words):
    """[SOS, ctx, rest of "<words> <name>."] with ctx over the first len(ctx) word slots."""
    tokens = tokenize([f"{words} {c.replace('_', ' ')}." for c in classnames])
    emb = clip.token_embedding(tokens).clone()
    emb[:, 1:1 + ctx.shape[-2]] = ctx
    return emb, tokens.argmax(-1)


def cls_attention(block, x, n_patches):
    """Mean-over-heads attention of the CLS query to the patches, from in_proj by hand."""
    attn = block.attn
    h = block.ln_1(x)                                       # [L, B, w]
    length, batch, width = h.shape
    heads, head_dim = attn.num_heads, width // attn.num_heads
    q, k, _ = (h @ attn.in_proj_weight.t() + attn.in_proj_bias).split(width, dim=-1)
    q = q[0].reshape(batch, heads, head_dim)
    k = k.permute(1, 0, 2).reshape(batch, length, heads, head_dim)
    probs = (torch.einsum("bhd,blhd->bhl", q, k) / head_dim ** 0.5).softmax(-1).mean(1)
    return probs[:, 1:1 + n_patches]


def hand_vision(visual, images, prompts=()):
    """(global feature [B, d], tokens [B, 1+N, d], CLS attention [B, N]) from the stock modules."""
    x = visual.conv1(images)
    b, w = x.shape[:2]
    x = x.reshape(b, w, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(b, 1, w), x], dim=1) + visual.positional_embedding
    n = x.shape[1] - 1
    if prompts:
        x = torch.cat([x, prompts[0].expand(b, -1, -1)], dim=1)
    x = visual.ln_pre(x).permute(1, 0, 2)
    blocks = list(visual.transformer.resblocks)
    attention = None
    for i, block in enumerate(blocks):
        if 1 <= i < len(prompts):
            x = torch.cat([x[:-prompts[i].shape[0]], prompts[i].unsqueeze(1).expand(-1, b, -1)])
        if i == len(blocks) - 1:
            attention = cls_attention(block, x, n)
        x = block(x)
    tokens = visual.ln_post(x.permute(1, 0, 2)[:, :1 + n]) @ visual.proj
    return tokens[:, 0], tokens, attention


def hand_mlp(mlp, x, batch_stats):
    """Linear -> BatchNorm (batch statistics over all tokens, or running ones) -> ReLU -> Linear."""
    flat = x.reshape(-1, x.shape[-1])
    h = flat @ mlp.fc1.weight.t() + mlp.fc1.bias
    if batch_stats:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = mlp.norm.running_mean, mlp.norm.running_var
    h = (h - mean) / torch.sqrt(var + mlp.norm.eps) * mlp.norm.weight + mlp.norm.bias
    out = F.relu(h) @ mlp.fc2.weight.t() + mlp.fc2.bias
    return out.reshape(*x.shape[:-1], -1)


def check_one_step(model, images, labels):
    """One training step gives every trainable parameter a finite gradient; evaluation then gives
    finite logits over the evaluation classes (the backbone tests' smoke check of each method)."""
    model.train()
    loss, _ = model.forward_train(images, labels)
    loss.backward()
    grads = [p.grad for p in model.trainable_parameters().values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (len(images), model.num_eval_classes) and torch.isfinite(logits).all()


def hand_refine(refiner, text, cache):
    detail = F.softmax(F.normalize(text, dim=-1) @ cache.t(), dim=1) @ cache
    return 0.2 * torch.cat([text, detail], dim=1) @ refiner.aggregator.linear.weight.t() + text


def hand_semantic(aligned, attention):
    top = attention.topk(TOPK, dim=1).indices + 1
    rows = [torch.cat([a[:1], a[t], a.mean(0, keepdim=True)]) for a, t in zip(aligned, top)]
    return torch.stack(rows)                                # [B, k + 2, d]


def hand_cache_write(cache, aligned, momentum=0.8):
    """Released rule: w_i = P[i, j] / max_k P[k, j], P = softmax over tokens."""
    x = F.normalize(aligned.reshape(-1, cache.shape[1]), dim=-1)
    scores = x @ cache.t()
    assigned = scores.argmax(1)
    p = scores.softmax(0)
    new = cache.clone()
    for j in assigned.unique().tolist():
        rows = (assigned == j).nonzero()[:, 0]
        weights = p[rows, j] / p[:, j].max()
        new[j] = momentum * cache[j] + (1 - momentum) * (weights[:, None] * x[rows]).sum(0)
    return F.normalize(new, dim=-1)


def hand_kd(student, teacher, t):
    log_s = F.log_softmax(student / t, dim=1)
    log_t = F.log_softmax(teacher / t, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum() * t * t / student.numel()


def coop_text(model, clip, classnames=CLASSNAMES):
    emb, eot = prompted_embeddings(clip, classnames, model.prompt_learner.ctx, "a photo of a")
    return hand_text(clip, emb, eot)


def maple_text(model, clip, classnames=CLASSNAMES):
    learner = model.prompt_learner
    emb, eot = prompted_embeddings(clip, classnames, learner.ctx, "a photo of a")
    return hand_text(clip, emb, eot, [learner.compound_prompts_text[0]])


def maple_vision_prompts(model):
    learner = model.prompt_learner
    deep = learner.compound_prompts_text[0]
    layer1 = deep @ learner.compound_prompt_projections[0].weight.t() \
        + learner.compound_prompt_projections[0].bias
    return [learner.ctx @ learner.proj.weight.t() + learner.proj.bias, layer1]


def student_prompts(model):
    visual = model.image_encoder
    return [visual.VPT, visual.transformer.resblocks[1].VPT_shallow]


def hand_pieces(model, clip, method, images):
    """(E [C, d], global feature, tokens, attention) of `model` computed by hand."""
    if method == "CoOp":
        return (coop_text(model, clip),) + hand_vision(clip.visual, images)
    if method == "MaPLe":
        return (maple_text(model, clip),) + hand_vision(clip.visual, images,
                                                         maple_vision_prompts(model))
    return (model.teacher_text,) + hand_vision(model.image_encoder, images, student_prompts(model))


def hand_teacher(tfile, classnames, images=None):
    _, tclip, prompts = tfile
    emb, eot = prompted_embeddings(tclip, classnames, prompts["prompt_learner.ctx"], "a photo of a")
    text = hand_text(tclip, emb, eot, [prompts["text_encoder.transformer.resblocks.1.VPT_shallow"]])
    if images is None:
        return text
    feature, _, _ = hand_vision(tclip.visual, images, [
        prompts["image_encoder.VPT"], prompts["image_encoder.transformer.resblocks.1.VPT_shallow"]])
    return text, tclip.logit_scale.exp() * F.normalize(feature, dim=-1) @ text.t()


def hand_eval_logits(model, clip, method, images, refiner):
    text, feature, _, _ = hand_pieces(model, clip, method, images)
    if method == "PromptKD":
        feature = hand_mlp(model.VPT_image_trans, feature, batch_stats=False)
    if refiner:
        text = hand_refine(model.refiner, text, model.refiner.cache.entries)
    return model.logit_scale.exp() * F.normalize(feature, dim=-1) @ text.t()


# ------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("method", TRAINED)
def test_eval_logits_match_hand_computation(build, base_clip, batch, method, refiner):
    model = build(method, refiner=refiner)
    perturb_prompts(model)
    model.eval()
    images = batch[0]
    with torch.no_grad():
        got = model(images)
        expected = hand_eval_logits(model, base_clip, method, images, refiner)
    assert got.shape == (len(images), len(CLASSNAMES))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_coop_plain_logits_are_clip_logits_with_learned_prompts(build, base_clip, batch):
    """Refiner off = published CoOp: logit_scale * normalize(v) @ normalize(text)^T, with v the
    stock `encode_image` and, before training, text = CLIP's own "a photo of a <name>."."""
    model = build("CoOp")
    model.eval()
    images = batch[0]
    with torch.no_grad():
        v = F.normalize(base_clip.encode_image(images), dim=-1)
        text = F.normalize(base_clip.encode_text(
            tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])), dim=-1)
        torch.testing.assert_close(model(images), base_clip.logit_scale.exp() * v @ text.t(),
                                   atol=ATOL, rtol=1e-4)


def test_zeroshot_uses_dataset_template_and_trains_nothing(build, base_clip, batch):
    model = build("ZeroshotCLIP", "DATASET.NAME", "OxfordPets")
    model.eval()
    images = batch[0]
    with torch.no_grad():
        v = F.normalize(base_clip.encode_image(images), dim=-1)
        text = F.normalize(base_clip.encode_text(tokenize(
            [f"a photo of a {c.replace('_', ' ')}, a type of pet." for c in CLASSNAMES])), dim=-1)
        torch.testing.assert_close(model(images), base_clip.logit_scale.exp() * v @ text.t(),
                                   atol=ATOL, rtol=1e-4)
    assert model.trainable_parameters() == {}
    assert model.checkpoint_state() == {}
    with pytest.raises(RuntimeError, match="eval-only"):
        model.forward_train(*batch)


@pytest.mark.parametrize("method", TRAINED)
def test_refiner_off_has_no_refiner_parameters(build, method):
    model = build(method)
    assert model.refiner is None
    assert not [n for n, _ in model.named_parameters() if "refiner" in n]
    assert not [k for k in model.state_dict() if "refiner" in k]
    assert not [k for k in model.checkpoint_state() if "refiner" in k]


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("method", TRAINED)
def test_trainable_parameters_are_prompts_and_refiner(build, method, refiner):
    model = build(method, refiner=refiner)
    expected = OWN_PARAMS[method] | (REFINER_NAMES if refiner else set())
    assert set(model.trainable_parameters()) == expected
    saved = set(model.checkpoint_state())
    assert expected <= saved
    # Besides parameters, only the refiner's buffers (cache, BatchNorm statistics) and the
    # PromptKD projector's BatchNorm statistics are saved; nothing class-dependent.
    extra = saved - expected
    assert all(k.startswith(("refiner.", "VPT_image_trans.")) for k in extra), extra
    if refiner:
        assert "refiner.cache.entries" in saved


# ------------------------------------------------------------------------------ training loss
@pytest.mark.parametrize("method", ["CoOp", "MaPLe"])
def test_refiner_training_loss_matches_formula(build, base_clip, batch, method):
    model = build(method, refiner=True)
    perturb_prompts(model)
    model.train()
    images, labels = batch
    cache = model.refiner.cache.entries.clone()
    with torch.no_grad():
        pieces = hand_pieces(model, base_clip, method, images)
        parts, expected_cache = hand_refiner_step(model, pieces, labels, cache,
                                                  base_clip.logit_scale.exp())
    check_refiner_step(model, images, labels, parts, expected_cache)


def hand_refiner_step(model, pieces, labels, cache, scale):
    """((L_cls, L_sem, L_reg), cache after the write) of one CE-form TR step, from the hand-made
    (E, global feature, tokens, attention) and the cache before the step."""
    text, feature, tokens, attention = pieces
    refined = hand_refine(model.refiner, text, cache)
    aligned = hand_mlp(model.refiner.aligner, tokens, batch_stats=True)
    loss_cls = F.cross_entropy(scale * F.normalize(feature, dim=-1) @ refined.t(), labels)
    semantic = hand_semantic(aligned, attention).reshape(-1, aligned.shape[-1])
    loss_sem = F.cross_entropy(scale * semantic @ text.t(), labels.repeat_interleave(N_SEM))
    loss_reg = (F.normalize(refined, dim=-1) - text).abs().mean()
    return (loss_cls, loss_sem, loss_reg), hand_cache_write(cache, aligned)


def check_refiner_step(model, images, labels, expected_parts, expected_cache):
    """One `forward_train` gives these loss parts, their weighted sum, and this cache."""
    loss_cls, loss_sem, loss_reg = expected_parts
    loss, parts = model.forward_train(images, labels)
    torch.testing.assert_close(parts["loss_cls"], loss_cls, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(parts["loss_sem"], loss_sem, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(parts["loss_reg"], loss_reg, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), loss_cls + 0.02 * loss_sem + 20 * loss_reg,
                               atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(model.refiner.cache.entries, expected_cache, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("method", ["CoOp", "MaPLe"])
def test_plain_training_loss_is_cross_entropy(build, base_clip, batch, method):
    model = build(method)
    perturb_prompts(model)
    images, labels = batch
    with torch.no_grad():
        text, feature, _, _ = hand_pieces(model, base_clip, method, images)
        logits = base_clip.logit_scale.exp() * F.normalize(feature, dim=-1) @ text.t()
    loss, parts = model.forward_train(images, labels)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, labels), atol=ATOL, rtol=1e-4)
    assert set(parts) == {"loss_cls", "acc"}
    expected_acc = (logits.argmax(dim=1) == labels).float().mean() * 100
    torch.testing.assert_close(parts["acc"], expected_acc)


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_promptkd_training_loss_matches_kd_formula(build, batch, teacher_file, refiner):
    model = build("PromptKD", *KD_OPTS, refiner=refiner)
    perturb_prompts(model)
    model.train()
    images = batch[0]
    w, t = 3.0, 2.0
    with torch.no_grad():
        _, teacher_logits = hand_teacher(teacher_file, CLASSNAMES, images)
        text, feature, tokens, attention = hand_pieces(model, None, "PromptKD", images)
        feature = F.normalize(hand_mlp(model.VPT_image_trans, feature, batch_stats=True), dim=-1)
        scale = model.logit_scale.exp()
        if refiner:
            cache = model.refiner.cache.entries.clone()
            refined = hand_refine(model.refiner, text, cache)
            aligned = hand_mlp(model.refiner.aligner, tokens, batch_stats=True)
            loss_kd = hand_kd(scale * feature @ refined.t(), teacher_logits, t)
            semantic = hand_semantic(aligned, attention).reshape(-1, aligned.shape[-1])
            loss_sem = hand_kd(scale * semantic @ text.t(),
                               teacher_logits.repeat_interleave(N_SEM, dim=0), t)
            loss_reg = (F.normalize(refined, dim=-1) - text).abs().mean()
            expected = w * (loss_kd + 0.01 * loss_sem + 0.02 * loss_reg)
        else:
            loss_kd = hand_kd(scale * feature @ text.t(), teacher_logits, t)
            expected = w * loss_kd

    loss, parts = model.forward_train(images)
    torch.testing.assert_close(parts["loss_kd"], loss_kd, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), expected, atol=ATOL, rtol=1e-4)
    if refiner:
        torch.testing.assert_close(parts["loss_sem"], loss_sem, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(parts["loss_reg"], loss_reg, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.refiner.cache.entries, hand_cache_write(cache, aligned),
                                   atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------------------ gradients, steps
@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("method", TRAINED)
def test_gradients_reach_exactly_the_trainable_parameters(build, batch, method, refiner):
    model = build(method, refiner=refiner)
    model.train()
    loss, _ = model.forward_train(*batch)
    loss.backward()
    trainable = {id(p) for p in model.trainable_parameters().values()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(model.trainable_parameters())
    for name, param in model.named_parameters():
        if id(param) in trainable:
            assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"
    if method == "PromptKD":
        assert not [n for n, p in model.teacher.named_parameters() if p.requires_grad]


def _step_lowers_loss(model, batch, lr):
    model.train()
    cache = None if model.refiner is None else model.refiner.cache.entries.clone()
    optimizer = torch.optim.SGD(list(model.trainable_parameters().values()), lr=lr)
    before, _ = model.forward_train(*batch)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    if cache is not None:  # same batch, same cache: only the step differs
        model.refiner.cache.entries = cache.clone()
    with torch.no_grad():
        after, _ = model.forward_train(*batch)
    return before.item(), after.item()


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("method", TRAINED)
def test_one_sgd_step_lowers_the_loss(build, batch, method, refiner):
    model = build(method, refiner=refiner)
    before, after = _step_lowers_loss(model, batch, lr=1e-2)
    assert math.isfinite(before) and after < before, (before, after)


# ------------------------------------------------------------------------------ evaluation cache
class CountingClassifier:
    def __init__(self, model):
        self.inner = model.classifier
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.inner()


@pytest.mark.parametrize("method,refiner", [(m, r) for m in TRAINED for r in (False, True)]
                         + [("ZeroshotCLIP", False)])
def test_evaluation_computes_class_embeddings_once(build, method, refiner):
    model = build(method, refiner=refiner)
    perturb_prompts(model)
    counter = CountingClassifier(model)
    model.classifier = counter
    model.eval()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(3)]
    with torch.no_grad():
        cached = [model(x) for x in batches]
        assert counter.calls == 1
        for x, logits in zip(batches, cached):
            features = F.normalize(model.encode_images(x).features, dim=-1)
            fresh = model.logit_scale.exp() * features @ counter.inner()[model_slice(model)].t()
            torch.testing.assert_close(logits, fresh, atol=ATOL, rtol=1e-4)
        model.train()
        model.eval()
        model(batches[0])
    assert counter.calls == 2, "train() must invalidate the cached classifier"
    model.load_checkpoint_state(model.checkpoint_state())
    with torch.no_grad():
        model(batches[0])
    assert counter.calls == 3, "loading a checkpoint must invalidate the cached classifier"


def model_slice(model):
    return getattr(model, "class_slice", slice(None))


def test_maple_projects_its_vision_prompts_once_per_evaluation(build):
    model = build("MaPLe", refiner=True)
    perturb_prompts(model)
    learner, calls = model.prompt_learner, []
    project = learner.vision_prompts
    learner.vision_prompts = lambda: calls.append(1) or project()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(3)]
    model.eval()
    with torch.no_grad():
        cached = [model(x) for x in batches]
    assert len(calls) == 1
    with torch.no_grad():  # equal to projecting afresh for every batch
        for x, logits in zip(batches, cached):
            features = encode_image(model.image_encoder, x, project()).features
            fresh = model.logit_scale.exp() * F.normalize(features, dim=-1) @ \
                model.classifier().t()
            torch.testing.assert_close(logits, fresh, atol=ATOL, rtol=1e-4)
        model.train()
        model.eval()
        model(batches[0])
    assert len(calls) == 2, "train() must drop the projected prompts"


@pytest.mark.parametrize("method", TRAINED)
def test_cache_moves_in_training_only(build, batch, method):
    model = build(method, refiner=True)
    entries = model.refiner.cache.entries.clone()
    model.eval()
    with torch.no_grad():
        model(batch[0])
        model(batch[0])
    assert torch.equal(model.refiner.cache.entries, entries)
    model.train()
    model.forward_train(*batch)
    moved = model.refiner.cache.entries
    assert not torch.allclose(moved, entries)
    torch.testing.assert_close(moved.norm(dim=1), torch.ones(len(moved)))


def test_refiner_batchnorm_statistics_do_not_move_in_evaluation(build, batch):
    model = build("CoOp", refiner=True)
    model.eval()
    before = {k: v.clone() for k, v in model.checkpoint_state().items()}
    with torch.no_grad():
        model(batch[0])
    after = model.checkpoint_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------ CoOp prompts
def coop_reference_prompts(clip, ctx, position, words):
    """CoOp's layouts, per class: end [SOS, ctx, name, rest]; middle [SOS, ctx[:n//2], name,
    ctx[n//2:], rest]; front [SOS, name, ctx, rest]."""
    rows = []
    for c, classname in enumerate(CLASSNAMES):
        name = classname.replace("_", " ")
        emb = clip.token_embedding(tokenize([f"{words} {name}."]))[0]
        n_name = name_token_count(name)
        class_ctx = ctx[c] if ctx.dim() == 3 else ctx
        n = class_ctx.shape[0]
        sos, name_emb, rest = emb[:1], emb[1 + n:1 + n + n_name], emb[1 + n + n_name:]
        if position == "end":
            parts = [sos, class_ctx, name_emb, rest]
        elif position == "middle":
            parts = [sos, class_ctx[:n // 2], name_emb, class_ctx[n // 2:], rest]
        else:
            parts = [sos, name_emb, class_ctx, rest]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("csc", [False, True], ids=["shared", "csc"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_prompt_layouts(build, base_clip, position, csc):
    model = build("CoOp", "TRAINER.COOP.CLASS_TOKEN_POSITION", position,
                  "TRAINER.COOP.CSC", str(csc), "TRAINER.COOP.CTX_INIT", "",
                  "TRAINER.COOP.N_CTX", "5")
    ctx = model.prompt_learner.ctx
    assert ctx.shape == ((len(CLASSNAMES), 5, 64) if csc else (5, 64))
    words = " ".join(["X"] * 5)
    with torch.no_grad():
        expected = coop_reference_prompts(base_clip, ctx, position, words)
        torch.testing.assert_close(model.prompt_learner(), expected, atol=0, rtol=0)
        eot = tokenize([f"{words} {c.replace('_', ' ')}." for c in CLASSNAMES]).argmax(-1)
        torch.testing.assert_close(model.text_features(), hand_text(base_clip, expected, eot),
                                   atol=ATOL, rtol=1e-4)


def test_coop_class_specific_contexts_differ_per_class(build, base_clip, batch):
    model = build("CoOp", "TRAINER.COOP.CSC", "True", "TRAINER.COOP.CTX_INIT", "")
    ctx = model.prompt_learner.ctx
    assert not torch.equal(ctx[0], ctx[1])
    loss, _ = model.forward_train(*batch)
    loss.backward()
    # Class 1 and 3 appear in no label and in every logit: still reached through the softmax.
    assert (ctx.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_coop_ctx_init_sets_context_length(build, base_clip):
    model = build("CoOp", "TRAINER.COOP.CTX_INIT", "a_photo_of a", "TRAINER.COOP.N_CTX", "16")
    emb = base_clip.token_embedding(tokenize(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(model.prompt_learner.ctx.detach(), emb.detach())


def test_coop_unknown_class_token_position_is_refused(build):
    with pytest.raises(UserError, match="CLASS_TOKEN_POSITION"):
        build("CoOp", "TRAINER.COOP.CLASS_TOKEN_POSITION", "back")


@pytest.mark.parametrize("method", TRAINED)
def test_refiner_topk_above_patch_count_is_refused(build, method):
    with pytest.raises(UserError, match="TOPK"):
        build(method, "TRAINER.REFINER.ENABLED", "True", "TRAINER.REFINER.TOPK", "17")


# ------------------------------------------------------------------------------ MaPLe
def test_maple_prompt_widths(build):
    model = build("MaPLe")
    learner = model.prompt_learner
    assert learner.ctx.shape == (2, 64)
    assert [tuple(p.shape) for p in learner.compound_prompts_text] == [(2, 64)]
    assert [tuple(p.shape) for p in learner.vision_prompts()] == [(2, 128), (2, 128)]


@pytest.mark.parametrize("depth", ["0", "4"])
def test_maple_depth_outside_the_clip_is_refused(build, depth):
    with pytest.raises(UserError, match="PROMPT_DEPTH"):
        build("MaPLe", "TRAINER.MAPLE.PROMPT_DEPTH", depth)


def test_maple_deepest_valid_depth_builds(build, batch):
    model = build("MaPLe", "TRAINER.MAPLE.PROMPT_DEPTH", "3")
    assert len(model.prompt_learner.vision_prompts()) == 3
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(batch[0])).all()


# ------------------------------------------------------------------------------ checkpoints
def _train_one_step(model, batch):
    model.train()
    optimizer = torch.optim.SGD(list(model.trainable_parameters().values()), lr=0.05)
    loss, _ = model.forward_train(*batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("method", TRAINED)
def test_checkpoint_moves_from_base_to_novel_classes(build, method, refiner):
    base, novel = CLASSNAMES[:3], CLASSNAMES[3:]
    gen = torch.Generator().manual_seed(11)
    images, labels = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0, 2])
    trained = build(method, refiner=refiner, classnames=base)
    _train_one_step(trained, (images, labels))
    state = {k: v.clone() for k, v in trained.checkpoint_state().items()}
    class_buffers = ("token_prefix", "token_suffix", "eot_indices", "tokenized_prompts",
                     "teacher", "text_feature_bank", "order")
    assert not [k for k in state if any(b in k for b in class_buffers)]

    target = build(method, refiner=refiner, classnames=novel, seed=1)
    reference = build(method, refiner=refiner, classnames=novel, seed=2)
    target.load_checkpoint_state(state)
    loaded = target.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    if refiner:
        assert torch.equal(target.refiner.cache.entries, trained.refiner.cache.entries)
    for name, buffer in reference.named_buffers():
        if any(b in name for b in class_buffers):
            assert torch.equal(dict(target.named_buffers())[name], buffer), name
    if method == "PromptKD":
        assert target.teacher_text.shape[0] == len(novel)
    else:
        assert target.prompt_learner.token_prefix.shape[0] == len(novel)
    target.eval()
    with torch.no_grad():
        assert target(images).shape == (2, len(novel))


@pytest.mark.parametrize("method", TRAINED)
def test_refiner_checkpoint_into_plain_model_says_add_refiner(build, method):
    state = build(method, refiner=True).checkpoint_state()
    with pytest.raises(UserError, match="add --refiner"):
        build(method).load_checkpoint_state(state)


@pytest.mark.parametrize("method", TRAINED)
def test_plain_checkpoint_into_refiner_model_says_drop_refiner(build, method):
    state = build(method).checkpoint_state()
    with pytest.raises(UserError, match="drop --refiner"):
        build(method, refiner=True).load_checkpoint_state(state)


@pytest.mark.parametrize("source,target", [("CoOp", "MaPLe"), ("MaPLe", "CoOp"),
                                           ("CoOp", "PromptKD")])
def test_checkpoint_of_another_method_is_refused(build, source, target):
    state = build(source).checkpoint_state()
    with pytest.raises(UserError, match="another method"):
        build(target).load_checkpoint_state(state)


def test_checkpoint_with_other_embedding_size_is_refused(build, teacher_clip_path):
    state = build("CoOp", refiner=True,
                  clip=load_clip(teacher_clip_path, "fp32")).checkpoint_state()
    with pytest.raises(UserError, match="shape"):
        build("CoOp", refiner=True).load_checkpoint_state(state)


def test_checkpoint_with_other_cache_size_names_the_setting(build):
    state = build("CoOp", "TRAINER.REFINER.CACHE_SIZE", "7", refiner=True).checkpoint_state()
    with pytest.raises(UserError, match="TRAINER.REFINER.CACHE_SIZE 7"):
        build("CoOp", refiner=True).load_checkpoint_state(state)


def test_class_specific_checkpoint_into_other_class_count_is_refused(build):
    state = build("CoOp", "TRAINER.COOP.CSC", "True", classnames=CLASSNAMES[:3]).checkpoint_state()
    with pytest.raises(UserError, match="shape"):
        build("CoOp", "TRAINER.COOP.CSC", "True", classnames=CLASSNAMES[3:]).load_checkpoint_state(
            state)


# ------------------------------------------------------------------------------ PromptKD teacher
def test_promptkd_teacher_loads_from_checkpoint(build, teacher_file):
    model = build("PromptKD", shared_teacher=False)
    path, tclip, prompts = teacher_file
    teacher = model.teacher
    teacher_state = teacher.state_dict()
    for key, value in prompts.items():
        assert torch.equal(teacher_state[key], value), key
    # The checkpoint's CLIP weights are the teacher's, not those of TEACHER_PATH.
    assert torch.equal(teacher.text_encoder.text_projection, tclip.text_projection)
    assert teacher.logit_scale.item() == pytest.approx(math.log(30.0))
    # token_prefix / token_suffix of the file (other shape) ignored: rebuilt from the class names.
    learner = teacher.prompt_learner
    emb = tclip.token_embedding(tokenize([f"a photo of a {c.replace('_', ' ')}."
                                          for c in CLASSNAMES]))
    assert torch.equal(learner.token_prefix, emb[:, :1])
    assert torch.equal(learner.token_suffix, emb[:, 5:])
    assert not [n for n, p in teacher.named_parameters() if p.requires_grad]
    assert not teacher.training


def test_promptkd_teacher_text_is_computed_once_at_build(build, teacher_file, batch):
    model = build("PromptKD", shared_teacher=False)
    with torch.no_grad():
        expected = hand_teacher(teacher_file, CLASSNAMES)
    torch.testing.assert_close(model.teacher_text, expected, atol=ATOL, rtol=1e-4)
    assert model.teacher_text.shape == (len(CLASSNAMES), 48)
    assert "teacher_text" not in model.state_dict()  # rebuilt, never saved
    calls = []
    model.teacher.text_features = lambda: calls.append(1)
    model.train()
    model.forward_train(batch[0])
    model.eval()
    with torch.no_grad():
        model(batch[0])
    assert calls == []


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
def test_promptkd_eval_classes_are_slices_of_all_classes(build, batch, refiner):
    model = build("PromptKD", refiner=refiner)
    model.eval()
    images = batch[0]
    with torch.no_grad():
        full = model(images)
        model.set_eval_classes("val")
        val = model(images)
        model.set_eval_classes("test")
        test = model(images)
        model.set_eval_classes("test", modal="cross")
        cross = model(images)
    m = math.ceil(len(CLASSNAMES) / 2)
    assert val.shape == (3, m) and test.shape == (3, len(CLASSNAMES) - m)
    torch.testing.assert_close(val, full[:, :m])
    torch.testing.assert_close(test, full[:, m:])
    torch.testing.assert_close(cross, full)


def test_promptkd_without_teacher_checkpoint_is_refused(base_clip, teacher_clip_path):
    cfg = make_cfg("TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path)
    with pytest.raises(UserError, match="TEACHER_CKPT"):
        PromptKD(cfg, CLASSNAMES, copy.deepcopy(base_clip))


def test_promptkd_missing_teacher_file_is_refused(base_clip, teacher_clip_path, tmp_path):
    cfg = make_cfg("TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
                   "TRAINER.PROMPTKD.TEACHER_CKPT", str(tmp_path / "nope.pth.tar"))
    with pytest.raises(UserError, match="does not exist"):
        PromptKD(cfg, CLASSNAMES, copy.deepcopy(base_clip))


def _write_teacher(tmp_path, state):
    path = tmp_path / "model-best.pth.tar"
    torch.save({"state_dict": state, "epoch": 20}, str(path))
    return str(path)


def _teacher_cfg(path, teacher_clip_path):
    return make_cfg("TRAINER.PROMPTKD.TEACHER_CKPT", path,
                    "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
                    "TRAINER.PROMPTKD.N_CTX_VISION", "4",
                    "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2")


def test_promptkd_teacher_without_text_context_is_refused(base_clip, teacher_file,
                                                          teacher_clip_path, tmp_path):
    state = dict(torch.load(teacher_file[0])["state_dict"])
    del state["prompt_learner.ctx"]
    cfg = _teacher_cfg(_write_teacher(tmp_path, state), teacher_clip_path)
    with pytest.raises(UserError, match="prompt_learner.ctx"):
        PromptKD(cfg, CLASSNAMES, copy.deepcopy(base_clip))


def test_promptkd_teacher_for_another_clip_is_refused(base_clip, teacher_file, clip_path,
                                                      tmp_path):
    # The teacher prompts are 128 / 192 wide; the student-sized CLIP is 64 / 128 wide.
    state = {k: v for k, v in torch.load(teacher_file[0])["state_dict"].items()
             if "VPT" in k or k.startswith("prompt_learner.")}
    cfg = _teacher_cfg(_write_teacher(tmp_path, state), clip_path)
    with pytest.raises(UserError, match="shape"):
        PromptKD(cfg, CLASSNAMES, copy.deepcopy(base_clip))


def test_promptkd_teacher_checkpoint_with_promptsrc_zero_shot_encoder_loads(
        base_clip, teacher_file, teacher_clip_path, tmp_path, batch):
    """PromptSRC's prompt learner keeps a frozen copy of CLIP's image encoder as
    `ZS_image_encoder`, and Dassl saves the whole state dict, so teacher checkpoints trained with
    PromptSRC carry `prompt_learner.ZS_image_encoder.*`; PromptKD loads them non-strictly."""
    state = dict(torch.load(teacher_file[0])["state_dict"])
    state.update({"prompt_learner.ZS_image_encoder." + k[len("image_encoder."):]: v
                  for k, v in state.items() if k.startswith("image_encoder.") and "VPT" not in k})
    cfg = _teacher_cfg(_write_teacher(tmp_path, state), teacher_clip_path)
    model = PromptKD(cfg, CLASSNAMES, copy.deepcopy(base_clip))
    with torch.no_grad():
        torch.testing.assert_close(model.teacher_text, hand_teacher(teacher_file, CLASSNAMES),
                                   atol=ATOL, rtol=1e-4)


def test_promptkd_student_checkpoint_names(build):
    state = build("PromptKD", refiner=True).checkpoint_state()
    assert "image_encoder.VPT" in state
    assert "image_encoder.transformer.resblocks.1.VPT_shallow" in state
    assert PROJECTOR_NAMES <= set(state)
    assert not [k for k in state if k.startswith("teacher.")]


# ------------------------------------------------------------------------------ precision
def test_fp16_coop_with_refiner_trains_on_cpu(clip_path, batch):
    clip = load_clip(clip_path, "fp16")
    cfg = make_cfg("TRAINER.COOP.PREC", "fp16", *REFINER_ON)
    torch.manual_seed(0)
    model = CoOp(cfg, CLASSNAMES, clip)
    assert model.prompt_learner.ctx.dtype == torch.float16
    images, labels = batch
    try:
        _train_one_step(model, (images, labels))
    except RuntimeError as exc:  # an op without a CPU half kernel in this torch build
        if "Half" in str(exc) or "half" in str(exc):
            pytest.skip(f"fp16 on CPU unsupported by this torch build: {exc}")
        raise
    for name, param in model.trainable_parameters().items():
        assert torch.isfinite(param).all(), name
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (3, len(CLASSNAMES)) and torch.isfinite(logits).all()
