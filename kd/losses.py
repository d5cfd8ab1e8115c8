"""Distillation loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    loss = alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

alpha weights the hard labels (the reference experiment uses alpha = 0.05-0.1, T = 7). The T^2 factor keeps
the soft-target gradients on the same scale as the hard-label ones when T changes (paper, section 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KL_REDUCTIONS = ("batchmean", "mean")


def kd_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    kl_reduction: str = "batchmean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (CE(student, targets), T^2 * KL(teacher_T || student_T)), both scalars in float32.

    kl_reduction="batchmean" is the true KL divergence averaged over samples. "mean" divides the summed KL by
    batch * classes, as `nn.KLDivLoss(reduction="mean")` does in the knowledge-distillation-pytorch reference
    implementation: it reproduces that code's numbers exactly, but scales the soft term down by 1 / classes.
    """
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    # Losses in fp32 even under autocast: log_softmax of logits / T loses precision in bf16.
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.detach().float()
    ce = F.cross_entropy(student_logits, targets)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    kl = kl / (student_logits.shape[0] if kl_reduction == "batchmean" else student_logits.numel())
    return ce, kl * temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    kl_reduction: str = "batchmean",
) -> torch.Tensor:
    """alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))."""
    ce, kd = kd_loss_terms(student_logits, teacher_logits, targets, temperature, kl_reduction)
    return alpha * ce + (1.0 - alpha) * kd
