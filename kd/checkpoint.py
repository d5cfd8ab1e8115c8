"""Training state (Accelerate save_state, for exact resume) and portable model files (for use anywhere).

Layout of an output dir:
    checkpoints/epoch_0003/   full training state; a folder is complete once it holds COMPLETE_MARKER
    model_best.pt, model_final.pt   {"format", "state_dict", "meta"}: loadable with torch + kd.models alone;
    meta["model"] records the family, name and constructor arguments that rebuild it (kd.models.model_spec)
"""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from kd.errors import UserError, free_bytes, no_space_message
from kd.models import build_model
from kd.models.weights import KD_MODEL_FORMAT as MODEL_FORMAT
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "kd_complete"
BEST_MODEL, FINAL_MODEL = "model_best.pt", "model_final.pt"
MIN_FREE = 1 << 20  # a write that failed with less than this left on its filesystem failed for lack of space


@dataclass
class TrainState:
    """Progress saved with every checkpoint (registered with accelerator.register_for_checkpointing), and what
    a resume needs to continue it under another geometry or refuse a changed recipe (kd.resume)."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # batches per process of epoch `epoch` already trained (non-zero only mid-epoch)
    samples_in_epoch: int = 0  # samples of epoch `epoch` trained over all processes: where a resume continues
    global_step: int = 0  # optimizer steps
    epoch_loss_sum: float = 0.0  # sample-weighted training-loss sum over those samples (all processes)
    best_acc1: float = -1.0
    best_epoch: int = 0
    epochs: int = 0  # --epochs of the run that saved it
    geometry: dict = field(default_factory=dict)  # num_processes, batch_size, grad_accum_steps of that run
    hparams: dict = field(default_factory=dict)  # the flags that define the training (kd.resume.training_flags)
    segments: list = field(default_factory=list)  # LR schedule extensions (kd.optim.EpochSchedule)
    history: list = field(default_factory=list)  # one record per resume: when, from where, what changed
    legacy: bool = False  # saved by a kd that counted batches, not samples: same geometry assumed

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.legacy = "samples_in_epoch" not in state


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones (no marker, or a .tmp- name) are never listed."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: p.name)


def save_training_state(accelerator: Accelerator, output_dir: Path, state: TrainState, keep: int) -> Path:
    """All processes must call this. Writes to a temporary folder, then renames, so a crash mid-write leaves the
    previous checkpoint as the latest."""
    name = f"epoch_{state.epoch:04d}" + (f"_step_{state.step_in_epoch:06d}" if state.step_in_epoch else "")
    root = Path(output_dir) / CHECKPOINTS
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / COMPLETE_MARKER).write_text(f"{state}\n")
            _fsync_tree(tmp)
    except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as a bare RuntimeError
        raise _write_failed(exc, tmp, output_dir) from None
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _write_failed(exc: Exception, tmp: Path, output_dir: Path) -> Exception:
    """A failed checkpoint write: the partial folder is removed (the previous checkpoint stays the latest); a full
    disk becomes one line saying how much space is missing, anything else is re-raised as it was."""
    disk_full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left" in str(exc) or free_bytes(tmp) < MIN_FREE
    complete = checkpoint_dirs(output_dir)
    needed = _tree_size(complete[-1]) if complete else _tree_size(tmp)
    message = no_space_message(tmp, needed) if disk_full else ""
    shutil.rmtree(tmp, ignore_errors=True)
    if not disk_full:
        return exc
    last = f"; the last complete checkpoint is {complete[-1].name}" if complete else ""
    return UserError(f"{message}{last}")


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def save_model_file(path: Path, state_dict: dict, meta: dict) -> None:
    """Atomic: the file is either the previous version or the new one, never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}
    try:
        torch.save({"format": MODEL_FORMAT, "meta": meta, "state_dict": state_dict}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as a bare RuntimeError
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or free_bytes(tmp) < MIN_FREE
        needed = tmp.stat().st_size if tmp.exists() else None
        message = no_space_message(tmp, needed) if full else ""
        tmp.unlink(missing_ok=True)
        if full:
            raise UserError(f"{message}; {path.name} is unchanged") from None
        raise
    os.replace(tmp, path)


def resolve_model_path(path: str | Path) -> Path:
    """A model file, or a run's output dir (its best model, else its final one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (BEST_MODEL, FINAL_MODEL):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} holds no {BEST_MODEL} or {FINAL_MODEL}: pass a finished train_teacher.py output "
                        f"dir or a model file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass a train_teacher.py output dir or its model_best.pt")
    return path


# What a model file's metadata must hold, and of which type: the scripts and caches read these.
META_TYPES = {"arch": str, "num_classes": int, "class_names": list, "image_size": int, "mean": list, "std": list}


def _check_meta(path: Path, meta) -> None:
    if not isinstance(meta, dict):
        raise UserError(f"{path} has no metadata: it is not a kd model file; pass the model_best.pt written by "
                        f"train_teacher.py")
    wrong = [f"{key} ({'missing' if key not in meta else type(meta[key]).__name__ + ', not ' + kind.__name__})"
             for key, kind in META_TYPES.items() if not isinstance(meta.get(key), kind)]
    if "val_acc1" in meta and not isinstance(meta["val_acc1"], (int, float)):
        wrong.append(f"val_acc1 ({type(meta['val_acc1']).__name__}, not a number)")
    if not wrong and len(meta["class_names"]) != meta["num_classes"]:
        wrong.append(f"class_names ({len(meta['class_names'])} names for {meta['num_classes']} classes)")
    if wrong:
        raise UserError(f"{path}: damaged metadata: {', '.join(wrong)}; retrain or pass the model_best.pt written "
                        f"by train_teacher.py")


def load_model_file(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on CPU, metadata) from a model file or a run dir."""
    path = resolve_model_path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises anything (KeyError, EOFError...) on garbage
        raise UserError(f"cannot read {path} ({exc.__class__.__name__}): the file is truncated or not a kd model "
                        f"file; retrain or pass another checkpoint") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UserError(f"{path} is not a kd model file (expected format {MODEL_FORMAT}); pass the model_best.pt "
                        f"written by train_teacher.py")
    meta = blob.get("meta")
    _check_meta(path, meta)
    try:  # files before kd-model specs hold torchvision ResNets and CIFAR ResNets, which their arch names rebuild
        model = build_model(meta["arch"], meta["num_classes"], head=meta.get("head", "linear"), spec=meta.get("model"))
    except UserError as exc:
        raise UserError(f"{path}: cannot rebuild its model: {exc}") from None
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not match {meta['arch']} with {meta['num_classes']} classes "
                        f"({str(exc).splitlines()[0]})") from None
    return model.eval(), meta
