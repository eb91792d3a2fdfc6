"""`textrefiner-export`: a trained run as an ONNX model (image in, logits out) and a JSON sidecar.

    textrefiner-export --model-dir output/run --output model.onnx [--classnames "a,b,c"]
    # writes model.onnx and model.json: classes, input size, resize, normalisation

The graph is the evaluator's model in float32: the image encoder (with its deep prompts) and,
for every method but CoCoOp, the class embeddings (refined by TextRefiner where it is on)
computed once here and stored in the graph as a constant; CoCoOp's classifier depends on the
image, so its meta-net, prompts, text encoder (and refiner) are in the graph and run per image.
The batch size is free. Needs the `onnx` extra: pip install "textrefiner[onnx]".
"""
import argparse
import json
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import atomic_write
from .errors import UserError
from .methods import CoCoOp
from .methods.base import image_text_logits
from .predict import add_run_args, build_run_model

INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSET = 17


class LogitsGraph(nn.Module):
    """What is exported: images [B, 3, H, W] -> float32 logits [B, C], the method's evaluation
    forward, with its classifier (Ehat where TextRefiner is on) computed here once and held as a
    buffer, which the graph stores as a constant. CoCoOp's classifier depends on the image: its
    forward, text path included, is traced as it is."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        classifier = None
        if not isinstance(model, CoCoOp):
            with torch.no_grad():
                classifier = model.class_embeddings().detach().clone()
        self.register_buffer("classifier", classifier)

    def forward(self, images):
        features = self.model.encode_images(images).features
        if self.classifier is None:
            return self.model.forward_features(features).float()
        return image_text_logits(F.normalize(features, dim=-1), self.classifier,
                                 self.model.logit_scale.exp()).float()


def sidecar(classnames, cfg, method: str, refiner: bool) -> dict:
    """What a program needs besides the graph to use it: the columns' class names and the
    preprocessing (resize the shorter side, centre crop, scale to [0, 1], normalise)."""
    size = list(cfg.INPUT.SIZE)
    normalise = "normalize" in cfg.INPUT.TRANSFORMS
    return {"classes": list(classnames), "input": INPUT_NAME, "output": OUTPUT_NAME,
            "input_size": size, "resize_shorter_side": max(size),
            "interpolation": cfg.INPUT.INTERPOLATION, "center_crop": size,
            "pixel_scale": "RGB in [0, 1]",
            "mean": list(cfg.INPUT.PIXEL_MEAN) if normalise else [0.0, 0.0, 0.0],
            "std": list(cfg.INPUT.PIXEL_STD) if normalise else [1.0, 1.0, 1.0],
            "method": method, "textrefiner": refiner,
            "logits": "logit_scale x cosine similarity; softmax over classes gives probabilities"}


def export_onnx(model, cfg, output: str, opset: int = OPSET) -> dict:
    """Write `model` (a PromptMethod in eval mode, float32, on the CPU) to `output` and its
    sidecar beside it (`<output without .onnx>.json`); returns the sidecar."""
    require_onnx()
    graph = LogitsGraph(model.float().cpu())
    height, width = cfg.INPUT.SIZE
    example = torch.zeros(2, 3, height, width)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer's warnings are about Python values it fixes (the prompts' token length,
        # the class count): both are fixed in an exported model.
        warnings.simplefilter("ignore")
        atomic_write(output, lambda f: torch.onnx.export(
            graph, (example,), f, dynamo=False, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}), "wb")
    info = sidecar(model.classnames, cfg, type(model).__name__, model.refiner is not None)
    atomic_write(sidecar_path(output), lambda f: json.dump(info, f, indent=1), "w")
    return info


def sidecar_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".json"


def require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("Exporting to ONNX needs the onnx package: pip install "
                        "\"textrefiner[onnx]\" (or pip install onnx onnxruntime).") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-export",
        description="Export a trained run to ONNX (image in, logits out) with a JSON sidecar "
                    "(classes, input size, normalisation).")
    add_run_args(parser)
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_onnx()
        model, cfg, _ = build_run_model(args, torch.device("cpu"), precision="fp32")
        info = export_onnx(model, cfg, args.output, args.opset)
    except UserError as exc:
        print(f"textrefiner-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"textrefiner-export: wrote {args.output} ({len(info['classes'])} classes, input "
          f"{'x'.join(map(str, info['input_size']))}) and {sidecar_path(args.output)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
