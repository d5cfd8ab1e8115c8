"""What a resume may change, and how it continues.

A resume never silently trains another recipe: every flag that defines the training (learning rate, optimizer,
seed, models, loss, data, image size, ...) must equal the checkpoint's, or the run is refused with one line naming
each flag and its saved value. Three things may change, each stated in the log and recorded in the checkpoint's
and config.json's `resume_history`:
  - the geometry (processes, --batch-size, --grad-accum-steps), e.g. a requeued job on fewer GPUs: the schedule
    runs in epochs and the train order is one permutation per epoch whatever the geometry, so the run continues
    with the samples the interrupted epoch had not reached, each once (kd.data.EpochSampler);
  - --epochs: an extension (or a shortening) that ends the current LR schedule with a new cosine segment, from the
    LR reached at the resume point down to 0 at the new last epoch; a schedule that had already ended restarts
    at the peak LR (a warm restart, no warmup);
  - infrastructure flags (MAY_CHANGE): paths, workers, logging, checkpointing, tracking, precision, compile.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kd.checkpoint import TrainState
from kd.errors import UserError
from kd.optim import EpochSchedule

GEOMETRY = ("num_processes", "batch_size", "grad_accum_steps")
MAY_CHANGE = {
    "epochs", "batch_size", "grad_accum_steps",  # the extension and the geometry: continued, see above
    "data_dir", "packed_dir", "output_dir", "resume", "overwrite", "download", "skip_corrupt", "workers",
    "checkpoint_every", "keep_checkpoints", "dist_timeout", "log_every", "report_to", "wandb_project",
    "wandb_entity", "wandb_group", "wandb_tags", "run_name", "compile", "channels_last", "mixed_precision",
    "teacher_checkpoint", "teacher_cache",  # files may move; the cache checks its teacher by hash
}


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def training_flags(args) -> dict:
    """The flags a resume must keep: all but MAY_CHANGE, so a flag added later is protected by default."""
    return {k: _plain(v) for k, v in sorted(vars(args).items()) if k not in MAY_CHANGE}


def saved_state(path: Path) -> dict:
    """The TrainState a checkpoint folder holds (registered first, so Accelerate's custom_checkpoint_0), read
    before Accelerate loads the models: a changed recipe is refused before it fails as a shape mismatch."""
    try:
        return torch.load(Path(path) / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state file
        raise UserError(f"cannot read the training state in {path} ({exc.__class__.__name__}): resume from an "
                        f"older checkpoint (--resume PATH) or start over with --overwrite") from None


def recipe(args, data) -> dict:
    """training_flags plus what the data is: the same flags on another folder are another recipe."""
    return {**training_flags(args), "train_images": len(data.train), "classes": len(data.class_names)}


def check_recipe(saved: dict, now: dict, args, path: Path) -> None:
    """Refuses a resume that changes a flag of the recipe, naming each one with its saved value."""
    before = saved.get("hparams") or {}
    changed = [k for k in sorted(before) if k in now and before[k] != now[k]]
    if changed:
        flags = ", ".join(f"{'--' + k.replace('_', '-') if hasattr(args, k) else k} {_show(now[k])} (saved: "
                          f"{_show(before[k])})" for k in changed)
        raise UserError(f"--resume from {path}: this command changes {flags}; a resume continues the saved recipe: "
                        f"pass the saved values (only --epochs, the batch geometry and infrastructure flags may "
                        f"change), or start a new run in another --output-dir")
    epochs, done = args.epochs, saved.get("epoch", 0)
    if epochs < done:
        raise UserError(f"--epochs {epochs} is fewer than the {done} epochs {path} has completed: pass --epochs "
                        f">= {done}")


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def continue_run(state: TrainState, args, now: dict, geometry: dict, epoch_samples: int, path: Path) -> list[str]:
    """After Accelerate loaded `state` from `path`: adapts it to this command (geometry, --epochs), records the
    resume in its history and returns the lines that say what changed."""
    lines, changes = [], {}
    saved_geometry = state.geometry or geometry
    if state.legacy:  # counted batches of the geometry that wrote it, which was not recorded: assume this one
        per_batch = geometry["batch_size"] * geometry["num_processes"]
        state.samples_in_epoch = state.step_in_epoch * per_batch
        state.epoch_loss_sum *= per_batch
        state.epochs = state.epochs or args.epochs
    for key in GEOMETRY:
        if saved_geometry.get(key) != geometry[key]:
            changes[key] = [saved_geometry.get(key), geometry[key]]
    if changes:
        global_batch = {k: v for k, v in ((k, saved_geometry.get(k)) for k in GEOMETRY)}
        lines.append(f"resuming with another geometry ({_geometry(global_batch)} -> {_geometry(geometry)}): the LR "
                     f"schedule continues in epochs" + (f"; the remaining samples of epoch {state.epoch + 1} "
                                                        f"({state.samples_in_epoch} of {epoch_samples} done) are "
                                                        f"trained once" if state.samples_in_epoch else ""))
    saved_epochs = state.epochs or args.epochs
    progress = state.epoch + state.samples_in_epoch / epoch_samples
    if args.epochs != saved_epochs and progress < args.epochs:
        old = EpochSchedule(None, args.lr, args.warmup_epochs, saved_epochs, state.segments)
        ended = progress >= (state.segments[-1]["end"] if state.segments else saved_epochs)
        factor = 1.0 if ended else old.factor(progress, progress)
        state.segments = [*state.segments, {"start": progress, "end": float(args.epochs), "factor": factor}]
        changes["epochs"] = [saved_epochs, args.epochs]
        how = "restarts at the peak" if ended else "continues"
        lines.append(f"--epochs {saved_epochs} -> {args.epochs}: the LR schedule {how} at {args.lr * factor:.4g} "
                     f"from epoch {progress:.3g} and decays along a new cosine segment to 0 at epoch {args.epochs}")
    elif args.epochs != saved_epochs:
        changes["epochs"] = [saved_epochs, args.epochs]
    state.history = [*state.history, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": str(path),
                                      "epoch": state.epoch, "samples_in_epoch": state.samples_in_epoch,
                                      "global_step": state.global_step, "changes": changes}]
    state.epochs, state.geometry, state.hparams, state.legacy = args.epochs, geometry, now, False
    return lines


def _geometry(g: dict) -> str:
    return (f"{g['num_processes']} processes x --batch-size {g['batch_size']} x --grad-accum-steps "
            f"{g['grad_accum_steps']}")
