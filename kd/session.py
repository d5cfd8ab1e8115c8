"""Everything both scripts share around the training loop: accelerator, output dir, data loaders, optimizer,
resume, tracking, model files and the closing summary. A script builds its model(s) and calls `Session.fit`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import accelerate
import torch
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from kd import footprint
from kd import tracking as keys
from kd.augment import DeviceAugment
from kd.checkpoint import (BEST_MODEL, CHECKPOINTS, FINAL_MODEL, TrainState, checkpoint_dirs, save_model_file,
                           load_model_file, resolve_model_path, save_training_state)
from kd.compute import autocast_dtype, compile_enabled, inference_teacher, memory_format
from kd.config import validate
from kd.data import DataBundle, TrainSubset, build_datasets, default_image_size, whole
from kd.engine import Objective, Trainer, evaluate
from kd.errors import UserError, warn
from kd.models import spec_of
from kd.optim import build_optimizer, is_fused, warmup_cosine
from kd.packed import PackedDataset, packed_bundle
from kd.signals import StopRequest, Stopped, ignore_stop_signals
from kd.teacher_cache import CachedViews

RUN_FILE, CONFIG_FILE = "run.json", "config.json"
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
        try:
            self.accelerator = Accelerator(
                mixed_precision=args.mixed_precision,
                gradient_accumulation_steps=args.grad_accum_steps,
                log_with="wandb" if self.report_to == "wandb" else None,
                project_dir=str(self.output_dir),
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                          non_blocking=True),
                step_scheduler_with_optimizer=False,
                kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))],
            )
        except ValueError as exc:  # e.g. fp16 requested on a CPU
            raise UserError(f"--mixed-precision {args.mixed_precision}: {exc}") from None
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
                   f"{self.accelerator.device.type}, precision {self.accelerator.mixed_precision}")

    def print(self, *a) -> None:
        if self.accelerator.is_main_process:  # once per job (accelerator.print prints once per node)
            print(*a, flush=True)

    # ---------------------------------------------------------------- output dir
    def _claim_output_dir(self) -> None:
        """Refuses to mix two runs in one dir. Every process checks before any process writes."""
        args, acc, out = self.args, self.accelerator, self.output_dir
        run_file = out / RUN_FILE
        previous = json.loads(run_file.read_text()) if run_file.is_file() else None
        if previous and not (args.resume or args.overwrite):
            raise UserError(f"{out} already holds a {previous['job_type']} run: pass --resume to continue it, "
                            f"--overwrite to replace it, or another --output-dir")
        if previous and args.resume and not args.overwrite and previous["job_type"] != self.job_type:
            raise UserError(f"{out} holds a {previous['job_type']} run, not a {self.job_type} run: pass another "
                            f"--output-dir")
        try:  # a real write probe: os.access is always true for root, and says nothing of read-only mounts
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
        except OSError as exc:
            raise UserError(f"--output-dir {out} is not writable ({exc.strerror}): pass a folder you can write "
                            f"to") from None
        acc.wait_for_everyone()
        keep = previous is not None and not args.overwrite
        self.run_id = previous["run_id"] if keep else keys.new_run_id()
        if acc.is_main_process:
            if args.overwrite:
                for name in RUN_OUTPUTS:
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            if not keep:
                run_file.write_text(json.dumps({"run_id": self.run_id, "job_type": self.job_type}) + "\n")
        acc.wait_for_everyone()

    # ---------------------------------------------------------------- loaders and optimization
    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        args = self.args
        # Folder data augments in the workers: they restart every epoch, reseeded from the checkpointed RNG, so a
        # resume is exact. Packed workers only copy memory (augmentation is on the device, seeded by hash): they
        # persist, which saves their start-up at every epoch and evaluation (many workers, short epochs on a GPU),
        # and their loader gets a generator of its own, so that starting workers never draws from the global RNG
        # (a resumed run would start them once more than an uninterrupted one, and dropout would then differ).
        packed = isinstance(whole(dataset), PackedDataset)
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=args.workers, pin_memory=self.accelerator.device.type == "cuda",
                          persistent_workers=packed and args.workers > 0, worker_init_fn=ignore_stop_signals,
                          generator=torch.Generator() if packed else None)

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
        train_loader, val_loader = self._loader(self.data.train, True), self._loader(self.data.val, False)
        model = model.to(memory_format=memory_format(args.channels_last))
        optimizer = build_optimizer(model, args.opt, args.lr, args.weight_decay, args.momentum, args.nesterov,
                                    acc.device)
        model, optimizer, train_loader, val_loader = acc.prepare(model, optimizer, train_loader, val_loader)
        compile_models = compile_enabled(args.compile, acc.device)
        # Compiled after DDP, as accelerate does; `model` (uncompiled) stays the one saved and checkpointed.
        train_model = torch.compile(model) if compile_models else model
        steps_per_epoch = -(-len(train_loader) // args.grad_accum_steps)
        scheduler = warmup_cosine(optimizer, round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch)
        if objective.teacher is not None:
            objective.teacher = inference_teacher(objective.teacher, acc.device, autocast_dtype(acc.mixed_precision),
                                                  args.channels_last, compile_models)
        if objective.cache is not None:
            objective.cache = objective.cache.to(acc.device)
        batch_transform, eval_transform = self._batch_transforms(objective)
        state = TrainState()
        acc.register_for_checkpointing(state, scheduler)
        self._resume(state)

        config = {**self.resolved_config(), "fused_optimizer": is_fused(optimizer)}
        config = json.loads(json.dumps(config, default=str))  # plain types: safe to unpickle
        if acc.is_main_process:
            (self.output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tracker = keys.Tracker(acc, self.output_dir)
        tracker.start(self.report_to, config, project=args.wandb_project, run_id=self.run_id, job_type=self.job_type,
                      name=args.run_name, entity=args.wandb_entity, group=args.wandb_group, tags=args.wandb_tags,
                      resume_step=state.global_step)
        if objective.distills:
            if objective.cache is not None:  # measured when the cache was built, on the same packed val images
                teacher_acc1 = objective.cache.meta["teacher"]["val_acc1"]
            else:
                with acc.autocast():  # the teacher is not prepared, so its forward is not wrapped in autocast
                    teacher_acc1 = evaluate(acc, objective.teacher, val_loader, transform=eval_transform)[keys.VAL_ACC1]
            self.print(f"teacher val top-1: {teacher_acc1:.4f}")
            if state.global_step == 0:
                tracker.log({keys.TEACHER_VAL_ACC1: teacher_acc1}, step=0)
            tracker.summary({keys.TEACHER_VAL_ACC1: teacher_acc1})

        meta = {"arch": arch, "model": spec, "head": args.head, "num_classes": self.data.num_classes,
                "class_names": self.data.class_names, "image_size": self.data.image_size,
                "mean": list(self.data.mean), "std": list(self.data.std), "dataset": args.dataset,
                "job_type": self.job_type, "config": config}

        def on_epoch_end(trainer: Trainer, val_metrics: dict, is_best: bool) -> None:
            self.print(f"epoch {trainer.state.epoch}/{args.epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in val_metrics.items()))
            if is_best:
                self._save_model(model, BEST_MODEL, {**meta, "epoch": trainer.state.epoch,
                                                     "val_acc1": val_metrics[keys.VAL_ACC1]})

        trainer = Trainer(acc, train_model, objective, optimizer, scheduler, train_loader, val_loader, tracker, state,
                          epochs=args.epochs, log_every=args.log_every, clip_grad_norm=args.clip_grad_norm,
                          on_epoch_end=on_epoch_end, checkpoint_every=args.checkpoint_every, stop=self.stop,
                          save_state=lambda s: save_training_state(acc, self.output_dir, s, args.keep_checkpoints),
                          batch_transform=batch_transform, eval_transform=eval_transform)
        try:
            final = trainer.fit()
        except Stopped:
            self.print(f"stopped by signal at step {state.global_step}; state saved in {self.output_dir / CHECKPOINTS}"
                       f": run again with --resume to continue")
            tracker.finish()
            acc.wait_for_everyone()  # ranks leaving early would make torchrun kill rank 0 while it closes W&B
            raise
        if not final:  # resumed a finished run: nothing left to train
            final = trainer.evaluate()
        self._save_model(model, FINAL_MODEL, {**meta, "epoch": state.epoch, "val_acc1": final[keys.VAL_ACC1]})
        self._measure_footprint(tracker)
        tracker.finish()
        return self._summarize(state, final, trainer)

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

    def _resume(self, state: TrainState) -> None:
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
        acc.load_state(str(path))
        self.print(f"resumed from {path}: epoch {state.epoch}, step {state.global_step}")

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
