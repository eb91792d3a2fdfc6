"""The README's code stays in step with the library: its custom-trainer example runs."""
import os
import re

import pytest
import torch

from textrefiner import TextRefiner
from textrefiner.clip_backbone import load_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_custom_trainer_example_runs_as_written(clip_path, precision):
    """The README's snippet, unchanged, on an fp32 and an fp16 CLIP (fp32 text features)."""
    clip_model = load_clip(clip_path, precision)
    example = next(block for block in readme_python_blocks() if "TextRefiner(" in block)
    dim = clip_model.text_projection.shape[1]
    prompt = torch.nn.Parameter(torch.randn(3, dim))
    namespace = {"clip_model": clip_model, "images": torch.randn(4, 3, 32, 32),
                 "labels": torch.tensor([0, 1, 2, 0]), "prompt_params": [prompt],
                 "text_features": prompt * 2}
    torch.manual_seed(0)
    initial_cache = TextRefiner(dim).cache.entries.clone()  # what the example starts from
    torch.manual_seed(0)
    exec(compile(example, "README.md", "exec"), namespace)
    loss, refiner = namespace["loss"], namespace["refiner"]
    assert torch.isfinite(loss) and loss.ndim == 0 and loss.dtype == clip_model.dtype
    assert refiner.aggregator.linear.weight.grad is not None
    assert refiner.aligner.fc1.weight.grad is not None      # reached through the semantic loss
    assert prompt.grad is not None
    assert not torch.equal(refiner.cache.entries.float(), initial_cache)  # the cache was written
    assert refiner.training
