"""What the server computes with: a trained run in PyTorch (any class names) or an exported ONNX
model (its own classes). Both turn a preprocessed batch and a class list into probabilities [N, C],
the numbers `textrefiner-predict` gives for the same images and names."""
import json
import os
import threading
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch

from ..clip_backbone import amp_autocast, check_image_size, load_clip, unknown_words
from ..data.transforms import build_transform
from ..errors import UserError
from ..methods import CoCoOp

ClassList = Tuple[str, ...]


class ClassListError(UserError):
    """A class list this model cannot name (the request's fault: a 4xx)."""


class TorchBackend:
    """A run's model for its own classes, and a bounded LRU of models for other class lists.

    The image side is the run's model's; each other class list gets the run's method built on a
    second copy of the CLIP (the "text CLIP") with the run's checkpoint loaded, as
    `textrefiner-predict --classnames` builds it, so its classifier (refined by TextRefiner where
    it is on) is the evaluator's. It is computed once, when the list is first asked for, and kept
    in the model (CoCoOp's depends on the image, so its model runs per batch). Methods that attach
    prompts to the CLIP's encoders attach them to the text CLIP, which every cached model shares:
    each load writes the same checkpoint values there, and only the worker thread builds or runs
    models, so no model ever sees another's half-loaded state.
    """

    kind = "pytorch"

    def __init__(self, run, device: torch.device, cache_size: int = 16, log=None):
        from ..predict import build_method_model

        self.run, self.device, self.cache_size = run, device, max(1, cache_size)
        self._log = log or (lambda message: None)
        self._build = build_method_model
        self.clip = load_clip(run.backbone, run.precision)
        check_image_size(run.cfg, self.clip)
        self.model = build_method_model(run, run.classnames, self.clip, device, self._log)
        self.classnames: List[str] = list(self.model.classnames)
        self.transform = build_transform(run.cfg, is_train=False)
        self.precision = run.precision
        self._text_clip = None
        self._models: "OrderedDict[ClassList, torch.nn.Module]" = OrderedDict()
        self._unknown: "OrderedDict[ClassList, List[str]]" = OrderedDict()
        self._lock = threading.Lock()  # guards _unknown (read from request threads)

    # ------------------------------------------------------------ what it is
    def info(self) -> dict:
        cfg = self.run.cfg
        return {"backend": self.kind, "method": self.run.trainer,
                "backbone": self.run.backbone, "textrefiner": self.model.refiner is not None,
                "classes": self.classnames, "input_size": list(cfg.INPUT.SIZE),
                "precision": self.precision, "device": str(self.device),
                "any_classnames": self.accepts_other_classes()}

    def accepts_other_classes(self) -> bool:
        return not (self.run.trainer == "CoOp" and self.run.cfg.TRAINER.COOP.CSC)

    def check(self, classnames: ClassList):
        """Refuse, in one line, a class list the run's method cannot name (CoOp's class-specific
        context, PromptKD without its teacher)."""
        from ..predict import check_classnames

        try:
            check_classnames(self.run.cfg, self.run.trainer, self.run.run_classes, classnames)
        except UserError as exc:
            raise ClassListError(str(exc).replace("--classnames", "the class names")) from None

    def unknown_words(self, classnames: ClassList) -> List[str]:
        """The words of `classnames` the CLIP does not know (`clip_backbone.unknown_words`)."""
        with self._lock:
            if classnames in self._unknown:
                self._unknown.move_to_end(classnames)
                return self._unknown[classnames]
        words = unknown_words(self.clip, classnames)
        with self._lock:
            self._unknown[classnames] = words
            while len(self._unknown) > 4 * self.cache_size:
                self._unknown.popitem(last=False)
        return words

    # ------------------------------------------------------------ computing (worker thread only)
    def model_for(self, classnames: ClassList):
        """The model that names `classnames` (built once, kept while recently used)."""
        if list(classnames) == self.classnames:
            return self.model
        if classnames in self._models:
            self._models.move_to_end(classnames)
            return self._models[classnames]
        if self._text_clip is None:
            self._text_clip = load_clip(self.run.backbone, self.run.precision)
        try:
            model = self._build(self.run, classnames, self._text_clip, self.device,
                                lambda message: None)  # read once already, at start
        except UserError as exc:
            raise ClassListError(str(exc)) from None
        except RuntimeError as exc:  # CLIP's tokenizer: a prompt longer than its context
            raise ClassListError(f"These class names cannot be prompts: {exc}") from None
        if not isinstance(model, CoCoOp):
            model.class_embeddings()  # the (refined) classifier, computed here once
        self._models[classnames] = model
        while len(self._models) > self.cache_size:
            self._models.popitem(last=False)
        return model

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor, classnames: ClassList) -> torch.Tensor:
        """[N, C] float32 on the CPU: the softmax of the evaluator's logits, as `Predictor`."""
        model = self.model_for(classnames)
        with amp_autocast(self.precision, self.device):
            features = self.model.encode_images(batch.to(self.device)).features
            logits = model.forward_features(features).float()
        return logits.softmax(dim=-1).cpu()

    def predictor(self, classnames: ClassList):
        """A `Predictor` over the model for `classnames` (for textrefiner-explain's pictures)."""
        from ..predict import Predictor

        predictor = Predictor(self.model_for(classnames), self.transform, classnames,
                              self.precision, self.device)
        predictor.cfg = self.run.cfg
        return predictor


class OnnxBackend:
    """An exported model (`textrefiner-export`: model.onnx and its JSON sidecar) in ONNX Runtime.
    It names only the classes it was exported with (any order of them)."""

    kind = "onnx"

    def __init__(self, path: str, threads: int = 0):
        from ..export import sidecar_path

        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("Serving an ONNX model needs onnxruntime: pip install "
                            "\"textrefiner[onnx]\".") from None
        side = sidecar_path(path)
        if not os.path.isfile(path) or not os.path.isfile(side):
            raise UserError(f"--onnx needs the model and its sidecar: {path} and {side} (both "
                            "written by textrefiner-export).")
        with open(side, encoding="utf-8") as f:
            self.sidecar = json.load(f)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.path = path
        self.classnames: List[str] = list(self.sidecar["classes"])
        self.transform = build_transform(sidecar_cfg(self.sidecar), is_train=False)
        self.device = torch.device("cpu")

    def info(self) -> dict:
        side = self.sidecar
        return {"backend": self.kind, "method": side.get("method", ""),
                "backbone": os.path.basename(self.path), "textrefiner": bool(side.get("textrefiner")),
                "classes": self.classnames, "input_size": list(side["input_size"]),
                "precision": "fp32", "device": "cpu", "any_classnames": False}

    def accepts_other_classes(self) -> bool:
        return False

    def unknown_words(self, classnames: ClassList) -> List[str]:
        return []  # the names were read when exporting (textrefiner-export said so then)

    def check(self, classnames: ClassList):
        self.columns(classnames)

    def columns(self, classnames: ClassList) -> Optional[List[int]]:
        """Indices of `classnames` among the exported classes (None: the exported order)."""
        if list(classnames) == self.classnames:
            return None
        others = [name for name in classnames if name not in self.classnames]
        if others or len(set(classnames)) != len(self.classnames):
            raise ClassListError(
                f"This ONNX model names only the {len(self.classnames)} classes it was exported "
                f"with ({', '.join(self.classnames[:8])}{' ...' if len(self.classnames) > 8 else ''}"
                "): leave the class names out, or serve the run (--model-dir) to name others.")
        return [self.classnames.index(name) for name in classnames]

    def probabilities(self, batch: torch.Tensor, classnames: ClassList) -> torch.Tensor:
        columns = self.columns(classnames)
        logits = torch.from_numpy(self.session.run(
            [self.sidecar["output"]], {self.sidecar["input"]: batch.float().numpy()})[0])
        probabilities = logits.float().softmax(dim=-1)
        return probabilities if columns is None else probabilities[:, columns]


def sidecar_cfg(side: dict):
    """A configuration whose test transform is the sidecar's preprocessing."""
    from ..config import load_cfg

    height, width = side["input_size"]
    return load_cfg(opts=["INPUT.SIZE", f"({height}, {width})",
                          "INPUT.INTERPOLATION", side["interpolation"],
                          "INPUT.PIXEL_MEAN", str(list(side["mean"])),
                          "INPUT.PIXEL_STD", str(list(side["std"])),
                          "INPUT.TRANSFORMS", '["normalize"]'])


def class_list(names: Optional[Sequence[str]], backend) -> ClassList:
    """The request's class list as a cache key (the model's own where none is given)."""
    return tuple(backend.classnames if names is None else names)
