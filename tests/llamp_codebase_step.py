"""LLaMP's own model (its models/llamp.py) on the tiny models of tests/test_llamp.py: one training
step and one evaluation. Run by that test in an interpreter with LLaMP's pinned packages
(transformers 4.35, peft 0.4; see docs/llamp.md):

    python tests/llamp_codebase_step.py WORK_DIR LLAMP_CHECKOUT

WORK_DIR/setup.pt holds the inputs (CLIP weights in transformers' layout and its config, the
tokenizer files, the LLM folder, the cached files' folder, class names, LLaMP's command-line
flags, images, labels, seeds); WORK_DIR/codebase.pt gets its initial state dict, the step's
losses, gradients and LLM prompts, and the evaluation's text features and scores.
"""
import os
import sys

import torch


def llamp_model(setup):
    """LLaMP's model on the test's CLIP, tokenizer, LLM and files, from seed `init_seed` (run from
    LLaMP's checkout, on sys.path)."""
    import transformers
    from safetensors.torch import load_file
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer, LlamaConfig, LlamaForCausalLM)

    def tiny_clip(*_, **__):
        model = CLIPModel(CLIPConfig(**setup["clip_config"]))
        missing, unexpected = model.load_state_dict(setup["clip_state"], strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        return model

    def tiny_processor(*_, **__):
        tokenizer = CLIPTokenizer(*setup["tokenizer_files"])
        return CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)

    CLIPModel.from_pretrained = tiny_clip  # no hub: the test's CLIP and tokenizer
    CLIPProcessor.from_pretrained = tiny_processor
    print("LLaMP side: transformers", transformers.__version__)

    from argparse import Namespace

    from flags import parser
    from models.llamp import LLaMP

    llm = LlamaForCausalLM(LlamaConfig(**setup["llm_sizes"]))
    weights = load_file(os.path.join(setup["llm"], "model.safetensors"))
    missing, _ = llm.load_state_dict(weights, strict=False)
    assert all(k.startswith("lm_head") for k in missing), missing
    args = parser.parse_args(setup["args"])
    torch.manual_seed(setup["init_seed"])
    model = LLaMP(Namespace(data_dir=setup["files"]), setup["classnames"], args, llm, None)
    # float32 throughout: its logit scale is built from np.log, a float64 (its bf16 runs cast it)
    model.logit_scale.data = model.logit_scale.data.float()
    generator = torch.Generator().manual_seed(setup["init_seed"])
    with torch.no_grad():  # LoRA's B starts at zero: give it values, so that it counts
        for name, param in model.named_parameters():
            if "lora_B" in name and name.startswith("lora_model."):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def main(work, checkout):
    sys.path.insert(0, checkout)
    os.chdir(checkout)  # its modules import flags.py and read relative paths
    setup = torch.load(os.path.join(work, "setup.pt"), weights_only=False)
    model = llamp_model(setup)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    prompts = []
    encode = model.encode_LLM_prompt
    model.encode_LLM_prompt = lambda p, subset: (prompts.append(p.detach().clone()),
                                                 encode(p, subset))[1]
    images, labels = setup["images"], setup["labels"]
    model.train()
    torch.manual_seed(setup["step_seed"])
    losses, _ = model((images, images, labels))
    losses["loss_total"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)

    model.eval()
    with torch.no_grad():
        model.load_state_dict(initial)  # evaluation from the same weights as ours
        model.compute_all_class_embeddings("base")
        _, scores = model((images,), subset="base")
    torch.save({"initial": initial, "losses": {k: v.detach() for k, v in losses.items()},
                "grads": grads, "trainable": trainable, "train_prompts": prompts[0],
                "eval_text": model.all_class_embed[0].detach(), "scores": scores.detach()},
               os.path.join(work, "codebase.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
