"""Everything both scripts share around the training loop: accelerator, output dir, data loaders, optimizer,
resume, tracking, model files and the closing summary. A script builds its model(s) and calls `Session.fit`."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import accelerate
import torch
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from torch import nn
from torch.utils.data import DataLoader

from kd import footprint
from kd import tracking as keys
from kd.augment import DeviceAugment
from kd.checkpoint import (BEST_MODEL, CHECKPOINTS, FINAL_MODEL, TrainState, checkpoint_dirs, save_model_file,
                           load_model_file, resolve_model_path, save_training_state)
from kd.compute import autocast_dtype, compile_enabled, inference_teacher, memory_format, resolve_precision
from kd.config import validate
from kd.data import DataBundle, EpochSampler, TrainSubset, build_datasets, default_image_size, whole
from kd.engine import Objective, Trainer, evaluate
from kd.errors import UserError, warn
from kd.models import spec_of
from kd.optim import EpochSchedule, build_optimizer, is_fused
from kd.outdir import RUN_FILE, OutputDir
from kd.packed import PackedDataset, packed_bundle
from kd.resume import check_recipe, continue_run, recipe, saved_state
from kd.signals import StopRequest, Stopped, exit_stopped_on_signal, ignore_stop_signals
from kd.teacher_cache import CachedViews

CONFIG_FILE = "config.json"
RUN_OUTPUTS = (CHECKPOINTS, BEST_MODEL, FINAL_MODEL, keys.METRICS_FILE, RUN_FILE, CONFIG_FILE, footprint.FILE, "wandb")


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def slurm_info() -> dict | None:
    """The Slurm job this run is part of (restart_count grows with each requeue), or None outside Slurm."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {"job_id": os.environ["SLURM_JOB_ID"], "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"), "nodes": os.environ.get("SLURM_JOB_NODELIST")}


def versions() -> dict:
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "accelerate": accelerate.__version__,
            "python": sys.version.split()[0], "git_sha": _git_sha()}


class Session:
    def __init__(self, args: argparse.Namespace, job_type: str, normalization: tuple | None = None):
        """`normalization`: the (mean, std) the trained model's weights expect (kd.models.input_normalization);
        None: the dataset's. The data pipeline normalizes every batch that way."""
        validate(args)
        self.args, self.job_type, self.start_time = args, job_type, time.time()
        self.output_dir = Path(args.output_dir)
        self.stop = StopRequest().install()
        self.report_to = keys.prepare_wandb_mode(args.report_to)
        # The device is known before the Accelerator exists: the process state it will use, made as it would.
        process_group = InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))
        device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **process_group.to_kwargs()).device
        precision, self.precision_reason = resolve_precision(args.mixed_precision, device)
        self.accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=args.grad_accum_steps,
            log_with="wandb" if self.report_to == "wandb" else None,
            project_dir=str(self.output_dir),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                      non_blocking=True),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[process_group],
        )
        set_seed(args.seed, device_specific=True)  # different augmentations per process; DDP syncs the weights
        self._claim_output_dir()
        args.image_size = args.image_size or default_image_size(args.dataset)
        self.augment = None  # packed data: the batched on-device augmentation
        with self.accelerator.main_process_first():  # one process downloads or packs, the others find the files
            if args.data_format == "packed":
                self.data: DataBundle = packed_bundle(
                    args.dataset, args.data_dir, args.image_size, pack_size=args.pack_size, packed_dir=args.packed_dir,
                    variant=args.dataset_variant, download=args.download, skip_corrupt=args.skip_corrupt,
                    normalization=normalization, log=self.print)
                args.pack_size = self.data.train.spec.crop  # the default resolved, for config.json
                self.augment = DeviceAugment(args.image_size, args.pack_size, self.data.mean, self.data.std,
                                             args.seed, args.channels_last)
            else:
                self.data = build_datasets(args.dataset, args.data_dir, args.image_size, variant=args.dataset_variant,
                                           download=args.download, seed=args.seed, skip_corrupt=args.skip_corrupt,
                                           normalization=normalization)
        if args.train_fraction < 1:
            self.data.train = TrainSubset(self.data.train, args.train_fraction, args.seed)
        self.print(f"{job_type}: {args.dataset} ({len(self.data.train)} train / {len(self.data.val)} val images, "
                   f"{self.data.num_classes} classes) on {self.accelerator.num_processes} x "
                   f"{self.accelerator.device.type}, precision {self.accelerator.mixed_precision} "
                   f"({self.precision_reason})")

    def print(self, *a) -> None:
        if self.accelerator.is_main_process:  # once per job (accelerator.print prints once per node)
            print(*a, flush=True)

    # ---------------------------------------------------------------- output dir
    def _claim_output_dir(self) -> None:
        """Refuses a dir that holds another run or that another process is using; writes nothing there yet."""
        acc = self.accelerator
        self.outdir = OutputDir(self.output_dir, self.job_type, resume=bool(self.args.resume),
                                overwrite=self.args.overwrite, outputs=RUN_OUTPUTS)
        # Only the main process takes the lock; the others learn its outcome, so that every process stops with
        # the same one line instead of waiting for a process that has left.
        outcome = [None, None, None]  # [error message, takeover line, run id]
        if acc.is_main_process:
            try:
                outcome[1] = self.outdir.claim()
                outcome[2] = self.outdir.run_id(keys.new_run_id())
            except UserError as exc:
                outcome[0] = str(exc)
        if acc.num_processes > 1:
            outcome = broadcast_object_list(outcome)
        if outcome[0]:
            raise UserError(outcome[0])
        if outcome[1]:
            self.print(outcome[1])
        self.run_id = outcome[2]

    def _start(self, config: dict) -> None:
        """The run has really started (data, models and the first step worked): from here on it owns the dir."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.outdir.commit(self.run_id)
            (self.output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        acc.wait_for_everyone()

    # ---------------------------------------------------------------- loaders and optimization
    def _loader(self, dataset, sampler: EpochSampler | None = None) -> DataLoader:
        """The train loader (with the epoch sampler) or the val loader (in order). Folder data augments in the
        workers, each sample seeded by itself (kd.data.IndexedDataset); they restart every epoch. Packed workers
        only copy memory (augmentation is on the device, seeded by hash): they persist, which saves their start-up
        at every epoch and evaluation. Every loader has a generator of its own, so starting workers never draws
        from the global RNG (a resumed run would start them once more than an uninterrupted one, and dropout
        would then differ)."""
        args = self.args
        packed = isinstance(whole(dataset), PackedDataset)
        return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=sampler is not None,
                          num_workers=args.workers, pin_memory=self.accelerator.device.type == "cuda",
                          persistent_workers=packed and args.workers > 0, worker_init_fn=ignore_stop_signals,
                          generator=torch.Generator())

    def _check_enough_data(self) -> None:
        global_batch = self.args.batch_size * self.accelerator.num_processes
        if len(self.data.train) < global_batch:
            raise UserError(f"the train set has {len(self.data.train)} images, fewer than one global batch "
                            f"({self.accelerator.num_processes} processes x --batch-size {self.args.batch_size}): "
                            f"lower --batch-size")

    def resolved_config(self) -> dict:
        acc = self.accelerator
        return {**vars(self.args), "job_type": self.job_type, "num_processes": acc.num_processes,
                "global_batch_size": self.args.batch_size * acc.num_processes * self.args.grad_accum_steps,
                "mixed_precision": acc.mixed_precision, "num_classes": self.data.num_classes,
                "train_images": len(self.data.train), "val_images": len(self.data.val), "run_id": self.run_id,
                "versions": versions(), "slurm": slurm_info()}

    # ---------------------------------------------------------------- training
    def fit(self, model: nn.Module, arch: str, objective: Objective | None = None) -> dict:
        args, acc = self.args, self.accelerator
        objective = objective or Objective()
        spec = spec_of(model, arch)  # before DDP wraps the model
        self._check_enough_data()
        sampler = EpochSampler(self.data.train, args.seed)
        train_loader, val_loader = self._loader(self.data.train, sampler), self._loader(self.data.val)
        model = model.to(memory_format=memory_format(args.channels_last))
        objective.attach(model)  # a feature method's hooks, on the student itself (DDP and compile keep them)
        parts = objective.trainable()  # a method's trainable parts (FitNet's regressor) share the optimizer
        for part in parts:  # in the student's layout, so DDP's gradient buckets match their strides
            part.to(memory_format=memory_format(args.channels_last))
        optimizer = build_optimizer(nn.ModuleList([model, *parts]) if parts else model, args.opt, args.lr,
                                    args.weight_decay, args.momentum, args.nesterov, acc.device)
        model, optimizer, train_loader, val_loader = acc.prepare(model, optimizer, train_loader, val_loader)
        objective.prepare(acc)
        compile_models = compile_enabled(args.compile, acc.device)
        # Compiled after DDP, as accelerate does; `model` (uncompiled) stays the one saved and checkpointed.
        train_model = torch.compile(model) if compile_models else model
        if objective.teacher is not None:
            objective.teacher = inference_teacher(objective.teacher, acc.device, autocast_dtype(acc.mixed_precision),
                                                  args.channels_last, compile_models,
                                                  objective.method.teacher_layers if objective.method else ())
        if objective.cache is not None:
            objective.cache = objective.cache.to(acc.device)
        batch_transform, eval_transform = self._batch_transforms(objective)
        geometry = {"num_processes": acc.num_processes, "batch_size": args.batch_size,
                    "grad_accum_steps": args.grad_accum_steps}
        state = TrainState(epochs=args.epochs, geometry=geometry, hparams=recipe(args, self.data))
        acc.register_for_checkpointing(state)
        global_batch = args.batch_size * acc.num_processes
        self._resume(state, geometry, len(self.data.train) // global_batch * global_batch)
        sampler.resume_at(state.epoch, state.samples_in_epoch)
        schedule = EpochSchedule(optimizer, args.lr, args.warmup_epochs, args.epochs, state.segments)

        config = {**self.resolved_config(), "fused_optimizer": is_fused(optimizer), "resume_history": state.history}
        if objective.distills:
            config["method_settings"] = objective.method.settings()
        config = json.loads(json.dumps(config, default=str))  # plain types: safe to unpickle
        tracker = keys.Tracker(acc, self.output_dir)
        teacher_acc1 = None
        if objective.distills:
            if objective.cache is not None:  # measured when the cache was built, on the same packed val images
                teacher_acc1 = objective.cache.meta["teacher"]["val_acc1"]
            else:
                with acc.autocast():  # the teacher is not prepared, so its forward is not wrapped in autocast
                    teacher_acc1 = evaluate(acc, objective.teacher, val_loader, transform=eval_transform)[keys.VAL_ACC1]
            self.print(f"teacher val top-1: {teacher_acc1:.4f}")

        def on_start() -> None:  # after the first step: the run works, from here on it writes to its dir
            self._start(config)
            tracker.start(self.report_to, config, project=args.wandb_project, run_id=self.run_id,
                          job_type=self.job_type, name=args.run_name, entity=args.wandb_entity,
                          group=args.wandb_group, tags=args.wandb_tags, resume_step=state.global_step)
            if teacher_acc1 is not None:
                if state.global_step == 0:
                    tracker.log({keys.TEACHER_VAL_ACC1: teacher_acc1}, step=0)
                tracker.summary({keys.TEACHER_VAL_ACC1: teacher_acc1})

        meta = {"arch": arch, "model": spec, "head": args.head, "method": config.get("method"), "num_classes": self.data.num_classes,
                "class_names": self.data.class_names, "image_size": self.data.image_size,
                "mean": list(self.data.mean), "std": list(self.data.std), "dataset": args.dataset,
                "job_type": self.job_type, "config": config}

        def on_epoch_end(trainer: Trainer, val_metrics: dict, is_best: bool) -> None:
            self.print(f"epoch {trainer.state.epoch}/{args.epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in val_metrics.items()))
            if is_best:
                self._save_model(model, BEST_MODEL, {**meta, "epoch": trainer.state.epoch,
                                                     "val_acc1": val_metrics[keys.VAL_ACC1]})

        trainer = Trainer(acc, train_model, objective, optimizer, schedule, train_loader, val_loader, tracker, state,
                          epochs=args.epochs, log_every=args.log_every, clip_grad_norm=args.clip_grad_norm,
                          on_epoch_end=on_epoch_end, checkpoint_every=args.checkpoint_every, stop=self.stop,
                          save_state=lambda s: save_training_state(acc, self.output_dir, s, args.keep_checkpoints),
                          batch_transform=batch_transform, eval_transform=eval_transform, on_start=on_start)
        try:
            final = trainer.fit()
        except Stopped:
            self.print(f"stopped by signal at step {state.global_step}; state saved in {self.output_dir / CHECKPOINTS}"
                       f": run again with --resume to continue")
            exit_stopped_on_signal()
            self._close(tracker)
            raise
        if not final:  # resumed a finished run: nothing left to train
            final = trainer.evaluate()
        self._save_model(model, FINAL_MODEL, {**meta, "epoch": state.epoch, "val_acc1": final[keys.VAL_ACC1]})
        self._measure_footprint(tracker)
        self._close(tracker)
        return self._summarize(state, final, trainer)

    def _close(self, tracker: keys.Tracker) -> None:
        """W&B first (main process), then every process together: ranks leaving early would make torchrun kill
        rank 0 while it closes W&B. Accelerate's end_training would destroy the process group before that wait."""
        tracker.finish()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()  # trackers are closed by now: this only destroys the process group
        self.outdir.close()

    def _batch_transforms(self, objective: Objective) -> tuple:
        """(train batch_transform, eval transform) for the Trainer: on-device augmentation of packed images (with
        the cached views when distilling from a cache), or just the memory layout for ready-made folder batches."""
        if self.augment is None:
            layout = memory_format(self.args.channels_last)
            return (lambda images, indices, epoch: (images.contiguous(memory_format=layout), None),
                    lambda images: images.contiguous(memory_format=layout))
        if objective.cache is not None:
            return CachedViews(objective.cache, self.augment), self.augment.eval_batch
        return self.augment.train_batch, self.augment.eval_batch

    def _resume(self, state: TrainState, geometry: dict, epoch_samples: int) -> None:
        args, acc = self.args, self.accelerator
        if not args.resume or args.overwrite:
            return
        if args.resume == "auto":
            found = checkpoint_dirs(self.output_dir)
            partial = sorted((self.output_dir / CHECKPOINTS).glob(".tmp-*"))
            if partial:
                self.print(f"ignoring {len(partial)} incomplete checkpoint(s) (interrupted while saving): "
                           f"{', '.join(p.name for p in partial)}")
            if not found:
                self.print(f"--resume: no checkpoint in {self.output_dir / CHECKPOINTS}; starting from scratch")
                return
            path = found[-1]
        else:
            path = Path(args.resume)
            if not (path / "kd_complete").is_file():
                raise UserError(f"--resume {path} is not a complete checkpoint folder: pass --resume without a "
                                f"value to pick the latest one in --output-dir")
        saved = saved_state(path)
        check_recipe(saved, state.hparams, args, path)
        acc.load_state(str(path))
        self.print(f"resumed from {path}: epoch {state.epoch}, step {state.global_step}")
        for line in continue_run(state, args, recipe(args, self.data), geometry, epoch_samples, path):
            self.print(line)

    def _save_model(self, model: nn.Module, name: str, meta: dict) -> None:
        if self.accelerator.is_main_process:
            state_dict = self.accelerator.get_state_dict(model)
            save_model_file(self.output_dir / name, state_dict, meta)
        self.accelerator.wait_for_everyone()

    def _measure_footprint(self, tracker: keys.Tracker) -> None:
        """compression.json and the W&B summary: the shipped model (model_best.pt, read back from disk) measured once
        by the main process while the others wait."""
        acc = self.accelerator
        if acc.is_main_process:
            path = resolve_model_path(self.output_dir)
            try:
                model, meta = load_model_file(path)
                figures = {"model": path.name, **footprint.measure(model, meta["image_size"], path, acc.device)}
            except Exception as exc:  # noqa: BLE001 - a finished run must not fail on its epilogue
                warn(f"could not measure {path.name} ({exc.__class__.__name__}: {exc}); the run is complete, "
                     f"measure it later with python -m kd.footprint {self.output_dir} --save")
            else:
                footprint.save(self.output_dir, figures)
                tracker.summary(footprint.summary_values(figures))
                self.print(f"footprint of {path.name}: {footprint.describe(figures)}")
        acc.wait_for_everyone()

    def _summarize(self, state: TrainState, final: dict, trainer: Trainer) -> dict:
        wall = time.time() - self.start_time
        img_per_s = trainer.images_seen / trainer.train_seconds if trainer.train_seconds else 0.0
        summary = {"best_val_acc1": state.best_acc1, "best_epoch": state.best_epoch,
                   "final_val_acc1": final[keys.VAL_ACC1], "wall_seconds": wall, "train_img_per_s": img_per_s,
                   "model": str(self.output_dir / BEST_MODEL)}
        self.print(f"done in {wall / 60:.1f} min: best val top-1 {state.best_acc1:.4f} (epoch {state.best_epoch}), "
                   f"final {final[keys.VAL_ACC1]:.4f}, {img_per_s:.0f} img/s training; best model: "
                   f"{self.output_dir / BEST_MODEL}")
        return summary
