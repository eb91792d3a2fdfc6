"""The README's code stays in step with the library: its custom-trainer example runs."""
import os
import re

import torch

from textrefiner import TextRefiner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_custom_trainer_example_runs(small_clip):
    example = next(block for block in readme_python_blocks() if "TextRefiner(" in block)
    dim = small_clip.text_projection.shape[1]
    example = example.replace("TextRefiner(dim=512)", f"TextRefiner(dim={dim})")
    namespace = {"clip_model": small_clip, "images": torch.randn(4, 3, 32, 32),
                 "labels": torch.tensor([0, 1, 2, 0]), "text_features": torch.randn(3, dim)}
    torch.manual_seed(0)
    initial_cache = TextRefiner(dim).cache.entries.clone()  # what the example starts from
    torch.manual_seed(0)
    exec(compile(example, "README.md", "exec"), namespace)
    loss, refiner = namespace["loss"], namespace["refiner"]
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    assert refiner.aggregator.linear.weight.grad is not None
    assert refiner.aligner.fc1.weight.grad is not None      # reached through the semantic loss
    assert not torch.equal(refiner.cache.entries, initial_cache)  # the example wrote the cache
