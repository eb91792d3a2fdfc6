"""Run a training command and record the random numbers it draws (tests/test_codebase_runs.py).

    python tests/codebase_train.py RECORD CLIP MODE [CODEBASE] -- ARGS...

MODE: "codebase" runs CODEBASE's own train.py with ARGS; "dropin" runs it with the docs' six
drop-in lines added (the `TR_` trainers); "ours" runs `textrefiner-train ARGS`; "ours-nodassl" runs
it with Dassl.pytorch made unimportable. A codebase loads CLIP through its `clip._download`, which
is pointed to the file CLIP (the codebases take a backbone name, and this machine is offline).

With DUMP_LOADED=<file> set, a codebase run saves the state dicts of its trainer's models when it
first tests (after `--eval-only`'s `load_model`) into that file.

RECORD gets one line per event: in the main process `iter <n> <torch state>` when a loader
starts an epoch and `batch <file names>` per batch; in whichever process augments an image,
`item <pid> <file name> <crop box>` (the process is the main one with 0 loader workers).
"""
import hashlib
import os
import runpy
import sys

import torch
import torch.utils.data
import torchvision.transforms as T
from PIL import Image

RECORD, CLIP, MODE = sys.argv[1:4]
CODEBASE = sys.argv[4] if sys.argv[4] != "--" else ""
ARGS = sys.argv[sys.argv.index("--") + 1:]
MAIN = os.getpid()

def write(line):
    with open(RECORD, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def state():
    return hashlib.md5(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]


def record_loaders():
    loader_iter = torch.utils.data.DataLoader.__iter__
    next_batch = torch.utils.data.dataloader._BaseDataLoaderIter.__next__

    def start(self):
        write(f"iter {len(self.dataset)} {state()}")
        return loader_iter(self)

    def batch(self):
        out = next_batch(self)
        if isinstance(out, dict) and "impath" in out:
            write("batch " + " ".join(os.path.basename(p) for p in out["impath"]))
        return out

    torch.utils.data.DataLoader.__iter__ = start
    torch.utils.data.dataloader._BaseDataLoaderIter.__next__ = batch


def record_augmentations():
    opened = {}
    image_open = Image.open
    get_params = T.RandomResizedCrop.get_params

    def open_image(path, *args, **kwargs):
        image = image_open(path, *args, **kwargs)
        opened["name"] = os.path.basename(str(path))
        return image

    def crop(img, scale, ratio):
        box = get_params(img, scale, ratio)
        pid = "main" if os.getpid() == MAIN else str(os.getpid())
        write(f"item {pid} {opened.get('name')} {box}")
        return box

    Image.open = open_image
    T.RandomResizedCrop.get_params = staticmethod(crop)


def dropin_train_py(text):
    """The codebase's train.py with the drop-in lines of docs/codebase-repos.md."""
    replacements = [
        ("import argparse\n", "import argparse\nimport textrefiner_trainers\n"
         "from textrefiner.config import extend_cfg as tr_extend_cfg, add_refiner_args, "
         "apply_refiner_args, tr_config_file\n"),
        ("def setup_cfg(args):\n", "def setup_cfg(args):\n"
         "    args.config_file = tr_config_file(args.config_file)\n"),
        ("    reset_cfg(cfg, args)\n",
         "    reset_cfg(cfg, args)\n    apply_refiner_args(cfg, args)\n"),
        ("    args = parser.parse_args()\n", "    add_refiner_args(parser)\n"
         "    args = parser.parse_args()\n"),
        ("def setup_cfg(args):\n", "def _extend(cfg):\n    _codebase_extend_cfg(cfg)\n"
         "    tr_extend_cfg(cfg)\n\n\ndef setup_cfg(args):\n"),
        ("    extend_cfg(cfg)\n", "    _extend(cfg)\n"),
        ("def extend_cfg(cfg):\n", "def _codebase_extend_cfg(cfg):\n"),
    ]
    for anchor, replacement in replacements:
        if anchor not in text:
            raise SystemExit(f"train.py has no line {anchor!r} to add the drop-in lines to")
        text = text.replace(anchor, replacement, 1)
    return text


def dump_loaded_models(path):
    """Save what the codebase's trainer holds when it first tests (after `--eval-only`'s
    `load_model`): {model name: state_dict}. Every trainer's `test` (PromptKD has its own) first
    sets its models to eval mode."""
    from dassl.engine.trainer import TrainerBase
    set_model_mode = TrainerBase.set_model_mode

    def dumping_set_model_mode(self, mode="train", names=None):
        if mode == "eval" and not os.path.exists(path):
            torch.save({name: model.state_dict() for name, model in self._models.items()}, path)
        return set_model_mode(self, mode, names)

    TrainerBase.set_model_mode = dumping_set_model_mode


def run_codebase():
    sys.path.insert(0, CODEBASE)
    os.chdir(CODEBASE)
    from clip import clip  # the codebase's own clip package
    clip._download = lambda url, root=None: CLIP
    sys.argv = ["train.py"] + ARGS
    if os.environ.get("DUMP_LOADED"):
        dump_loaded_models(os.environ["DUMP_LOADED"])
    if MODE == "codebase":
        runpy.run_path("train.py", run_name="__main__")
        return
    with open("train.py", encoding="utf-8") as f:
        code = compile(dropin_train_py(f.read()), os.path.join(CODEBASE, "train.py"), "exec")
    exec(code, {"__name__": "__main__", "__file__": os.path.join(CODEBASE, "train.py")})


def main():
    record_loaders()
    record_augmentations()
    if MODE in ("codebase", "dropin"):
        return run_codebase()
    if MODE == "ours-nodassl":
        sys.modules["dassl"] = None  # as where Dassl.pytorch is not installed
    from textrefiner.train import main as train
    return train(ARGS)


if __name__ == "__main__":
    sys.exit(main())
