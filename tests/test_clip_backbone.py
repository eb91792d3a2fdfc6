"""CLIP helpers: loading, encoders checked against the stock model, deep prompts, `import_clip`."""
import math
import os
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

from conftest import HANG_TIMEOUT
from textrefiner import _compat
from textrefiner.clip_backbone import (TextEncoder, attach_ivlp_prompts, clip_cache_dir,
                                       clip_dims, embed_tokens, encode_image, encode_text,
                                       encode_text_tokens, ivlp_deep_prompts, ivlp_vision_prompts,
                                       load_clip, tokenize)
from textrefiner.clip_backbone import openai_sha256s
from textrefiner.errors import UserError
from textrefiner.safe_load import TRUST_ENV, RefusedFile, sha256_of

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(clip_path):
    """A shared fp32 model for the tests that do not change it."""
    return load_clip(clip_path, "fp32")


def max_diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# load_clip
# --------------------------------------------------------------------------------------------
def test_load_clip_plain_state_dict_in_both_precisions(clip_path):
    saved = torch.load(clip_path, map_location="cpu", weights_only=True)
    half = load_clip(clip_path, "fp16").state_dict()
    full = load_clip(clip_path, "fp32").state_dict()
    assert set(half) == set(full) == set(saved)
    assert half["visual.conv1.weight"].dtype == torch.float16
    assert half["visual.transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    for key, value in saved.items():
        assert full[key].dtype == torch.float32, key
        # fp16 weights are CLIP's own precision; fp32 is the same numbers widened
        assert torch.equal(full[key], value.to(half[key].dtype).float()), key
        assert torch.equal(half[key].float(), full[key]), key


def test_load_clip_amp_is_float32_and_model_is_in_eval_mode(clip_path):
    for precision in ("amp", "bf16"):  # autocast over float32 weights (bf16: LLaMP's PREC)
        model = load_clip(clip_path, precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert not model.training
    with pytest.raises(UserError, match="fp16"):
        load_clip(clip_path, "fp64")


def test_load_clip_reads_openais_jit_archives_only(clip_path, tmp_path, model, monkeypatch):
    """A TorchScript archive runs its code when loaded: only the files OpenAI published (known by
    the sha256 in their download address) are loaded, others with the explicit opt-in."""
    clip = _compat.import_clip()
    traced_from = clip.model.build_model(torch.load(clip_path, weights_only=True)).float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive = torch.jit.trace_module(
            traced_from, {"encode_image": torch.randn(1, 3, 32, 32)}, check_trace=False)
        path = str(tmp_path / "clip_jit.pt")
        torch.jit.save(archive, path)
    assert sha256_of(path) not in openai_sha256s()
    with pytest.raises(RefusedFile, match="TorchScript archive other than the ones OpenAI") as info:
        load_clip(path, "fp32")
    assert path in str(info.value) and TRUST_ENV in str(info.value)

    published = openai_sha256s() | {sha256_of(path)}  # as if OpenAI had published this file
    monkeypatch.setattr("textrefiner.clip_backbone.openai_sha256s", lambda: published)
    loaded = load_clip(path, "fp32").state_dict()
    monkeypatch.undo()
    monkeypatch.setenv(TRUST_ENV, "1")
    trusted = load_clip(path, "fp32").state_dict()
    expected = model.state_dict()
    assert set(loaded) == set(trusted) == set(expected)
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key
        assert torch.equal(trusted[key], expected[key]), key


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError) as info:
        load_clip("ViT-Q/99")
    message = str(info.value)
    assert "ViT-Q/99" in message
    for name in ("ViT-B/16", "ViT-L/14", "RN50"):
        assert name in message
    assert "MODEL.BACKBONE.PATH" in message


@pytest.mark.parametrize("config_key", ["MODEL.BACKBONE.PATH", "TRAINER.PROMPTKD.TEACHER_PATH"])
def test_name_without_network_says_which_file_to_place(monkeypatch, config_key):
    clip = _compat.import_clip()

    def offline(url, root):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(clip.clip, "_download", offline)
    with pytest.raises(UserError) as info:
        load_clip("ViT-B/16", config_key=config_key)
    message = str(info.value)
    assert config_key in message
    assert os.path.join(clip_cache_dir(), "ViT-B-16.pt") in message
    assert "ViT-B/16" in message


def test_corrupt_files_raise_user_errors(tmp_path, clip_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    data = Path(clip_path).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (garbage, empty, truncated):
        with pytest.raises(UserError, match="Could not read CLIP weights"):
            load_clip(str(path))

    not_clip = tmp_path / "not_clip.pt"
    torch.save({"weight": torch.zeros(2)}, not_clip)
    with pytest.raises(UserError, match="visual.proj"):
        load_clip(str(not_clip))


def test_jit_archive_of_another_model_raises_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, "1")
    path = str(tmp_path / "linear_jit.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UserError, match="visual.proj"):
        load_clip(path)


def test_state_dict_wrapped_in_a_checkpoint_dict_loads(tmp_path, clip_path, model):
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": torch.load(clip_path, weights_only=True), "epoch": 3}, wrapped)
    loaded = load_clip(str(wrapped)).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_clip_dims_of_the_small_model(model):
    dims = clip_dims(model)
    assert dims == {"embed_dim": 32, "text_width": 64, "vision_width": 128, "num_patches": 16,
                    "text_layers": 3, "vision_layers": 3, "image_size": 32}


# --------------------------------------------------------------------------------------------
# encode_image against the stock model
# --------------------------------------------------------------------------------------------
def stock_image_pass(visual, images, prompts=()):
    """Run the stock `visual` with hooks that add deep prompts the way the codebases define them.

    Returns the stock features, the last block's input and output ([L, B, width]).
    """
    handles, seen = [], {}
    if prompts:
        def append_prompts(module, args):
            x = args[0]
            return (torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1),)
        handles.append(visual.ln_pre.register_forward_pre_hook(append_prompts))
    blocks = visual.transformer.resblocks
    for i in range(1, len(prompts)):
        def replace_last(module, args, prompt=prompts[i]):
            x = args[0].clone()
            x[-prompt.shape[0]:] = prompt.unsqueeze(1)
            return (x,)
        handles.append(blocks[i].register_forward_pre_hook(replace_last))

    def keep_input(module, args):
        seen["input"] = args[0]

    def keep_output(module, args, output):
        seen["output"] = output

    handles.append(blocks[-1].register_forward_pre_hook(keep_input))
    handles.append(blocks[-1].register_forward_hook(keep_output))
    try:
        with torch.no_grad():
            features = visual(images)
    finally:
        for handle in handles:
            handle.remove()
    return features, seen["input"], seen["output"]


def hand_cls_attention(block, x, n_patches):
    """Mean-over-heads attention of the CLS query to the patch keys, from the in_proj weights."""
    attn = block.attn
    heads = attn.num_heads
    h = block.ln_1(x)                                                # [L, B, w]
    q, k, _ = (h @ attn.in_proj_weight.t() + attn.in_proj_bias).chunk(3, dim=-1)
    length, batch, width = q.shape
    head_dim = width // heads

    def split(t):                                                    # -> [B, H, L, hd]
        return t.reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim)
    weights = scores.softmax(dim=-1).mean(dim=1)                     # [B, L, L]
    return weights[:, 0, 1:1 + n_patches]


def test_encode_image_equals_stock(model, images):
    with torch.no_grad():
        stock = model.encode_image(images)
        ours = encode_image(model.visual, images)
    assert ours.tokens is None and ours.cls_attention is None
    assert max_diff(ours.features, stock) <= 1e-6


def test_encode_image_tokens_and_attention(model, images):
    visual = model.visual
    with torch.no_grad():
        out = encode_image(visual, images, return_tokens=True)
    stock, last_in, last_out = stock_image_pass(visual, images)
    assert max_diff(out.features, stock) <= 1e-5
    assert torch.equal(out.tokens[:, 0], out.features)
    assert out.tokens.shape == (4, 17, 32)
    with torch.no_grad():
        expected_tokens = visual.ln_post(last_out.permute(1, 0, 2)) @ visual.proj
        expected_attention = hand_cls_attention(visual.transformer.resblocks[-1], last_in, 16)
    assert max_diff(out.tokens, expected_tokens) <= 1e-5
    assert out.cls_attention.shape == (4, 16)
    assert max_diff(out.cls_attention, expected_attention) <= 1e-6
    assert (out.cls_attention > 0).all()
    assert (out.cls_attention.sum(dim=1) < 1).all()  # CLS also attends to itself


def test_encode_text_tokens_equals_stock(model):
    tokens = tokenize(["a photo of a red circle.", "blue square", ""])
    with torch.no_grad():
        ours = encode_text_tokens(model, tokens)
        stock = model.encode_text(tokens)
    assert ours.shape == (3, 32)
    assert max_diff(ours, stock) <= 1e-6


# --------------------------------------------------------------------------------------------
# Deep prompts
# --------------------------------------------------------------------------------------------
def vision_prompts(depth, n_ctx=3, width=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n_ctx, width, generator=generator) * 0.5 for _ in range(depth)]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_encode_image_with_vision_prompts_matches_a_hooked_stock_pass(model, images, depth):
    visual = model.visual
    prompts = vision_prompts(depth)
    with torch.no_grad():
        out = encode_image(visual, images, prompts=prompts, return_tokens=True)
        plain = encode_image(visual, images)
    stock, last_in, last_out = stock_image_pass(visual, images, prompts)
    assert max_diff(out.features, stock) <= 1e-5
    assert out.tokens.shape == (4, 17, 32)           # prompt tokens are not local tokens
    with torch.no_grad():
        expected_tokens = visual.ln_post(last_out.permute(1, 0, 2)[:, :17]) @ visual.proj
        expected_attention = hand_cls_attention(visual.transformer.resblocks[-1], last_in, 16)
    assert max_diff(out.tokens, expected_tokens) <= 1e-5
    assert max_diff(out.cls_attention, expected_attention) <= 1e-6
    assert (out.cls_attention.sum(dim=1) < 1).all()
    assert max_diff(out.features, plain.features) > 1e-3  # the prompts matter


def test_depth_one_vision_prompts_change_only_layer_zero(model, images):
    visual = model.visual
    shallow = vision_prompts(1)
    deep = shallow + vision_prompts(1, seed=1)
    with torch.no_grad():
        one = encode_image(visual, images, prompts=shallow).features
        two = encode_image(visual, images, prompts=deep).features
    assert max_diff(one, stock_image_pass(visual, images, shallow)[0]) <= 1e-5
    assert max_diff(one, two) > 1e-3                  # the layer-1 prompt would have mattered


def text_prompt_reference(model, tokens, prompts):
    """Stock `encode_text` with hooks: prompts[0] at positions 1..n of the word embeddings,
    prompts[i] replacing positions 1..n before block i."""
    n_ctx = prompts[0].shape[0]

    def put_shallow(module, args, output):
        output = output.clone()
        output[:, 1:1 + n_ctx] = prompts[0].to(output.dtype)
        return output

    handles = [model.token_embedding.register_forward_hook(put_shallow)]
    for i in range(1, len(prompts)):
        def replace(module, args, prompt=prompts[i]):
            x = args[0].clone()                                      # [L, C, w]
            x[1:1 + n_ctx] = prompt.unsqueeze(1)
            return (x,)
        handles.append(model.transformer.resblocks[i].register_forward_pre_hook(replace))
    try:
        with torch.no_grad():
            return model.encode_text(tokens)
    finally:
        for handle in handles:
            handle.remove()


def text_prompts(depth, n_ctx=2, width=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n_ctx, width, generator=generator) for _ in range(depth)]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_encode_text_with_deep_prompts_matches_a_hooked_stock_pass(model, depth):
    tokens = tokenize(["X X red circle.", "X X blue square.", "X X striped disc."])
    prompts = text_prompts(depth)
    embeddings = embed_tokens(model, tokens).clone()
    embeddings[:, 1:3] = prompts[0]
    with torch.no_grad():
        ours = encode_text(model, embeddings, tokens.argmax(dim=-1), deep_prompts=prompts[1:])
        via_encoder = TextEncoder(model)(embeddings, tokens.argmax(dim=-1), prompts[1:])
    expected = text_prompt_reference(model, tokens, prompts)
    assert max_diff(ours, expected) <= 1e-5
    assert torch.equal(ours, via_encoder)
    if depth > 1:
        with torch.no_grad():
            shallow_only = encode_text(model, embeddings, tokens.argmax(dim=-1))
        assert max_diff(ours, shallow_only) > 1e-3


def test_depth_one_text_prompts_change_only_layer_zero(model):
    tokens = tokenize(["X X red circle."])
    embeddings = embed_tokens(model, tokens).clone()
    embeddings[:, 1:3] = text_prompts(1)[0]
    with torch.no_grad():
        empty = encode_text(model, embeddings, tokens.argmax(dim=-1), deep_prompts=[])
        none = encode_text(model, embeddings, tokens.argmax(dim=-1))
    assert torch.equal(empty, none)
    assert max_diff(none, text_prompt_reference(model, tokens, text_prompts(1))) <= 1e-5
    assert max_diff(none, encode_text_tokens(model, tokens)) > 1e-3


def test_attach_ivlp_vision_prompts_names_and_use(small_clip, images):
    visual = small_clip.visual
    attach_ivlp_prompts(visual, n_ctx=4, depth=3, vision=True)
    names = {name: p for name, p in visual.named_parameters() if "VPT" in name}
    assert set(names) == {"VPT", "transformer.resblocks.1.VPT_shallow",
                          "transformer.resblocks.2.VPT_shallow"}
    assert all(p.shape == (4, 128) and p.dtype == torch.float32 for p in names.values())
    prompts = ivlp_vision_prompts(visual)
    assert [id(p) for p in prompts] == [id(names["VPT"]),
                                        id(names["transformer.resblocks.1.VPT_shallow"]),
                                        id(names["transformer.resblocks.2.VPT_shallow"])]
    assert [id(p) for p in ivlp_deep_prompts(visual)] == [id(p) for p in prompts[1:]]
    with torch.no_grad():
        ours = encode_image(visual, images, prompts=prompts).features
    reference = stock_image_pass(visual, images, [p.detach() for p in prompts])[0]
    assert max_diff(ours, reference) <= 1e-5


def test_attach_ivlp_text_prompts_names(small_clip):
    encoder = TextEncoder(small_clip)
    attach_ivlp_prompts(encoder, n_ctx=2, depth=2, vision=False)
    names = [name for name, _ in encoder.named_parameters() if "VPT" in name]
    assert names == ["transformer.resblocks.1.VPT_shallow"]
    assert not hasattr(encoder, "VPT")
    assert [id(p) for p in ivlp_deep_prompts(encoder)] == [
        id(encoder.transformer.resblocks[1].VPT_shallow)]
    assert encoder.transformer.resblocks[1].VPT_shallow.shape == (2, 64)


def test_ivlp_prompts_take_the_dtype_of_fp16_weights(clip_path):
    model = load_clip(clip_path, "fp16")
    attach_ivlp_prompts(model.visual, n_ctx=2, depth=2, vision=True)
    encoder = TextEncoder(model)
    attach_ivlp_prompts(encoder, n_ctx=2, depth=3, vision=False)
    prompts = ivlp_vision_prompts(model.visual) + ivlp_deep_prompts(encoder)
    assert len(prompts) == 4
    assert all(p.dtype == torch.float16 for p in prompts)


def test_attach_ivlp_prompts_depth_limits(small_clip):
    visual = small_clip.visual
    attach_ivlp_prompts(visual, n_ctx=2, depth=0, vision=True)
    assert ivlp_vision_prompts(visual) == []
    with pytest.raises(UserError, match="depth"):
        attach_ivlp_prompts(visual, n_ctx=2, depth=4, vision=True)


# --------------------------------------------------------------------------------------------
# import_clip in awkward environments (fresh interpreters)
# --------------------------------------------------------------------------------------------
NO_PKG_RESOURCES = """
import sys
import traceback

from textrefiner import _compat


class NoPkgResources:
    def find_spec(self, name, path=None, target=None):
        if name == "pkg_resources" or name.startswith("pkg_resources."):
            raise ImportError("pkg_resources is not installed here")
        return None


def check(label):
    try:
        import pkg_resources
        raise SystemExit("the blocker did not work")
    except ImportError:
        pass
    try:
        import textrefiner
        from textrefiner.clip_backbone import build_random_clip, tokenize
        clip = _compat.import_clip()
        assert callable(textrefiner.load_clip)
        assert callable(clip.model.build_model) and callable(clip.clip.tokenize)
        assert tokenize(["a photo"]).shape == (1, 77)
        build_random_clip(vision_layers=1, transformer_layers=1)
        assert sys.modules.get("pkg_resources") is None, "the stand-in must not stay behind"
        print(label, "ok", flush=True)
    except BaseException:
        print(label, "FAILED", flush=True)
        traceback.print_exc()


# 1. a finder that refuses pkg_resources (as when setuptools >= 81 has no pkg_resources)
blocker = NoPkgResources()
sys.meta_path.insert(0, blocker)
sys.modules.pop("pkg_resources", None)
check("meta_path")

# 2. the other standard way to make an import fail: a None entry in sys.modules
sys.meta_path.remove(blocker)
for name in [m for m in sys.modules if m.split(".")[0] == "clip" or "_stock_clip" in m]:
    del sys.modules[name]
_compat._stock_clip = None
sys.modules["pkg_resources"] = None
check("none_entry")
"""

FAKE_CLIP = """
import clip as shadowing
assert getattr(shadowing, "FAKE", False), "the fake package should shadow the stock one"
from textrefiner import _compat
from textrefiner.clip_backbone import build_random_clip, tokenize
stock = _compat.import_clip()
assert stock is not shadowing and not hasattr(stock, "FAKE")
assert callable(stock.model.build_model) and callable(stock.clip.tokenize)
assert _compat.import_clip() is stock
assert tokenize(["a photo"]).shape == (1, 77)
build_random_clip(vision_layers=1, transformer_layers=1)
import clip
assert clip is shadowing, "`import clip` must still give the fake package"
print("ok")
"""


@pytest.fixture(scope="module")
def fresh_interpreters(tmp_path_factory):
    """Each check in a fresh interpreter, started once for the tests that ask for its result
    (under pytest-xdist, only on the worker that runs them)."""
    root = tmp_path_factory.mktemp("compat")
    fake = root / "fake"
    (fake / "clip").mkdir(parents=True)
    (fake / "clip" / "__init__.py").write_text("FAKE = True\n")
    checks = {"no_pkg_resources": (NO_PKG_RESOURCES, []), "fake_clip": (FAKE_CLIP, [str(fake)])}
    results = {}

    def result(name):
        if name not in results:
            code, extra = checks[name]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([*extra, str(REPO_ROOT)]))
            proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                                  capture_output=True, text=True, timeout=HANG_TIMEOUT)
            results[name] = (proc.stdout, proc.stderr, proc.returncode)
        return results[name]

    return result


@pytest.mark.parametrize("blocker", ["meta_path", "none_entry"])
def test_import_clip_without_pkg_resources(fresh_interpreters, blocker):
    out, err, code = fresh_interpreters("no_pkg_resources")
    assert code == 0, err[-3000:]
    assert f"{blocker} ok" in out.splitlines(), out + err[-3000:]


def test_import_clip_with_a_fake_clip_package_on_the_path(fresh_interpreters):
    out, err, code = fresh_interpreters("fake_clip")
    assert code == 0, err[-3000:]
    assert out.strip().endswith("ok")
