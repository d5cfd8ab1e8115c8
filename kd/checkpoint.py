"""Training state (Accelerate save_state, for exact resume) and portable model files (for use anywhere).

Layout of an output dir:
    checkpoints/epoch_0003/   full training state; a folder is complete once it holds COMPLETE_MARKER
    model_best.pt, model_final.pt   {"format", "state_dict", "meta"}: loadable with torch + kd.models alone;
    meta["model"] records the family, name and constructor arguments that rebuild it (kd.models.model_spec)
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from kd.errors import UserError
from kd.models import build_model
from kd.models.weights import KD_MODEL_FORMAT as MODEL_FORMAT
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "kd_complete"
BEST_MODEL, FINAL_MODEL = "model_best.pt", "model_final.pt"


@dataclass
class TrainState:
    """Progress saved with every checkpoint (registered with accelerator.register_for_checkpointing)."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # batches of epoch `epoch` already trained (non-zero only after a mid-epoch save)
    global_step: int = 0  # optimizer steps
    epoch_loss_sum: float = 0.0  # training-loss sum over the batches of a mid-epoch save (mean over processes)
    best_acc1: float = -1.0
    best_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(f"{state}\n")
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    torch.save({"format": MODEL_FORMAT, "meta": meta, "state_dict": state_dict}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
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
    meta = blob["meta"]
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
