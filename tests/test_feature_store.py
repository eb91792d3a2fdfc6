"""The feature store: exact logits with and without it, keys that never hit wrongly, refusal for
methods that prompt the image side, and safety when runs overlap, die or find broken files."""
import json
import os
import signal
import struct
import subprocess
import sys

import pytest
import torch

from conftest import HANG_TIMEOUT
from textrefiner.engine.standalone import StandaloneTrainer
from textrefiner.feature_store import (MAGIC, TMP_PREFIX, FeatureStore, batch_entry_keys,
                                       image_key, model_key, store_refusal)
from textrefiner.methods import method_class
from textrefiner.train import build_parser, main, setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"CoOp": "CoOp/demo_cpu.yaml", "CoCoOp": "CoOp/demo_cpu.yaml",
           "ZeroshotCLIP": "CoOp/demo_cpu.yaml", "MaPLe": "CoOp/demo_cpu.yaml"}


def run_args(demo, out, trainer="CoOp", store=None, refiner=False, *opts):
    args = ["--engine", "standalone", "--root", demo["root"], "--trainer", trainer, "--seed", "1",
            "--dataset-config-file", "configs/datasets/synthetic_shapes.yaml",
            "--config-file", f"configs/trainers/{CONFIGS[trainer]}", "--output-dir",
            str(out), "MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "2",
            "DATASET.SUBSAMPLE_CLASSES", "new", "DATALOADER.TEST.BATCH_SIZE", "7",
            "TRAINER.COCOOP.PREC", "fp32", "TRAINER.COCOOP.N_CTX", "4",
            "TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", "2"]
    if store is not None:
        args[:0] = ["--feature-store", str(store)]
    if refiner:
        args[:0] = ["--refiner"]
    return args + list(opts)


def eval_logits(args):
    """The test logits of a run built from command-line args (the standalone engine's batches)."""
    trainer = StandaloneTrainer(setup_cfg(build_parser().parse_args(args)), args[args.index(
        "--trainer") + 1])
    torch.manual_seed(3)  # a trained-looking refiner cache and prompts, the same in every run
    with torch.no_grad():
        for param in trainer.model.trainable_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    trainer.model.eval()
    with torch.no_grad():
        logits = torch.cat([logits for logits, _ in trainer._eval_batches(trainer.splits.test)])
    return logits, trainer


@pytest.mark.parametrize("trainer, refiner, opts", [
    ("CoOp", True, ("TRAINER.COOP.PREC", "fp16")),
    ("CoOp", False, ("TRAINER.COOP.PREC", "amp")),
    ("CoCoOp", True, ()),
    ("ZeroshotCLIP", False, ()),
])
def test_logits_identical_with_cold_and_warm_store(demo, tmp_path, trainer, refiner, opts):
    store = tmp_path / "store"
    plain, _ = eval_logits(run_args(demo, tmp_path / "a", trainer, None, refiner, *opts))
    cold, first = eval_logits(run_args(demo, tmp_path / "b", trainer, store, refiner, *opts))
    warm, second = eval_logits(run_args(demo, tmp_path / "c", trainer, store, refiner, *opts))
    assert plain.dtype == cold.dtype == warm.dtype
    assert torch.equal(plain, cold) and torch.equal(plain, warm)
    n = len(first.splits.test)
    assert f"feature store: 0 of {n} images read, {n} computed" in "\n".join(first.log.buffer)
    assert f"feature store: {n} of {n} images read, 0 computed" in "\n".join(second.log.buffer)


def test_entries_are_per_test_batch(demo, tmp_path):
    """An image's features can differ in the last bits with the batch it runs in, so entries
    written in other batches (the base half, batch 5) are not used for the full test set (batch
    7); the same split in the same batches hits, whatever the method."""
    store = tmp_path / "store"
    eval_logits(run_args(demo, tmp_path / "a", "CoOp", store, True, "DATASET.SUBSAMPLE_CLASSES",
                         "base", "DATALOADER.TEST.BATCH_SIZE", "5"))
    plain, _ = eval_logits(run_args(demo, tmp_path / "b", "CoOp", None, True,
                                    "DATASET.SUBSAMPLE_CLASSES", "all"))
    mixed, trainer = eval_logits(run_args(demo, tmp_path / "c", "CoOp", store, True,
                                          "DATASET.SUBSAMPLE_CLASSES", "all"))
    assert torch.equal(plain, mixed)
    assert "0 of 100 images read, 100 computed" in "\n".join(trainer.log.buffer)
    for name in ("ZeroshotCLIP", "CoCoOp"):
        _, trainer = eval_logits(run_args(demo, tmp_path / name, name, store, False,
                                          "DATASET.SUBSAMPLE_CLASSES", "all"))
        assert "100 of 100 images read, 0 computed" in "\n".join(trainer.log.buffer)


def test_batch_entry_keys():
    keys = batch_entry_keys(["a", "b", "c", "d", "e"], 2)
    assert len(set(keys)) == 5 and keys[4].endswith("-0")
    assert keys[:2] == batch_entry_keys(["a", "b"], 2)
    assert keys[:2] != batch_entry_keys(["a", "b", "c"], 3)[:2]
    assert batch_entry_keys(["b", "a"], 2)[1] != keys[0]


def test_cli_run_with_store_reports_same_accuracy(demo, tmp_path):
    store = tmp_path / "store"
    for out, flag in (("plain", None), ("cold", store), ("warm", store)):
        assert main(["--eval-only"] + run_args(demo, tmp_path / out, "ZeroshotCLIP", flag)) == 0
    accuracy = [line for out in ("plain", "cold", "warm")
                for line in (tmp_path / out / "log.txt").read_text().splitlines()
                if "* accuracy" in line]
    assert len(set(accuracy)) == 1 and len(accuracy) == 3
    assert "images read" in (tmp_path / "warm" / "log.txt").read_text()


# ---------------------------------------------------------------------------------------- keys
def test_model_key_changes_with_weights_transform_precision_and_device(small_clip, tmp_path):
    from contextlib import nullcontext

    import torchvision.transforms as T

    from textrefiner.clip_backbone import build_random_clip

    cpu = torch.device("cpu")
    transform = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
    base = model_key(small_clip.visual, transform, "fp32", cpu, nullcontext)
    assert base == model_key(small_clip.visual, transform, "fp32", cpu, nullcontext)
    other_weights = build_random_clip(embed_dim=32, image_resolution=32, vision_layers=3,
                                      vision_width=128, vision_patch_size=8, transformer_width=64,
                                      transformer_layers=3, seed=1).float()
    one_bit = {k: v.clone() for k, v in small_clip.visual.state_dict().items()}
    one_bit["proj"].view(-1).view(torch.int32)[0] ^= 1  # one bit of one weight
    small_clip_bit = build_random_clip(embed_dim=32, image_resolution=32, vision_layers=3,
                                       vision_width=128, vision_patch_size=8,
                                       transformer_width=64, transformer_layers=3).float()
    small_clip_bit.visual.load_state_dict(one_bit)
    bilinear = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR),
                          T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
    other_norm = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
                            T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.2] * 3)])
    variants = [
        model_key(other_weights.visual, transform, "fp32", cpu, nullcontext),
        model_key(small_clip_bit.visual, transform, "fp32", cpu, nullcontext),
        model_key(small_clip.visual, bilinear, "fp32", cpu, nullcontext),
        model_key(small_clip.visual, other_norm, "fp32", cpu, nullcontext),
        model_key(small_clip.visual, transform, "amp", cpu,
                  lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        model_key(small_clip.visual.half(), transform, "fp16", cpu, nullcontext),
    ]
    keys = variants + [base, dict(base, device="cuda:NVIDIA H200")]
    folders = {FeatureStore(str(tmp_path), key).folder for key in keys}
    assert len(folders) == len(keys)


def test_image_key_changes_with_path_size_and_mtime(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"12345")
    first = image_key(str(image))
    assert first == image_key(str(image))
    os.utime(image, ns=(10 ** 18, 10 ** 18 + 1))
    touched = image_key(str(image))
    image.write_bytes(b"123456")
    os.utime(image, ns=(10 ** 18, 10 ** 18 + 1))
    resized = image_key(str(image))
    copy = tmp_path / "b.png"
    copy.write_bytes(b"123456")
    os.utime(copy, ns=(10 ** 18, 10 ** 18 + 1))
    assert len({first, touched, resized, image_key(str(copy))}) == 4


def test_changed_image_is_a_miss_and_recomputed(demo, tmp_path):
    """Rewriting a test image in place (same path) must not return its old features."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo["root"], root)
    local = dict(demo, root=str(root))
    store = tmp_path / "store"
    eval_logits(run_args(local, tmp_path / "a", "CoOp", store))
    _, trainer = eval_logits(run_args(local, tmp_path / "b", "CoOp", store))
    first = trainer.splits.test[0].impath
    other = trainer.splits.test[-1].impath
    shutil.copyfile(other, first)  # new content, new mtime, same path
    plain, _ = eval_logits(run_args(local, tmp_path / "c", "CoOp", None))
    stored, trainer = eval_logits(run_args(local, tmp_path / "d", "CoOp", store))
    assert torch.equal(plain, stored)
    n = len(trainer.splits.test)
    # its batch (the first, 7 images) is computed again
    assert f"{n - 7} of {n} images read, 7 computed" in "\n".join(trainer.log.buffer)


# ------------------------------------------------------------------------------------- refusal
@pytest.mark.parametrize("name", ["MaPLe", "PromptSRC", "PromptKD"])
def test_methods_that_prompt_the_image_side_refuse(name):
    assert "prompts or trains the image encoder" in store_refusal(method_class(name))


@pytest.mark.parametrize("name", ["CoOp", "CoCoOp", "ZeroshotCLIP"])
def test_frozen_image_side_methods_use_it(name):
    assert store_refusal(method_class(name)) == ""


def test_maple_says_in_the_log_that_it_does_not_use_the_store(demo, tmp_path):
    store = tmp_path / "store"
    plain, _ = eval_logits(run_args(demo, tmp_path / "a", "MaPLe"))
    logits, trainer = eval_logits(run_args(demo, tmp_path / "b", "MaPLe", store))
    assert torch.equal(plain, logits)
    assert any(line.startswith("feature store: not used: MaPLe prompts or trains the image")
               for line in trainer.log.buffer)
    assert not store.exists()


# ------------------------------------------------------------------------------- broken files
def small_store(tmp_path, log):
    return FeatureStore(str(tmp_path / "store"), {"test": 1}, log)


def test_round_trip_keeps_dtype_and_bits(tmp_path):
    store = small_store(tmp_path, print)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        features = torch.randn(3, 5).to(dtype)
        keys = [f"{dtype}-{i}" for i in range(3)]
        store.write("g", keys, features)
        found = store.read("g", keys)
        restored = torch.stack([found[k] for k in keys])
        assert restored.dtype == dtype and torch.equal(restored.view(torch.uint8),
                                                       features.view(torch.uint8))


def foreign_header(header):
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("damage", ["truncate", "foreign", "flip", "empty", "trailing",
                                    "no rows", "list keys", "not a dtype"])
def test_broken_file_is_reported_once_set_aside_and_recomputed(tmp_path, damage):
    lines = []
    store = small_store(tmp_path, lines.append)
    keys = ["a", "b", "c"]
    path = store.write("g", keys, torch.arange(6, dtype=torch.float32).reshape(3, 2))
    data = open(path, "rb").read()
    broken = {"truncate": data[:-5], "foreign": b"PK\x03\x04 a zip file" + data[20:],
              "flip": data[:-1] + bytes([data[-1] ^ 1]), "empty": b"",
              "trailing": data + b"\0",
              "no rows": foreign_header({"dtype": "float32", "shape": [0, 2], "keys": [],
                                         "digest": ""}),
              "list keys": foreign_header({"dtype": "float32", "shape": [1, 2], "keys": [["a"]],
                                           "digest": ""}),
              "not a dtype": foreign_header({"dtype": "nn", "shape": [1, 2], "keys": ["a"],
                                             "digest": ""})}[damage]
    with open(path, "wb") as handle:
        handle.write(broken)
    assert store.read("g", keys) == {}
    assert len(lines) == 1 and path in lines[0] and "moved aside" in lines[0]
    assert os.path.exists(path + ".bad") and not os.path.exists(path)
    store.write("g", keys, torch.ones(3, 2))  # what the next evaluation does
    assert torch.equal(torch.stack(list(store.read("g", keys).values())), torch.ones(3, 2))
    assert len(lines) == 1


def test_truncated_file_in_a_real_run_gives_the_right_logits(demo, tmp_path):
    store = tmp_path / "store"
    plain, _ = eval_logits(run_args(demo, tmp_path / "a", "CoOp", None))
    eval_logits(run_args(demo, tmp_path / "b", "CoOp", store))
    files = sorted(str(p) for p in store.rglob("*.feat"))
    with open(files[0], "r+b") as handle:
        handle.truncate(os.path.getsize(files[0]) // 2)
    logits, trainer = eval_logits(run_args(demo, tmp_path / "c", "CoOp", store))
    assert torch.equal(plain, logits)
    log = "\n".join(trainer.log.buffer)
    assert log.count("is not a complete store file") == 1 and "truncated" in log


# --------------------------------------------------------------------------------- concurrency
WRITER = """
import sys, torch
from textrefiner.feature_store import FeatureStore
root, name, count, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = FeatureStore(root, {"test": 1})
for i in range(count):
    keys = [f"k{(i * 3 + j) % 40}" for j in range(rows)]
    store.write("g", keys, torch.stack([torch.full((64,), float(k[1:])) for k in keys]))
print("done", flush=True)
"""


def writer(tmp_path, name, count, rows=8, **environ):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **environ)
    return subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "store"), name,
                             str(count), str(rows)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def check_store(tmp_path):
    lines = []
    found = small_store(tmp_path, lines.append).read("g", [f"k{i}" for i in range(40)])
    for key, row in found.items():
        assert torch.equal(row, torch.full((64,), float(key[1:])))
    return found, lines


def test_two_processes_writing_at_once_lose_and_corrupt_nothing(tmp_path):
    procs = [writer(tmp_path, name, 60) for name in ("a", "b", "c")]
    for proc in procs:
        out, err = proc.communicate(timeout=HANG_TIMEOUT)
        assert proc.returncode == 0 and "done" in out, err
    found, lines = check_store(tmp_path)
    assert len(found) == 40 and lines == []
    assert len(list((tmp_path / "store").rglob("*.feat"))) == 180  # every file of every writer


def test_killed_writer_leaves_a_readable_store_and_its_temporary_file_is_removed(tmp_path):
    """The writer kills itself (TEXTREFINER_KILL_AT) with its third file written to a temporary
    file, not yet renamed: the store holds its first two files, and the next reader removes the
    dead writer's temporary file."""
    proc = writer(tmp_path, "a", 10, TEXTREFINER_KILL_AT="store_write=3")
    _, err = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, err
    assert "TEXTREFINER_KILL_AT=store_write=3: killed process" in err, err
    group = next((tmp_path / "store").rglob("g"))
    left = [p.name for p in group.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(left) == 1 and left[0].startswith(
        f"{TMP_PREFIX}{__import__('socket').gethostname()}-{proc.pid}-"), left
    assert len(list(group.glob("*.feat"))) == 2
    found, lines = check_store(tmp_path)
    assert sorted(found) == sorted(f"k{i}" for i in range(11)) and lines == []  # files 0 and 1
    assert not any(p.name.startswith(TMP_PREFIX) for p in group.iterdir())


def test_flag_sets_the_config_key_and_is_off_by_default(demo, tmp_path):
    cfg = setup_cfg(build_parser().parse_args(run_args(demo, tmp_path, "CoOp", tmp_path / "s")))
    assert cfg.TEST.FEATURE_STORE == str(tmp_path / "s")
    assert setup_cfg(build_parser().parse_args(run_args(demo, tmp_path))).TEST.FEATURE_STORE == ""


def test_two_evaluations_at_once_share_the_store(demo, tmp_path):
    """Two real runs (processes) fill the same store at once; a third reads everything."""
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "textrefiner.train", "--eval-only"]
                              + run_args(demo, tmp_path / name, "CoOp", store, True), cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=HANG_TIMEOUT)
        assert proc.returncode == 0, err[-2000:]
    logs = [(tmp_path / name / "log.txt").read_text() for name in ("a", "b")]
    plain, _ = eval_logits(run_args(demo, tmp_path / "c", "CoOp", None, True))
    stored, trainer = eval_logits(run_args(demo, tmp_path / "d", "CoOp", store, True))
    assert torch.equal(plain, stored)
    n = len(trainer.splits.test)
    assert f"{n} of {n} images read, 0 computed" in "\n".join(trainer.log.buffer)
    assert all("images read" in log and "not a complete" not in log for log in logs)


def test_resnet_backbone_gives_the_same_logits_through_the_store(demo, tmp_path,
                                                                 resnet_clip_path):
    """The store keys off what the model computed, whatever the image encoder is."""
    store = tmp_path / "store"
    opts = ("MODEL.BACKBONE.PATH", resnet_clip_path, "INPUT.SIZE", "(96, 96)")
    plain, _ = eval_logits(run_args(demo, tmp_path / "a", "CoOp", None, True, *opts))
    cold, _ = eval_logits(run_args(demo, tmp_path / "b", "CoOp", store, True, *opts))
    warm, trainer = eval_logits(run_args(demo, tmp_path / "c", "CoOp", store, True, *opts))
    assert torch.equal(plain, cold) and torch.equal(plain, warm)
    n = len(trainer.splits.test)
    assert f"{n} of {n} images read, 0 computed" in "\n".join(trainer.log.buffer)
    assert len({p.parent.parent for p in store.rglob("*.feat")}) == 1  # one model key
