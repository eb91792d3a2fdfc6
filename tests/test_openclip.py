"""OpenCLIP backbones (`open_clip_torch`): small random-weight models built by open_clip itself
(`pretrained=None`), loaded through "openclip:<model>/<file>", against open_clip's own
`encode_image` / `encode_text`, in its batch-first layout and in the older sequence-first one."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from conftest import CLASSNAMES, make_cfg, write_teacher_checkpoint  # noqa: E402
from test_methods import ATOL, REFINER_ON, TOPK, check_one_step, tokenize  # noqa: E402
from textrefiner.clip_backbone import (TextEncoder, check_image_size, clip_dims,  # noqa: E402
                                       embed_tokens, encode_image, encode_text,
                                       encode_text_tokens, load_clip)
from textrefiner.errors import UserError  # noqa: E402
from textrefiner.methods import build_method  # noqa: E402
from textrefiner.methods.templates import IMAGENET_TEMPLATES  # noqa: E402
from textrefiner.openclip_models import OpenCLIP, check_clip_towers, parse_spec  # noqa: E402

# ViT image tower with layer scales (as in OpenCLIP's ls_init_value models), CLIP's text tower.
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                       "head_width": 32, "ls_init_value": 0.5},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                     "layers": 2, "ls_init_value": 0.5}}
TEACHER = {"embed_dim": 48,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                        "layers": 2}}
SIZE = ("INPUT.SIZE", "(32, 32)", "TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT",
        "a photo of a", "TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT",
        "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2")


def random_openclip(config, seed=0):
    """open_clip's CLIP from a config dict, pretrained=None, every weight moved off its init."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**copy.deepcopy(config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def sequence_first(model):
    """The older OpenCLIP layout: transformers and attention modules on [L, B, w]."""
    for transformer in (model.transformer, model.visual.transformer):
        transformer.batch_first = False
        for block in transformer.resblocks:
            block.attn.batch_first = False
    return model


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The tiny configs registered with open_clip as "tr-tiny" / "tr-teacher", weights on disk:
    {"tiny": "openclip:tr-tiny/<file>", "teacher": ...}."""
    folder = tmp_path_factory.mktemp("openclip")
    specs = {}
    for name, config, seed in (("tiny", TINY, 0), ("teacher", TEACHER, 1)):
        config_file = folder / f"tr-{name}.json"
        config_file.write_text(json.dumps(config))
        open_clip.add_model_config(str(config_file))
        weights = folder / f"{name}.pt"
        torch.save(random_openclip(config, seed).state_dict(), str(weights))
        specs[name] = f"openclip:tr-{name}/{weights}"
    return specs


@pytest.fixture(scope="module", params=["batch_first", "sequence_first"])
def pair(request):
    """(open_clip's model, the project's view of the same modules)."""
    model = random_openclip(TINY)
    if request.param == "sequence_first":
        sequence_first(model)
    check_clip_towers(model, "tiny")
    return model, OpenCLIP(model, "tiny")


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def text_of(classnames, template="a photo of a {}."):
    return tokenize([template.format(c.replace("_", " ")) for c in classnames])


# ------------------------------------------------------------------------------ loading
def test_spec_parsing():
    assert parse_spec("ViT-B-16/laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert parse_spec("ViT-B-16//data/w.bin") == ("ViT-B-16", "/data/w.bin")
    assert parse_spec("hf-hub:timm/some-clip") == ("hf-hub:timm/some-clip", None)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "amp"])
def test_loads_from_a_local_file_through_open_clip(registered, precision):
    model = load_clip(registered["tiny"], precision)
    assert isinstance(model, OpenCLIP) and not model.training
    assert model.dtype == (torch.float16 if precision == "fp16" else torch.float32)
    reference = random_openclip(TINY)
    assert set(model.state_dict()) <= set(reference.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value.float(), reference.state_dict()[key].to(value.dtype).float()), key
    assert clip_dims(model) == {"embed_dim": 32, "text_width": 64, "vision_width": 64,
                                "num_patches": 16, "text_layers": 2, "vision_layers": 2,
                                "image_size": 32}


def test_a_name_without_weights_lists_the_tags():
    with pytest.raises(UserError, match="laion2b_s34b_b88k"):
        load_clip("openclip:ViT-B-16")


@pytest.mark.parametrize("spec", ["openclip:No-Such-Model/x", "openclip:tr-tiny/no_such_tag"])
def test_unknown_model_or_tag_is_one_clear_line(registered, spec):
    with pytest.raises(UserError) as info:
        load_clip(spec)
    assert "\n" not in str(info.value) and spec in str(info.value)


UNSUPPORTED = [
    ("attentional_pool", dict(vision_cfg={"attentional_pool": True}), "attentional pooling"),
    ("avg_pool", dict(vision_cfg={"pool_type": "avg"}), "'avg'"),
    ("qk_norm", dict(text_cfg={"qk_norm": True}), "CustomResidualAttentionBlock"),
    ("text_pool_last", dict(text_cfg={"pool_type": "last"}), "'last'"),
    ("no_causal_mask", dict(text_cfg={"no_causal_mask": True}), "causal mask"),
    ("siglip_bias", dict(init_logit_bias=-10.0), "SigLIP"),
]


@pytest.mark.parametrize("change, reason", [u[1:] for u in UNSUPPORTED],
                         ids=[u[0] for u in UNSUPPORTED])
def test_other_towers_are_refused_with_one_line(change, reason):
    config = copy.deepcopy(TINY)
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    model = open_clip.model.CLIP(**config)
    with pytest.raises(UserError) as info:
        check_clip_towers(model, "openclip:x/y")
    message = str(info.value)
    assert reason in message and "\n" not in message and "not supported" in message


def test_custom_text_clip_is_refused():
    model = open_clip.model.CustomTextCLIP(**copy.deepcopy(TINY))
    with pytest.raises(UserError, match="CustomTextCLIP"):
        check_clip_towers(model, "openclip:x/y")


def test_image_normalisation_must_be_the_models(registered):
    model = load_clip(registered["tiny"])
    check_image_size(make_cfg("INPUT.PIXEL_MEAN", "[0.48145466, 0.4578275, 0.40821073]",
                              "INPUT.PIXEL_STD", "[0.26862954, 0.26130258, 0.27577711]"), model)
    with pytest.raises(UserError, match="INPUT.PIXEL_MEAN"):
        check_image_size(make_cfg("INPUT.PIXEL_MEAN", "[0.5, 0.5, 0.5]"), model)


# ------------------------------------------------------------------------------ encoders
def test_encoders_equal_open_clip(pair, images):
    model, ours = pair
    tokens = tokenize(["a photo of a red circle.", "blue square", ""])
    with torch.no_grad():
        expected = model.encode_image(images)
        assert (encode_image(ours.visual, images).features - expected).abs().max() <= 1e-5
        out = encode_image(ours.visual, images, return_tokens=True)
        assert (out.features - model.encode_image(images)).abs().max() <= 1e-5
        assert (encode_text_tokens(ours, tokens) - model.encode_text(tokens)).abs().max() <= 1e-5
    assert out.tokens.shape == (3, 17, 32) and out.cls_attention.shape == (3, 16)


def test_local_tokens_and_attention_from_open_clips_last_block(pair, images):
    model, ours = pair
    visual = model.visual
    seen = {}
    last = visual.transformer.resblocks[-1]
    handles = [last.register_forward_pre_hook(lambda m, a: seen.update(x=a[0])),
               last.register_forward_hook(lambda m, a, o: seen.update(y=o))]
    with torch.no_grad():
        visual(images)
        out = encode_image(ours.visual, images, return_tokens=True)
    for handle in handles:
        handle.remove()
    first = (lambda t: t) if visual.transformer.batch_first else (lambda t: t.transpose(0, 1))
    x, y = first(seen["x"]), first(seen["y"])                        # [B, L, w]
    with torch.no_grad():
        expected_tokens = visual.ln_post(y) @ visual.proj
        h = last.ln_1(x)
        q, k, _ = (h @ last.attn.in_proj_weight.t() + last.attn.in_proj_bias).chunk(3, dim=-1)
        heads = last.attn.num_heads
        q = q.reshape(3, 17, heads, -1).transpose(1, 2)
        k = k.reshape(3, 17, heads, -1).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)
    torch.testing.assert_close(out.tokens, expected_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.cls_attention, weights[:, 0, 1:], atol=1e-6, rtol=1e-4)


def test_deep_prompts_match_a_hooked_open_clip_pass(pair, images):
    """Vision prompts appended before ln_pre and replaced before block 1; text prompts at
    positions 1..n, replaced before block 1: the same numbers through open_clip's forward."""
    model, ours = pair
    gen = torch.Generator().manual_seed(5)
    vision = [torch.randn(2, 64, generator=gen) for _ in range(2)]
    text = [torch.randn(2, 64, generator=gen) for _ in range(2)]
    first = model.transformer.batch_first

    def to_blf(x):
        return x if first else x.transpose(0, 1)

    def append(module, args):
        x = args[0]
        return (torch.cat([x, vision[0].expand(x.shape[0], -1, -1)], dim=1),)

    def replace_vision(module, args):
        x = to_blf(args[0]).clone()
        x[:, -2:] = vision[1]
        return (to_blf(x),)

    def replace_text(module, args):
        x = to_blf(args[0]).clone()
        x[:, 1:3] = text[1]
        return (to_blf(x),) + tuple(args[1:])

    def put_shallow(module, args, output):
        output = output.clone()
        output[:, 1:3] = text[0]
        return output

    tokens = tokenize(["X X red circle.", "X X blue square."])
    handles = [model.visual.ln_pre.register_forward_pre_hook(append),
               model.visual.transformer.resblocks[1].register_forward_pre_hook(replace_vision),
               model.transformer.resblocks[1].register_forward_pre_hook(replace_text),
               model.token_embedding.register_forward_hook(put_shallow)]
    try:
        with torch.no_grad():
            expected_image = model.encode_image(images)
            expected_text = model.encode_text(tokens)
    finally:
        for handle in handles:
            handle.remove()
    embeddings = embed_tokens(ours, tokens).clone()
    embeddings[:, 1:3] = text[0]
    with torch.no_grad():
        image = encode_image(ours.visual, images, vision).features
        got_text = encode_text(TextEncoder(ours), embeddings, tokens.argmax(-1), text[1:])
    assert (image - expected_image).abs().max() <= 1e-5
    assert (got_text - expected_text).abs().max() <= 1e-5


@pytest.mark.parametrize("option", ["checkpointing", "chunk_size"])
def test_text_memory_options_keep_the_features(pair, option):
    _, ours = pair
    tokens = text_of(CLASSNAMES)
    encoder = TextEncoder(ours)
    plain = encoder(embed_tokens(ours, tokens), tokens.argmax(-1))
    setattr(encoder, option, True if option == "checkpointing" else 2)
    torch.testing.assert_close(encoder(embed_tokens(ours, tokens), tokens.argmax(-1)), plain,
                               atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ every method
def build(method, clip, *opts, refiner=False, teacher=None):
    extra = ()
    if method == "PromptKD":
        extra = ("TRAINER.PROMPTKD.TEACHER_CKPT", teacher[0], "TRAINER.PROMPTKD.TEACHER_PATH",
                 teacher[1], "TRAINER.PROMPTKD.N_CTX_VISION", "4")
    cfg = make_cfg(*(SIZE + extra + tuple(opts) + (REFINER_ON if refiner else ())))
    torch.manual_seed(0)
    return build_method(method, cfg, CLASSNAMES, clip)


@pytest.fixture(scope="module")
def teacher(registered, tmp_path_factory):
    folder = tmp_path_factory.mktemp("oc_teacher") / "VLPromptLearner"
    return write_teacher_checkpoint(folder / "model-best.pth.tar", registered["teacher"]), \
        registered["teacher"]


def test_features_without_prompts_equal_open_clip(pair, images):
    """Each method's un-prompted features: zero-shot CLIP's classifier, CoOp's and CoCoOp's
    (meta-net output 0) text features from their initial words, MaPLe's (depth 1) text side,
    PromptSRC's frozen references, and every image side without prompts."""
    model, ours = pair
    with torch.no_grad():
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(text_of(CLASSNAMES)), dim=-1)

        zeroshot = build("ZeroshotCLIP", ours, "DATASET.NAME", "ImageNet")
        assert (zeroshot.text_features() - text).abs().max() <= 1e-5
        zeroshot.eval()
        expected = model.logit_scale.exp() * image @ text.t()
        assert (zeroshot(images) - expected).abs().max() <= 1e-4

        coop = build("CoOp", ours)
        assert (coop.text_features() - text).abs().max() <= 1e-5
        coop_image = F.normalize(coop.encode_images(images).features, dim=-1)
        assert (coop_image - image).abs().max() <= 1e-5

        cocoop = build("CoCoOp", ours)
        cocoop.prompt_learner.meta_net.linear2.weight.zero_()
        cocoop.prompt_learner.meta_net.linear2.bias.zero_()
        per_image = cocoop.batch_text_features(image)
        assert (per_image - text.expand(3, -1, -1)).abs().max() <= 1e-5

        maple = build("MaPLe", ours, "TRAINER.MAPLE.PROMPT_DEPTH", "1")
        assert (maple.text_features() - text).abs().max() <= 1e-5

        src = build("PromptSRC", ours)
        ensemble = sum(model.encode_text(text_of(CLASSNAMES, t)) for t in IMAGENET_TEMPLATES)
        fixed = F.normalize(ensemble / len(IMAGENET_TEMPLATES), dim=-1)
        assert (src.zero_shot_text_features() - fixed).abs().max() <= 1e-5
        assert (src.zero_shot_image_features(images) - image).abs().max() <= 1e-5


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("method", ["CoOp", "CoCoOp", "MaPLe", "PromptSRC", "PromptKD"])
def test_every_method_trains_and_evaluates(registered, teacher, images, method, refiner):
    model = build(method, load_clip(registered["tiny"]), refiner=refiner, teacher=teacher)
    check_one_step(model, images, torch.tensor([0, 2, 4]))


@pytest.mark.parametrize("engine", ["standalone", "dassl"])
def test_run_from_the_command_line(registered, tmp_path, engine):
    """`MODEL.BACKBONE.NAME openclip:...` on both engines, CoOp + TextRefiner."""
    from textrefiner.config import CONFIG_DIR
    from textrefiner.data import write_synthetic_dataset
    from textrefiner.train import main
    if engine == "dassl":
        pytest.importorskip("dassl")
    root = str(tmp_path / "data")
    write_synthetic_dataset(root, num_classes=4, per_class_train=3, per_class_val=1,
                            per_class_test=2, image_size=32)
    args = ["--engine", engine, "--root", root, "--trainer", "CoOp", "--refiner",
            "--dataset-config-file", f"{CONFIG_DIR}/datasets/synthetic_shapes.yaml",
            "--config-file", f"{CONFIG_DIR}/trainers/CoOp/demo_cpu.yaml",
            "--output-dir", str(tmp_path / "out"), "MODEL.BACKBONE.NAME", registered["tiny"],
            "MODEL.BACKBONE.PATH", "", "INPUT.PIXEL_MEAN", "[0.48145466, 0.4578275, 0.40821073]",
            "INPUT.PIXEL_STD", "[0.26862954, 0.26130258, 0.27577711]", "DATASET.NUM_SHOTS",
            "2", "OPTIM.MAX_EPOCH", "1", "TRAINER.REFINER.TOPK", str(TOPK), "USE_CUDA", "False"]
    assert main(args) == 0
    assert "* accuracy:" in (tmp_path / "out" / "log.txt").read_text()


def test_openclip_resnet_runs_like_clips(images):
    """OpenCLIP's copy of CLIP's ResNet (RN50 and friends): same encoders, dense local tokens."""
    config = copy.deepcopy(TINY)
    config["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}
    model = random_openclip(config)
    check_clip_towers(model, "rn")
    ours = OpenCLIP(model, "rn")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = encode_image(ours.visual, images, return_tokens=True)
        assert (out.features - model.encode_image(images)).abs().max() <= 1e-5
    assert out.tokens.shape == (2, 5, 32) and out.cls_attention.shape == (2, 4)
    assert clip_dims(ours)["num_patches"] == 4 and clip_dims(ours)["image_size"] == 64
    with pytest.raises(UserError, match="ResNet"):
        build("MaPLe", ours, "INPUT.SIZE", "(64, 64)")


def test_shipped_openclip_configs_fit_their_models():
    """Every configs/trainers/*/openclip_*.yaml names a pretrained (model, tag) open_clip knows,
    with the image size and normalisation those weights were trained with."""
    import glob
    from textrefiner.config import CONFIG_DIR, load_cfg
    files = sorted(glob.glob(f"{CONFIG_DIR}/trainers/*/openclip_*.yaml"))
    assert len(files) >= 3
    for path in files:
        cfg = load_cfg(path)
        name, tag = parse_spec(cfg.MODEL.BACKBONE.NAME[len("openclip:"):])
        assert (name, tag) in open_clip.list_pretrained(), path
        pretrained = open_clip.get_pretrained_cfg(name, tag)
        size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
        assert tuple(cfg.INPUT.SIZE) == (size, size), path
        assert tuple(cfg.INPUT.PIXEL_MEAN) == tuple(pretrained["mean"]), path
        assert tuple(cfg.INPUT.PIXEL_STD) == tuple(pretrained["std"]), path


def test_text_projection_as_a_linear_layer(images):
    """OpenCLIP's `proj_bias` text towers project with an nn.Linear."""
    config = copy.deepcopy(TINY)
    config["text_cfg"]["proj_bias"] = True
    model = random_openclip(config)
    assert isinstance(model.text_projection, torch.nn.Linear)
    ours = OpenCLIP(model, "linear")
    tokens = text_of(CLASSNAMES)
    with torch.no_grad():
        assert (encode_text_tokens(ours, tokens) - model.encode_text(tokens)).abs().max() <= 1e-5
        assert TextEncoder(ours).dtype == torch.float32 and clip_dims(ours)["embed_dim"] == 32
