"""Training under torchrun ends as one process ends: real `torchrun` launches (2 ranks, gloo, CPU)
against one process with the global batch, same seed and config otherwise. Differences come only
from floating-point summation order, so the comparisons allow 1e-5 where the plain-DDP recipe
(DISTRIBUTED.EXACT False) differs by 1e-3 (context) to 0.5 (cache)."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

from conftest import HANG_TIMEOUT
from textrefiner.config import load_cfg
from textrefiner.data import build_loader
from textrefiner.data.base import Datum
from textrefiner.data.transforms import build_transform, replay_draws
from textrefiner.distributed import GlobalBatchSampler, rank_share
from textrefiner.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, "-m", "torch.distributed.run"]


def close(x, y):
    """Equal up to summation order: 1e-5 of the tensor's scale (at least 1e-5)."""
    return torch.allclose(x, y, atol=1e-5 * max(1.0, float(x.abs().max())), rtol=1e-4)


# ----------------------------------------------------------------------------- launching
def launch(command, **environ):
    """Run `command` (with `environ` added to the environment) in its own process group, so that
    a hang cannot leave ranks behind. Returns (return code, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **environ)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # Only stops a hung launch (see HANG_TIMEOUT); it decides no result.
    watchdog = threading.Timer(HANG_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(lines)


def torchrun(args, nproc=2):
    code, output = launch(LAUNCH + ["--standalone", "--nproc_per_node", str(nproc), "-m",
                                    "textrefiner.train"] + args)
    assert code == 0, output[-3000:]
    return output


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- runs
def coop_args(demo, out, batch, *opts, refiner=True, epochs=2):
    return (["--engine", "standalone", "--root", demo["root"], "--trainer", "CoOp", "--seed", "1",
             "--dataset-config-file", "configs/datasets/synthetic_shapes.yaml",
             "--config-file", "configs/trainers/CoOp/demo_cpu.yaml",
             "--output-dir", str(out)] + (["--refiner"] if refiner else [])
            + ["MODEL.BACKBONE.PATH", demo["clip"], "USE_CUDA", "False",
               "DATASET.NUM_SHOTS", "4", "DATASET.SUBSAMPLE_CLASSES", "base",
               "OPTIM.MAX_EPOCH", str(epochs), "DATALOADER.TRAIN_X.BATCH_SIZE", str(batch)]
            + list(opts))


def final_checkpoint(out, epoch, folder="prompt_learner"):
    return torch.load(os.path.join(out, folder, f"model.pth.tar-{epoch}"), weights_only=False)


def accuracies(out):
    return re.findall(r"\* accuracy: ([\d.]+)%", (out / "log.txt").read_text())


def assert_same_run(one, many, epoch, folder="prompt_learner"):
    """Weights, cache, BatchNorm statistics and optimiser state of the final checkpoints agree up
    to summation order; every accuracy printed is the same."""
    a, b = final_checkpoint(one, epoch, folder), final_checkpoint(many, epoch, folder)
    assert sorted(a["state_dict"]) == sorted(b["state_dict"])
    for key, value in a["state_dict"].items():
        if value.is_floating_point():
            assert close(value, b["state_dict"][key]), key
        else:
            assert torch.equal(value, b["state_dict"][key]), key
    for slot, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert close(value, b["optimizer"]["state"][slot][name]), name
    assert accuracies(one) == accuracies(many) and accuracies(one)


@pytest.fixture(scope="module")
def one_process(demo, tmp_path_factory):
    """CoOp + TR, one process, batch 8, 2 epochs: the run the distributed ones must reproduce."""
    out = tmp_path_factory.mktemp("one_process")
    assert main(coop_args(demo, out, 8)) == 0
    return out


# ----------------------------------------------------------------------------- pieces
def test_ranks_share_the_batches_one_process_draws():
    def batches(world, rank, seed=3):
        generator = torch.Generator().manual_seed(seed)
        return list(GlobalBatchSampler(11, 6, False, generator, rank, world))

    single = [[index for index, _ in batch] for batch in batches(1, 0)]
    generator = torch.Generator().manual_seed(3)
    assert single == list(torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(range(11), generator=generator), 6, False))
    shares = [batches(2, rank) for rank in range(2)]
    for step, batch in enumerate(single):
        own = [[i for i, mine in shares[rank][step] if mine] for rank in range(2)]
        assert own[0] + own[1] == batch  # contiguous shares, in order, nothing twice
        assert [len(o) for o in own] == ([3, 3] if len(batch) == 6 else [3, 2])


@pytest.mark.parametrize("n, world, sizes", [(8, 2, [4, 4]), (7, 2, [4, 3]), (5, 4, [2, 1, 1, 1])])
def test_rank_shares_are_contiguous_and_cover_everything(n, world, sizes):
    shares = [rank_share(n, rank, world) for rank in range(world)]
    assert [s.stop - s.start for s in shares] == sizes
    assert [i for s in shares for i in range(n)[s]] == list(range(n))


def test_a_training_set_smaller_than_the_processes_is_refused():
    from textrefiner.distributed import check_share_sizes
    from textrefiner.errors import UserError
    check_share_sizes(2, 2)
    with pytest.raises(UserError, match="fewer than the 4 processes"):
        check_share_sizes(3, 4)


def test_replayed_draws_leave_the_rng_where_augmenting_leaves_it():
    from PIL import Image
    cfg = load_cfg(opts=["INPUT.SIZE", "(32, 32)", "INPUT.TRANSFORMS",
                         "['random_crop', 'random_resized_crop', 'random_flip', 'normalize']"])
    transform = build_transform(cfg, is_train=True)
    for size in [(40, 30), (28, 64), (32, 32)]:
        torch.manual_seed(5)
        transform(Image.new("RGB", size, (200, 10, 10)))
        after_augmenting = torch.get_rng_state()
        torch.manual_seed(5)
        replay_draws(transform, size)
        assert torch.equal(torch.get_rng_state(), after_augmenting), size


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_loaders_give_each_image_the_augmentation_of_one_process(tmp_path, workers):
    from PIL import Image
    items = []
    for i in range(9):  # sizes differ, so the number of crop attempts differs
        path = str(tmp_path / f"{i}.png")
        pixels = torch.randint(0, 256, (20 + 7 * i, 50 - 3 * i, 3), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path)
        items.append(Datum(path, i % 3, str(i % 3)))
    cfg = load_cfg(opts=["INPUT.SIZE", "(24, 24)", "DATALOADER.NUM_WORKERS", str(workers),
                         "USE_CUDA", "False"])

    def images(batch_size, share=None):
        torch.manual_seed(7)
        loader = build_loader(items, cfg, True, batch_size, True, share=share,
                              generator=torch.Generator().manual_seed(11))
        return [(b["index"].tolist(), b["img"]) for b in loader]

    single = images(4)
    shares = [images(2, share=(rank, 2)) for rank in range(2)]
    assert len(single) == len(shares[0]) == 2  # 9 images, batch 4: the short last one dropped
    for step, (indices, imgs) in enumerate(single):
        assert shares[0][step][0] + shares[1][step][0] == indices
        assert torch.equal(torch.cat([shares[0][step][1], shares[1][step][1]]), imgs)


def test_torchrun_pieces_match_one_process():
    """GlobalBatchNorm (outputs, gradients, running statistics), the loss weights of unequal
    shares and gather_rows, in tests/torchrun_checks.py under 2 ranks."""
    code, output = launch(LAUNCH + ["--standalone", "--nproc_per_node", "2",
                                    os.path.join(REPO, "tests", "torchrun_checks.py")])
    assert code == 0 and output.count(": ok") == 2, output[-3000:]


# ----------------------------------------------------------------------------- whole runs
def test_two_ranks_train_as_one_process_with_the_global_batch(demo, one_process, tmp_path):
    output = torchrun(coop_args(demo, tmp_path, 4))
    assert_same_run(one_process, tmp_path, epoch=2)
    log = (tmp_path / "log.txt").read_text()
    assert log.count("* accuracy:") == 1  # only rank 0 writes
    assert "Traceback" not in output
    # The loss lines show the means over the global batch, as one process prints them.
    def losses(out):
        text = (out / "log.txt").read_text()
        return [float(v) for v in re.findall(r"batch \[.*?\] .*? loss ([\d.]+)", text)]

    assert losses(tmp_path) == pytest.approx(losses(one_process), abs=2e-4)
    assert len(losses(tmp_path)) == 4


def test_plain_ddp_runs_and_is_what_the_comparisons_catch(demo, one_process, tmp_path):
    """DISTRIBUTED.EXACT False: per-rank shuffling, augmentations and BatchNorm, as before. It
    trains and evaluates under torchrun, and ends far outside the comparisons' tolerance."""
    torchrun(coop_args(demo, tmp_path, 4, "DISTRIBUTED.EXACT", "False"))
    assert (tmp_path / "log.txt").read_text().count("* accuracy:") == 1
    with pytest.raises(AssertionError):
        assert_same_run(one_process, tmp_path, epoch=2)
    a, b = (final_checkpoint(out, 2)["state_dict"]["refiner.cache.entries"]
            for out in (one_process, tmp_path))
    assert float((a - b).abs().max()) > 1e-2


@pytest.mark.parametrize("resume", ["torchrun", "one process"])
def test_a_run_killed_on_one_rank_resumes_and_ends_as_one_process(demo, one_process, tmp_path,
                                                                  resume):
    """Resumed by the same torchrun command in the same folder, or by one process (batch 8) with
    --resume into another folder: either ends as the uninterrupted single-process run."""
    killed_dir = tmp_path / "killed"
    args = coop_args(demo, killed_dir, 4)
    command = LAUNCH + ["--standalone", "--nproc_per_node", "2", "-m", "textrefiner.train"] + args
    # Rank 1 kills itself after its first step of epoch 2 (of 2 steps): rank 0 waits for it in
    # the second step, so epoch 2's checkpoint can never be written.
    kill_at = "epoch=2,batch=1,rank=1"
    code, output = launch(command, TEXTREFINER_KILL_AT=kill_at)
    assert code != 0 and f"TEXTREFINER_KILL_AT={kill_at}: killed process" in output, output[-3000:]
    assert re.search(r"exitcode\s*:\s*-9", output), output[-3000:]  # torchrun's report on rank 1
    assert sorted(os.listdir(killed_dir / "prompt_learner")) == ["checkpoint", "model.pth.tar-1"]
    if resume == "torchrun":
        torchrun(args)  # the same command again: resumes from epoch 1
        finished = killed_dir
    else:
        finished = tmp_path / "resumed"
        assert main(["--resume", str(killed_dir)] + coop_args(demo, finished, 8)) == 0
    assert "Resumed from epoch 1" in (finished / "log.txt").read_text()
    assert_same_run(one_process, finished, epoch=2)


def test_two_nodes_of_one_rank_train_as_one_process(demo, one_process, tmp_path):
    port = free_port()
    nodes = [LAUNCH + ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "textrefiner-test",
                       "-m", "textrefiner.train"] + coop_args(demo, tmp_path, 4)
             for _ in range(2)]
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, launch(nodes[i])))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for code, output in results:
        assert code == 0, output[-3000:]
    assert_same_run(one_process, tmp_path, epoch=2)


def test_short_batch_and_odd_validation_set_under_torchrun(demo, tmp_path):
    """5 training images, global batch 8: one short batch shared 3 + 2 (the loss weights make the
    gradient the global mean's); validation on 5 images (3 + 2, no padding) picks the best
    epoch, and loader workers augment."""
    opts = ("DATASET.NUM_SHOTS", "1", "TEST.FINAL_MODEL", "best_val",
            "DATALOADER.NUM_WORKERS", "1")
    one, many = tmp_path / "one", tmp_path / "many"
    assert main(coop_args(demo, one, 8, *opts)) == 0
    torchrun(coop_args(demo, many, 4, *opts))
    assert_same_run(one, many, epoch=2)
    assert "* total: 5" in (many / "log.txt").read_text()


def test_dassl_engine_under_torchrun_says_to_use_the_standalone_one(monkeypatch, capsys, demo,
                                                                    tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = coop_args(demo, tmp_path, 4)
    args[args.index("standalone")] = "dassl"
    assert main(args) == 2
    assert "--engine standalone" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every method
SMALL = ["INPUT.SIZE", "(32, 32)", "USE_CUDA", "False", "TRAIN.PRINT_FREQ", "1",
         "TRAINER.COOP.PREC", "fp32", "TRAINER.COCOOP.PREC", "fp32", "TRAINER.MAPLE.PREC", "fp32",
         "TRAINER.MAPLE.PROMPT_DEPTH", "2", "TRAINER.PROMPTSRC.PREC", "fp32",
         "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2",
         "TRAINER.PROMPTSRC.GPA_MEAN", "1", "TRAINER.PROMPTSRC.GPA_STD", "1",
         "TRAINER.PROMPTKD.PREC", "fp32", "TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2"]
# trainer, its checkpoint folder, --refiner, extra options
METHOD_RUNS = [
    ("CoCoOp", "prompt_learner", True, ()),
    ("MaPLe", "MultiModalPromptLearner", True, ()),
    ("PromptSRC", "VLPromptLearner", True, ()),  # GPA over the 2 epochs
    ("PromptSRC", "VLPromptLearner", False, ()),
    ("PromptKD", "VLPromptLearner", True, ("DATASET.NUM_SHOTS", "0")),  # projector BatchNorm
    ("PromptKD", "VLPromptLearner", False, ("DATASET.NUM_SHOTS", "0")),
    ("CoOp", "prompt_learner", False, ()),
]


def test_every_method_trains_under_torchrun_as_in_one_process(tmp_path, clip_path,
                                                              teacher_clip_path, teacher_ckpt):
    import json

    from textrefiner.data import write_synthetic_dataset
    root = str(tmp_path / "data")
    write_synthetic_dataset(root, num_classes=4, per_class_train=4, per_class_val=2,
                            per_class_test=3, image_size=32)

    def args(i, out, batch):
        trainer, _, refiner, opts = METHOD_RUNS[i] if i < len(METHOD_RUNS) else (
            "ZeroshotCLIP", None, False, ())
        return (["--engine", "standalone", "--root", root, "--trainer", trainer, "--seed", "1",
                 "--dataset-config-file", "configs/datasets/synthetic_shapes.yaml",
                 "--config-file", "configs/trainers/CoOp/demo_cpu.yaml",
                 "--output-dir", str(out / str(i))] + (["--refiner"] if refiner else [])
                + (["--eval-only"] if trainer == "ZeroshotCLIP" else [])
                + ["MODEL.BACKBONE.PATH", clip_path, "DATASET.NUM_SHOTS", "2",
                   "DATALOADER.TRAIN_X.BATCH_SIZE", str(batch),
                   "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip_path,
                   "TRAINER.PROMPTKD.TEACHER_CKPT", teacher_ckpt] + SMALL + list(opts))

    runs = range(len(METHOD_RUNS) + 1)  # the last: zero-shot CLIP, evaluation only
    one, many = tmp_path / "one", tmp_path / "many"
    for i in runs:
        assert main(args(i, one, 4)) == 0, METHOD_RUNS[i] if i < len(METHOD_RUNS) else i
    (tmp_path / "runs.json").write_text(json.dumps([args(i, many, 2) for i in runs]))
    code, output = launch(LAUNCH + ["--standalone", "--nproc_per_node", "2",
                                    os.path.join(REPO, "tests", "torchrun_train.py"),
                                    str(tmp_path / "runs.json")])
    assert code == 0, output[-3000:]
    for i, (trainer, folder, refiner, _) in enumerate(METHOD_RUNS):
        try:
            assert_same_run(one / str(i), many / str(i), epoch=2, folder=folder)
        except AssertionError as exc:
            raise AssertionError(f"{trainer}{' + TR' if refiner else ''}: {exc}") from None
    zero_shot = str(len(METHOD_RUNS))
    assert accuracies(one / zero_shot) == accuracies(many / zero_shot)


@pytest.mark.slow
def test_ranks_fill_and_read_the_feature_store(demo, tmp_path):
    """Each rank evaluates its share through the store; accuracy as without it, and a second
    evaluation computes nothing."""
    store = ["--feature-store", str(tmp_path / "store")]
    plain, filled, read = tmp_path / "plain", tmp_path / "filled", tmp_path / "read"
    torchrun(["--eval-only"] + coop_args(demo, plain, 4, "DATALOADER.TEST.BATCH_SIZE", "7"))
    torchrun(["--eval-only"] + store + coop_args(demo, filled, 4, "DATALOADER.TEST.BATCH_SIZE",
                                                 "7"))
    torchrun(["--eval-only"] + store + coop_args(demo, read, 4, "DATALOADER.TEST.BATCH_SIZE",
                                                 "7"))
    assert accuracies(plain) == accuracies(filled) == accuracies(read) and accuracies(plain)
    assert " 0 computed" not in (filled / "log.txt").read_text()
    assert re.search(r"feature store: (\d+) of \1 images read, 0 computed",
                     (read / "log.txt").read_text())
