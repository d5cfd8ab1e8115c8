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


# ---------------------------------------------------------------- DKD, DIST, logit standardization, AT, FitNet
from kd.losses import (at_loss, dist_loss, dist_loss_terms, dkd_loss, dkd_loss_terms, hint_loss,  # noqa: E402
                       standardize_logits)


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_dkd(s, t, y, alpha, beta, T):
    """TCKD and NCKD from their definitions: binary target-vs-rest, and the renormalised non-target classes."""
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    rows = np.arange(len(y))
    bs = np.stack([ps[rows, y], 1 - ps[rows, y]], 1)
    bt = np.stack([pt[rows, y], 1 - pt[rows, y]], 1)
    rest = np.ones_like(ps, bool)
    rest[rows, y] = False
    qs = ps[rest].reshape(len(y), -1) / bs[:, 1:]
    qt = pt[rest].reshape(len(y), -1) / bt[:, 1:]
    tckd, nckd = np_kl(bt, bs).mean() * T * T, np_kl(qt, qs).mean() * T * T
    return alpha * tckd + beta * nckd, tckd, nckd


def np_pearson_rows(a, b):
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def np_dist(s, t, beta, gamma, T):
    ys, yt = np_softmax(s / T), np_softmax(t / T)
    inter = 1 - np_pearson_rows(ys, yt).mean()
    intra = 1 - np_pearson_rows(ys.T, yt.T).mean()
    return T * T * (beta * inter + gamma * intra)


def np_pool(f, size):
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


def np_at(fs, ft, p=2):
    size = min(fs.shape[-1], ft.shape[-1])
    fs, ft = np_pool(fs, size), np_pool(ft, size)
    def q(f):
        a = (f ** p).mean(1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    return ((q(fs) - q(ft)) ** 2).mean()


def numeric_grad(f, x, eps=1e-6):
    """Central differences of a float64 numpy function: an independent check of autograd."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


def torch_grad(loss_fn, x):
    x = torch.tensor(x, requires_grad=True)
    loss_fn(x).backward()
    return x.grad.numpy()


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_closed_form_values_and_gradients(logits, T):
    s, t, y = logits
    got = dkd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), 1.0, 8.0, T)
    assert got.item() == pytest.approx(np_dkd(s, t, y, 1.0, 8.0, T)[0], rel=1e-5)
    grad = torch_grad(lambda x: dkd_loss(x, torch.tensor(t), torch.tensor(y), 1.0, 8.0, T), s)
    np.testing.assert_allclose(grad, numeric_grad(lambda x: np_dkd(x, t, y, 1.0, 8.0, T)[0], s), rtol=2e-3,
                               atol=1e-6)


def test_kl_is_tckd_plus_teacher_weighted_nckd(logits):
    """KL(teacher || student) = TCKD + (1 - p_t^teacher) NCKD per sample (Zhao et al. eq. 5): what plain KD
    couples and DKD decouples."""
    s, t, y = (torch.tensor(a) for a in logits)
    for T in (1.0, 4.0):
        for i in range(len(y)):
            one = slice(i, i + 1)
            _, kl = kd_loss_terms(s[one], t[one], y[one], T)
            tckd, nckd = dkd_loss_terms(s[one], t[one], y[one], T)
            p_t = torch.softmax(t[one] / T, 1)[0, y[i]]
            assert kl.item() == pytest.approx((tckd + (1 - p_t) * nckd).item(), rel=1e-5, abs=1e-7)


def test_dkd_is_stable_when_the_target_probability_is_one():
    s, t = torch.zeros(2, 5), torch.zeros(2, 5)
    t[:, 0] = s[:, 1] = 200.0  # p_t of the teacher is 1 to fp32 precision
    s.requires_grad_(True)
    loss = dkd_loss(s, t, torch.tensor([0, 0]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_matches_closed_form_values_and_gradients(logits, T):
    s, t, _ = logits
    got = dist_loss(torch.tensor(s), torch.tensor(t), 1.0, 2.0, T)
    assert got.item() == pytest.approx(np_dist(s, t, 1.0, 2.0, T), rel=1e-5)
    grad = torch_grad(lambda x: dist_loss(x, torch.tensor(t), 1.0, 2.0, T), s)
    np.testing.assert_allclose(grad, numeric_grad(lambda x: np_dist(x, t, 1.0, 2.0, T), s), rtol=2e-3, atol=1e-6)
    inter, intra = dist_loss_terms(torch.tensor(s), torch.tensor(t), T)
    assert (inter + 2 * intra).item() == pytest.approx(got.item())


def test_dist_is_zero_for_a_linear_copy_of_the_teacher_probabilities(logits):
    _, t, _ = logits
    assert dist_loss(torch.tensor(t), torch.tensor(t), 1.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_standardize_logits_closed_form_and_invariance(logits):
    s, _, _ = logits
    got = standardize_logits(torch.tensor(s)).numpy()
    np.testing.assert_allclose(got, (s - s.mean(1, keepdims=True)) / s.std(1, ddof=1, keepdims=True), rtol=1e-5,
                               atol=1e-6)
    rng = np.random.default_rng(2)
    shift, scale = rng.normal(0, 10, (len(s), 1)), rng.uniform(0.1, 20, (len(s), 1))
    np.testing.assert_allclose(standardize_logits(torch.tensor(s * scale + shift)).numpy(), got, rtol=1e-4,
                               atol=1e-5)
    assert np.allclose(got.mean(1), 0, atol=1e-6) and np.allclose(got.std(1, ddof=1), 1, atol=1e-5)


@pytest.mark.parametrize("sizes", [(4, 4), (8, 4), (4, 8)])
def test_at_matches_closed_form_values_and_gradients(sizes):
    rng = np.random.default_rng(3)
    fs, ft = rng.normal(0, 1, (2, 3, sizes[0], sizes[0])), rng.normal(0, 1, (2, 5, sizes[1], sizes[1]))
    got = at_loss(torch.tensor(fs), torch.tensor(ft))
    assert got.item() == pytest.approx(np_at(fs, ft), rel=1e-5)
    grad = torch_grad(lambda x: at_loss(x, torch.tensor(ft)), fs)
    np.testing.assert_allclose(grad, numeric_grad(lambda x: np_at(x, ft), fs), rtol=2e-3, atol=1e-7)


def test_hint_loss_is_the_mse_and_its_gradient():
    rng = np.random.default_rng(4)
    fs, ft = rng.normal(0, 1, (2, 3, 4, 4)), rng.normal(0, 1, (2, 3, 4, 4))
    assert hint_loss(torch.tensor(fs), torch.tensor(ft)).item() == pytest.approx(((fs - ft) ** 2).mean(), rel=1e-5)
    grad = torch_grad(lambda x: hint_loss(x, torch.tensor(ft)), fs)
    np.testing.assert_allclose(grad, 2 * (fs - ft) / fs.size, rtol=1e-4, atol=1e-7)


def test_new_losses_leave_the_teacher_alone_and_compute_in_fp32(logits):
    s, t, y = logits
    teacher, student = torch.tensor(t, requires_grad=True), torch.tensor(s, requires_grad=True)
    for loss in (dkd_loss(student.bfloat16(), teacher, torch.tensor(y), 1.0, 8.0, 4.0),
                 dist_loss(student.bfloat16(), teacher, 1.0, 1.0, 4.0)):
        assert loss.dtype == torch.float32
        loss.backward()
        assert teacher.grad is None
