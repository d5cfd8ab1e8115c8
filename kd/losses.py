"""Distillation losses as pure functions of tensors (torch only): Hinton's KD, DKD, DIST, logit standardization,
attention transfer and FitNet's hint. The methods in kd/methods/ wire them to a student and a teacher.

All losses are computed in float32 even under autocast (log_softmax of logits / T loses precision in bf16), and
the teacher's side is a fixed target: no gradient flows into it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KL_REDUCTIONS = ("batchmean", "mean")
_MASK = 1000.0  # subtracted from the target logit / T: exp(-1000) is 0 in fp32, so it drops out of a softmax


def kd_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    kl_reduction: str = "batchmean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (CE(student, targets), T^2 * KL(teacher_T || student_T)), both scalars in float32 (Hinton et al.
    2015, "Distilling the Knowledge in a Neural Network"). The T^2 factor keeps the soft-target gradients on the
    same scale as the hard-label ones when T changes (paper, section 2).

    kl_reduction="batchmean" is the true KL divergence averaged over samples. "mean" divides the summed KL by
    batch * classes, as `nn.KLDivLoss(reduction="mean")` does in the knowledge-distillation-pytorch reference
    implementation: it reproduces that code's numbers exactly, but scales the soft term down by 1 / classes.
    """
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
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


def dkd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^2 * TCKD, T^2 * NCKD), each averaged over the batch: the two parts of Decoupled KD (Zhao et al.,
    CVPR 2022, "Decoupled Knowledge Distillation"). With p = softmax(z / T) and t the target class:

        TCKD = KL(b_teacher || b_student),  b = [p_t, 1 - p_t]                      (target vs the rest)
        NCKD = KL(p^_teacher || p^_student), p^_i = p_i / (1 - p_t) for i != t      (among the non-targets)

    so that KL(p_teacher || p_student) = TCKD + (1 - p_t^teacher) * NCKD. Log-probabilities come from
    log-sum-exps, so p_t -> 1 does not overflow."""
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    target = F.one_hot(targets, s.shape[1]).to(s.dtype)
    s_rest, t_rest = s - _MASK * target, t - _MASK * target  # the non-target classes only
    s_all, t_all = s.logsumexp(1), t.logsumexp(1)
    log_b_s = torch.stack([(s * target).sum(1) - s_all, s_rest.logsumexp(1) - s_all], 1)  # [log p_t, log 1-p_t]
    log_b_t = torch.stack([(t * target).sum(1) - t_all, t_rest.logsumexp(1) - t_all], 1)
    n = s.shape[0]
    tckd = F.kl_div(log_b_s, log_b_t, reduction="sum", log_target=True) / n
    nckd = F.kl_div(F.log_softmax(s_rest, 1), F.log_softmax(t_rest, 1), reduction="sum", log_target=True) / n
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
             beta: float, temperature: float) -> torch.Tensor:
    """Decoupled KD: T^2 * (alpha * TCKD + beta * NCKD), averaged over the batch (see dkd_loss_terms). The paper's
    defaults: alpha = 1, beta = 8, T = 4, the whole term warmed up linearly over the first 20 epochs."""
    tckd, nckd = dkd_loss_terms(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter-class, intra-class) relation losses of DIST, each times T^2 (see dist_loss)."""
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    inter = 1 - _pearson(y_s, y_t).mean()
    intra = 1 - _pearson(y_s.T, y_t.T).mean()
    return inter * temperature**2, intra * temperature**2


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              temperature: float) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): with y = softmax(z / T),

        T^2 * (beta * (1 - mean over samples of Pearson(y_s, y_t) across classes)        inter-class relation
             + gamma * (1 - mean over classes of Pearson(y_s, y_t) across the batch))    intra-class relation

    It matches relations rather than values, so a much stronger teacher's sharper outputs need not be copied
    exactly. The paper's defaults: beta = gamma = 1, T = 1."""
    inter, intra = dist_loss_terms(student_logits, teacher_logits, temperature)
    return beta * inter + gamma * intra


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation"): each
    sample's logits become (z - mean(z)) / std(z) before the temperature softmax, so the student matches the
    teacher's logit relations, not their range (std with Bessel's correction, as the authors' code). Invariant to
    a per-sample shift and positive scale of z."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(N, H*W): the mean over channels of |f|^p, L2-normalised per sample."""
    return F.normalize(feature.float().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention"): with
    q = L2-normalised mean over channels of f^p, the mean over batch and positions of (q_s - q_t)^2. Feature
    maps of different spatial size are average-pooled to the smaller one; channel counts may differ."""
    teacher_feature = teacher_feature.detach()
    hs, ht = student_feature.shape[-2:], teacher_feature.shape[-2:]
    if hs[0] * hs[1] > ht[0] * ht[1]:
        student_feature = F.adaptive_avg_pool2d(student_feature, ht)
    elif hs != ht:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, hs)
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


def hint_loss(regressed_student: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNet's hint (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets"): the mean squared error
    between the regressed student feature map and the teacher's (pooled to the smaller spatial size)."""
    teacher_feature = teacher_feature.detach().float()
    if regressed_student.shape[-2:] != teacher_feature.shape[-2:]:
        size = min(regressed_student.shape[-2:], teacher_feature.shape[-2:], key=lambda s: s[0] * s[1])
        regressed_student = F.adaptive_avg_pool2d(regressed_student, size)
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, size)
    return F.mse_loss(regressed_student.float(), teacher_feature)
