"""Run by tests/test_llamp_cache.py in TEXTREFINER_LLAMP_PYTHON (LLaMP's pins: transformers
4.35): LLaMP's own forward pass of tools/run_inference_chat.py (prepare_inputs_for_generation,
then the model, keeping `past_key_values[-1:]` stacked) on the ids the LLM step used, and its
decoder-layer call of models/llamp.py on the written file. Prints one JSON line."""
import json
import sys

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask

folder = sys.argv[1]
step = torch.load(f"{folder}/step.pt")
model = LlamaForCausalLM.from_pretrained(f"{folder}/llama").eval()
with torch.inference_mode():
    inputs = model.prepare_inputs_for_generation(input_ids=step["ids"],
                                                 attention_mask=step["mask"], use_cache=True)
    outputs = model(**inputs, return_dict=True)
    theirs = torch.stack([torch.stack([kv.cpu() for kv in pkvs])
                          for pkvs in outputs.past_key_values[-1:]])
valid = step["mask"].bool()
diff = max((theirs[0, i, c][:, valid[c]] - step["pkv"][0, i, c][:, valid[c]]).abs().max().item()
           for i in range(2) for c in range(valid.shape[0]))

content = torch.load(f"{folder}/release_past_key_value.pt")
kv = content["base"][0]["past_key_values"][-1:]  # num_decoder_layers 1
mask = content["base"][0]["attn_mask"]
classes, new = mask.shape[0], 4
tokens = torch.randn(classes, new, model.config.hidden_size)
full_mask = torch.cat((mask.float(), torch.ones(classes, new)), dim=1)
position_ids = torch.clamp(torch.cumsum(full_mask, dim=-1).long() - 1, min=0)[:, -new:]
mask_4d = _prepare_4d_causal_attention_mask(full_mask, (classes, new), tokens, kv.shape[-2])
with torch.no_grad():
    hidden = model.model.layers[-1](tokens, attention_mask=mask_4d, position_ids=position_ids,
                                    past_key_value=kv[0], use_cache=False,
                                    output_attentions=True)[0]
print(json.dumps({"max_abs_diff": diff, "shape_equal": theirs.shape == step["pkv"].shape,
                  "decoder_output": list(hidden.shape),
                  "finite": bool(torch.isfinite(hidden).all())}))
