"""Lets the PromptSRC and PromptKD codebases' own train.py run on a CPU in float32.

Put this folder on the PYTHONPATH of that process only (tests/test_codebase_runs.py does): Python
imports `sitecustomize` at start-up. Three methods become no-ops there:

* `Tensor.cuda()` and `Module.cuda()`: their trainers call them unconditionally, and this machine
  has no CUDA device; the tensors stay where they are, on the CPU;
* `Tensor.half()`: their IVLP CLIP rounds its prompts to half precision in every forward pass
  whatever PREC says (`torch.cat` then promotes them back to float32 beside float32 tokens), and
  `convert_weights` halves CLIP's weights, which `PREC fp32` casts back with `.float()`.

No value is otherwise changed and no random number drawn, so the run is the codebase's `PREC fp32`
run, with its prompts kept in float32 as PREC fp32 asks (on a GPU the same command rounds them to
half precision at each use, a difference of up to 2^-11 relative).
"""
import torch


def _unchanged(self, *args, **kwargs):
    return self


torch.Tensor.cuda = _unchanged
torch.nn.Module.cuda = _unchanged
torch.Tensor.half = _unchanged
