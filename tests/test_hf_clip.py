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
from test_methods import REFINER_ON, TOPK, check_one_step, tokenize  # noqa: E402
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
    "teacher": (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=2),
                dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=2, image_size=32, patch_size=8), 48),
}
EXACT = ["quick_gelu", "gelu"]


def save_hf_clip(folder, shape="quick_gelu", seed=0, preprocessor=True, tokenizer="tokenizer.json",
                 safe=True):
    """A random transformers CLIPModel of SHAPES[shape] in `folder`, its tokenizer as
    tokenizer.json (transformers 5 writes it) or as vocab.json and merges.txt (older folders)."""
    text, vision, projection = SHAPES[shape]
    folder = hf_models.save_random_hf_clip(str(folder), text, vision, projection, seed)
    if tokenizer == "tokenizer.json":
        transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
        for name in ("vocab.json", "merges.txt"):
            os.remove(os.path.join(folder, name))
    elif not tokenizer:
        for name in ("vocab.json", "merges.txt"):
            os.remove(os.path.join(folder, name))
    if not safe:  # older hub folders: a pickled state dict (transformers 5 writes safetensors)
        from safetensors.torch import load_file
        state = load_file(os.path.join(folder, "model.safetensors"))
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    if preprocessor:
        size = vision["image_size"]
        transformers.CLIPImageProcessor(
            image_mean=MEAN, image_std=STD, size={"shortest_edge": size},
            crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {shape: save_hf_clip(root / shape, shape, seed=i) for i, shape in enumerate(SHAPES)}


def reference(folder):
    return transformers.CLIPModel.from_pretrained(folder, attn_implementation="eager").eval()


def features(output):
    """get_*_features' tensor (transformers 5 returns it as its output's pooler_output)."""
    return getattr(output, "pooler_output", output)


def images_for(size, n=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("shape", EXACT)
def test_features_equal_transformers(folders, shape):
    """Global image features, the local tokens (ln_post and proj of the last hidden state, as
    transformers' pooled output is its CLS), the CLS attention, text features, logit scale."""
    folder, hf = folders[shape], reference(folders[shape])
    ours = load_clip(f"hf:{folder}")
    size = SHAPES[shape][1]["image_size"]
    images = images_for(size)
    tokens = tokenize(["a photo of a red circle.", "blue square", "", TOKENIZER_PROBES[1]])
    with torch.no_grad():
        expected = features(hf.get_image_features(pixel_values=images))
        out = encode_image(ours.visual, images, return_tokens=True)
        vision = hf.vision_model(pixel_values=images, output_attentions=True)
        local = hf.visual_projection(hf.vision_model.post_layernorm(vision.last_hidden_state))
        text = features(hf.get_text_features(input_ids=tokens))
        got_text = encode_text_tokens(ours, tokens)
    # the 1e-5; measured at most 2e-6 on these features (values up to 3)
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
        text = features(hf.get_text_features(input_ids=tokens))
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


def test_sharded_safetensors(tmp_path, folders):
    """A folder saved in shards (model.safetensors.index.json naming each tensor's file)."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = shutil.copytree(folders["quick_gelu"], tmp_path / "sharded")
    state = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    a, b = load_clip(f"hf:{folder}"), load_clip(f"hf:{folders['quick_gelu']}")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_pytorch_bin_and_vocab_files(tmp_path, folders):
    """A `.bin` folder (read through safe_load) with vocab.json / merges.txt: the same model."""
    folder = save_hf_clip(tmp_path / "bin", safe=False, tokenizer="vocab")
    assert os.path.isfile(os.path.join(folder, "pytorch_model.bin"))
    a, b = load_clip(f"hf:{folder}"), load_clip(f"hf:{folders['quick_gelu']}")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


# ------------------------------------------------------------------------------ finding it
def test_repo_id_from_the_local_cache_offline(folders, tmp_path, monkeypatch):
    """hf:<org>/<repo> is the cached snapshot (huggingface_hub's layout); nothing is fetched."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--shape-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    os.symlink(folders["quick_gelu"], repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    a, b = load_clip("hf:someone/shape-clip"), load_clip(f"hf:{folders['quick_gelu']}")
    assert a.name == "hf:someone/shape-clip"
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    pinned = load_clip(f"hf:someone/shape-clip@{commit}")  # a revision: the snapshot it names
    assert torch.equal(pinned.visual.proj, b.visual.proj)
    with pytest.raises(UserError, match="hf download someone/shape-clip --revision v2"):
        load_clip("hf:someone/shape-clip@v2")
    with pytest.raises(UserError) as info:
        load_clip("hf:someone/other-clip")
    message = str(info.value)
    assert "\n" not in message and "hf download someone/other-clip" in message
    assert str(cache / "models--someone--other-clip") in message


def test_sweep_preflight_names_a_missing_repo(tmp_path, monkeypatch, folders):
    from textrefiner.sweep.preflight import _weights_line
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert _weights_line(f"hf:{folders['gelu']}") is None
    assert "hf download org/missing" in _weights_line("hf:org/missing")
    assert "neither a folder nor" in _weights_line("hf:./no/such/folder")


# ------------------------------------------------------------------------------ refusals
def edit_config(folder, change):
    path = os.path.join(folder, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    change(config)
    with open(path, "w") as handle:
        json.dump(config, handle)


REFUSED = [
    ("siglip", lambda c: c.update(model_type="siglip"), "no class token"),
    ("chinese_clip", lambda c: c.update(model_type="chinese_clip"), "non-CLIP text tower"),
    ("vision_only", lambda c: c.update(model_type="clip_vision_model"), "no text tower"),
    ("activation", lambda c: c["vision_config"].update(hidden_act="relu"), "'relu'"),
    ("eos", lambda c: c["text_config"].update(eos_token_id=7), "pools at token id 7"),
]


@pytest.mark.parametrize("change, reason", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_cannot_run_is_refused_with_one_line(tmp_path, change, reason):
    folder = save_hf_clip(tmp_path / "m")
    edit_config(folder, change)
    with pytest.raises(UserError) as info:
        load_clip(f"hf:{folder}")
    message = str(info.value)
    assert reason in message and "\n" not in message and "not supported" in message


def test_other_tokenizers_and_missing_files_are_refused(tmp_path):
    folder = save_hf_clip(tmp_path / "m", tokenizer="vocab")
    with open(os.path.join(folder, "vocab.json")) as handle:
        vocab = json.load(handle)
    vocab["a</w>"], vocab["the</w>"] = vocab["the</w>"], vocab["a</w>"]
    with open(os.path.join(folder, "vocab.json"), "w") as handle:
        json.dump(vocab, handle)
    with pytest.raises(UserError, match="tokenizer's vocabulary or merges"):
        load_clip(f"hf:{folder}")
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(folder, name))
    with pytest.raises(UserError, match="has no tokenizer"):
        load_clip(f"hf:{folder}")
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(UserError, match="no config.json"):
        load_clip(f"hf:{folder}")


def test_extra_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = save_hf_clip(tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["vision_model.head.probe"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(UserError, match="vision_model.head.probe"):
        load_clip(f"hf:{folder}")


# ------------------------------------------------------------------------------ input settings
def test_normalisation_and_size_come_from_the_folder(folders):
    model = load_clip(f"hf:{folders['gelu']}")
    assert model.image_mean == tuple(MEAN) and model.image_std == tuple(STD)
    check_image_size(make_cfg("INPUT.SIZE", "(40, 40)", "INPUT.PIXEL_MEAN", str(MEAN),
                              "INPUT.PIXEL_STD", str(STD)), model)
    with pytest.raises(UserError) as info:
        check_image_size(make_cfg("INPUT.SIZE", "(40, 40)"), model)
    assert f"INPUT.PIXEL_MEAN {MEAN} and INPUT.PIXEL_STD {STD}" in str(info.value)
    with pytest.raises(UserError, match=r"INPUT.SIZE \(40, 40\)"):
        check_image_size(make_cfg("INPUT.PIXEL_MEAN", str(MEAN), "INPUT.PIXEL_STD", str(STD)),
                         model)


def test_configs_take_the_folders_values_unless_they_set_them(folders):
    from textrefiner.config import CONFIG_DIR, load_cfg
    spec = f"hf:{folders['gelu']}"
    cfg = load_cfg(opts=["MODEL.BACKBONE.NAME", spec])
    assert cfg.INPUT.SIZE == (40, 40) and cfg.INPUT.PIXEL_MEAN == MEAN
    assert cfg.INPUT.PIXEL_STD == STD
    check_image_size(cfg, load_clip(spec))
    cfg = load_cfg(f"{CONFIG_DIR}/trainers/CoOp/demo_cpu.yaml", opts=[
        "MODEL.BACKBONE.NAME", spec, "INPUT.SIZE", "(40, 40)"])
    assert cfg.INPUT.PIXEL_MEAN == [0.48145466, 0.4578275, 0.40821073]  # the config's
    with pytest.raises(UserError, match="INPUT.PIXEL_MEAN"):
        check_image_size(cfg, load_clip(spec))
    # a value that is also the default is still the config's (StreetCLIP under a 224 px config)
    cfg = load_cfg(opts=["MODEL.BACKBONE.NAME", spec, "INPUT.SIZE", "(224, 224)"])
    assert cfg.INPUT.SIZE == (224, 224) and cfg.INPUT.PIXEL_MEAN == MEAN
    with pytest.raises(UserError, match=r"set INPUT.SIZE \(40, 40\)"):
        check_image_size(cfg, load_clip(spec))


def test_feature_store_keys_differ_between_folders(folders, tmp_path):
    """Two folders with the same weights and another activation never share features."""
    import shutil
    from textrefiner.feature_store import model_key
    from textrefiner.data.transforms import build_transform
    from contextlib import nullcontext
    other = shutil.copytree(folders["quick_gelu"], tmp_path / "gelu_copy")
    edit_config(str(other), lambda c: [c[t].update(hidden_act="gelu")
                                       for t in ("text_config", "vision_config")])
    transform = build_transform(make_cfg(), is_train=False)
    keys = [model_key(load_clip(f"hf:{f}").visual, transform, "fp32", torch.device("cpu"),
                      nullcontext) for f in (folders["quick_gelu"], other, folders["quick_gelu"])]
    assert keys[0]["weights"] == keys[1]["weights"] and keys[0] != keys[1]
    assert keys[0] == keys[2]


# ------------------------------------------------------------------------------ every method
SIZE = ("TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.CTX_INIT", "a photo of a",
        "TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2",
        "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2")


@pytest.fixture(scope="module")
def teacher(folders, tmp_path_factory):
    from conftest import write_teacher_checkpoint
    folder = tmp_path_factory.mktemp("hf_teacher") / "VLPromptLearner"
    spec = f"hf:{folders['teacher']}"
    return write_teacher_checkpoint(folder / "model-best.pth.tar", spec), spec


def build(method, clip, refiner=False, teacher=None):
    from textrefiner.methods import build_method
    extra = ()
    if method == "PromptKD":
        extra = ("TRAINER.PROMPTKD.TEACHER_CKPT", teacher[0], "TRAINER.PROMPTKD.TEACHER_PATH",
                 teacher[1], "TRAINER.PROMPTKD.N_CTX_VISION", "4")
    cfg = make_cfg(*(SIZE + extra + (REFINER_ON if refiner else ())))
    torch.manual_seed(0)
    return build_method(method, cfg, CLASSNAMES, clip)


@pytest.mark.parametrize("method", ["ZeroshotCLIP", "CoOp"])
def test_zero_shot_is_transformers_clip(folders, method):
    """ZeroshotCLIP's logits, and CoOp's before training (its context is "a photo of a"):
    transformers' normalised features of "a photo of a <class>." times its logit scale."""
    hf, images = reference(folders["quick_gelu"]), images_for(32)
    prompts = tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
    with torch.no_grad():
        image = F.normalize(features(hf.get_image_features(pixel_values=images)), dim=-1)
        text = F.normalize(features(hf.get_text_features(input_ids=prompts)), dim=-1)
        model = build(method, load_clip(f"hf:{folders['quick_gelu']}")).eval()
        # features within 1e-5 times a logit scale of 15 here; measured 3e-6
        assert (model(images) - hf.logit_scale.exp() * image @ text.t()).abs().max() <= 1e-4


@pytest.mark.parametrize("refiner", [False, True], ids=["plain", "refiner"])
@pytest.mark.parametrize("method", ["CoOp", "CoCoOp", "MaPLe", "PromptSRC", "PromptKD"])
def test_every_method_trains_and_evaluates(folders, teacher, method, refiner):
    model = build(method, load_clip(f"hf:{folders['quick_gelu']}"), refiner, teacher)
    check_one_step(model, images_for(32), torch.tensor([0, 2, 4]))


# ------------------------------------------------------------------------------ the programs
def train_args(root, out, backbone, trainer="CoOp", refiner=True, opts=(), engine="standalone"):
    from textrefiner.config import CONFIG_DIR
    return (["--engine", engine, "--root", root, "--trainer", trainer, "--seed", "1",
             "--dataset-config-file", f"{CONFIG_DIR}/datasets/synthetic_shapes.yaml",
             "--config-file", f"{CONFIG_DIR}/trainers/CoOp/demo_cpu.yaml", "--output-dir", out]
            + (["--refiner"] if refiner else [])
            + ["MODEL.BACKBONE.NAME", backbone, "INPUT.PIXEL_MEAN", str(MEAN), "INPUT.PIXEL_STD",
               str(STD), "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "1",
               "TRAINER.REFINER.TOPK", str(TOPK), "USE_CUDA", "False", *opts])


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from textrefiner.data import write_synthetic_dataset
    root = str(tmp_path_factory.mktemp("hf_data"))
    write_synthetic_dataset(root, num_classes=4, per_class_train=3, per_class_val=1,
                            per_class_test=2, image_size=32)
    return root


def test_train_predict_export_and_feature_store(folders, shapes_root, tmp_path):
    """textrefiner-train (CoOp + TextRefiner, with a feature store), textrefiner-predict's
    Predictor, and textrefiner-export's ONNX model under ONNX Runtime (within 1e-4)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from textrefiner.export import main as export
    from textrefiner.predict import Predictor
    from textrefiner.train import main as train
    run, store = tmp_path / "run", tmp_path / "store"
    assert train(train_args(shapes_root, str(run), f"hf:{folders['quick_gelu']}",
                            opts=["TEST.FEATURE_STORE", str(store)])) == 0
    assert "* accuracy:" in (run / "log.txt").read_text()
    stored = [os.path.join(d, f) for d, _, files in os.walk(store) for f in files
              if f.endswith(".feat")]
    assert stored
    predictor = Predictor.from_run(str(run), device="cpu")
    folder = os.path.join(shapes_root, "synthetic_shapes", "images")
    paths = sorted(os.path.join(folder, d, f) for d in os.listdir(folder)
                   for f in os.listdir(os.path.join(folder, d)))[:4]
    batch = predictor.preprocess(paths)
    output = tmp_path / "shapes.onnx"
    assert export(["--model-dir", str(run), "--output", str(output)]) == 0
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    info = json.loads((tmp_path / "shapes.json").read_text())
    assert info["mean"] == MEAN and info["std"] == STD
    logits = torch.from_numpy(session.run([info["output"]], {info["input"]: batch.numpy()})[0])
    assert (logits - predictor.logits(batch)).abs().max() < 1e-4


def test_the_dassl_engine_trains_on_it(folders, shapes_root, tmp_path):
    """CoOp + TextRefiner through Dassl's trainer loop (the standalone engine is tested above)."""
    pytest.importorskip("dassl")
    from textrefiner.train import main as train
    run = tmp_path / "run"
    assert train(train_args(shapes_root, str(run), f"hf:{folders['quick_gelu']}",
                            engine="dassl")) == 0
    assert "* accuracy:" in (run / "log.txt").read_text()


def test_a_sweep_runs_on_it(folders, shapes_root, tmp_path):
    """A sweep over zero-shot CLIP and CoOp + TextRefiner on an hf: backbone."""
    from textrefiner.sweep import cli
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
protocol: base2new
root: {shapes_root}
datasets: [synthetic_shapes]
config: demo_tiny
engine: standalone
seeds: [1]
methods: [ZeroshotCLIP, CoOp+TR]
overrides: {{MODEL.BACKBONE.NAME: "hf:{folders['quick_gelu']}", INPUT.PIXEL_MEAN: {MEAN},
            INPUT.PIXEL_STD: {STD}, DATASET.NUM_SHOTS: 2, OPTIM.MAX_EPOCH: 1,
            TRAINER.REFINER.TOPK: {TOPK}}}
""")
    assert cli.main([str(spec), "--out", str(tmp_path / "out")]) == 0
    logs = [os.path.join(d, "log.txt") for d, _, files in os.walk(tmp_path / "out")
            if "log.txt" in files]
    assert logs and all("* accuracy:" in open(log).read() for log in logs)
