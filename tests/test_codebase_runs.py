"""Same seed, same run: a whole training run equals its codebase's, on either engine.

Against the codebases (checkouts in TEXTREFINER_CODEBASES, Dassl.pytorch importable): the
codebase's own train.py, `textrefiner-train` on the Dassl engine, on the built-in engine without
Dassl, and the drop-in (the codebase's train.py with docs/codebase-repos.md's lines, `TR_` trainer),
3 epochs on an EuroSAT-layout fixture, fp32, CPU, with 0 and 2 loader workers: the same batches,
the same crops, the same torch random state at every epoch's start, the same first logged loss (4
decimals, compared first) and the learned tensors within 1e-5. `test_fixture_matrix` varies the
fixture on purpose for PromptSRC and PromptKD (shots, batch sizes, learning rates, prompt depths,
GPA, KD weights, teacher widths, images larger and smaller than the CLIP's input), each case the
codebase's run against one engine. Without the codebases: CoOp and CoOp + TextRefiner see the same
data, on both engines, and tests/test_codebase_order.py checks bit for bit the float operations
these runs need in their codebases' order.

PromptSRC's and PromptKD's train.py call `.cuda()` unconditionally and halve their prompts whatever
PREC says: they run with tests/cpu_fp32_probe on their PYTHONPATH (its docstring says what it
changes), which gives their `PREC fp32` run on the CPU. Their CLIP files are half precision, as
OpenAI publishes CLIP: on a GPU those codebases halve CLIP before loading its weights, which the
probe skips, so a float32 file would give them other weights than an fp32 run has.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import HANG_TIMEOUT
from textrefiner.clip_backbone import save_random_clip
from textrefiner.configs import CONFIG_DIR as CONFIGS
from textrefiner.data import write_synthetic_dataset
from textrefiner.data.base import read_split_json, write_split_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "codebase_train.py")
HAS_DASSL = importlib.util.find_spec("dassl") is not None
CODEBASES = [p for p in os.environ.get("TEXTREFINER_CODEBASES", "").split(os.pathsep) if p]
TOLERANCE = 1e-5

# method -> (a file only its codebase has, trainer config there, opts, checkpoint folder)
METHODS = {
    "CoOp": ("trainers/coop.py", "CoOp/vit_b16_ep50_ctxv1.yaml",
             ("TRAINER.COOP.PREC", "fp32", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"),
             "prompt_learner"),
    "CoCoOp": ("trainers/cocoop.py", "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
               ("TRAINER.COCOOP.PREC", "fp32", "DATALOADER.TRAIN_X.BATCH_SIZE", "4"),
               "prompt_learner"),
    # MaPLe's codebase casts its projection to half precision whatever PREC says, so its fp32 runs
    # fail ("mat1 and mat2 must have the same dtype"): compared in fp16 (slow on a CPU: one
    # epoch, and to fp16's rounding)
    "MaPLe": ("trainers/maple.py", "MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
              ("TRAINER.MAPLE.PREC", "fp16", "TRAINER.MAPLE.PROMPT_DEPTH", "2",
               "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "1"),
              "MultiModalPromptLearner"),
}
IVLP_OPTS = ("PREC", "fp32", "PROMPT_DEPTH_TEXT", "2", "PROMPT_DEPTH_VISION", "2")
METHODS["PromptSRC"] = (
    "trainers/promptsrc.py", "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
    sum(((f"TRAINER.PROMPTSRC.{k}", v) for k, v in zip(IVLP_OPTS[::2], IVLP_OPTS[1::2])), ()) +
    ("TRAINER.PROMPTSRC.GPA_MEAN", "2", "TRAINER.PROMPTSRC.GPA_STD", "1", "OPTIM.LR", "0.0025"),
    "VLPromptLearner")
# A ViT-B/16-wide student and a ViT-L/14-wide teacher see the same images: 112 px
METHODS["PromptKD"] = (
    "trainers/promptkd.py", "PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml",
    sum(((f"TRAINER.PROMPTKD.{k}", v) for k, v in zip(IVLP_OPTS[::2], IVLP_OPTS[1::2])), ()) +
    ("TRAINER.PROMPTKD.KD_WEIGHT", "1000.0", "TRAINER.MODAL", "base2novel", "INPUT.SIZE",
     "(112, 112)", "DATASET.NUM_SHOTS", "0", "OPTIM.LR", "0.005"), "VLPromptLearner")
NOT_IN = {"PromptSRC": "trainers/promptkd.py"}  # PromptKD's checkout has PromptSRC's trainer too
PROBED = {"PromptSRC", "PromptKD"}
PROBE = os.path.join(REPO, "tests", "cpu_fp32_probe")
# PromptKD's projector's BatchNorm statistics are means and variances of its hidden layer, whose
# inputs are un-normalised image features: they scale any rounding difference, so their margin is
# relative to their largest value (measured 0 on this CPU, every learned tensor bit for bit in
# every fixture here; the margins are issue 41's).
STATISTICS = ("running_mean", "running_var")
STATISTICS_RELATIVE_TOLERANCE = 5e-4
EPOCHS = {"MaPLe": 1}
TOLERANCES = {"MaPLe": 1e-3}
CASES = [(method, workers) for method in METHODS for workers in (0, 2)
         if not (method == "MaPLe" and workers)]
# MaPLe's codebase projects 512-wide text prompts to 768-wide vision prompts (ViT-B/16's widths)
WIDE = {"MaPLe", "PromptSRC"}
WIDE_CLIP = dict(embed_dim=512, image_resolution=32, vision_layers=2, vision_width=768,
                 vision_patch_size=16, transformer_width=512, transformer_layers=2)
LARGE_CLIP = dict(embed_dim=768, image_resolution=112, vision_layers=2, vision_width=1024,
                  vision_patch_size=14, transformer_width=768, transformer_layers=2)
# The matrix's CLIPs: patches of 8 px (16 local tokens at 32 px), and a teacher narrower than
# ViT-L/14 (ViT-B/16's tower widths) with the 768-wide joint space PromptKD's projector writes to.
MATRIX_CLIPS = {"wide_patch8": dict(WIDE_CLIP, vision_patch_size=8),
                "teacher_b16": dict(WIDE_CLIP, image_resolution=112, embed_dim=768)}
COMMON_OPTS = ("INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "3", "OPTIM.WARMUP_EPOCH", "0",
               "DATASET.NUM_SHOTS", "4", "TRAIN.PRINT_FREQ", "1", "OPTIM.LR", "0.01")


# The matrix: fixtures varied on purpose, each the codebase's run against one engine, both engines
# and 0/2 loader workers across it. id: (method, CLIP, teacher CLIP (PromptKD), engine, loader
# workers, options over METHODS' and COMMON_OPTS). PromptSRC's cases read 64 px images
# (eurosat64_root) into 32 px CLIPs, PromptKD's 48 px images (eurosat_root) into 112 px ones.
MATRIX = {
    # issue 41's: 16 local tokens, 4 shots, batch 4, its config's LR 0.0025, depth 2/2, GPA 2/1
    "PromptSRC-patch8-4shots-batch4": ("PromptSRC", "wide_patch8", "", "standalone", 0, (
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4")),
    "PromptSRC-1shot-batch1-lr0.05-depth1/2-gpa1/2": ("PromptSRC", "wide", "", "dassl", 2, (
        "DATASET.NUM_SHOTS", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "1", "OPTIM.LR", "0.05",
        "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "1", "TRAINER.PROMPTSRC.GPA_MEAN", "1",
        "TRAINER.PROMPTSRC.GPA_STD", "2")),
    "PromptSRC-16shots-batch32-lr0.01-depth2/1-gpa3/3": (
        "PromptSRC", "wide_patch8", "", "standalone", 2, (
            "DATASET.NUM_SHOTS", "16", "DATALOADER.TRAIN_X.BATCH_SIZE", "32", "OPTIM.LR", "0.01",
            "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "1", "TRAINER.PROMPTSRC.GPA_MEAN", "3",
            "TRAINER.PROMPTSRC.GPA_STD", "3")),
    "PromptKD-kd1-teacherB16-batch16-lr0.05": ("PromptKD", "wide112", "teacher_b16", "dassl", 0, (
        "TRAINER.PROMPTKD.KD_WEIGHT", "1.0", "DATALOADER.TRAIN_X.BATCH_SIZE", "16",
        "OPTIM.LR", "0.05")),
    "PromptKD-kd10-teacherL14-batch4": ("PromptKD", "wide112", "large", "standalone", 2, (
        "TRAINER.PROMPTKD.KD_WEIGHT", "10.0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4")),
}


def codebase_of(method):
    relative = METHODS[method][0]
    found = [repo for repo in CODEBASES if os.path.isfile(os.path.join(repo, relative))
             and not os.path.isfile(os.path.join(repo, NOT_IN.get(method, "-")))]
    if not found:
        pytest.skip(f"no checkout in TEXTREFINER_CODEBASES holds {relative}")
    if not HAS_DASSL:
        pytest.skip("the codebases run on Dassl.pytorch, which is not installed")
    return found[0]


@pytest.fixture(scope="module")
def eurosat_root(tmp_path_factory):
    """Synthetic shapes in EuroSAT's layout (<root>/eurosat/2750, split_zhou_EuroSAT.json), which
    the CoOp codebase's reader and ours read alike."""
    return eurosat_layout(tmp_path_factory.mktemp("eurosat_fixture"), num_classes=6,
                          per_class_train=8, per_class_val=4, per_class_test=4, image_size=48)


def eurosat_layout(root, **sizes):
    """Synthetic shapes (`write_synthetic_dataset(**sizes)`, seed 3) in EuroSAT's layout under
    `root`; returns it."""
    folder = write_synthetic_dataset(str(root / "shapes"), seed=3, **sizes)
    images = root / "eurosat" / "2750"
    images.parent.mkdir()
    shutil.move(os.path.join(folder, "images"), str(images))
    splits = read_split_json(os.path.join(folder, "split_zhou_SyntheticShapes.json"), str(images))
    write_split_json(str(images.parent / "split_zhou_EuroSAT.json"), *splits, str(images))
    return str(root)


@pytest.fixture(scope="module")
def eurosat64_root(tmp_path_factory):
    """As `eurosat_root` with 10 classes of 16 training images each, 64 px (twice the CLIP's
    input in PromptSRC's cases)."""
    return eurosat_layout(tmp_path_factory.mktemp("eurosat64_fixture"), num_classes=10,
                          per_class_train=16, per_class_val=4, per_class_test=4, image_size=64)


@pytest.fixture(scope="module")
def wide_clip(tmp_path_factory):
    """A random CLIP with ViT-B/16's widths and two layers per tower."""
    return save_random_clip(str(tmp_path_factory.mktemp("clip") / "wide_clip.pt"), **WIDE_CLIP)


@pytest.fixture(scope="module")
def half_clips(tmp_path_factory):
    """ViT-B/16-wide CLIPs at 32 and 112 px, a ViT-L/14-wide one at 112 px and the matrix's
    (MATRIX_CLIPS), two layers each, in half precision (see the module's docstring)."""
    folder = tmp_path_factory.mktemp("half_clip")
    clips = {}
    for name, dims in (("wide", WIDE_CLIP), ("wide112", dict(WIDE_CLIP, image_resolution=112)),
                       ("large", LARGE_CLIP), *MATRIX_CLIPS.items()):
        path = save_random_clip(str(folder / f"{name}.pt"), **dims)
        state = torch.load(path, weights_only=True)
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
        clips[name] = path
    return clips


@pytest.fixture(scope="module")
def promptkd_codebase(eurosat_root, half_clips, tmp_path_factory):
    """A copy of PromptKD's checkout for the ViT-B/16-wide student at 112 px and a ViT-L/14-wide
    teacher (`promptkd_checkout`)."""
    return promptkd_checkout(tmp_path_factory.mktemp("promptkd"), eurosat_root,
                             half_clips["wide112"], half_clips["large"])


def promptkd_checkout(folder, eurosat_root, student_clip, teacher_clip):
    """A copy of PromptKD's checkout in `folder` with the files it reads from fixed places: its
    CLIPs (`clip/ViT-B-16.pt`, `clip/ViT-L-14.pt`, whatever their widths) and a teacher trained
    for one epoch by the PromptSRC trainer of that checkout
    (`teacher_model/EuroSAT/VLPromptLearner/`)."""
    copy = os.path.join(str(folder), "PromptKD")
    shutil.copytree(codebase_of("PromptKD"), copy, ignore=shutil.ignore_patterns(".git"))
    shutil.copy(student_clip, os.path.join(copy, "clip", "ViT-B-16.pt"))
    shutil.copy(teacher_clip, os.path.join(copy, "clip", "ViT-L-14.pt"))
    out = os.path.join(str(folder), "teacher")
    shutil.rmtree(os.path.join(eurosat_root, "eurosat", "split_fewshot"), ignore_errors=True)
    run("codebase", os.path.join(str(folder), "teacher.txt"), teacher_clip, [
        "--root", eurosat_root, "--seed", "1", "--trainer", "PromptSRC", "--output-dir", out,
        "--dataset-config-file", os.path.join(copy, "configs", "datasets", "eurosat.yaml"),
        "--config-file", os.path.join(copy, "configs", "trainers", "PromptSRC",
                                      "vit_l14_c2_ep20_batch8_4+4ctx.yaml"),
        "INPUT.SIZE", "(112, 112)", "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0",
        "DATASET.NUM_SHOTS", "4", "DATALOADER.NUM_WORKERS", "0",
        "TRAINER.PROMPTSRC.GPA_MEAN", "1"] + [
        f"TRAINER.PROMPTSRC.{k}" if i % 2 == 0 else k for i, k in enumerate(IVLP_OPTS)],
        copy, **probe_env())
    teacher = os.path.join(copy, "teacher_model", "EuroSAT", "VLPromptLearner")
    os.makedirs(teacher)
    shutil.copy(os.path.join(out, "VLPromptLearner", "model.pth.tar-1"),
                os.path.join(teacher, "model-best.pth.tar"))
    return copy


def probe_env():
    """PYTHONPATH with tests/cpu_fp32_probe first."""
    paths = [PROBE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def run(mode, record, clip, args, codebase="", **env_vars):
    """Run the runner (tests/codebase_train.py); returns the recorded lines."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars)
    if mode == "ours-nodassl":  # Dassl on PYTHONPATH only: leave it out
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if "Dassl" not in p)
    command = [sys.executable, RUNNER, str(record), clip, mode] + (
        [codebase] if codebase else []) + ["--"] + list(args)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(record, encoding="utf-8") as f:
        return f.read().splitlines()


def first_loss(folder):
    """The first batch's loss as the run's log.txt in `folder` writes it (4 decimals)."""
    with open(os.path.join(str(folder), "log.txt"), encoding="utf-8") as f:
        found = re.search(r"batch \[1/\d+\].*?\bloss (\d+\.\d{4})\b", f.read())
    assert found, f"no first batch's loss in {folder}/log.txt"
    return found.group(1)


def stream(lines):
    """(main-process events in order, each loader worker's augmentations in order, sorted)."""
    main = [line for line in lines if not line.startswith("item ") or line.split()[1] == "main"]
    workers = {}
    for line in lines:
        if line.startswith("item ") and line.split()[1] != "main":
            workers.setdefault(line.split()[1], []).append(line.split(" ", 2)[2])
    return main, sorted(workers.values())


def learned(path):
    """The learned tensors of a checkpoint by codebase name (`ctx`, `meta_net.*`, or MaPLe's
    `prompt_learner.*`), CLIP's frozen weights left out."""
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    state = {k: v for k, v in state.items() if "token_prefix" not in k and "token_suffix" not in k}
    if "image_encoder.VPT" in state:  # PromptSRC, PromptKD: prompts, PromptKD's projector
        return {k: v for k, v in state.items() if "VPT" in k or k == "prompt_learner.ctx"}
    if any(k.startswith("prompt_learner.") for k in state):
        return {k: v for k, v in state.items() if k.startswith("prompt_learner.")}
    return state


def learned_keys(state):
    """The keys of the learned tensors of a checkpoint's state_dict."""
    return [k for k in state if "token_prefix" not in k and "token_suffix" not in k
            and (k.startswith("prompt_learner.") or "." not in k or k.startswith("meta_net.")
                 or "VPT" in k)]


def assert_same_tensors(ours, theirs, what, tolerance=TOLERANCE):
    ours = {k.replace("prompt_learner.", "", 1) if k.replace("prompt_learner.", "", 1) in theirs
            else k: v for k, v in ours.items()}
    assert sorted(ours) == sorted(theirs), what
    for key, value in theirs.items():
        diff = (ours[key].float() - value.float()).abs().max().item()
        bound = STATISTICS_RELATIVE_TOLERANCE * value.float().abs().max().item() \
            if key.endswith(STATISTICS) else tolerance
        assert diff <= bound, f"{what}: {key} differs by {diff}"


@pytest.mark.parametrize("method, workers", CASES)
def test_a_seed_gives_the_codebase_run(eurosat_root, demo, tmp_path, request, method, workers):
    codebase = codebase_of(method)
    clip = request.getfixturevalue("wide_clip") if method in WIDE else demo["clip"]
    _, config, opts, folder = METHODS[method]
    probe, ours_opts = {}, []
    if method in PROBED:
        probe = probe_env()
        clip = request.getfixturevalue("half_clips")["wide"]
    if method == "PromptKD":
        codebase = request.getfixturevalue("promptkd_codebase")
        clip = request.getfixturevalue("half_clips")["wide112"]
        ours_opts = ["TRAINER.PROMPTKD.TEACHER_PATH", request.getfixturevalue("half_clips")[
            "large"], "TRAINER.PROMPTKD.TEACHER_CKPT", os.path.join(
            codebase, "teacher_model", "EuroSAT", "VLPromptLearner", "model-best.pth.tar")]
    args = ["--root", eurosat_root, "--seed", "1",
            "--dataset-config-file", os.path.join(codebase, "configs", "datasets", "eurosat.yaml"),
            "--config-file", os.path.join(codebase, "configs", "trainers", config)]
    opts = list(COMMON_OPTS + opts) + ["DATALOADER.NUM_WORKERS", str(workers)]
    ours_opts = opts + ["MODEL.BACKBONE.PATH", clip] + ours_opts
    runs = {
        "codebase": ("codebase", args + ["--trainer", method], opts),
        "drop-in": ("dropin", args + ["--trainer", "TR_" + method], ours_opts),
        "dassl engine": ("ours", ["--engine", "dassl"] + args + ["--trainer", method], ours_opts),
        "built-in engine": ("ours-nodassl", ["--engine", "standalone"] + args + [
            "--trainer", method], ours_opts),
    }
    results = {}
    for name, (mode, run_args, run_opts) in runs.items():
        out = tmp_path / name.replace(" ", "_")
        shutil.rmtree(os.path.join(eurosat_root, "eurosat", "split_fewshot"), ignore_errors=True)
        lines = run(mode, tmp_path / f"{out.name}.txt", clip,
                    run_args + ["--output-dir", str(out)] + run_opts, codebase,
                    **(probe if mode in ("codebase", "dropin") else {}))
        final = out / folder / f"model.pth.tar-{EPOCHS.get(method, 3)}"
        results[name] = (first_loss(out), stream(lines), learned(str(final)))
    loss, (main, workers_seen), theirs = results.pop("codebase")
    assert sum(line.startswith("batch ") for line in main) >= 6 and (
        workers_seen if workers else any(line.startswith("item main") for line in main))
    for name, (our_loss, (our_main, our_workers), ours) in results.items():
        assert our_loss == loss, f"{name}: first loss {our_loss}, the codebase's {loss}"
        assert our_main == main, f"{name}: other batches, crops or random states"
        assert our_workers == workers_seen, f"{name}: other crops in the loader workers"
        assert_same_tensors(ours, theirs, name, TOLERANCES.get(method, TOLERANCE))

    # The codebase's own --eval-only reads the file the built-in engine wrote as its own.
    epochs = EPOCHS.get(method, 3)
    dump = tmp_path / "loaded.pt"
    run("codebase", tmp_path / "eval.txt", clip, args + [
        "--trainer", method, "--output-dir", str(tmp_path / "eval"), "--eval-only",
        "--model-dir", str(tmp_path / "built-in_engine"), "--load-epoch", str(epochs)] + opts,
        codebase, DUMP_LOADED=str(dump), **probe)
    loaded = torch.load(str(dump), weights_only=False)[folder]
    saved = torch.load(str(tmp_path / "built-in_engine" / folder / f"model.pth.tar-{epochs}"),
                       weights_only=True)["state_dict"]
    trained = learned_keys(saved)
    assert trained
    for key in trained:
        assert torch.equal(loaded[key], saved[key].to(loaded[key].dtype)), key
    if method == "PromptKD":  # every learned tensor arrived, the projector's included
        assert sum(k.startswith("VPT_image_trans.conv1.") for k in trained) == 9


@pytest.mark.parametrize("case", MATRIX)
def test_fixture_matrix(eurosat_root, eurosat64_root, half_clips, tmp_path, case):
    """The codebase's run and one engine's in a MATRIX fixture: the same first logged loss (to its
    4 decimals, compared first), batches and crops, and every learned tensor within 1e-5."""
    method, clip_name, teacher, engine, workers, case_opts = MATRIX[case]
    codebase, root = codebase_of(method), eurosat64_root
    clip = half_clips[clip_name]
    _, config, opts, folder = METHODS[method]
    ours_opts = ["MODEL.BACKBONE.PATH", clip]
    if method == "PromptKD":
        codebase = promptkd_checkout(tmp_path, eurosat_root, clip, half_clips[teacher])
        root = eurosat_root
        ours_opts += ["TRAINER.PROMPTKD.TEACHER_PATH", half_clips[teacher],
                      "TRAINER.PROMPTKD.TEACHER_CKPT", os.path.join(
                          codebase, "teacher_model", "EuroSAT", "VLPromptLearner",
                          "model-best.pth.tar")]
    args = ["--root", root, "--seed", "1", "--trainer", method,
            "--dataset-config-file", os.path.join(codebase, "configs", "datasets", "eurosat.yaml"),
            "--config-file", os.path.join(codebase, "configs", "trainers", config)]
    opts = list(COMMON_OPTS + opts + case_opts) + ["DATALOADER.NUM_WORKERS", str(workers)]
    mode = "ours" if engine == "dassl" else "ours-nodassl"
    results = []
    for name, run_mode, run_args, run_opts, env in (
            ("codebase", "codebase", args, opts, probe_env()),
            (engine, mode, ["--engine", engine] + args, opts + ours_opts, {})):
        out = tmp_path / name
        shutil.rmtree(os.path.join(root, "eurosat", "split_fewshot"), ignore_errors=True)
        lines = run(run_mode, tmp_path / f"{name}.txt", clip,
                    run_args + ["--output-dir", str(out)] + run_opts, codebase, **env)
        results.append((first_loss(out), stream(lines),
                        learned(str(out / folder / "model.pth.tar-3"))))
    (loss, (main, seen), theirs), (our_loss, (our_main, our_seen), ours) = results
    assert our_loss == loss, f"{engine}: first loss {our_loss}, the codebase's {loss}"
    assert sum(line.startswith("batch ") for line in main) >= 6 and (
        seen if workers else any(line.startswith("item main") for line in main))
    assert our_main == main and our_seen == seen, f"{engine}: other batches or crops"
    assert_same_tensors(ours, theirs, engine)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("engine", ["standalone", "dassl"])
def test_refiner_sees_the_data_of_the_run_without_it(demo, tmp_path, engine, workers):
    """CoOp and CoOp + TextRefiner, same seed: the same images in the same batches with the same
    crops, and the same torch random state at every epoch's start (TextRefiner draws its initial
    weights and cache from a generator of its own)."""
    if engine == "dassl" and not HAS_DASSL:
        pytest.skip("Dassl.pytorch is not installed")
    args = ["--engine", engine, "--root", demo["root"], "--trainer", "CoOp", "--seed", "1",
            "--dataset-config-file", os.path.join(CONFIGS, "datasets", "synthetic_shapes.yaml"),
            "--config-file", os.path.join(CONFIGS, "trainers", "CoOp", "demo_cpu.yaml")]
    opts = ["MODEL.BACKBONE.PATH", demo["clip"], "DATASET.NUM_SHOTS", "4", "OPTIM.MAX_EPOCH", "2",
            "DATALOADER.NUM_WORKERS", str(workers), "DATASET.SUBSAMPLE_CLASSES", "base"]
    streams = []
    for flags in ([], ["--refiner"]):
        out = tmp_path / ("refiner" if flags else "plain")
        lines = run("ours", tmp_path / f"{out.name}.txt", demo["clip"],
                    args + ["--output-dir", str(out)] + flags + opts)
        streams.append(stream(lines))
    (main, seen), (main_tr, seen_tr) = streams
    assert sum(line.startswith("batch ") for line in main) >= 4
    assert (seen if workers else [line for line in main if line.startswith("item ")])
    assert main_tr == main and seen_tr == seen
