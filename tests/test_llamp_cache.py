"""textrefiner-llamp-cache: LLaMP's per-dataset files from a tiny random LLaMA, loaded through
`from_pretrained` as a real LLM is, and a small random CLIP."""
import json
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from textrefiner import llamp_cache  # noqa: E402
from textrefiner.clip_backbone import encode_text_tokens, load_clip, tokenize  # noqa: E402
from textrefiner.data.synthetic import write_synthetic_dataset  # noqa: E402
from textrefiner.errors import UserError  # noqa: E402
from textrefiner.methods.templates import template_for  # noqa: E402

DATASET = "SyntheticShapes"
NUM_CLASSES = 5  # 3 base, 2 new
MAX_NEW_TOKENS = 6


def fake_noun_chunks(text):
    """The spaCy stand-in: pairs of words."""
    words = text.split()
    return [" ".join(words[i:i + 2]) for i in range(0, len(words), 2)]


def save_tiny_llama(folder):
    """A 2-layer LLaMA (grouped keys and values: 4 heads, 2 kv heads) with a small byte-level BPE
    tokenizer that adds <s> like LLaMA's, and a chat template; both saved with save_pretrained."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t.format("circle") for t in llamp_cache.llm_templates(DATASET)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)  # no chat template: LLaMA-2's is used
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def install_fake_spacy(monkeypatch):
    """A `spacy` module whose en_core_web_sm yields `fake_noun_chunks`."""
    def load(name):
        if name != llamp_cache.DEFAULT_SPACY_MODEL:
            raise OSError(f"[E050] Can't find model '{name}'")
        return lambda text: types.SimpleNamespace(
            noun_chunks=[types.SimpleNamespace(text=t) for t in fake_noun_chunks(text)])
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))


@pytest.fixture
def fake_spacy(monkeypatch):
    install_fake_spacy(monkeypatch)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_synthetic_dataset(root, num_classes=NUM_CLASSES, per_class_train=1, per_class_val=1,
                            per_class_test=1, image_size=8)
    return root


@pytest.fixture(scope="module")
def written(data_root, llama_path, clip_path):
    """The two files the command writes, read back."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        install_fake_spacy(monkeypatch)
        assert llamp_cache.main(["--root", data_root, "--dataset", DATASET, "--llm", llama_path,
                             "--clip", clip_path, "--device", "cpu", "--batch-size", "2",
                                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--overwrite"]) == 0
    kv_path, emb_path = llamp_cache.cache_paths(data_root, DATASET)
    return torch.load(kv_path), torch.load(emb_path)


def test_class_names_are_the_training_halves(data_root):
    from textrefiner.data.datasets import build_dataset
    from textrefiner.config import load_cfg
    names = llamp_cache.split_classnames(data_root, DATASET)
    for split in ("base", "new"):
        cfg = load_cfg(opts=["DATASET.ROOT", data_root, "DATASET.NAME", DATASET,
                             "DATASET.NUM_SHOTS", "1", "DATASET.SUBSAMPLE_CLASSES", split])
        assert names[split] == build_dataset(cfg).classnames
    assert len(names["base"]) == 3 and len(names["new"]) == 2


def test_file_layout_is_llamps(written, data_root):
    key_values, embeddings = written
    names = llamp_cache.split_classnames(data_root, DATASET)
    assert set(key_values) == {"base", "new"} == set(embeddings)
    for split in ("base", "new"):
        entries = key_values[split]
        assert len(entries) == len(llamp_cache.llm_templates(DATASET)) == 11
        for entry in entries:
            pkv, mask = entry["past_key_values"], entry["attn_mask"]
            # [layers kept, (key, value), classes, kv heads, tokens, head dim]
            assert pkv.shape == (1, 2, len(names[split]), 2, mask.shape[1], 16)
            assert pkv.dtype == torch.float32 and mask.dtype == torch.int64
            assert torch.isfinite(pkv).all()
            assert len(entry["text_predictions"]) == len(names[split])
        # LLaMP's decoder call: x["past_key_values"][-1:][0] unpacks to (key, value)
        key, value = entries[0]["past_key_values"][-1:][0]
        assert key.shape[2] == entries[0]["attn_mask"].shape[1]
        avg, every = embeddings[split]["avg"], embeddings[split]["all"]
        assert every.shape == (1, len(names[split]), 32)  # one copy for a dataset LLaMP lacks
        assert torch.equal(avg, every.mean(0))


def test_keys_and_values_are_the_llms_on_the_unpadded_text(written, data_root, llama_path):
    """Each class's stored keys and values at its real tokens equal the last layer's on its
    prompt + noun phrases alone (no padding): padding, positions, layer and order are LLaMP's."""
    key_values, _ = written
    model = transformers.AutoModelForCausalLM.from_pretrained(
        llama_path, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = llamp_cache.prepare_tokenizer(
        transformers.AutoTokenizer.from_pretrained(llama_path))
    names = llamp_cache.split_classnames(data_root, DATASET)["new"]
    template = llamp_cache.llm_templates(DATASET)[3]
    entry = key_values["new"][3]
    for index, name in enumerate(names):
        prompt = llamp_cache.llm_prompts(tokenizer, template, [name])[0]
        assert prompt.startswith("<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
                                 "In one sentece, ") and prompt.endswith(" appears as")
        prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            generated = model.generate(prompt_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                       pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(generated[0, prompt_ids.shape[1]:], skip_special_tokens=True)
        assert entry["text_predictions"][index] == answer
        phrases = ", ".join(fake_noun_chunks(answer))
        phrase_ids = tokenizer(phrases, return_tensors="pt")["input_ids"]
        full = torch.cat([prompt_ids, phrase_ids], dim=1)
        with torch.inference_mode():
            cache = llamp_cache._output_cache(model(full, use_cache=True))
        key, value = llamp_cache.legacy_key_values(cache)[-1]
        stored = entry["past_key_values"][0, :, index][:, :, entry["attn_mask"][index].bool()]
        assert stored.shape[-2] == full.shape[1]
        torch.testing.assert_close(stored[0], key[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored[1], value[0], atol=1e-5, rtol=1e-5)


def test_clip_embeddings_average_the_noun_phrase_texts(written, data_root, clip_path):
    key_values, embeddings = written
    clip_model = load_clip(clip_path, "fp32")
    names = llamp_cache.split_classnames(data_root, DATASET)["base"]
    answers = key_values["base"][0]["text_predictions"]
    for index, (name, answer) in enumerate(zip(names, answers)):
        texts = [template_for(DATASET).format(name.replace("_", " ")) + "with " + phrase
                 for phrase in fake_noun_chunks(answer)]
        with torch.no_grad():
            expected = F.normalize(encode_text_tokens(clip_model, tokenize(texts)), dim=-1).mean(0)
        torch.testing.assert_close(embeddings["base"]["avg"][index], expected, atol=1e-5,
                                   rtol=1e-5)


def test_llamp_datasets_keep_its_copies_of_the_embeddings():
    assert llamp_cache.CLIP_EMBEDDING_COPIES["ImageNet"] == 51 + 60
    assert set(llamp_cache.CLIP_EMBEDDING_COPIES) == set(llamp_cache.LLM_TEMPLATES)
    assert all(len(t) == 11 for t in llamp_cache.LLM_TEMPLATES.values())


@pytest.mark.skipif(not os.environ.get("TEXTREFINER_LLAMP_PYTHON"),
                    reason="TEXTREFINER_LLAMP_PYTHON is not set: an interpreter with LLaMP's "
                           "pinned transformers 4.35")
def test_llamps_own_stack_gives_the_same_keys_and_values_and_reads_the_file(tmp_path,
                                                                            llama_path):
    """In transformers 4.35, LLaMP's own forward pass on the same ids gives the stored keys and
    values at every real token (bit for bit), and its decoder call runs on the written file."""
    import shutil
    import subprocess
    from conftest import HANG_TIMEOUT
    model, tokenizer = llamp_cache.load_llm(llama_path, "cpu")
    llamp_cache.prepare_tokenizer(tokenizer)
    prompts = llamp_cache.llm_prompts(tokenizer, llamp_cache.llm_templates("OxfordPets")[0],
                                      ["red circle", "blue_square", "a long striped disc name"])
    entry = llamp_cache.describe_classes(model, tokenizer, prompts, fake_noun_chunks,
                                         batch_size=2, max_new_tokens=5)
    options = dict(return_tensors="pt", padding=True, truncation=True, max_length=128)
    asked = tokenizer(prompts, **options)
    phrases = tokenizer([", ".join(fake_noun_chunks(a)) for a in entry["text_predictions"]],
                        **options)
    ids = torch.cat([asked["input_ids"], phrases["input_ids"]], dim=1)
    assert torch.equal(torch.cat([asked["attention_mask"], phrases["attention_mask"]], dim=1),
                       entry["attn_mask"])
    torch.save({"ids": ids, "mask": entry["attn_mask"], "pkv": entry["past_key_values"]},
               tmp_path / "step.pt")
    torch.save({"base": [entry], "new": [entry]}, tmp_path / "release_past_key_value.pt")
    shutil.copytree(llama_path, tmp_path / "llama")
    done = subprocess.run(
        [os.environ["TEXTREFINER_LLAMP_PYTHON"],
         os.path.join(os.path.dirname(__file__), "llamp_cache_pinned.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=HANG_TIMEOUT,
        env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"max_abs_diff": 0.0, "shape_equal": True, "finite": True,
                      "decoder_output": [3, 4, 64]}


def test_cache_objects_and_tuples_give_the_same_layout(llama_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    with torch.inference_mode():
        cache = llamp_cache._output_cache(model(torch.tensor([[1, 5, 6, 7]]), use_cache=True))
    as_tuple = llamp_cache.legacy_key_values(cache)
    assert len(as_tuple) == 2
    stacked = llamp_cache.kept_key_values(as_tuple, layers_kept=2)
    assert torch.equal(stacked, llamp_cache.kept_key_values(cache, layers_kept=2))
    assert torch.equal(stacked[1, 0], as_tuple[1][0]) and torch.equal(stacked[0, 1], as_tuple[0][1])
    assert torch.equal(llamp_cache.kept_key_values(cache)[0], stacked[1])  # the last layer


def test_existing_files_are_skipped_without_loading_anything(written, data_root, capsys):
    kv_path, _ = llamp_cache.cache_paths(data_root, DATASET)
    before = os.stat(kv_path).st_mtime_ns
    code = llamp_cache.main(["--root", data_root, "--dataset", DATASET, "--llm", "/nowhere"])
    assert code == 0 and os.stat(kv_path).st_mtime_ns == before
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("llm", ["/no/such/llama", "meta-llama/Llama-2-7b-chat-hf"])
def test_unreachable_llm_is_one_clear_line(llm, data_root, fake_spacy, monkeypatch, tmp_path,
                                           capsys):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        llamp_cache.load_llm(llm, "cpu")
    message = str(err.value)
    assert "\n" not in message and repr(llm) in message and "--llm" in message


def test_missing_spacy_model_is_one_clear_line(fake_spacy):
    with pytest.raises(UserError, match="python -m spacy download en_core_web_lg"):
        llamp_cache.spacy_noun_phrases("en_core_web_lg")


def test_an_answer_without_noun_phrases_is_an_error(clip_path):
    with pytest.raises(UserError, match="'blue square'.*no noun phrase"):
        llamp_cache.class_text_embeddings(load_clip(clip_path, "fp32"), DATASET,
                                          ["red circle", "blue square"], ["a b", " "],
                                          fake_noun_chunks)


def test_the_method_reads_the_files_written_here(written, data_root):
    """textrefiner.methods.llamp reads LLaMP's files as LLaMP does: the written entries come back
    stacked per template, and the "avg" embeddings."""
    from textrefiner.methods.llamp import read_clip_embeddings, read_past_key_values
    key_values, embeddings = written
    folder = os.path.dirname(llamp_cache.cache_paths(data_root, DATASET)[0])
    kv, mask = read_past_key_values(folder, "base", 11, 1)
    for t in (0, 10):  # templates of fewer tokens are padded on the left
        entry = key_values["base"][t]
        tokens = entry["attn_mask"].shape[1]
        assert torch.equal(kv[t][..., -tokens:, :], entry["past_key_values"])
        assert torch.equal(mask[t][:, -tokens:], entry["attn_mask"])
        assert not mask[t][:, :-tokens].any()
    assert torch.equal(read_clip_embeddings(folder, "new"), embeddings["new"]["avg"])


# ----------------------------------------------------------------------------- the sweep's plan

@pytest.fixture
def llamp_configs(tmp_path, monkeypatch):
    """A folder with a config of one's own, configs/trainers/LLaMP/test_cfg.yaml, as the current
    directory (the shipped configs for the rest)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "trainers" / "LLaMP").mkdir(parents=True)
    (tmp_path / "configs" / "trainers" / "LLaMP" / "test_cfg.yaml").write_text(
        'OPTIM:\n  MAX_EPOCH: 2\nMODEL:\n  BACKBONE:\n    NAME: "ViT-B/16"\n')


def llamp_spec(**extra):
    from textrefiner.sweep.spec import parse_spec
    return parse_spec({"datasets": ["dtd", "eurosat"], "seeds": [1, 2], "config": "test_cfg",
                       "methods": ["LLaMP", {"method": "CoOp", "config": "vit_b16_ep10_ctxv1"},
                                   "LLaMP+TR"], **extra})


def test_the_plan_runs_each_datasets_llm_step_once_before_its_llamp_runs(tmp_path,
                                                                          llamp_configs):
    from textrefiner.sweep.spec import expand
    runs = expand(llamp_spec(), tmp_path / "out", root="/data")
    steps = [r for r in runs if r.kind == "llm"]
    assert [r.key for r in steps] == ["llamp_cache/DescribableTextures", "llamp_cache/EuroSAT"]
    assert steps[0].command() == ("textrefiner-llamp-cache --root /data --dataset "
                                  "DescribableTextures --clip ViT-B/16")
    assert steps[0].outputs == llamp_cache.cache_paths("/data", "DescribableTextures")
    position = {r.key: i for i, r in enumerate(runs)}
    for run in runs:
        if run.trainer == "LLaMP" and run.kind == "train":
            step = "llamp_cache/" + ("EuroSAT" if "/eurosat/" in run.key else
                                     "DescribableTextures")
            assert run.after == step and position[step] < position[run.key]
        elif run.trainer == "CoOp":
            assert run.kind == "llm" or run.after is None or run.kind == "test"
    assert len(runs) == 2 + 3 * 2 * 2 * 2  # 2 steps; 3 methods x 2 datasets x 2 seeds x 2


def test_the_llm_step_uses_the_runs_llm_and_clip_and_none_with_files_dir(tmp_path,
                                                                        llamp_configs):
    from textrefiner.sweep.spec import expand
    spec = llamp_spec(overrides={"TRAINER.LLAMP.LLM": "{out}/llama",
                                 "MODEL.BACKBONE.PATH": "/w/clip.pt"})
    (step, *_) = expand(spec, tmp_path / "out", root="/data")
    assert step.argv[-4:] == ("--llm", str(tmp_path / "out" / "llama"), "--clip", "/w/clip.pt")
    own_files = llamp_spec(overrides={"TRAINER.LLAMP.FILES_DIR": "/mine"})
    runs = expand(own_files, tmp_path / "out", root="/data")
    assert not [r for r in runs if r.kind == "llm"]


def test_an_llm_step_is_skipped_once_its_files_exist(tmp_path, llamp_configs, capsys):
    from textrefiner.sweep import cli
    from textrefiner.sweep.plan import initial_states
    from textrefiner.sweep.spec import expand
    root = tmp_path / "data"
    spec = llamp_spec(root=str(root))
    runs = expand(spec, tmp_path / "out")
    assert initial_states(runs)["llamp_cache/EuroSAT"] == "queued"
    for path in llamp_cache.cache_paths(str(root), "EuroSAT"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    assert initial_states(runs)["llamp_cache/EuroSAT"] == "skipped"
    assert initial_states(runs)["llamp_cache/DescribableTextures"] == "queued"
    spec_file = tmp_path / "spec.yaml"
    import yaml
    spec_file.write_text(yaml.safe_dump({
        "datasets": ["dtd", "eurosat"], "seeds": [1], "config": "test_cfg", "root": str(root),
        "methods": ["LLaMP"]}))
    assert cli.main([str(spec_file), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    # the pre-flight's lines come first: this fixture holds no dataset folders
    out = [line for line in capsys.readouterr().out.splitlines()
           if not line.startswith("missing: ")]
    assert out[0] == "to do: llamp_cache/DescribableTextures"
    assert "to do: llamp_cache/EuroSAT" not in out
    assert out[-1] == "6 runs in all: 1 finished, 5 to do"


def test_the_sweep_worker_runs_an_llm_step(tmp_path, data_root, llama_path, clip_path,
                                           fake_spacy):
    from textrefiner.sweep.plan import LLAMP_CACHE_PROGRAM, Run, run_finished
    from textrefiner.sweep.worker import execute_run
    root = str(tmp_path / "data")
    write_synthetic_dataset(root, num_classes=2, per_class_train=1, per_class_val=1,
                            per_class_test=1, image_size=8)
    out = tmp_path / "out" / "llamp_cache" / DATASET
    step = Run(f"llamp_cache/{DATASET}", str(out),
               ("--root", root, "--dataset", DATASET, "--llm", llama_path, "--clip", clip_path,
                "--device", "cpu", "--max-new-tokens", "2"), None, "LLaMP", "llm",
               program=LLAMP_CACHE_PROGRAM, outputs=llamp_cache.cache_paths(root, DATASET))
    assert not run_finished(step)
    assert execute_run(step) == 0 and run_finished(step)
    assert (out / "sweep.log").read_text().startswith("$ textrefiner-llamp-cache --root ")
    assert json.loads((out / "sweep_status.json").read_text())["state"] == "finished"


def test_llamp_runs_take_its_recipe_of_each_dataset(tmp_path):
    """LLaMP's published recipe is per dataset (configs/trainers/LLaMP/<its name>_llama_7b)."""
    from textrefiner.sweep.spec import expand, parse_spec
    spec = parse_spec({"datasets": ["oxford_pets", "imagenet"], "methods": ["LLaMP"],
                       "seeds": [1]})
    runs = {r.key: r for r in expand(spec, tmp_path / "out", root="/data")}
    pets = runs["base2new/test_new/oxford_pets/shots_16/LLaMP/pets_llama_7b/seed1"].argv
    imagenet = runs["base2new/test_new/imagenet/shots_16/LLaMP/imagenet_llama_7b/seed1"].argv
    assert pets[pets.index("--load-epoch") + 1] == "20"
    assert imagenet[imagenet.index("--load-epoch") + 1] == "10"
    assert list(runs)[0] == "llamp_cache/OxfordPets"
