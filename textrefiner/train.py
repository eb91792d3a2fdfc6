"""`textrefiner-train` / `python -m textrefiner.train`: CoOp's train.py, plus `--refiner`.

    textrefiner-train --root DATA --trainer CoOp --refiner \\
        --dataset-config-file configs/datasets/oxford_pets.yaml \\
        --config-file configs/trainers/CoOp/vit_b16_ep10_ctxv1.yaml \\
        --output-dir output/pets DATASET.NUM_SHOTS 16 DATASET.SUBSAMPLE_CLASSES base

`--engine auto` runs on Dassl.pytorch when it is installed and on the built-in standalone runner
otherwise (and always under torchrun); both read the same configs and write the same outputs.
"""
import argparse
import contextlib
import importlib.util
import os
import re
import sys

from . import faults
from .config import add_refiner_args, apply_refiner_args, load_cfg
from .configs import describe, find_config
from .errors import OutputError, UserError, describe_os_error, output_failed
from .methods import METHODS, method_class

ENGINES = ("auto", "dassl", "standalone")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-train", description="Train or evaluate a prompt-tuned CLIP (--trainer), "
        "with TextRefiner on (--refiner) or off.")
    parser.add_argument("--root", default="", help="path to the datasets folder")
    parser.add_argument("--output-dir", default="", help="output directory")
    parser.add_argument("--resume", default="", help="checkpoint directory to resume from")
    parser.add_argument("--seed", type=int, default=-1, help="only positive values fix the seed")
    parser.add_argument("--source-domains", nargs="+", help="source domains (DA/DG)")
    parser.add_argument("--target-domains", nargs="+", help="target domains (DA/DG)")
    parser.add_argument("--transforms", nargs="+", help="data augmentation methods")
    parser.add_argument("--config-file", default="", help="path to the trainer config file")
    parser.add_argument("--dataset-config-file", default="", help="path to the dataset config")
    parser.add_argument("--trainer", default="", help=f"one of {sorted(METHODS)}")
    parser.add_argument("--backbone", default="", help="CLIP backbone name (MODEL.BACKBONE.NAME)")
    parser.add_argument("--head", default="", help="name of head (unused, kept for CoOp)")
    parser.add_argument("--eval-only", action="store_true", help="evaluation only")
    parser.add_argument("--model-dir", default="", help="load the model from this directory")
    parser.add_argument("--load-epoch", type=int, help="load the weights of this epoch")
    parser.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="dassl (Dassl.pytorch), standalone (built in), or auto (dassl when "
                             "it is installed, standalone under torchrun)")
    parser.add_argument("--text-checkpointing", action="store_true",
                        help="recompute the text encoder's activations in the backward pass: "
                             "less memory for many classes, same gradients "
                             "(TRAINER.TEXT_ENCODER.CHECKPOINTING)")
    parser.add_argument("--text-chunk-size", type=int, metavar="N",
                        help="encode at most N class prompts at a time "
                             "(TRAINER.TEXT_ENCODER.CHUNK_SIZE; 0: all at once)")
    parser.add_argument("--feature-store", metavar="DIR",
                        help="read the frozen image encoder's features of the test images from "
                             "DIR, computing and adding only the missing ones (zero-shot CLIP, "
                             "CoOp, CoCoOp, with or without TextRefiner; TEST.FEATURE_STORE)")
    add_refiner_args(parser)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="modify config options using the command line (KEY VALUE pairs)")
    return parser


def setup_cfg(args):
    """Defaults < dataset YAML < trainer YAML < command-line flags < KEY VALUE pairs."""
    if not args.trainer:
        raise UserError(f"Choose a method with --trainer ({', '.join(sorted(METHODS))}).")
    method_class(args.trainer)  # unknown trainer: a clear error before anything else
    # a shipped config's name becomes its path, so the log (config_lines) names the file read
    args.config_file = find_config(args.config_file, "method") if args.config_file else ""
    args.dataset_config_file = (find_config(args.dataset_config_file, "dataset")
                                if args.dataset_config_file else "")
    flags = {"DATASET.ROOT": args.root, "OUTPUT_DIR": args.output_dir, "RESUME": args.resume,
             "MODEL.BACKBONE.NAME": args.backbone, "MODEL.HEAD.NAME": args.head,
             "SEED": str(args.seed) if args.seed >= 0 else "",
             "DATASET.SOURCE_DOMAINS": _as_list(args.source_domains),
             "DATASET.TARGET_DOMAINS": _as_list(args.target_domains),
             "INPUT.TRANSFORMS": _as_list(args.transforms),
             "TRAINER.NAME": args.trainer,
             "TRAINER.TEXT_ENCODER.CHECKPOINTING": "True" if args.text_checkpointing else "",
             "TRAINER.TEXT_ENCODER.CHUNK_SIZE":
                 "" if args.text_chunk_size is None else str(args.text_chunk_size),
             "TEST.FEATURE_STORE": args.feature_store}
    pairs = [item for key, value in flags.items() if value for item in (key, value)]
    cfg = load_cfg(args.config_file or None, args.dataset_config_file or None,
                   pairs + list(args.opts or []))
    apply_refiner_args(cfg, args, check_trainer=False)  # plain names map to TR_ trainers
    cfg.freeze()
    return cfg


def config_lines(args) -> list:
    """The log's lines saying which config files the run read (after setup_cfg)."""
    return [describe(path, role) for path, role in ((args.dataset_config_file, "dataset"),
                                                    (args.config_file, "method")) if path]


def _as_list(values):
    return str(list(values)) if values else ""


def resolve_engine(engine: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) only the standalone engine runs: "auto" picks it."""
    has_dassl = importlib.util.find_spec("dassl") is not None
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if engine == "auto":
        return "dassl" if has_dassl and not under_torchrun else "standalone"
    if engine == "dassl" and under_torchrun:
        raise UserError("Dassl.pytorch trains in one process (nn.DataParallel at most) and cannot "
                        "run under torchrun: use --engine standalone (or auto).")
    if engine == "dassl" and not has_dassl:
        raise UserError("--engine dassl needs Dassl.pytorch, which is not installed: install it "
                        "from its repository or use --engine standalone.")
    return engine


class _Tee:
    """Copies what is printed to a log file (Dassl's runs print their log)."""

    def __init__(self, console, file):
        self.console, self.file = console, file

    def write(self, text):
        self.console.write(text)
        self._to_file(self.file.write, text)

    def flush(self):
        self.console.flush()
        self._to_file(self.file.flush)

    def _to_file(self, operation, *args):
        try:
            operation(*args)
        except OSError as exc:
            raise output_failed(self.file.name, exc) from None


@contextlib.contextmanager
def _print_to_log(output_dir: str):
    """Append everything printed to <output_dir>/log.txt, then give stdout back. (Dassl's own
    `setup_logger` starts a new, time-stamped file when log.txt exists and closes the console
    when it is garbage-collected.)"""
    os.makedirs(output_dir, exist_ok=True)
    console = sys.stdout
    with open(os.path.join(output_dir, "log.txt"), "a", encoding="utf-8") as file:
        sys.stdout = _Tee(console, file)
        try:
            yield
        finally:
            sys.stdout = console


def run_dassl(cfg, args):
    from dassl.engine import build_trainer
    from dassl.utils import collect_env_info, set_random_seed

    from textrefiner_trainers import TRAINER_NAMES

    cfg.defrost()
    cfg.TRAINER.NAME = TRAINER_NAMES[args.trainer]
    cfg.freeze()
    if cfg.SEED >= 0:
        set_random_seed(cfg.SEED)
    with _print_to_log(cfg.OUTPUT_DIR):
        print("\n".join(config_lines(args)))
        print(f"Collecting env info ...\n{collect_env_info()}")
        trainer = build_trainer(cfg)
        trainer.checkpoint_every_epoch = True  # a checkpoint to resume from after every epoch
        if args.eval_only:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
            trainer.test()
        elif not args.no_train:
            trainer.train()
    return trainer


def run(argv=None):
    return run_args(build_parser().parse_args(argv))


def run_args(args):
    faults.check()  # a malformed TEXTREFINER_KILL_AT fails before anything runs
    cfg = setup_cfg(args)
    if cfg.RESUME and not os.path.isdir(cfg.RESUME):
        raise UserError(f"--resume {cfg.RESUME} is not a folder: give the --output-dir of the run "
                        "to continue.")
    engine = resolve_engine(args.engine)
    if engine == "dassl":
        return run_dassl(cfg, args)
    from .engine.standalone import run_standalone
    return run_standalone(cfg, args.trainer, eval_only=args.eval_only, model_dir=args.model_dir,
                          load_epoch=args.load_epoch, no_train=args.no_train,
                          notes=config_lines(args))


def _message(exc: Exception) -> str:
    """The message alone: an error raised in a DataLoader worker arrives wrapped in the worker's
    traceback, whose last line holds the original message."""
    message = str(exc) if not isinstance(exc, OSError) else describe_os_error(exc)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(f"{type(exc).__name__}: ", 1)[-1]
    return message


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_args(args)
    except UserError as exc:
        return _fail(args, _message(exc), exc.exit_code)
    except OSError as exc:  # the environment failed: disk full, no permission, a file gone
        # No errno: a file's content is wrong (e.g. an image PIL cannot identify). A DataLoader
        # worker's error arrives without its errno, but with "[Errno N]" in its message.
        environment = exc.errno is not None or re.search(r"\[Errno \d+\]", str(exc))
        code = OutputError.exit_code if environment else UserError.exit_code
        return _fail(args, f"{_message(exc)} ({type(exc).__name__}). Fix that file or folder (a "
                     "file where a folder belongs, permissions, free disk space), then run the "
                     "same command again: training resumes from the last checkpoint in "
                     "--output-dir.", code)
    except KeyboardInterrupt:
        print("textrefiner-train: interrupted", file=sys.stderr)
        return 130
    return 0


def _fail(args, message: str, code: int) -> int:
    """Print the error line, and add it to the run's log.txt when there is one."""
    line = f"textrefiner-train: error: {message}"
    print(line, file=sys.stderr)
    log = os.path.join(args.output_dir, "log.txt")
    if args.output_dir and os.path.isfile(log):
        with contextlib.suppress(OSError):  # the log itself may be what failed
            with open(log, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
