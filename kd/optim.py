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
    parameters; 3x faster than the multi-tensor one for ResNet-18 on CPU, see BENCHMARKS.md) where it exists."""
    groups = param_groups(model, weight_decay)
    fused = {"fused": True} if torch.device(device).type in FUSED_DEVICES else {}
    if opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fused)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    raise ValueError(f"unknown optimizer {opt!r}")


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "optimizer", optimizer).defaults.get("fused"))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 to the peak LR over `warmup_steps`, then cosine decay to 0 at `total_steps`.
    Stepped once per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
