"""`textrefiner-predict` and `Predictor`: classify new images with a trained run.

    textrefiner-predict --model-dir output/run photos/ cat.jpg --topk 3 --output predictions.csv
    textrefiner-predict --model-dir output/run photos/ --classnames "zebra,okapi,giraffe"

    from textrefiner.predict import Predictor
    predictor = Predictor.from_run("output/run", classnames=["zebra", "okapi"])
    probabilities = predictor(["a.jpg", pil_image])        # [N, C], rows sum to 1

A run is its output folder (`--output-dir` of textrefiner-train, or a sweep's run folder). Its
checkpoints hold the run's configuration and class names (`config`, `classnames`), so nothing
else is needed; checkpoints written elsewhere (the codebases, earlier versions) need the training
command's `--trainer`, `--config-file` and `KEY VALUE` pairs, given here as to textrefiner-train.
The model is the one the evaluator scores: the same classifier (refined once where TextRefiner is
on; per image for CoCoOp), the test transform of INPUT.*, and PREC, so the logits on a test split
are the evaluation's. Any class list may replace the run's where prompts are shared across
classes (the base-to-new setting); CoOp's class-specific context (CSC) knows only its own classes.
"""
import argparse
import contextlib
import csv
import json
import os
import shlex
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import CODEBASE_FOLDERS, checkpoint_path, read_checkpoint
from .clip_backbone import (amp_autocast, check_image_size, load_clip, unknown_words,
                            unknown_words_message)
from .config import apply_refiner_args, load_cfg
from .data.transforms import build_transform
from .errors import UserError, run_command
from .methods import METHODS, method_class

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
TRAINER_PREFIX = "TR_"  # the Dassl layer's registry names


# ---------------------------------------------------------------------------- the run
def run_checkpoint(model_dir: str, load_epoch: Optional[int] = None):
    """(path, checkpoint dict) of the run in `model_dir`: `load_epoch`'s file, else
    model-best.pth.tar, else the latest epoch's; (None, {}) when the folder holds no checkpoints."""
    model_dir = followed_sweep_run(model_dir)
    if not os.path.isdir(model_dir):
        raise UserError(f"--model-dir {model_dir} is not a folder: give the --output-dir of a "
                        "training run (or a sweep's run folder).")
    names = [name for name in CODEBASE_FOLDERS if os.path.isdir(os.path.join(model_dir, name))]
    if not names:
        return None, {}
    folder = os.path.join(model_dir, names[0])
    saved = sorted((f for f in os.listdir(folder) if f.startswith("model")), key=_epoch_order)
    path = checkpoint_path(model_dir, names[0], load_epoch)
    if load_epoch is None and not os.path.isfile(path) and saved:
        path = os.path.join(folder, saved[-1])  # no best model (TEST.FINAL_MODEL last_step)
    if not os.path.isfile(path):
        raise UserError(f"No checkpoint at {path}; {folder} holds {', '.join(saved) or 'none'}"
                        ": choose one with --load-epoch N.")
    return path, read_checkpoint(path)


def _epoch_order(filename: str):
    epoch = filename.rsplit("-", 1)[-1]
    return int(epoch) if epoch.isdigit() else -1


def followed_sweep_run(model_dir: str) -> str:
    """A sweep's test run trains nothing: it names its training run (--model-dir) in its
    sweep_status.json, which is the run to load."""
    from .sweep.plan import STATUS_FILE

    status = os.path.join(model_dir, STATUS_FILE)
    if any(os.path.isdir(os.path.join(model_dir, name)) for name in CODEBASE_FOLDERS) or \
            not os.path.isfile(status):
        return model_dir
    with contextlib.suppress(OSError, ValueError):
        with open(status, encoding="utf-8") as f:
            words = shlex.split(json.load(f).get("command") or "")
        if "--eval-only" in words and "--model-dir" in words:
            return words[words.index("--model-dir") + 1]
    return model_dir


def run_cfg(checkpoint: dict, args):
    """(cfg, method name): the configuration saved in the run's checkpoint, then this command's
    config files, flags and KEY VALUE pairs (e.g. a CLIP file that moved: MODEL.BACKBONE.PATH)."""
    saved = checkpoint.get("config")
    if not saved and not args.trainer:
        raise UserError("This checkpoint holds no configuration (written by a codebase or an "
                        "earlier version): give the training command's --trainer, --config-file, "
                        "--dataset-config-file and KEY VALUE pairs (MODEL.BACKBONE.PATH ...)."
                        if checkpoint else
                        "No trained run: give --model-dir (a training run's --output-dir), or "
                        "--trainer ZeroshotCLIP with --config-file and --classnames.")
    cfg = load_cfg(args.config_file or None, args.dataset_config_file or None,
                   list(args.opts or []), saved=saved)
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    trainer = method_name(args.trainer or cfg.TRAINER.NAME)
    cfg.TRAINER.NAME = trainer
    apply_refiner_args(cfg, args, check_trainer=False)
    return cfg, trainer


def method_name(trainer: str) -> str:
    """Our method's name for a trainer name ("CoOp" or the Dassl layer's "TR_CoOp")."""
    name = trainer[len(TRAINER_PREFIX):] if trainer.startswith(TRAINER_PREFIX) else trainer
    if not name:
        raise UserError(f"Which method? Give --trainer ({', '.join(sorted(METHODS))}).")
    method_class(name)  # unknown: one clear line
    return name


def run_classnames(checkpoint: dict, cfg) -> List[str]:
    """The classes the run trained on: saved in its checkpoint, else read from its dataset."""
    if checkpoint.get("classnames"):
        return list(checkpoint["classnames"])
    if not cfg.DATASET.NAME or not cfg.DATASET.ROOT:
        raise UserError("The checkpoint does not name its classes and no dataset is configured: "
                        "give them with --classnames (a list or a file, one name per line).")
    from .data import build_dataset

    cls = method_class(cfg.TRAINER.NAME)
    splits = build_dataset(cfg, all_classes_for_training=(
        cls.trains_on_all_classes and cfg.TRAINER.MODAL == "base2novel"))
    return list(splits.classnames)


def check_classnames(cfg, trainer: str, run_classes, classnames):
    """Refuse a class list the method cannot name, in one line that says what to do. (A CSC
    checkpoint that does not name its classes is checked by its context's shape when loaded.)"""
    if trainer == "CoOp" and cfg.TRAINER.COOP.CSC and list(classnames) != list(run_classes):
        raise UserError("This CoOp run learned a class-specific context (TRAINER.COOP.CSC): it "
                        "names only the classes it was trained on, so --classnames cannot change "
                        "them. Leave --classnames out, or train with a shared context (CSC False).")
    if trainer == "PromptKD":
        teacher = cfg.TRAINER.PROMPTKD.TEACHER_CKPT
        if not teacher or not os.path.isfile(teacher):
            raise UserError(
                "PromptKD's student names classes with its teacher's text features, so "
                "predicting needs the PromptSRC teacher it learned from: set "
                f"TRAINER.PROMPTKD.TEACHER_CKPT (now {teacher or 'empty'!r}: not found) and the "
                "teacher's CLIP (TRAINER.PROMPTKD.TEACHER_NAME or TEACHER_PATH) as KEY VALUE "
                "pairs.")


def parse_classnames(value) -> Optional[List[str]]:
    """--classnames: a file of names (one a line), or names separated by commas; a list passes."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [str(v) for v in value]
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UserError(f"--classnames {value!r} names no class: give names separated by commas, "
                        "or a file with one name per line.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"--classnames names {duplicates[0]!r} twice: give each class once.")
    return names


def pick_device(device: Optional[str] = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Run:
    """A trained run as read from its checkpoint and the command's flags, before any model is
    built: `classnames` are the ones asked for (--classnames, else the run's own)."""
    cfg: object
    trainer: str
    path: Optional[str]  # the checkpoint file; None for a method that trains nothing
    classnames: List[str]
    run_classes: List[str]  # the classes its checkpoint names (else `classnames`)
    backbone: str
    precision: str


def open_run(args, precision: Optional[str] = None) -> Run:
    """Read the run named by `args` (textrefiner-predict's flags); `precision` overrides its
    PREC. Refuses, in one line, a class list the method cannot name."""
    path, checkpoint = run_checkpoint(args.model_dir, args.load_epoch) if args.model_dir else (
        None, {})
    cfg, trainer = run_cfg(checkpoint, args)
    cls = method_class(trainer)
    if precision:
        cfg.TRAINER[cls.config_section].PREC = precision
    classnames = parse_classnames(args.classnames) or run_classnames(checkpoint, cfg)
    run = Run(cfg, trainer, path, classnames, list(checkpoint.get("classnames") or classnames),
              cfg.MODEL.BACKBONE.PATH or cfg.MODEL.BACKBONE.NAME,
              cfg.TRAINER[cls.config_section].PREC)
    check_classnames(cfg, trainer, run.run_classes, classnames)
    if cls.checkpoint_name and path is None:
        raise UserError(f"--model-dir {args.model_dir or '(none)'} holds no {cls.checkpoint_name}/ "
                        f"checkpoints of a {trainer} run: give the training run's --output-dir.")
    return run


def build_method_model(run: Run, classnames: Sequence[str], clip_model, device, log):
    """The run's method for `classnames` on `clip_model`, its checkpoint loaded, in eval mode on
    `device`."""
    from .checkpoint import load_method_checkpoint

    check_classnames(run.cfg, run.trainer, run.run_classes, classnames)
    model = method_class(run.trainer)(run.cfg, list(classnames), clip_model)
    if run.path is not None:
        load_method_checkpoint(model, run.path, log)
    if hasattr(model, "set_eval_classes"):  # PromptKD: score every class it is given
        model.set_eval_classes("test", modal="all")
    return model.to(device).eval()


def build_run_model(args, device, precision: Optional[str] = None, log=None):
    """(model in eval mode on `device`, cfg, trainer name) for a run, with its checkpoint loaded
    and the class names of --classnames (or the run's). `precision` overrides the run's PREC.
    Class-name words the CLIP does not know are named in one line to `log`."""
    log = log or (lambda message: print(message, file=sys.stderr))
    run = open_run(args, precision)
    clip_model = load_clip(run.backbone, run.precision)
    check_image_size(run.cfg, clip_model)
    note = unknown_words_message(unknown_words(clip_model, run.classnames))
    if note:
        log(f"note: {note}")
    return build_method_model(run, run.classnames, clip_model, device, log), run.cfg, run.trainer


# ---------------------------------------------------------------------------- the predictor
class Predictor:
    """A trained run as a callable: images (paths, PIL images, or a preprocessed batch) in, class
    probabilities [N, C] out (softmax of the evaluator's logits; LLaMP's scores as they are, being
    probabilities already); `classnames` names the columns.

    `Predictor.from_run(model_dir, ...)` loads a run; `Predictor(model, transform, classnames)`
    wraps a built PromptMethod.
    """

    def __init__(self, model, transform, classnames: Sequence[str], precision: str = "fp32",
                 device=None, batch_size: int = 64):
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.transform = transform
        self.classnames = list(classnames)
        self.precision = precision
        self.batch_size = batch_size
        self.cfg = None  # the run's configuration, where it was loaded from a run

    @classmethod
    def from_run(cls, model_dir: str = "", load_epoch: Optional[int] = None, classnames=None,
                 device=None, batch_size: int = 64, trainer: str = "", config_file: str = "",
                 opts: Sequence[str] = ()):
        """Load the run in `model_dir` (a training run's --output-dir); `classnames` (a list or
        a file) replaces its classes; `trainer`, `config_file` and `opts` (KEY VALUE pairs) as
        textrefiner-predict's flags."""
        args = build_parser().parse_args(
            ["--model-dir", model_dir, "--trainer", trainer, "--config-file", config_file]
            + (["--load-epoch", str(load_epoch)] if load_epoch is not None else [])
            + (["--set", *opts] if opts else []))
        args.classnames = classnames
        return cls.from_args(args, device=device, batch_size=batch_size)

    @classmethod
    def from_args(cls, args, device=None, batch_size: int = 64, log=None):
        device = pick_device(device)
        model, cfg, _ = build_run_model(args, device, log=log)
        precision = cfg.TRAINER[type(model).config_section].PREC
        predictor = cls(model, build_transform(cfg, is_train=False), model.classnames, precision,
                        device, batch_size)
        predictor.cfg = cfg
        return predictor

    def preprocess(self, images) -> torch.Tensor:
        """A batch tensor [N, 3, H, W] from paths or PIL images (a tensor passes as it is)."""
        if isinstance(images, torch.Tensor):
            return images
        return torch.stack([self.transform(_as_image(image)) for image in images])

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The evaluator's logits [N, C] (float32) of a preprocessed batch."""
        with amp_autocast(self.precision, self.device):
            return self.model(batch.to(self.device)).float()

    def display_transform(self):
        """The transform's steps before ToTensor: a PIL image resized and cropped as the model
        sees it (for pictures of patches at their place)."""
        import torchvision.transforms as T

        steps = getattr(self.transform, "transforms", None)
        if steps is None or not any(isinstance(step, T.ToTensor) for step in steps):
            raise UserError("This predictor's transform is not a torchvision Compose with "
                            "ToTensor: pictures cannot show the images as the model sees them.")
        return T.Compose(steps[:[isinstance(step, T.ToTensor) for step in steps].index(True)])

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, C] of a preprocessed batch."""
        scores = self.logits(batch)
        return scores if self.model.scores_are_probabilities else scores.softmax(dim=-1)

    def __call__(self, images) -> torch.Tensor:
        """Class probabilities [N, C] of `images` (paths, PIL images or a preprocessed batch)."""
        if not isinstance(images, (list, tuple, torch.Tensor)):
            images = [images]
        batch = self.preprocess(images)
        parts = [self.probabilities(batch[i:i + self.batch_size]).cpu()
                 for i in range(0, batch.shape[0], self.batch_size)]
        return torch.cat(parts)

    def predict_files(self, paths: Sequence[str], workers: int = 0, skipped=None):
        """(path, probabilities [C]) per readable image, batched through a DataLoader; an image
        that cannot be read is reported to `skipped(path, reason)` and left out."""
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, self.transform), batch_size=self.batch_size, num_workers=workers,
            collate_fn=_readable, pin_memory=self.device.type == "cuda")
        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=None, leave=False,
                   dynamic_ncols=True)
        try:
            for batch, names, failed in loader:
                for path, reason in failed:
                    (skipped or _report_skipped)(path, reason)
                if names:
                    probabilities = self.probabilities(batch).cpu()
                    yield from zip(names, probabilities)
                bar.update(len(names) + len(failed))
        finally:
            bar.close()


def _as_image(image):
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as img:
        return img.convert("RGB")


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return path, self.transform(_as_image(path)), None
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for damaged files
            return path, None, f"{type(exc).__name__}: {exc}"


def _readable(items):
    """Collate: (stacked tensors, their paths, [(path, reason)] of the unreadable ones)."""
    good = [(path, image) for path, image, _ in items if image is not None]
    failed = [(path, reason) for path, image, reason in items if image is None]
    batch = torch.stack([image for _, image in good]) if good else None
    return batch, [path for path, _ in good], failed


def _report_skipped(path, reason):
    print(f"textrefiner-predict: skipped {path}: cannot read it as an image ({reason})",
          file=sys.stderr)


def image_files(inputs: Sequence[str]) -> List[str]:
    """The image files named by `inputs`: files as given, folders searched recursively (files
    with an image extension, sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(item)
                           for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise UserError(f"{item} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"{item} is neither a file nor a folder: give image files or folders.")
    return paths


# ---------------------------------------------------------------------------- command line
def add_run_args(parser):
    """The flags that name a trained run and its classes (shared with textrefiner-export)."""
    parser.add_argument("--model-dir", default="",
                        help="the training run's --output-dir (or a sweep's run folder)")
    parser.add_argument("--load-epoch", type=int,
                        help="load this epoch's checkpoint (default: model-best.pth.tar)")
    parser.add_argument("--classnames", metavar="NAMES|FILE",
                        help="classes to name instead of the run's: names separated by commas, "
                             "or a file with one name per line")
    parser.add_argument("--trainer", default="",
                        help="the method, for checkpoints that do not hold their configuration "
                             f"({', '.join(sorted(METHODS))})")
    parser.add_argument("--config-file", default="", help="trainer config (as for training)")
    parser.add_argument("--dataset-config-file", default="", help="dataset config")
    parser.add_argument("--backbone", default="", help="CLIP backbone name (MODEL.BACKBONE.NAME)")
    parser.add_argument("--refiner", action="store_true",
                        help="TextRefiner on, for checkpoints that do not hold their configuration"
                             " (other refiner settings: TRAINER.REFINER.* KEY VALUE pairs)")
    parser.add_argument("--set", dest="opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config KEY VALUE pairs over the run's configuration (e.g. "
                             "MODEL.BACKBONE.PATH /new/place/ViT-B-16.pt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-predict",
        description="Classify images with a trained run: the top-k class names and their "
                    "probabilities for each image.")
    parser.add_argument("images", nargs="*", help="image files or folders (searched recursively)")
    add_run_args(parser)
    parser.add_argument("--topk", type=int, default=5, help="names per image (default 5)")
    parser.add_argument("--output", default="", help="write a CSV file instead of printing")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--workers", type=int, default=0, help="image-reading processes")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: the GPU "
                                                     "when there is one)")
    return parser


def top_k(probabilities: torch.Tensor, classnames, k: int):
    values, indices = probabilities.topk(min(k, len(classnames)))
    return [(classnames[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]


def write_predictions(rows, classnames, k: int, output: str):
    """Rows of (path, probabilities) to a CSV file (image, top1, prob1, ...) or to stdout."""
    k = min(k, len(classnames))
    header = ["image"] + [f"{name}{i}" for i in range(1, k + 1) for name in ("top", "prob")]
    count = 0
    with (open(output, "w", newline="", encoding="utf-8") if output
          else contextlib.nullcontext(sys.stdout)) as out:
        writer = csv.writer(out) if output else None
        if writer:
            writer.writerow(header)
        for path, probabilities in rows:
            best = top_k(probabilities, classnames, k)
            if writer:
                writer.writerow([path] + [f"{v:.6f}" if isinstance(v, float) else v
                                          for pair in best for v in pair])
            else:
                print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in best), flush=True)
            count += 1
    return count


def run(args) -> int:
    if args.topk < 1 or args.batch_size < 1:
        raise UserError("--topk and --batch-size must be at least 1.")
    if not args.images:
        raise UserError("No images: give image files or folders to classify.")
    paths = image_files(args.images)
    predictor = Predictor.from_args(args, device=args.device or None, batch_size=args.batch_size)
    skipped = []

    def skip(path, reason):
        skipped.append(path)
        _report_skipped(path, reason)

    count = write_predictions(predictor.predict_files(paths, args.workers, skip),
                              predictor.classnames, args.topk, args.output)
    note = f" ({len(skipped)} skipped: not readable as images)" if skipped else ""
    where = f" into {args.output}" if args.output else ""
    print(f"textrefiner-predict: {count} images classified{where}{note}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_command("textrefiner-predict", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
