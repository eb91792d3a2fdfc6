"""CLIP's ResNets (`ModifiedResNet`): loading, the image encoder and its local tokens, and the
methods on them, against the stock modules and the CoOp codebase's computation.

The CoOp codebase runs CoOp, CoCoOp and zero-shot CLIP on a ResNet unchanged: its image feature
is `clip_model.visual(image)`. TextRefiner's local tokens on a ResNet are the dense reading of
the attention pool (`encode_resnet_image`), recomputed here by hand from the pool's weights.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSNAMES, make_cfg
from test_methods import (ATOL, REFINER_ON, TOPK, check_refiner_step, hand_refiner_step,
                          hand_text, perturb_prompts, prompted_embeddings, tokenize)
from textrefiner.clip_backbone import (clip_dims, encode_image, encode_text_tokens, load_clip,
                                       num_patches)
from textrefiner.errors import UserError
from textrefiner.methods import build_method

WORDS = "a photo of a"
SIZE = ("INPUT.SIZE", "(96, 96)", "TRAINER.COCOOP.PREC", "fp32",
        "TRAINER.COCOOP.CTX_INIT", WORDS)


@pytest.fixture(scope="module")
def resnet(resnet_clip_path):
    return load_clip(resnet_clip_path, "fp32")


@pytest.fixture
def build(resnet):
    def _build(method, *opts, refiner=False, seed=0):
        cfg = make_cfg(*(SIZE + tuple(opts) + (REFINER_ON if refiner else ())))
        torch.manual_seed(seed)
        return build_method(method, cfg, CLASSNAMES, copy.deepcopy(resnet))

    return _build


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(3, 3, 96, 96, generator=gen), torch.tensor([0, 2, 4])


# ------------------------------------------------------------------------------ hand references
def pool_input(visual, images):
    """The map [B, C, H, W] the stock forward hands to its attention pool (a forward hook)."""
    seen = []
    handle = visual.attnpool.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        pooled = visual(images)
    finally:
        handle.remove()
    return seen[0], pooled


def hand_dense(pool, fmap):
    """Local tokens t_i = c_proj(v_proj(x_i)) and the query's attention a_i, head by head."""
    f = fmap.flatten(2).transpose(1, 2)                           # [B, N, C]
    x = torch.cat([f.mean(1, keepdim=True), f], dim=1) + pool.positional_embedding
    values = x[:, 1:] @ pool.v_proj.weight.t() + pool.v_proj.bias
    local = values @ pool.c_proj.weight.t() + pool.c_proj.bias      # [B, N, d]
    q = x[:, 0] @ pool.q_proj.weight.t() + pool.q_proj.bias         # [B, C]
    k = x @ pool.k_proj.weight.t() + pool.k_proj.bias               # [B, 1+N, C]
    head_dim = x.shape[-1] // pool.num_heads
    per_head = []
    for h in range(pool.num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = torch.einsum("bc,blc->bl", q[:, cols], k[:, :, cols]) / head_dim ** 0.5
        per_head.append(scores.softmax(-1))
    return local, torch.stack(per_head).mean(0)[:, 1:]


def hand_resnet(visual, images):
    """(g [B, d], tokens [B, 1+N, d], attention [B, N]) from the stock modules."""
    fmap, pooled = pool_input(visual, images)
    local, attention = hand_dense(visual.attnpool, fmap)
    return pooled, torch.cat([pooled[:, None], local], dim=1), attention


def coop_codebase_logits(ctx, clip, images):
    """CoOp's CustomCLIP.forward: visual(image), prompts through the text transformer."""
    emb, eot = prompted_embeddings(clip, CLASSNAMES, ctx, WORDS)
    text = hand_text(clip, emb, eot)
    v = F.normalize(clip.visual(images), dim=-1)
    return clip.logit_scale.exp() * v @ text.t(), text


# ------------------------------------------------------------------------------ loading, encoder
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resnet_state_dict_loads_by_file(resnet_clip_path, precision):
    clip = load_clip(resnet_clip_path, precision)
    assert type(clip.visual).__name__ == "ModifiedResNet"
    assert clip.visual.conv1.weight.dtype == (torch.float16 if precision == "fp16" else
                                              torch.float32)
    saved = torch.load(resnet_clip_path, weights_only=True)
    assert set(clip.state_dict()) == set(saved)


def test_resnet_dims(resnet):
    assert clip_dims(resnet) == {"embed_dim": 32, "text_width": 64, "vision_width": 512,
                                 "num_patches": 9, "text_layers": 2, "vision_layers": 0,
                                 "image_size": 96}
    assert num_patches(resnet.visual) == 9


def test_features_are_the_stock_forward(resnet, batch):
    images = batch[0]
    with torch.no_grad():
        stock = resnet.encode_image(images)
        assert torch.equal(encode_image(resnet.visual, images).features, stock)
        out = encode_image(resnet.visual, images, return_tokens=True)
    assert torch.equal(out.features, stock)  # the pooled output is unchanged
    assert out.tokens.shape == (3, 10, 32) and out.cls_attention.shape == (3, 9)
    assert torch.equal(out.tokens[:, 0], stock)


def test_local_tokens_and_attention_match_the_hand_computation(resnet, batch):
    images = batch[0]
    with torch.no_grad():
        out = encode_image(resnet.visual, images, return_tokens=True)
        pooled, tokens, attention = hand_resnet(resnet.visual, images)
    torch.testing.assert_close(out.tokens, tokens, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.cls_attention, attention, atol=1e-6, rtol=1e-4)
    assert (attention.sum(-1) < 1).all()  # the mean token takes the rest


def test_attention_is_the_pools_own_query_row(resnet, batch):
    """The weights torch's attention computes for the pool's first query, averaged over heads."""
    pool = resnet.visual.attnpool
    with torch.no_grad():
        fmap, _ = pool_input(resnet.visual, batch[0])
        x = fmap.flatten(2).permute(2, 0, 1)
        x = torch.cat([x.mean(0, keepdim=True), x]) + pool.positional_embedding[:, None]
        _, weights = F.multi_head_attention_forward(
            x[:1], x, x, x.shape[-1], pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False,
            0.0, pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True,
            use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight)
        out = encode_image(resnet.visual, batch[0], return_tokens=True)
    torch.testing.assert_close(out.cls_attention, weights[:, 0, 1:], atol=1e-6, rtol=1e-4)


def test_prompts_on_a_resnet_are_refused(resnet, batch):
    with pytest.raises(UserError, match="ResNet"):
        encode_image(resnet.visual, batch[0], [torch.zeros(2, 512)])


# ------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("method", ["MaPLe", "PromptSRC", "PromptKD"])
def test_methods_that_prompt_vit_blocks_refuse_a_resnet(build, method):
    with pytest.raises(UserError) as info:
        build(method)
    message = str(info.value)
    assert method in message and "ResNet" in message and "\n" not in message


def test_zeroshot_is_the_stock_clip(build, resnet, batch):
    model = build("ZeroshotCLIP", "DATASET.NAME", "OxfordPets")
    model.eval()
    with torch.no_grad():
        v = F.normalize(resnet.encode_image(batch[0]), dim=-1)
        text = F.normalize(resnet.encode_text(tokenize(
            [f"a photo of a {c.replace('_', ' ')}, a type of pet." for c in CLASSNAMES])), dim=-1)
        torch.testing.assert_close(model(batch[0]), resnet.logit_scale.exp() * v @ text.t(),
                                   atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(encode_text_tokens(resnet, tokenize(["a cat."])),
                                   resnet.encode_text(tokenize(["a cat."])), atol=ATOL, rtol=1e-4)


def test_coop_logits_loss_and_gradients_equal_the_codebase(build, resnet, batch):
    model = build("CoOp")
    perturb_prompts(model)
    images, labels = batch
    model.eval()
    with torch.no_grad():
        expected, _ = coop_codebase_logits(model.prompt_learner.ctx, resnet, images)
        torch.testing.assert_close(model(images), expected, atol=ATOL, rtol=1e-4)

    model.train()
    loss, _ = model.forward_train(images, labels)
    grad = torch.autograd.grad(loss, model.prompt_learner.ctx)[0]
    ctx = model.prompt_learner.ctx.detach().clone().requires_grad_(True)
    logits, _ = coop_codebase_logits(ctx, resnet, images)
    expected_loss = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(grad, torch.autograd.grad(expected_loss, ctx)[0], atol=1e-6,
                               rtol=1e-4)


@pytest.mark.parametrize("csc", [False, True], ids=["shared", "csc"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_prompt_options_train_and_evaluate(build, batch, position, csc):
    model = build("CoOp", "TRAINER.COOP.CLASS_TOKEN_POSITION", position, "TRAINER.COOP.CSC",
                  str(csc), "TRAINER.COOP.CTX_INIT", "", "TRAINER.COOP.N_CTX", "4")
    model.eval()
    with torch.no_grad():
        v = F.normalize(model.image_encoder(batch[0]), dim=-1)
        expected = model.logit_scale.exp() * v @ model.text_features().t()
        torch.testing.assert_close(model(batch[0]), expected, atol=ATOL, rtol=1e-4)
    model.train()
    loss, _ = model.forward_train(*batch)
    loss.backward()
    assert model.prompt_learner.ctx.grad.abs().sum() > 0


def test_cocoop_logits_equal_the_codebase_per_image_loop(build, resnet, batch):
    model = build("CoCoOp")
    perturb_prompts(model)
    model.eval()
    learner = model.prompt_learner
    with torch.no_grad():
        v = F.normalize(resnet.visual(batch[0]), dim=-1)
        rows = []
        for v_b in v:
            net = learner.meta_net
            bias = F.relu(v_b @ net.linear1.weight.t() + net.linear1.bias) @ \
                net.linear2.weight.t() + net.linear2.bias
            emb, eot = prompted_embeddings(resnet, CLASSNAMES, learner.ctx + bias, WORDS)
            rows.append(resnet.logit_scale.exp() * v_b @ hand_text(resnet, emb, eot).t())
        torch.testing.assert_close(model(batch[0]), torch.stack(rows), atol=ATOL, rtol=1e-4)


def test_batchnorm_statistics_stay_frozen_in_training(build, batch):
    """As in the codebases, the frozen ResNet keeps its running statistics while prompts train."""
    model = build("CoOp", refiner=True)
    norm = model.image_encoder.bn1
    before = norm.running_mean.clone()
    model.train()
    assert not model.image_encoder.training and model.refiner.training
    model.forward_train(*batch)
    assert torch.equal(norm.running_mean, before)


# ------------------------------------------------------------------------------ TextRefiner
def test_refiner_training_step_matches_the_formula(build, resnet, batch):
    model = build("CoOp", refiner=True)
    perturb_prompts(model)
    model.train()
    images, labels = batch
    cache = model.refiner.cache.entries.clone()
    with torch.no_grad():
        _, text = coop_codebase_logits(model.prompt_learner.ctx, resnet, images)
        pieces = (text,) + hand_resnet(resnet.visual, images)
        parts, expected_cache = hand_refiner_step(model, pieces, labels, cache,
                                                  resnet.logit_scale.exp())
    check_refiner_step(model, images, labels, parts, expected_cache)


def test_refiner_topk_above_the_spatial_tokens_is_refused(build):
    with pytest.raises(UserError, match="9"):
        build("CoOp", "TRAINER.REFINER.ENABLED", "True", "TRAINER.REFINER.TOPK", "10")


@pytest.mark.parametrize("method", ["CoOp", "CoCoOp"])
def test_refiner_trains_and_evaluates(build, batch, method):
    model = build(method, refiner=True)
    model.train()
    loss, parts = model.forward_train(*batch)
    loss.backward()
    assert {"loss_sem", "loss_reg"} <= set(parts)
    assert all(p.grad is not None for p in model.trainable_parameters().values())
    model.eval()
    with torch.no_grad():
        assert model(batch[0]).shape == (3, len(CLASSNAMES))


# ------------------------------------------------------------------------------ both engines
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from textrefiner.data import write_synthetic_dataset
    root = str(tmp_path_factory.mktemp("resnet_data"))
    write_synthetic_dataset(root, num_classes=4, per_class_train=3, per_class_val=1,
                            per_class_test=2, image_size=32)
    return root


ENGINE_RUNS = [("CoOp", "CoOp/rn50_ep50.yaml", False), ("CoOp", "CoOp/rn50_ep50_ctxv1.yaml", True),
               ("CoCoOp", "CoCoOp/rn50_c4_ep10_batch1_ctxv1.yaml", True),
               ("ZeroshotCLIP", "ZeroshotCLIP/rn50.yaml", False)]


@pytest.mark.parametrize("engine", ["standalone", "dassl"])
@pytest.mark.parametrize("trainer, config, refiner", ENGINE_RUNS)
def test_codebase_resnet_configs_run_on_both_engines(engine, trainer, config, refiner,
                                                     resnet_clip_path, data_root, tmp_path):
    """The shipped ResNet configs (CoOp's own files, unchanged), sized down on the command line."""
    from textrefiner.config import CONFIG_DIR
    from textrefiner.train import main
    if engine == "dassl":
        pytest.importorskip("dassl")
    flags = (["--refiner"] if refiner else []) + (
        ["--eval-only"] if trainer == "ZeroshotCLIP" else [])
    args = ["--engine", engine, "--root", data_root, "--trainer", trainer, "--seed", "1",
            "--dataset-config-file", f"{CONFIG_DIR}/datasets/synthetic_shapes.yaml",
            "--config-file", f"{CONFIG_DIR}/trainers/{config}", "--output-dir", str(tmp_path)]
    opts = ["MODEL.BACKBONE.PATH", resnet_clip_path, "INPUT.SIZE", "(96, 96)", "USE_CUDA",
            "False", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
            "DATALOADER.TEST.BATCH_SIZE", "8", "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "1",
            "TRAINER.COOP.PREC", "fp32", "TRAINER.COCOOP.PREC", "fp32",
            "TRAINER.REFINER.TOPK", str(TOPK)]
    assert main(args + flags + opts) == 0
    assert "* accuracy:" in (tmp_path / "log.txt").read_text()
