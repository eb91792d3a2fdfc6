"""A Dassl-compatible training loop with no Dassl: same configs, outputs and checkpoints.

Outputs in cfg.OUTPUT_DIR: `log.txt`, TensorBoard events in `tensorboard/`, and
`<checkpoint name>/model.pth.tar-<epoch>` / `model-best.pth.tar` (Dassl's layout and dict keys).
Evaluation prints Dassl's result block, so CoOp's result parsers read our logs.

Reproducibility: random numbers are drawn as CoOp's train.py over Dassl draws them, from the
global generators seeded once (textrefiner.seeding), so a seed gives the codebase's run; each
checkpoint holds the generators' states, so a resumed run continues as the uninterrupted one.
Distributed: under `torchrun`, PyTorch's DDP wraps the training forward; with DISTRIBUTED.EXACT
N ranks x batch b train as one process x batch N*b (textrefiner.distributed). Only rank 0 writes.
"""
import datetime
import os
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from .. import faults
from ..checkpoint import (carry_best_checkpoint, check_resumable_lr, checkpoint_path,
                          load_init_weights, load_method_checkpoint, missing_best_error,
                          no_checkpoint_to_resume, restored_best_result, run_record,
                          save_method_checkpoint)
from ..clip_backbone import (amp_autocast, amp_grad_scaler, check_image_size, compute_note,
                             load_clip)
from ..data import build_dataset, build_loader
from ..data.transforms import build_transform
from ..distributed import (barrier, check_share_sizes, convert_batchnorm, gather_predictions,
                           init_from_environment, loss_weight, rank_share, reduce_step,
                           wrap_ddp)
from ..errors import UserError, output_failed
from ..feature_store import labels_of, maybe_stored_evaluation
from ..methods import method_class
from ..seeding import (check_resumable_seed, one_loader_pass, restore_from_checkpoint,
                       set_seed)
from .evaluator import Classification
from .optim import (backward_and_step, before_batch, build_optimizer, build_scheduler,
                    check_loss, explained_step_errors)

class Logger:
    """Prints to the console and, once `open` is called, also appends to `log.txt`.

    Lines printed before the file is opened (building the model, reading the data) are written to
    it then, so a run that fails during set-up leaves no log that looks like a result.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.buffer = []
        self.file = None

    def __call__(self, message: str = ""):
        if not self.enabled:
            return
        print(message, flush=True)
        if self.file is None:
            self.buffer.append(message)
        else:
            self._write(message)

    def open(self, path: str):
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self._write("\n".join(self.buffer))
        self.buffer = []

    def _write(self, text: str):
        try:
            self.file.write(text + "\n")
            self.file.flush()
        except OSError as exc:
            raise output_failed(self.file.name, exc) from None


class TrainStep(nn.Module):
    """Makes `forward_train` the forward pass, which is what DDP synchronises."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, labels):
        return self.method.forward_train(images, labels)


class StandaloneTrainer:
    def __init__(self, cfg, trainer_name: str):
        self.cfg = cfg
        self.rank, self.world = init_from_environment(cfg.USE_CUDA)
        self.exact = self.world > 1 and cfg.DISTRIBUTED.EXACT
        self.log = Logger(enabled=self.rank == 0)
        # Progress bars on rank 0's terminal only (None: tqdm leaves them out when not a tty).
        self._no_bar = None if self.rank == 0 else True
        self.device = _pick_device(cfg, self.rank)
        if cfg.SEED >= 0 or self.world > 1:  # torchrun's ranks draw alike even without a seed
            set_seed(max(cfg.SEED, 0))
        cls = method_class(trainer_name)
        self.splits = build_dataset(cfg, all_classes_for_training=(
            cls.trains_on_all_classes and cfg.TRAINER.MODAL == "base2novel"), log=self.log)
        self.precision = cfg.TRAINER[cls.config_section].PREC
        self.model = self._build_model(cls, trainer_name)
        if cfg.MODEL.INIT_WEIGHTS:
            load_init_weights(self.model, cfg.MODEL.INIT_WEIGHTS, self.log)
        self.checkpoint_name = cls.checkpoint_name
        self.stored_eval = maybe_stored_evaluation(
            cfg.TEST.FEATURE_STORE, self.model, build_transform(cfg, is_train=False),
            self.precision, self.device, lambda: amp_autocast(self.precision, self.device),
            self.log)
        self._build_optimisation()
        self.writer = None
        self.start_epoch = 0
        self.best_result = -float("inf")

    def _build_model(self, cls, trainer_name):
        cfg = self.cfg
        backbone = cfg.MODEL.BACKBONE.PATH or cfg.MODEL.BACKBONE.NAME
        if not backbone:
            raise UserError("No CLIP backbone: set MODEL.BACKBONE.NAME (e.g. ViT-B/16) or "
                            "MODEL.BACKBONE.PATH (a local CLIP file).")
        self.log(f"Loading CLIP ({backbone}, {compute_note(self.precision, self.device)})")
        clip_model = load_clip(backbone, self.precision)
        check_image_size(cfg, clip_model)
        self.log(f"Building {trainer_name}"
                 f"{' + TextRefiner' if cfg.TRAINER.REFINER.ENABLED else ''} on "
                 f"{len(self.splits.classnames)} classes")
        return cls(cfg, self.splits.classnames, clip_model).to(self.device)

    def _build_optimisation(self):
        """Optimiser, schedule and amp scaler over the trainable parameters; DDP under torchrun."""
        trainable = self.model.trainable_parameters()
        self.log(f"Parameters to be updated: {sorted(trainable)}")
        self.optim = self.sched = None
        if trainable:
            self.optim = build_optimizer(self.model.optimizer_groups(trainable),
                                         self.cfg.OPTIM)
            self.sched = (self.model.lr_scheduler(self.optim, self.cfg.OPTIM)
                          or build_scheduler(self.optim, self.cfg.OPTIM))
        self.scaler = amp_grad_scaler(self.precision, self.device)
        self.step_module = TrainStep(self.model)
        if self.world > 1 and trainable:
            if self.exact:
                convert_batchnorm(self.model)
            # Exact: every rank computes the same buffers (cache, BatchNorm statistics), so DDP
            # need not broadcast them (nor CLIP's) at every step.
            self.step_module = wrap_ddp(self.step_module, self.device, sync_buffers=not self.exact)

    # ------------------------------------------------------------------ outputs
    def open_outputs(self):
        """Create log.txt and the TensorBoard writer (only after set-up succeeded)."""
        if self.rank != 0:
            return
        self.log.open(os.path.join(self.cfg.OUTPUT_DIR, "log.txt"))
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(self.cfg.OUTPUT_DIR, "tensorboard"))

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def write_scalar(self, tag, value, step):
        if self.writer is not None:
            try:
                self.writer.add_scalar(tag, value, step)
            except OSError as exc:  # raised here by TensorBoard's writer thread
                raise output_failed(self.writer.log_dir, exc) from None

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch: int, filename_epoch=None, val_result=None):
        if self.rank == 0 and self.checkpoint_name:
            path = checkpoint_path(self.cfg.OUTPUT_DIR, self.checkpoint_name, filename_epoch)
            save_method_checkpoint(self.model, path, epoch, self.optim, self.sched, val_result,
                                   mark_latest=filename_epoch is not None,
                                   best_result=self.best_result, seed=self.cfg.SEED,
                                   **run_record(self.cfg, self.model.classnames))
            self.log(f"Checkpoint saved to {path}")  # as Dassl prints it
        barrier()  # no rank reads a checkpoint before rank 0 has written it

    def load_model(self, directory: str, epoch=None, resume=False):
        """Load prompts, refiner and cache from a Dassl-layout folder (e.g. base -> novel)."""
        if not self.checkpoint_name:
            self.log(f"{type(self.model).__name__} has no weights to load")
            return
        path = checkpoint_path(directory, self.checkpoint_name, epoch)
        checkpoint = load_method_checkpoint(self.model, path, self.log, resume)
        self.log(f"Loaded {path} (epoch {checkpoint.get('epoch')})")
        return checkpoint

    def resume_if_possible(self, directory: str):
        """Continue from the newest `model.pth.tar-<epoch>` in `directory`, as Dassl does."""
        if not self.checkpoint_name:
            return
        folder = os.path.join(directory, self.checkpoint_name)
        epochs = [int(f.rsplit("-", 1)[1]) for f in os.listdir(folder)
                  if f.startswith("model.pth.tar-")] if os.path.isdir(folder) else []
        if not epochs:
            if self.cfg.RESUME:
                raise no_checkpoint_to_resume(directory, self.checkpoint_name)
            return
        checkpoint = self.load_model(directory, max(epochs), resume=True)
        path = checkpoint_path(directory, self.checkpoint_name, max(epochs))
        check_resumable_lr(checkpoint, self.cfg.OPTIM.LR, path)
        check_resumable_seed(checkpoint, self.cfg.SEED, path)
        if checkpoint.get("optimizer") and self.optim:
            self.optim.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scheduler") and self.sched:
            self.sched.load_state_dict(checkpoint["scheduler"])
        self.start_epoch = checkpoint["epoch"]
        restore_from_checkpoint(checkpoint)  # the random states where the saved epoch ended
        self.best_result = restored_best_result(checkpoint, directory, self.checkpoint_name)
        self.log(f"Resumed from epoch {self.start_epoch} of {directory}")
        carried = self.rank == 0 and carry_best_checkpoint(directory, self.cfg.OUTPUT_DIR,
                                                           self.checkpoint_name)
        if carried:
            self.log(carried)
        barrier()

    # ------------------------------------------------------------------ training
    def train(self):
        cfg = self.cfg
        directory = cfg.RESUME or cfg.OUTPUT_DIR
        self.resume_if_possible(directory)
        max_epoch = cfg.OPTIM.MAX_EPOCH
        started = time.time()
        for epoch in range(self.start_epoch, max_epoch):
            self.run_epoch(epoch)
            self.after_epoch(epoch)
            faults.after_epoch(epoch + 1)  # TEXTREFINER_KILL_AT, for tests
        self.log(f"Finished training in {datetime.timedelta(seconds=int(time.time() - started))}")
        if not cfg.TEST.NO_TEST:
            if cfg.TEST.FINAL_MODEL == "best_val" and self.checkpoint_name:
                self.log("Deploy the model with the best val performance")
                if not os.path.isfile(checkpoint_path(cfg.OUTPUT_DIR, self.checkpoint_name)):
                    raise missing_best_error(cfg.OUTPUT_DIR, cfg.RESUME, self.checkpoint_name,
                                             max(max_epoch - self.start_epoch, 0))
                self.load_model(cfg.OUTPUT_DIR)
            else:
                self.log("Deploy the last-epoch model")
            self.test()

    def train_loader(self, epoch: int):
        cfg = self.cfg
        # No generator of its own: the shuffling, the worker seeds and the augmentations draw from
        # the global torch generator, as Dassl's loader does (the same on every rank under torchrun)
        batch_size = cfg.DATALOADER.TRAIN_X.BATCH_SIZE
        if self.exact:
            check_share_sizes(len(self.splits.train_x), self.world)
            return build_loader(self.splits.train_x, cfg, is_train=True, batch_size=batch_size,
                                shuffle=True, share=(self.rank, self.world))
        sampler = None
        if self.world > 1:
            sampler = torch.utils.data.DistributedSampler(
                _Indexable(len(self.splits.train_x)), shuffle=True, seed=max(cfg.SEED, 0))
            sampler.set_epoch(epoch)
        return build_loader(self.splits.train_x, cfg, is_train=True,
                            batch_size=batch_size, shuffle=sampler is None,
                            sampler=sampler)

    def run_epoch(self, epoch: int):
        cfg = self.cfg
        loader = self.train_loader(epoch)
        self.model.train()
        bar = tqdm(loader, desc=f"epoch [{epoch + 1}/{cfg.OPTIM.MAX_EPOCH}]",
                   disable=self._no_bar, leave=False, dynamic_ncols=True)
        totals, count, started = {}, 0, time.time()
        for batch_idx, batch in enumerate(bar):
            before_batch(self.sched, epoch, batch_idx, len(loader))
            lr = self.optim.param_groups[0]["lr"]
            parts = self.train_step(batch)
            faults.after_step(epoch + 1, batch_idx + 1)  # TEXTREFINER_KILL_AT, for tests
            count += 1
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
            step = epoch * len(loader) + batch_idx
            for key, value in parts.items():
                self.write_scalar(f"train/{key}", value, step)
            if (batch_idx + 1) % max(cfg.TRAIN.PRINT_FREQ, 1) == 0:  # Dassl's log lines
                self.log(f"epoch [{epoch + 1}/{cfg.OPTIM.MAX_EPOCH}] batch [{batch_idx + 1}/"
                         f"{len(loader)}] time {(time.time() - started) / count:.3f}s/batch "
                         + _format(parts) + f"  lr {lr:.4e}")
        means = _format({k: v / max(count, 1) for k, v in totals.items()})
        self.log(f"epoch [{epoch + 1}/{cfg.OPTIM.MAX_EPOCH}] done: {means}  lr {lr:.4e}")
        self.write_scalar("train/lr", lr, epoch)
        if self.model.skipped_cache_tokens:
            self.log(f"cache: skipped {self.model.skipped_cache_tokens} non-finite local tokens "
                     "so far")
        self.sched.step()

    def train_step(self, batch) -> dict:
        images = batch["img"].to(self.device)
        labels = batch["label"].to(self.device)
        with amp_autocast(self.precision, self.device):
            loss, parts = self.step_module(images, labels)
        reported = loss
        if self.world > 1:  # the check and the log see means over the global batch
            total, reported, parts = reduce_step(loss, parts, images.shape[0])
            if self.exact:
                loss = loss * loss_weight(images.shape[0], total, self.world)
        check_loss(reported, self.precision)
        self.optim.zero_grad(set_to_none=True)
        with explained_step_errors(self.precision, self.optim):
            backward_and_step(loss, self.optim, self.scaler, self.model.max_grad_norm)
        summary = {"loss": float(reported.detach())}
        summary.update({k: float(v) for k, v in parts.items()})
        return summary

    def after_epoch(self, epoch: int):
        cfg = self.cfg
        self.model.on_epoch_end(epoch, cfg.OPTIM.MAX_EPOCH)  # e.g. PromptSRC's GPA
        freq = cfg.TRAIN.CHECKPOINT_FREQ
        if not cfg.TEST.NO_TEST and cfg.TEST.FINAL_MODEL == "best_val":
            result = self.test(split="val", epoch=epoch)
            if result > self.best_result:
                self.best_result = result
                self.save(epoch, None, val_result=result)
        self.save(epoch, epoch + 1)
        # Every epoch leaves a checkpoint to resume from; the previous one goes unless
        # TRAIN.CHECKPOINT_FREQ keeps it.
        previous = epoch  # file number of the previous epoch's checkpoint
        if self.rank == 0 and self.checkpoint_name and previous >= 1 and not (
                freq > 0 and previous % freq == 0):
            path = checkpoint_path(cfg.OUTPUT_DIR, self.checkpoint_name, previous)
            if os.path.isfile(path):
                os.remove(path)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def test(self, split=None, epoch=None) -> float:
        cfg = self.cfg
        split = split or cfg.TEST.SPLIT
        items = self.splits.val if split == "val" and self.splits.val else self.splits.test
        split = "val" if items is self.splits.val else "test"
        if hasattr(self.model, "set_eval_classes"):
            self.model.set_eval_classes(split, cfg.TRAINER.MODAL, cfg.DATASET.SUBSAMPLE_CLASSES)
        self.model.eval()
        # This rank's contiguous share (all of it on one process); a rank may have none.
        share = items[rank_share(len(items), self.rank, self.world)]
        evaluator = Classification(self.model.num_eval_classes)
        self.log(f"Evaluate on the *{split}* set")
        with one_loader_pass():  # the same draws on every rank, and as Dassl's evaluation
            for logits, labels in self._eval_batches(share) if share or not items else ():
                evaluator.process(logits.float(), labels)
        gather_predictions(evaluator, self.device)
        results = _capture(evaluator.evaluate, self.log)
        for key, value in results.items():
            self.write_scalar(f"{split}/{key}", value, epoch if epoch is not None else 0)
        return results["accuracy"]

    def _eval_batches(self, items):
        """(logits, labels) per test batch: the model on the images, or on their features from
        the feature store (TEST.FEATURE_STORE)."""
        cfg = self.cfg
        batch_size = cfg.DATALOADER.TEST.BATCH_SIZE

        def loader_of(subset):
            return build_loader(subset, cfg, is_train=False, batch_size=batch_size, shuffle=False)

        if self.stored_eval is not None:
            features = self.stored_eval.image_features(
                items, cfg.DATASET.NAME, batch_size, lambda subset: tqdm(
                    loader_of(subset), disable=self._no_bar, leave=False, dynamic_ncols=True))
            labels = labels_of(items)
            for start, logits in self.stored_eval.logits(features, batch_size):
                yield logits, labels[start:start + logits.shape[0]]
            return
        for batch in tqdm(loader_of(items), disable=self._no_bar, leave=False,
                          dynamic_ncols=True):
            with amp_autocast(self.precision, self.device):
                logits = self.model(batch["img"].to(self.device))
            yield logits, batch["label"]


class _Indexable:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _format(parts: dict) -> str:
    return "  ".join(f"{key} {value:.4f}" for key, value in parts.items())


def _capture(evaluate, log):
    """Run Dassl-style `evaluate()` (which prints) and route its lines through the logger."""
    import contextlib
    import io

    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        results = evaluate()
    for line in stream.getvalue().rstrip("\n").split("\n"):
        log(line)
    return results


def _pick_device(cfg, rank):
    if cfg.USE_CUDA and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def run_standalone(cfg, trainer_name: str, eval_only=False, model_dir="", load_epoch=None,
                   no_train=False, notes=()):
    """CoOp's train.py flow on the standalone engine; `notes` are lines for the log (which
    config files were read)."""
    trainer = StandaloneTrainer(cfg, trainer_name)
    trainer.open_outputs()
    trainer.log(f"Command: {' '.join(sys.argv)}")
    for line in notes:
        trainer.log(line)
    trainer.log(f"Config:\n{cfg}")
    try:
        if eval_only:
            if model_dir:
                trainer.load_model(model_dir, load_epoch)
            trainer.test()
        elif not no_train:
            trainer.train()
        barrier()  # under torchrun no rank leaves while another still works with the group
    finally:
        trainer.close()
    return trainer
