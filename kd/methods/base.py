"""What a distillation method is: an nn.Module from (student and teacher outputs, targets) to (loss, named parts).

A method declares what it needs: logits only, or the feature maps of named student and teacher modules
(`student_layers`, `teacher_layers`, which kd.features provides), and owns its trainable parts as submodules
(FitNet's regressor): kd's Session prepares it with accelerate (DDP syncs their gradients), gives its parameters
to the optimizer and saves it in the training-state checkpoint, never in the student's model file. Its flags are
its own --help group (`add_flags`), built from them by `from_args`; `settings()` is what config.json records.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from kd import tracking as keys
from kd.errors import UserError
from kd.features import feature_shapes, last_feature_map
from kd.losses import standardize_logits


class Method(nn.Module):
    name = ""
    paper = ""
    default_temperature: float | None = None  # logit methods: --temperature when not given
    # ... and with --logit-standardize: z-scored logits have unit spread, so the paper's base temperature is lower
    standardized_temperature: float | None = None

    @classmethod
    def temperature_default(cls, logit_standardize: bool = False) -> float | None:
        if logit_standardize and cls.standardized_temperature is not None:
            return cls.standardized_temperature
        return cls.default_temperature
    uses_features = False  # feature methods cannot run from a teacher cache (it holds logits only)

    def __init__(self):
        super().__init__()
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """The method's own flags, in an argument group of their own."""

    @classmethod
    def checks(cls, args: argparse.Namespace) -> list[tuple[bool, str]]:
        """(ok, error message) for each value argparse cannot check."""
        return []

    @classmethod
    def from_args(cls, args: argparse.Namespace, student: nn.Module, teacher: nn.Module | None,
                  image_size: int) -> "Method":
        raise NotImplementedError

    def settings(self) -> dict:
        """The hyperparameters this method uses, for config.json, W&B and the model file."""
        return {}

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                student_features=(), teacher_features=(), epoch: int = 0) -> tuple[torch.Tensor, dict]:
        """(loss, {metric key: part}) for one batch; `epoch` counts from 0 (DKD's warm-up uses it)."""
        raise NotImplementedError


def part(name: str) -> str:
    """The metric key of a named loss part, next to train/loss_ce and train/loss_kd."""
    return f"train/loss_{name}"


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


class LogitMethod(Method):
    """A method on logits, with optional logit standardization (Sun et al. 2024) of both sides."""

    def __init__(self, temperature: float, logit_standardize: bool = False):
        super().__init__()
        self.temperature, self.logit_standardize = temperature, logit_standardize

    def soft_inputs(self, student_logits, teacher_logits):
        if self.logit_standardize:
            return standardize_logits(student_logits), standardize_logits(teacher_logits.detach())
        return student_logits, teacher_logits

    def settings(self) -> dict:
        return {"temperature": self.temperature, "logit_standardize": self.logit_standardize}


class FeatureMethod(Method):
    """A method on feature maps of (student layer, teacher layer) pairs, plus cross-entropy."""

    uses_features = True

    def __init__(self, student_layers: list[str], teacher_layers: list[str]):
        super().__init__()
        if len(student_layers) != len(teacher_layers) or not student_layers:
            raise ValueError("give as many student layers as teacher layers, at least one")
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)

    def settings(self) -> dict:
        return {"student_layers": self.student_layers, "teacher_layers": self.teacher_layers}


def layer_pairs(spec: list[str] | None, student: nn.Module, teacher: nn.Module | None,
                image_size: int) -> tuple[list[str], list[str]]:
    """--feature-layers (`name` for both models, or `student_name:teacher_name`; default: each model's last
    feature map before global pooling) as (student layers, teacher layers), checked on both models."""
    if spec:
        pairs = [s.split(":", 1) if ":" in s else (s, s) for s in spec]
        student_layers, teacher_layers = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        student_layers = [last_feature_map(student, image_size)]
        teacher_layers = [last_feature_map(teacher, image_size)] if teacher is not None else student_layers
    feature_shapes(student, student_layers, image_size)  # clear errors for unknown or non-4-D modules
    if teacher is not None:
        feature_shapes(teacher, teacher_layers, image_size)
    return student_layers, teacher_layers


def require_teacher(name: str, teacher: nn.Module | None) -> None:
    if teacher is None:
        raise UserError(f"--method {name} distills feature maps, which a teacher cache does not hold: run the "
                        f"teacher live (drop --teacher-cache) or use a logit method (kd, dkd, dist)")


TRAIN_LOSS_CE, TRAIN_LOSS_KD = keys.TRAIN_LOSS_CE, keys.TRAIN_LOSS_KD
