"""kd_loss against a closed form computed independently in numpy."""
import numpy as np
import pytest
import torch

from kd.losses import kd_loss, kd_loss_terms


def np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def reference(student, teacher, targets, alpha, T, reduction="batchmean"):
    """alpha * CE + (1 - alpha) * T^2 * KL(p_t || p_s), written out by hand in float64."""
    n, c = student.shape
    ce = -np_log_softmax(student)[np.arange(n), targets].mean()
    log_ps, log_pt = np_log_softmax(student / T), np_log_softmax(teacher / T)
    kl_sum = (np.exp(log_pt) * (log_pt - log_ps)).sum()
    kl = kl_sum / n if reduction == "batchmean" else kl_sum / (n * c)
    return alpha * ce + (1 - alpha) * T * T * kl


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 3, (16, 10)), rng.normal(0, 3, (16, 10))
    y = rng.integers(0, 10, 16)
    return s, t, y


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 4.0, 7.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_matches_closed_form(logits, alpha, T, reduction):
    s, t, y = logits
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha, T, kl_reduction=reduction)
    assert got.ndim == 0
    assert got.item() == pytest.approx(reference(s, t, y, alpha, T, reduction), rel=1e-5, abs=1e-6)


def test_alpha_edges_are_pure_terms(logits):
    s, t, y = (torch.tensor(a) for a in logits)
    ce, soft = kd_loss_terms(s, t, y, 7.0)
    assert kd_loss(s, t, y, alpha=1.0, temperature=7.0).item() == pytest.approx(ce.item())
    assert kd_loss(s, t, y, alpha=0.0, temperature=7.0).item() == pytest.approx(soft.item())
    assert torch.nn.functional.cross_entropy(s, y).item() == pytest.approx(ce.item())


def test_mean_reduction_is_batchmean_over_classes(logits):
    s, t, y = (torch.tensor(a) for a in logits)
    _, bm = kd_loss_terms(s, t, y, 4.0, "batchmean")
    _, mean = kd_loss_terms(s, t, y, 4.0, "mean")
    assert mean.item() == pytest.approx(bm.item() / s.shape[1])


def test_zero_when_student_equals_teacher(logits):
    s, _, y = (torch.tensor(a) for a in logits)
    _, soft = kd_loss_terms(s, s.clone(), y, 7.0)
    assert soft.item() == pytest.approx(0.0, abs=1e-9)


def test_soft_gradient_scale_is_independent_of_T():
    """Without T^2 the soft-target gradient shrinks like 1/T^2 (Hinton et al., sec. 2); with it, for large T it
    tends to (z_s - z_t) / (N * C) for zero-mean logits, whatever T is."""
    rng = np.random.default_rng(1)
    s = rng.normal(0, 1, (8, 10)); s -= s.mean(1, keepdims=True)
    t = rng.normal(0, 1, (8, 10)); t -= t.mean(1, keepdims=True)
    y = torch.zeros(8, dtype=torch.long)
    expected = (s - t) / (8 * 10)
    for T in (100.0, 300.0):
        student = torch.tensor(s, requires_grad=True)
        kd_loss(student, torch.tensor(t), y, alpha=0.0, temperature=T).backward()
        np.testing.assert_allclose(student.grad.numpy(), expected, rtol=0.03, atol=2e-4)


def test_gradient_matches_closed_form_and_skips_teacher(logits):
    s, t, y = logits
    alpha, T = 0.1, 7.0
    student = torch.tensor(s, requires_grad=True)
    teacher = torch.tensor(t, requires_grad=True)
    kd_loss(student, teacher, torch.tensor(y), alpha, T).backward()
    n = s.shape[0]
    p = np.exp(np_log_softmax(s))
    onehot = np.eye(s.shape[1])[y]
    ps, pt = np.exp(np_log_softmax(s / T)), np.exp(np_log_softmax(t / T))
    grad = alpha * (p - onehot) / n + (1 - alpha) * T * (ps - pt) / n  # d/ds of T^2 KL = T (p_s - p_t) / n
    np.testing.assert_allclose(student.grad.numpy(), grad, rtol=1e-4, atol=1e-7)
    assert teacher.grad is None  # the teacher is a fixed target


def test_bf16_inputs_are_computed_in_fp32(logits):
    s, t, y = logits
    got = kd_loss(torch.tensor(s).bfloat16(), torch.tensor(t).bfloat16(), torch.tensor(y), 0.1, 7.0)
    assert got.dtype == torch.float32


def test_unknown_reduction_rejected(logits):
    s, t, y = (torch.tensor(a) for a in logits)
    with pytest.raises(ValueError, match="kl_reduction"):
        kd_loss(s, t, y, 0.1, 7.0, kl_reduction="sum")
