"""Optimizer with weight decay only on weights, and the per-step warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Norm-layer weights and biases (all 1-D parameters) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# Devices with fused SGD and AdamW kernels in every torch kd supports (>= 2.4). Elsewhere (mps, xpu, ...) torch's
# default multi-tensor implementation is used.
FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = True, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """SGD or AdamW for a model that will train on `device`: the fused implementation (one kernel for all
    parameters; an isolated ResNet-18 step on CPU is 3-11x faster than torch's defaults, see BENCHMARKS.md) where
    it exists."""
    groups = param_groups(model, weight_decay)
    fused = {"fused": True} if torch.device(device).type in FUSED_DEVICES else {}
    if opt == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fused)
    elif opt == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, **fused)
    else:
        raise ValueError(f"unknown optimizer {opt!r}")
    optimizer.register_load_state_dict_pre_hook(_keep_implementation)
    return optimizer


def _keep_implementation(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """load_state_dict copies every saved group setting, `fused` and `foreach` included: a checkpoint written by
    another implementation (an older kd, another device) would switch this one off, and fp16 loss scaling would
    then fail on the first step. The implementation stays this run's choice."""
    return {**state_dict, "param_groups": [{**saved, "fused": current.get("fused"), "foreach": current.get("foreach")}
                                           for saved, current in zip(state_dict["param_groups"],
                                                                     optimizer.param_groups)]}


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(group.get("fused") for group in getattr(optimizer, "optimizer", optimizer).param_groups)


class EpochSchedule:
    """Linear warmup to the peak LR over `warmup_epochs`, then cosine decay to 0 at `epochs`, as a function of the
    fraction of training done in epochs rather than of a step count: a run resumed with another number of
    processes or batch size (other steps per epoch) continues the same curve. `segments` are the extensions of
    a resumed run that changed --epochs: from epoch `start` the LR falls from `factor` x peak to 0 at `end` along a
    cosine of its own. Set once per optimizer step, before it (`at`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, warmup_epochs: float, epochs: float,
                 segments: list[dict] = ()):
        self.optimizer, self.lr, self.warmup, self.epochs = optimizer, lr, warmup_epochs, epochs
        self.segments = segments
        self.last = lr

    def factor(self, start: float, end: float) -> float:
        """The LR factor of an optimizer step covering training progress [start, end) in epochs."""
        for segment in reversed(self.segments):
            if start >= segment["start"]:
                span = max(segment["end"] - segment["start"], 1e-9)
                return segment["factor"] * _cosine((start - segment["start"]) / span)
        if start < self.warmup:
            return min(1.0, end / self.warmup)
        return _cosine((start - self.warmup) / max(self.epochs - self.warmup, 1e-9))

    def at(self, start: float, end: float) -> None:
        self.last = self.lr * self.factor(start, end)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last

    def get_last_lr(self) -> list[float]:
        return [self.last]


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
