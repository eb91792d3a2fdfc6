"""`MethodTrainer`: a Dassl trainer that delegates everything method-specific to a `PromptMethod`.

Dassl runs the loop, logging, evaluation and tensorboard; the method (textrefiner.methods) owns the
model, its losses and what a checkpoint holds. Checkpoints keep Dassl's layout,
`<output>/<checkpoint_name>/model.pth.tar-<epoch>` and `model-best.pth.tar`, but hold only
`method.checkpoint_state()` (prompts, refiner weights and cache), so a model trained on the base
classes loads into one built for the novel classes.
"""
import os
import os.path as osp

import torch
from dassl.data import DataManager
from dassl.engine import TrainerX
from dassl.optim import build_lr_scheduler, build_optimizer

from textrefiner import faults
from textrefiner.checkpoint import (LATEST_MARKER, carry_best_checkpoint, check_resumable_lr,
                                    checkpoint_path, load_init_weights, load_method_checkpoint,
                                    missing_best_error, no_checkpoint_to_resume,
                                    restored_best_result, run_record, save_method_checkpoint)
from textrefiner.clip_backbone import (amp_autocast, amp_grad_scaler, check_image_size,
                                       compute_note, load_clip)
from textrefiner.config import ConfigError, validate_cfg
from textrefiner.data import DATASETS, build_loader
from textrefiner.engine.optim import build_scheduler as standalone_scheduler
from textrefiner.engine.optim import (backward_and_step, before_batch, check_loss,
                                      explained_step_errors)
from textrefiner.errors import UserError
from textrefiner.feature_store import labels_of, maybe_stored_evaluation
from textrefiner.methods import build_method, method_class
from textrefiner.seeding import check_resumable_seed, one_loader_pass, restore_from_checkpoint

# --trainer value -> name in Dassl's TRAINER_REGISTRY (prefixed so that the original codebases'
# trainers, registered in the same process, never clash with ours)
TRAINER_NAMES = {name: "TR_" + name
                 for name in ("CoOp", "CoCoOp", "LLaMP", "MaPLe", "PromptKD", "PromptSRC",
                              "ZeroshotCLIP")}
DATASET_PREFIX = "TR_"


def register_once(registry, cls):
    """Register `cls` under its class name unless the registry already holds that name."""
    if cls.__name__ not in registry._obj_map:
        registry.register(cls)
    return registry.get(cls.__name__)


def method_name_of(trainer_name: str):
    """Our method name ("PromptKD") for a registry name ("TR_PromptKD"), else None."""
    for method, registered in TRAINER_NAMES.items():
        if trainer_name in (method, registered):
            return method
    return None


def dassl_dataset_name(name: str) -> str:
    """The registry name of our reader for a dataset YAML's DATASET.NAME ("OxfordPets")."""
    return DATASET_PREFIX + name if name in DATASETS else name


def data_cfg(cfg):
    """A copy of `cfg` whose DATASET.NAME points Dassl's DataManager to our registered readers."""
    clone = cfg.clone()
    clone.defrost()
    clone.DATASET.NAME = dassl_dataset_name(cfg.DATASET.NAME)
    clone.freeze()
    return clone


class MethodTrainer(TrainerX):
    """Generic trainer; subclasses set `method_name`.

    The model is registered under the method's `checkpoint_name`, the name its codebase gives it
    ("prompt_learner" for CoOp, "MultiModalPromptLearner" for MaPLe, "VLPromptLearner" for
    PromptKD), which is also the checkpoint folder.
    """

    method_name = ""  # key of textrefiner.methods.METHODS
    # Dassl saves a checkpoint every TRAIN.CHECKPOINT_FREQ epochs and at the last one (so with
    # the codebases' 0, none to resume from before the end). textrefiner-train sets this: every
    # epoch then leaves one, as on the built-in engine. The drop-in (a codebase's own train.py)
    # keeps Dassl's behaviour.
    checkpoint_every_epoch = False

    @property
    def method_cls(self):
        return method_class(self.method_name)

    @property
    def registered_name(self) -> str:
        return self.method_cls.checkpoint_name or "model"  # "model": nothing is saved

    # ---------------------------------------------------------------- set-up
    def check_cfg(self, cfg):
        section = self.method_cls.config_section
        if "REFINER" not in cfg.TRAINER or section not in cfg.TRAINER:
            raise ConfigError(
                f"The config lacks TRAINER.REFINER or TRAINER.{section}: build it with "
                "textrefiner.config.load_cfg, or call textrefiner.config.extend_cfg(cfg) on "
                "Dassl's default config before merging the YAML files.")
        validate_cfg(cfg)  # PREC among fp16/fp32/amp, refiner values in range

    @property
    def precision(self) -> str:
        return self.cfg.TRAINER[self.method_cls.config_section].PREC

    def build_data_loader(self):
        dm = DataManager(data_cfg(self.cfg))
        self.train_loader_x = dm.train_loader_x
        self.train_loader_u = dm.train_loader_u
        self.val_loader = dm.val_loader
        self.test_loader = dm.test_loader
        self.num_classes = dm.num_classes
        self.num_source_domains = dm.num_source_domains
        self.lab2cname = dm.lab2cname
        self.dm = dm

    def build_model(self):
        cfg = self.cfg
        backbone = cfg.MODEL.BACKBONE.PATH or cfg.MODEL.BACKBONE.NAME
        print(f"Loading CLIP (backbone: {backbone}, precision: "
              f"{compute_note(self.precision, self.device)})")
        clip_model = load_clip(backbone, self.precision, config_key="MODEL.BACKBONE.PATH")
        check_image_size(cfg, clip_model)
        print(f"Building {self.method_name}"
              + (" with TextRefiner" if cfg.TRAINER.REFINER.ENABLED else ""))
        self.model = build_method(self.method_name, cfg, self.dm.dataset.classnames, clip_model)
        if cfg.MODEL.INIT_WEIGHTS:  # as Dassl and the codebases: a file, before training
            load_init_weights(self.model, cfg.MODEL.INIT_WEIGHTS)
        self.model.to(self.device)

        trainable = self.model.trainable_parameters()
        params = list(trainable.values())
        print(f"# trainable params: {sum(p.numel() for p in params):,}")
        groups = self.model.optimizer_groups(trainable)
        self.optim = build_optimizer(None, cfg.OPTIM, param_groups=groups) if params else None
        self.sched = (self.model.lr_scheduler(self.optim, cfg.OPTIM)
                      or build_scheduler(self.optim, cfg.OPTIM)) if params else None
        self.register_model(self.registered_name, self.model, self.optim, self.sched)
        self.scaler = amp_grad_scaler(self.precision, self.device)

    # ---------------------------------------------------------------- training
    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def forward_backward(self, batch):
        before_batch(self.sched, self.epoch, self.batch_idx, self.num_batches)
        images, labels = self.parse_batch_train(batch)
        with amp_autocast(self.precision, self.device):
            loss, parts = self.model.forward_train(images, labels)
        check_loss(loss, self.precision)
        with explained_step_errors(self.precision, self.optim):
            if self.scaler is None and self.model.max_grad_norm is None:
                self.model_backward_and_update(loss)
            else:
                self.model_zero_grad()
                backward_and_step(loss, self.optim, self.scaler, self.model.max_grad_norm)
        faults.after_step(self.epoch + 1, self.batch_idx + 1)  # TEXTREFINER_KILL_AT, for tests
        summary = {"loss": loss.item()}
        summary.update({name: float(value) for name, value in parts.items()})
        if (self.batch_idx + 1) == self.num_batches:  # per-epoch schedule, as CoOp
            self.update_lr()
        return summary

    def after_epoch(self):
        if self.model.skipped_cache_tokens:
            print(f"cache: skipped {self.model.skipped_cache_tokens} non-finite local tokens so far")
        self.model.on_epoch_end(self.epoch, self.max_epoch)  # e.g. PromptSRC's GPA, before saving
        super().after_epoch()
        if self.checkpoint_every_epoch:
            self._keep_one_to_resume_from()
        faults.after_epoch(self.epoch + 1)  # TEXTREFINER_KILL_AT, for tests

    def _keep_one_to_resume_from(self):
        """As the built-in engine: this epoch's checkpoint (where Dassl saved none), and the
        previous epoch's removed unless TRAIN.CHECKPOINT_FREQ keeps it."""
        if self.method_cls.checkpoint_name is None:
            return
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        number = self.epoch + 1  # this epoch's file: model.pth.tar-<number>

        def kept(n):
            return freq > 0 and n % freq == 0

        if not (kept(number) or number == self.max_epoch):
            self.save_model(self.epoch, self.output_dir)
        if number > 1 and not kept(number - 1):
            for name in self.get_model_names():
                previous = checkpoint_path(self.output_dir, name, number - 1)
                if osp.isfile(previous):
                    os.remove(previous)

    def model_inference(self, images):
        with amp_autocast(self.precision, self.device):
            return self.model(images).float()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def test(self, split=None):
        split = split or self.cfg.TEST.SPLIT
        if split == "val" and self.val_loader is None:
            split = "test"  # as Dassl falls back
        if hasattr(self.model, "set_eval_classes"):  # PromptKD scores a slice of its classes
            self.model.set_eval_classes(split, self.cfg.TRAINER.MODAL,
                                        self.cfg.DATASET.SUBSAMPLE_CLASSES)
        stored = self.stored_evaluation()
        if stored is None:
            return super().test(split)
        return self._test_from_store(split, stored)

    def stored_evaluation(self):
        """The feature store's evaluation (TEST.FEATURE_STORE), built on first use; None when it
        is off or the method's image side is prompted or trained."""
        if not hasattr(self, "_stored_eval"):
            self._stored_eval = maybe_stored_evaluation(
                self.cfg.TEST.FEATURE_STORE, self.model, self.test_loader.dataset.transform,
                self.precision, self.device, lambda: amp_autocast(self.precision, self.device),
                print)
        return self._stored_eval

    def _test_from_store(self, split, stored):
        """Dassl's `test` with the image features read from the feature store."""
        self.set_model_mode("eval")
        self.evaluator.reset()
        if split == "val" and self.val_loader is not None:
            loader = self.val_loader
        else:
            split, loader = "test", self.test_loader  # as Dassl falls back
        print(f"Evaluate on the *{split}* set")
        wrapper = loader.dataset  # Dassl's DatasetWrapper: its items and test transform
        items, batch_size = wrapper.data_source, loader.batch_size
        with one_loader_pass():  # draws as Dassl's pass over the test loader
            features = stored.image_features(
                items, self.cfg.DATASET.NAME, batch_size, lambda subset: build_loader(
                    subset, self.cfg, is_train=False, batch_size=batch_size, shuffle=False,
                    transform=wrapper.transform))
        labels = labels_of(items)
        for start, logits in stored.logits(features, batch_size):
            self.evaluator.process(logits.float(),
                                   labels[start:start + logits.shape[0]].to(logits.device))
        results = self.evaluator.evaluate()
        for key, value in results.items():
            self.write_scalar(f"{split}/{key}", value, self.epoch)
        return list(results.values())[0]

    # ---------------------------------------------------------------- checkpoints
    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name=""):
        if self.method_cls.checkpoint_name is None:
            return
        for name in self.get_model_names():
            filename = model_name or f"model.pth.tar-{epoch + 1}"
            path = save_method_checkpoint(self._models[name], osp.join(directory, name, filename),
                                          epoch, self._optims[name], self._scheds[name], val_result,
                                          best_result=float(self.best_result),
                                          **self._run_record(name))
            print(f"Checkpoint saved to {path}")
            if is_best:
                best = save_method_checkpoint(
                    self._models[name], checkpoint_path(directory, name), epoch,
                    self._optims[name], self._scheds[name], val_result, mark_latest=False,
                    best_result=float(self.best_result), **self._run_record(name))
                print(f"Best checkpoint saved to {best}")

    def _run_record(self, name) -> dict:
        """What a checkpoint records of its run (textrefiner-predict builds the model from it)."""
        return {"seed": self.cfg.SEED, **run_record(self.cfg, self._models[name].classnames)}

    def load_model(self, directory, epoch=None):
        """Load `<directory>/<checkpoint_name>/model.pth.tar-<epoch>` (default model-best.pth.tar)."""
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given")
            return
        if self.method_cls.checkpoint_name is None:
            print(f"{self.method_name} has no trained weights: nothing to load")
            return
        for name in self.get_model_names():
            path = checkpoint_path(directory, name, epoch)
            checkpoint = load_method_checkpoint(self._models[name], path)
            print(f"Loaded {path} into {name} (epoch = {checkpoint.get('epoch')})")

    def resume_model_if_exist(self, directory):
        """Resume from the latest checkpoint under `directory`, as Dassl does; returns the epoch."""
        names = self.get_model_names()
        markers = [osp.join(directory, name, LATEST_MARKER) for name in names]
        if not all(osp.isfile(marker) for marker in markers):
            if self.cfg.RESUME:
                raise no_checkpoint_to_resume(directory, names[0])
            print("No checkpoint found, train from scratch")
            return 0
        print(f"Found checkpoint at {directory} (will resume training)")
        start_epoch = 0
        for name, marker in zip(names, markers):
            with open(marker) as f:
                path = osp.join(directory, name, f.readline().strip())
            if not osp.isfile(path):
                raise UserError(f"{marker} names {path} as the checkpoint to resume from, but it "
                                f"is missing: restore it, or delete {marker} to start afresh.")
            checkpoint = load_method_checkpoint(self._models[name], path, resume=True)
            check_resumable_lr(checkpoint, self.cfg.OPTIM.LR, path)
            check_resumable_seed(checkpoint, self.cfg.SEED, path)
            if self._optims[name] is not None and checkpoint.get("optimizer") is not None:
                self._optims[name].load_state_dict(checkpoint["optimizer"])
            if self._scheds[name] is not None and checkpoint.get("scheduler") is not None:
                self._scheds[name].load_state_dict(checkpoint["scheduler"])
            start_epoch = checkpoint["epoch"]
            restore_from_checkpoint(checkpoint)  # the random states where the saved epoch ended
            # Dassl starts the best validation result afresh; an uninterrupted run remembers it.
            self.best_result = restored_best_result(checkpoint, directory, name)
            print(f"Resumed {name} from {path} (epoch = {start_epoch})")
            carried = carry_best_checkpoint(directory, self.output_dir, name)
            if carried:
                print(carried)
        return start_epoch

    def after_train(self):
        """Dassl's, with a clear error when `TEST.FINAL_MODEL best_val` has no best model."""
        cfg = self.cfg
        if (not cfg.TEST.NO_TEST and cfg.TEST.FINAL_MODEL == "best_val"
                and self.method_cls.checkpoint_name):
            for name in self.get_model_names():
                if not osp.isfile(checkpoint_path(self.output_dir, name)):
                    raise missing_best_error(self.output_dir, cfg.RESUME, name,
                                             max(self.max_epoch - self.start_epoch, 0))
        super().after_train()


def build_scheduler(optim, optim_cfg):
    """Dassl's scheduler; its warm-up wrappers pass `verbose` positionally, which recent torch
    versions reject, so fall back to the standalone engine's equivalent schedule then."""
    try:
        return build_lr_scheduler(optim, optim_cfg)
    except TypeError as exc:
        print(f"Dassl's learning-rate scheduler fails on torch {torch.__version__} ({exc}); "
              "using textrefiner.engine.optim's schedule, which gives the same rates")
        return standalone_scheduler(optim, optim_cfg)
