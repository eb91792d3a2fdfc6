"""transformers' CLIPModel backbones ("hf:<folder or org/repo>"): small random CLIPModels saved
with `save_pretrained`, loaded through `load_clip`, against transformers' own
`get_image_features` / `get_text_features` and its tokenizer."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import CLASSNAMES, make_cfg  # noqa: E402
from test_methods import REFINER_ON, TOPK, tokenize  # noqa: E402
from textrefiner import hf_models  # noqa: E402
from textrefiner._compat import import_clip  # noqa: E402
from textrefiner.clip_backbone import (check_image_size, clip_dims, encode_image,  # noqa: E402
                                       encode_text_tokens, load_clip)
from textrefiner.errors import UserError  # noqa: E402
from textrefiner.openclip_models import TOKENIZER_PROBES  # noqa: E402

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
# (text, vision, projection_dim): two activations, patch and image sizes, head counts, MLP widths
SHAPES = {
    "quick_gelu": (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2),
                   dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, image_size=32, patch_size=8), 32),
    "gelu": (dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                  hidden_act="gelu"),
             dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, image_size=40, patch_size=10, hidden_act="gelu",
                  layer_norm_eps=1e-6), 40),
}


def clip_tokenizer(folder, files="tokenizer.json"):
    """CLIP's BPE (the `clip` package's vocabulary and merges) as transformers' CLIPTokenizer,
    saved as tokenizer.json, or as vocab.json and merges.txt as older hub folders hold it."""
    simple = import_clip().clip._tokenizer
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    if files == "tokenizer.json":
        transformers.CLIPTokenizer(vocab=dict(simple.encoder), merges=merges).save_pretrained(
            folder)
        return
    with open(os.path.join(folder, "vocab.json"), "w") as handle:
        json.dump(simple.encoder, handle)
    with open(os.path.join(folder, "merges.txt"), "w") as handle:
        handle.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def save_hf_clip(folder, shape="quick_gelu", seed=0, preprocessor=True, tokenizer="tokenizer.json",
                 safe=True):
    """A random transformers CLIPModel (every weight moved off its init) in `folder`."""
    text, vision, projection = SHAPES[shape]
    config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                     projection_dim=projection)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.logit_scale.fill_(3.1)
    model.save_pretrained(str(folder))
    if not safe:  # older hub folders: a pickled state dict (transformers 5 writes safetensors)
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    if tokenizer:
        clip_tokenizer(str(folder), tokenizer)
    if preprocessor:
        size = vision["image_size"]
        transformers.CLIPImageProcessor(
            image_mean=MEAN, image_std=STD, size={"shortest_edge": size},
            crop_size={"height": size, "width": size}).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {shape: save_hf_clip(root / shape, shape) for shape in SHAPES}


def reference(folder):
    return transformers.CLIPModel.from_pretrained(folder, attn_implementation="eager").eval()


def images_for(size, n=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("shape", list(SHAPES))
def test_features_equal_transformers(folders, shape):
    """Global image features, the local tokens (ln_post and proj of the last hidden state, as
    transformers' pooled output is its CLS), the CLS attention, text features, logit scale."""
    folder, hf = folders[shape], reference(folders[shape])
    ours = load_clip(f"hf:{folder}")
    size = SHAPES[shape][1]["image_size"]
    images = images_for(size)
    tokens = tokenize(["a photo of a red circle.", "blue square", "", TOKENIZER_PROBES[1]])
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=images)
        expected = getattr(expected, "pooler_output", expected)
        out = encode_image(ours.visual, images, return_tokens=True)
        vision = hf.vision_model(pixel_values=images, output_attentions=True)
        local = hf.visual_projection(hf.vision_model.post_layernorm(vision.last_hidden_state))
        text = hf.get_text_features(input_ids=tokens)
        text = getattr(text, "pooler_output", text)
        got_text = encode_text_tokens(ours, tokens)
    assert (out.features - expected).abs().max() <= 1e-5
    assert (encode_image(ours.visual, images).features - expected).abs().max() <= 1e-5
    assert (out.tokens - local).abs().max() <= 1e-5
    assert (out.cls_attention - vision.attentions[-1][:, :, 0, 1:].mean(1)).abs().max() <= 1e-6
    assert (got_text - text).abs().max() <= 1e-5
    assert torch.equal(ours.logit_scale, hf.logit_scale)
    grid = size // SHAPES[shape][1]["patch_size"]
    assert clip_dims(ours) == {
        "embed_dim": SHAPES[shape][2], "text_width": SHAPES[shape][0]["hidden_size"],
        "vision_width": SHAPES[shape][1]["hidden_size"], "num_patches": grid * grid,
        "text_layers": 2, "vision_layers": SHAPES[shape][1]["num_hidden_layers"],
        "image_size": size}


def test_legacy_eos_token_id_pools_where_transformers_does(tmp_path):
    """Configs older than transformers' PR #24773 say eos_token_id 2: it then pools at the
    arg-max id, which is where CLIP's end token is."""
    folder = save_hf_clip(tmp_path / "legacy")
    config = json.loads((tmp_path / "legacy" / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(config))
    hf, ours = reference(folder), load_clip(f"hf:{folder}")
    tokens = tokenize(TOKENIZER_PROBES)
    with torch.no_grad():
        text = hf.get_text_features(input_ids=tokens)
        text = getattr(text, "pooler_output", text)
        assert (encode_text_tokens(ours, tokens) - text).abs().max() <= 1e-5


def test_tokenizer_gives_transformers_ids(folders):
    """The folder's CLIPTokenizer and clip.tokenize agree up to the end token (after it,
    transformers pads with the end token and clip with 0, which the causal mask never reads)."""
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(folders["gelu"])
    for text, ours in zip(TOKENIZER_PROBES, tokenize(TOKENIZER_PROBES)):
        theirs = hf_tokenizer(text)["input_ids"]
        assert ours[:len(theirs)].tolist() == theirs and int(ours.argmax()) == len(theirs) - 1


def test_defaults_are_transformers(folders):
    text, vision = transformers.CLIPTextConfig(), transformers.CLIPVisionConfig()
    for key, value in hf_models.TEXT_DEFAULTS.items():
        assert getattr(text, key) == value, key
    for key, value in hf_models.VISION_DEFAULTS.items():
        assert getattr(vision, key) == value, key


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_precisions(folders, precision):
    ours = load_clip(f"hf:{folders['quick_gelu']}", precision)
    assert ours.dtype == (torch.float16 if precision == "fp16" else torch.float32)
    fp32 = load_clip(f"hf:{folders['quick_gelu']}")
    assert torch.equal(ours.visual.proj.float(), fp32.visual.proj.to(ours.dtype).float())


def test_pytorch_bin_and_vocab_files(tmp_path, folders):
    """A `.bin` folder (read through safe_load) with vocab.json / merges.txt: the same model."""
    folder = save_hf_clip(tmp_path / "bin", safe=False, tokenizer="vocab")
    assert os.path.isfile(os.path.join(folder, "pytorch_model.bin"))
    a, b = load_clip(f"hf:{folder}"), load_clip(f"hf:{folders['quick_gelu']}")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
