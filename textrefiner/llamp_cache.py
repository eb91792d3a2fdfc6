"""LLaMP's LLM step, `textrefiner-llamp-cache`: the per-dataset files LLaMP trains from.

LLaMP (Zheng et al., CVPR 2024) asks an LLM (LLaMA-2-7B chat) about every class name once,
offline, and keeps two files in each dataset's folder, the ones its authors publish:

- `release_past_key_value.pt`: {"base": [...], "new": [...]}, one entry per LLM template
  (11 per dataset), each {"past_key_values": [layers kept, 2 (key, value), classes, kv heads,
  tokens, head dim] float tensor of the LLM's last decoder layer, "attn_mask": [classes, tokens]
  int64 (left-padded prompt, then the left-padded noun phrases), "text_predictions": the LLM's
  answers}.
- `release_clip_text_embeddings.pt`: {"base": {"avg": [classes, d], "all": [copies, classes, d]},
  "new": ...}: per class, the mean of the normalised CLIP text features of "<CoOp's template for
  the class>with <noun phrase>" over the noun phrases of the LLM's answer to the first template.

The steps follow LLaMP's tools/run_inference_chat.py and tools/extract_clip_text_features_zs.py:
chat-formatted "In one sentece, <template>" + " The <class> appears as", greedy answers of up to
64 tokens, their noun phrases (spaCy's en_core_web_sm) appended, and one forward pass whose keys
and values are kept. Class names come from `textrefiner.data.read_dataset`, base and new halves
as in training, so any dataset the package reads works.
"""

import argparse
import os
import sys
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from textrefiner._compat import import_clip
from textrefiner.clip_backbone import encode_text_tokens, load_clip
from textrefiner.data.base import classnames_of, subsample_classes
from textrefiner.data.datasets import DATASETS, dataset_dir, read_dataset
from textrefiner.errors import UserError
from textrefiner.methods.llamp import CLIP_EMBEDDINGS_FILE, PAST_KEY_VALUES_FILE
from textrefiner.methods.templates import template_for

SPLITS = ("base", "new")
DEFAULT_LLM = "meta-llama/Llama-2-7b-chat-hf"
DEFAULT_SPACY_MODEL = "en_core_web_sm"
LAYERS_KEPT = 1  # LLaMP keeps the last decoder layer's keys and values (`past_key_values[-1:]`)
MAX_PROMPT_TOKENS = 128
MAX_NEW_TOKENS = 64
BATCH_SIZE = 16
SYSTEM_PROMPT = "You are a helpful assistant."
QUESTION_PREFIX = "In one sentece, "  # sic: LLaMP's prompt, typo included
ANSWER_START = " The {} appears as"
CLIP_SUFFIX = "with "  # appended to CoOp's template, which ends with "." (no space: LLaMP's text)

# transformers 4.35's default LLaMA-2 chat format, used when a tokenizer carries no chat template
# (LLaMP's stack relied on that default; current Llama-2 chat tokenizers carry the same one).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# LLaMP's questions to the LLM, 11 per dataset (its tools/gpt_llama_templates.py); ImageNet,
# StanfordCars, SUN397 and Caltech101 share the ones for objects
OBJECT_TEMPLATES = (
    "describe the distinctive appearance of a {}.",
    "explain what sets a {} apart in terms of looks.",
    "portray the unique look of a {}.",
    "characterize the singular visual traits of a {}.",
    "outline the notable features of a {}'s appearance.",
    "detail the individual look characteristics of a {}.",
    "give a rundown of what makes a {}'s appearance stand out.",
    "depict the distinguishing physical qualities of a {}.",
    "sketch the standout characteristics of a {}'s form.",
    "describe what's visually unique about a {}.",
    "capture the essence of a {}'s distinct appearance.",
)

LLM_TEMPLATES = {
    "DescribableTextures": (
        "describe the distinctive appearance of {} texture.",
        "what unique characteristics define the {} texture?",
        "can you detail the distinguishing features of the {} texture?",
        "what makes the {} texture stand out in terms of appearance?",
        "highlight the exceptional aspects of the {} texture's appearance.",
        "discuss the notable visual qualities of the {} texture.",
        "illuminate the aspects that make the {} texture visually unique.",
        "what are the defining visual elements of the {} texture?",
        "unpack the distinctive visual characteristics of the {} texture.",
        "explore the particular visual features that characterize the {} texture.",
        "can you delineate the special attributes that mark the {} texture's appearance?",
    ),
    "EuroSAT": (
        "describe the distinctive appearance of a centered satellite photo of {}.",
        "outline the unique visual traits observed in a centered satellite photo of {}.",
        "characterize the salient features visible in a centered satellite image of {}.",
        "depict the standout qualities in the appearance of a centered satellite photograph of {}.",
        "elaborate on the distinguishing aspects captured in a centered satellite photo of {}.",
        "explain the specific visual details that define a centered satellite photo of {}.",
        "give a detailed description of the visual uniqueness in a centered satellite photo of {}.",
        "illustrate the peculiar visual elements present in a centered satellite snapshot of {}.",
        "detail the remarkable visual attributes of a centered satellite photo of {}.",
        "donvey the distinctive imagery seen in a centered satellite photo of {}.",
        "present the defining visual characteristics of a centered satellite photo of {}.",
    ),
    "FGVCAircraft": (
        "describe the distinctive appearance of a {}, a type of aircraft.",
        "explain the unique visual characteristics of a {}, an aircraft variety.",
        "detail the singular look of a {}, a kind of flying machine.",
        "outline the notable features of a {}, a category of aircraft.",
        "give a description of the unique aesthetic of a {}, a form of aircraft.",
        "characterize the unusual design of a {}, a type of aviation craft.",
        "discuss the distinctive style of a {}, a class of airplane.",
        "provide an overview of the special appearance of a {}, a sort of aircraft.",
        "elaborate on the particular outer form of a {}, a version of an aircraft.",
        "illustrate the exclusive design elements of a {}, a type of aeroplane.",
        "convey the individual physical traits of a {}, a model of aircraft.",
    ),
    "OxfordPets": (
        "describe the distinctive appearance of a {}, a type of pet.",
        "detail the unique look of a {}, a pet variety.",
        "characterize the notable features of a {}, a pet species.",
        "explain the singular traits of a {}, a pet breed.",
        "illustrate the remarkable characteristics of a {}, a domestic animal.",
        "portray the specific physical attributes of a {}, a companion animal.",
        "outline the exceptional markings of a {}, a household pet.",
        "depict the individual appearance of a {}, an animal companion.",
        "sketch the distinct visuals of a {}, a pet kind.",
        "convey the particular aesthetic of a {}, a pet classification.",
        "represent the unusual form of a {}, a type of domestic pet.",
    ),
    "OxfordFlowers": (
        "describe the distinctive appearance of a {}, a type of flower.",
        "outline the unique look of a {}, a flower variety.",
        "detail the distinguishing features of a {}, a species of flower.",
        "characterize the notable traits of a {}, a kind of flower.",
        "explain the specific appearance of a {}, a category of flower.",
        "portray the singular characteristics of a {}, a flower class.",
        "depict the remarkable attributes of a {}, a form of flower.",
        "convey the exceptional aspect of a {}, a flower type.",
        "render the peculiar visuals of a {}, a segment of flora.",
        "illustrate the particular form of a {}, a flower sort.",
        "sketch the standout qualities of a {}, a family of flower.",
    ),
    "Food101": (
        "describe the distinctive appearance of {}, a type of food.",
        "depict the unique look of {}, a kind of food.",
        "outline the notable features of {}, a category of food.",
        "characterize the peculiar visual traits of {}, a variety of food.",
        "explain the singular aesthetic of {}, a food type.",
        "give details on the distinguishing characteristics of {}, an example of food.",
        "illustrate the remarkable facade of {}, a food classification.",
        "convey the striking attributes of {}, a form of food.",
        "detail the individuality in appearance of {}, a food group.",
        "sketch the specific visual elements of {}, a segment of food.",
        "relay the exceptional visual identity of {}, a food category.",
    ),
    "UCF101": (
        "describe the distinctive appearance of a person doing {}.",
        "detail the unique look of someone engaged in {}.",
        "characterize the striking features of a person while {}.",
        "outline the notable characteristics of an individual during {}.",
        "sketch the defining traits of a person when they are {}.",
        "convey the singular style of someone in the act of {}.",
        "depict the exceptional features of a person amidst {}.",
        "illustrate the individual appearance of someone busy with {}.",
        "highlight the specific visual traits of a person who is {}.",
        "present the remarkable aspects of someone's appearance while {}.",
        "profile the visual uniqueness of an individual who is {}.",
    ),
    "ImageNet": OBJECT_TEMPLATES,
    "StanfordCars": OBJECT_TEMPLATES,
    "SUN397": OBJECT_TEMPLATES,
    "Caltech101": OBJECT_TEMPLATES,
}
# LLaMP's CLIP step loops over its GPT templates plus CLIP's 60 ImageNet templates without using
# them: "all" holds that many copies of the same embeddings, and "avg" is their mean.
CLIP_EMBEDDING_COPIES = {
    "DescribableTextures": 123, "EuroSAT": 135, "FGVCAircraft": 103, "OxfordPets": 110,
    "OxfordFlowers": 110, "Food101": 104, "UCF101": 108, "ImageNet": 111, "StanfordCars": 127,
    "SUN397": 132, "Caltech101": 129,
}


def llm_templates(dataset_name: str) -> tuple:
    """LLaMP's LLM templates for a dataset; its generic ImageNet ones for any other dataset."""
    return LLM_TEMPLATES.get(dataset_name, LLM_TEMPLATES["ImageNet"])


def cache_paths(root: str, dataset_name: str) -> tuple[str, str]:
    """Where LLaMP reads a dataset's two files: the dataset's folder under DATASET.ROOT."""
    folder = dataset_dir(root, dataset_name)
    return os.path.join(folder, PAST_KEY_VALUES_FILE), os.path.join(folder, CLIP_EMBEDDINGS_FILE)


def cache_exists(root: str, dataset_name: str) -> bool:
    return all(os.path.isfile(path) for path in cache_paths(root, dataset_name))


def split_classnames(root: str, dataset_name: str) -> dict:
    """{"base": [...], "new": [...]}: the class names of each half, in label order, read as for
    training (LLaMP reads them off Dassl's base and new datasets)."""
    train, _, _ = read_dataset(root, dataset_name)
    return {split: classnames_of(subsample_classes(train, subsample=split)[0]) for split in SPLITS}


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("The LLM step needs `transformers`: `pip install transformers "
                        "safetensors` (textrefiner's llamp extra).") from None
    return transformers


def load_llm(name_or_path: str, device, dtype=torch.float32):
    """(causal LM in eval mode, tokenizer) from a local folder or a Hugging Face hub name.

    Eager attention and float32 by default, as in LLaMP's stack (transformers 4.35's LLaMA).
    """
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError) as exc:  # offline, gated, missing files, a bad hub name
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"LLM {name_or_path!r} is neither a local model folder nor reachable on the Hugging "
            f"Face hub ({reason}). Download it where the hub is reachable (`hf download "
            f"{name_or_path}`) and pass its folder with --llm, or set HF_HOME to a cache that "
            "holds it.") from None
    return model.to(device).eval(), tokenizer


def prepare_tokenizer(tokenizer):
    """LLaMP's batching: unk as padding (distinct from eos), left padding; LLaMA-2's chat format
    where the tokenizer has none."""
    tokenizer.pad_token_id = tokenizer.unk_token_id
    tokenizer.padding_side = "left"
    if getattr(tokenizer, "chat_template", None) is None:
        print("The tokenizer has no chat template: using LLaMA-2's.", file=sys.stderr)
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def llm_prompts(tokenizer, template: str, classnames: Sequence[str]) -> list[str]:
    """The chat-formatted question about each class, followed by the start of the answer."""
    prompts = []
    for name in classnames:
        readable = name.replace("_", " ")
        chat = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": QUESTION_PREFIX + template.format(readable)}]
        prompts.append(tokenizer.apply_chat_template(chat, tokenize=False)
                       + ANSWER_START.format(readable))
    return prompts


def spacy_noun_phrases(model_name: str = DEFAULT_SPACY_MODEL) -> Callable[[str], list[str]]:
    """spaCy's noun chunks of a text, as LLaMP extracts them from the LLM's answers."""
    try:
        import spacy
    except ImportError:
        raise UserError("LLaMP's noun phrases need spaCy: `pip install spacy && python -m spacy "
                        f"download {model_name}`.") from None
    try:
        nlp = spacy.load(model_name)
    except OSError:
        raise UserError(f"spaCy's model {model_name!r} is not installed: run `python -m spacy "
                        f"download {model_name}` (or pass another with --spacy-model).") from None
    return lambda text: [chunk.text for chunk in nlp(text).noun_chunks]


def legacy_key_values(cache) -> tuple:
    """((key, value) per layer): the tuple form LLaMP's files and decoder calls use, from a
    transformers `Cache` object (current versions) or that tuple itself (4.35)."""
    if isinstance(cache, (tuple, list)):
        return tuple((layer[0], layer[1]) for layer in cache)
    if hasattr(cache, "layers"):  # transformers >= 4.56: a list of per-layer caches
        return tuple((layer.keys, layer.values) for layer in cache.layers)
    if hasattr(cache, "to_legacy_cache"):
        return tuple(cache.to_legacy_cache())
    raise TypeError(f"Unknown key-value cache type {type(cache).__name__}")


def kept_key_values(cache, layers_kept: int = LAYERS_KEPT) -> torch.Tensor:
    """[layers kept, 2, batch, kv heads, tokens, head dim] on the CPU: the last layers' keys
    and values stacked as LLaMP stores them."""
    layers = legacy_key_values(cache)[-layers_kept:]
    return torch.stack([torch.stack([key.cpu(), value.cpu()]) for key, value in layers])


def _output_cache(outputs):
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]


def padding_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding (padding itself at 1), as LLaMA's
    `prepare_inputs_for_generation` computed them in LLaMP's transformers 4.35."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


@torch.inference_mode()
def describe_classes(model, tokenizer, prompts: Sequence[str], noun_phrases,
                     batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS,
                     layers_kept: int = LAYERS_KEPT) -> dict:
    """One template's entry of `release_past_key_value.pt` for prompts (one per class)."""
    device = next(model.parameters()).device
    inputs = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                       max_length=MAX_PROMPT_TOKENS)
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        output_ids = model.generate(
            input_ids=input_ids[batch], attention_mask=attention_mask[batch], do_sample=False,
            max_new_tokens=max_new_tokens, temperature=None, top_p=None, use_cache=True,
            pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(output_ids[:, input_ids.shape[1]:],
                                          skip_special_tokens=True)
    phrases = tokenizer([", ".join(noun_phrases(answer)) for answer in answers],
                        return_tensors="pt", padding=True, truncation=True,
                        max_length=MAX_PROMPT_TOKENS)
    full_ids = torch.cat([input_ids, phrases["input_ids"].to(device)], dim=1)
    full_mask = torch.cat([attention_mask, phrases["attention_mask"].to(device)], dim=1)
    key_values = []
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        outputs = model(input_ids=full_ids[batch], attention_mask=full_mask[batch],
                        position_ids=padding_position_ids(full_mask[batch]), use_cache=True,
                        return_dict=True)
        key_values.append(kept_key_values(_output_cache(outputs), layers_kept))
    return {"past_key_values": torch.cat(key_values, dim=2), "attn_mask": full_mask.cpu(),
            "text_predictions": answers}


def past_key_value_file(model, tokenizer, dataset_name: str, classnames: dict, noun_phrases,
                        **options) -> dict:
    """The content of `release_past_key_value.pt`: per split, one entry per LLM template."""
    return {split: [describe_classes(model, tokenizer, llm_prompts(tokenizer, template, names),
                                     noun_phrases, **options)
                    for template in llm_templates(dataset_name)]
            for split, names in classnames.items()}


@torch.inference_mode()
def class_text_embeddings(clip_model, dataset_name: str, classnames: Sequence[str],
                          answers: Sequence[str], noun_phrases, batch_size: int = 256):
    """[classes, d]: per class, the mean normalised CLIP feature of "<template>with <phrase>"
    over the noun phrases of the LLM's answer about it."""
    template = template_for(dataset_name)
    texts, owners = [], []
    for index, (name, answer) in enumerate(zip(classnames, answers)):
        phrases = noun_phrases(answer)
        if not phrases:
            raise UserError(f"The LLM's answer about class {name!r} has no noun phrase "
                            f"({answer!r}), so it has no LLaMP text embedding: use the chat LLM "
                            "LLaMP uses (--llm), or check the --spacy-model.")
        base_text = template.format(name.replace("_", " ")) + CLIP_SUFFIX
        texts += [base_text + phrase for phrase in phrases]
        owners += [index] * len(phrases)
    device = clip_model.token_embedding.weight.device
    tokenize = import_clip().clip.tokenize
    features = torch.cat([
        F.normalize(encode_text_tokens(clip_model, tokenize(texts[i:i + batch_size],
                                                            truncate=True).to(device)).float(),
                    dim=-1)
        for i in range(0, len(texts), batch_size)])
    owners = torch.tensor(owners, device=features.device)
    sums = torch.zeros(len(classnames), features.shape[1], device=features.device)
    sums.index_add_(0, owners, features)
    counts = torch.bincount(owners, minlength=len(classnames)).unsqueeze(1)
    return (sums / counts).cpu()


def clip_text_embeddings_file(clip_model, dataset_name: str, classnames: dict, key_values: dict,
                              noun_phrases) -> dict:
    """The content of `release_clip_text_embeddings.pt`, from the answers to the first template."""
    copies = CLIP_EMBEDDING_COPIES.get(dataset_name, 1)
    content = {}
    for split, names in classnames.items():
        answers = key_values[split][0]["text_predictions"]
        embeddings = class_text_embeddings(clip_model, dataset_name, names, answers, noun_phrases)
        every = embeddings.unsqueeze(0).repeat(copies, 1, 1)
        content[split] = {"avg": every.mean(dim=0), "all": every}
    return content


def _save(obj, path: str) -> None:
    partial = path + ".partial"
    torch.save(obj, partial)
    os.replace(partial, path)


def write_llamp_cache(root: str, dataset_name: str, model, tokenizer, clip_model, noun_phrases,
                      **options) -> tuple[str, str]:
    """Write a dataset's two LLaMP files into its folder; returns their paths."""
    classnames = split_classnames(root, dataset_name)
    key_values = past_key_value_file(model, tokenizer, dataset_name, classnames, noun_phrases,
                                     **options)
    embeddings = clip_text_embeddings_file(clip_model, dataset_name, classnames, key_values,
                                           noun_phrases)
    kv_path, embeddings_path = cache_paths(root, dataset_name)
    _save(key_values, kv_path)
    _save(embeddings, embeddings_path)
    return kv_path, embeddings_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-llamp-cache",
        description="LLaMP's LLM step: write release_past_key_value.pt and "
                    "release_clip_text_embeddings.pt into each dataset's folder.")
    parser.add_argument("--root", required=True, help="the datasets' root (DATASET.ROOT)")
    parser.add_argument("--dataset", action="append", required=True,
                        help="a dataset name (DATASET.NAME); repeat for several")
    parser.add_argument("--llm", default=DEFAULT_LLM,
                        help=f"local model folder or Hugging Face hub name (default {DEFAULT_LLM})")
    parser.add_argument("--clip", default="ViT-B/16",
                        help="CLIP weights: a name of the `clip` package or a local file")
    parser.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite datasets whose two files exist (they are skipped otherwise)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        unknown = [name for name in args.dataset if name not in DATASETS]
        if unknown:
            raise UserError(f"Unknown dataset(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(DATASETS))}.")
        todo = [name for name in args.dataset
                if args.overwrite or not cache_exists(args.root, name)]
        for name in sorted(set(args.dataset) - set(todo)):
            print(f"{name}: LLaMP's files exist in {dataset_dir(args.root, name)}, skipped")
        if not todo:
            return 0
        noun_phrases = spacy_noun_phrases(args.spacy_model)
        model, tokenizer = load_llm(args.llm, args.device)
        prepare_tokenizer(tokenizer)
        clip_model = load_clip(args.clip, "fp32", args.device)
        for name in todo:
            paths = write_llamp_cache(args.root, name, model, tokenizer, clip_model, noun_phrases,
                                      batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens)
            print(f"{name}: wrote {' and '.join(paths)}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
