"""Tests of distill.losses: references written the plain way, properties, golden values, TRL cross-check."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    DIVERGENCES,
    TAIL_FLOOR,
    KDLossConfig,
    TiedEmbeddingLookup,
    attention_transfer_loss,
    ce_loss_from_hidden,
    forward_kl,
    hidden_state_loss,
    jsd,
    kd_loss_from_hidden,
    kd_loss_from_logits,
    mix_teacher_logprobs,
    reverse_kl,
    token_divergence,
    topk_from_logits,
    tvd,
)

RTOL = 1e-5
ATOL = 1e-6
B, T, HS, HT, V = 2, 7, 16, 12, 23


# ------------------------------------------------------------------------------------------------
# Independent references: explicit math on probabilities, no code shared with the library.
# ------------------------------------------------------------------------------------------------


def ref_divergence(kind: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-token divergence between teacher probs p and student probs q, [..., V] -> [...]."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (q * (q.log() - p.log())).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if kind == "skew_forward_kl":
        m = skew * p + (1 - skew) * q
        return (p * (p / m).log()).sum(-1)
    if kind == "skew_reverse_kl":
        m = skew * q + (1 - skew) * p
        return (q * (q / m).log()).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def ref_loss(student_logits, teacher_probs_fn, labels, cfg, num_items=None):
    """alpha * kd + (1 - alpha) * ce; teacher_probs_fn(T) gives the teacher's softened probs [B, T, V]."""
    t = cfg.temperature
    v = student_logits.shape[-1]
    mask = (labels != -100).float()
    n = num_items if num_items is not None else max(mask.sum().item(), 1)
    q = torch.softmax(student_logits / t, dim=-1)
    p = teacher_probs_fn(t)
    kd = (ref_divergence(cfg.divergence, p, q, cfg.beta, cfg.skew) * t**2 * mask).sum() / n
    ce = F.cross_entropy(student_logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="sum") / n
    return cfg.alpha * kd + (1 - cfg.alpha) * ce, kd, ce


def dense_teacher(teacher_logits):
    return lambda t: torch.softmax(teacher_logits / t, dim=-1)


def make_labels(gen, batch=B, length=T, vocab=V):
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :3] = -100  # a "prompt"
    labels[1, -2:] = -100  # "padding"
    return labels


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def student_and_teacher(gen, bias=True, teacher_vocab=V):
    h = torch.randn(B, T, HS, generator=gen, requires_grad=True)
    w = (torch.randn(V, HS, generator=gen) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.5).requires_grad_() if bias else None
    th = torch.randn(B, T, HT, generator=gen)
    tw = torch.randn(teacher_vocab, HT, generator=gen) * 0.5
    tb = torch.randn(teacher_vocab, generator=gen) * 0.5 if bias else None
    return h, w, b, th, tw, tb


def project(h, w, b):
    return h @ w.T + (b if b is not None else 0)


# ------------------------------------------------------------------------------------------------
# Both paths equal the reference, values and gradients.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_plain_path_matches_reference(gen, divergence, alpha, temperature):
    cfg = KDLossConfig(divergence, temperature=temperature, alpha=alpha, beta=0.3, skew=0.2)
    student = torch.randn(B, T, V, generator=gen, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=gen)
    labels = make_labels(gen)

    out = kd_loss_from_logits(student, teacher, labels, cfg)
    (grad,) = torch.autograd.grad(out.loss, student)
    ref, ref_kd, ref_ce = ref_loss(student, dense_teacher(teacher), labels, cfg)
    (ref_grad,) = torch.autograd.grad(ref, student)

    close(out.loss, ref)
    close(out.kd, ref_kd.detach())
    close(out.ce, ref_ce.detach())
    close(grad, ref_grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_path_matches_reference(gen, divergence, alpha, bias):
    # chunk_size 3 < 9 valid positions: several chunks, the last one short.
    cfg = KDLossConfig(divergence, temperature=2.0, alpha=alpha, beta=0.7, skew=0.3, chunk_size=3)
    h, w, b, th, tw, tb = student_and_teacher(gen, bias=bias)
    labels = make_labels(gen)
    params = [x for x in (h, w, b) if x is not None]

    out = kd_loss_from_hidden(h, w, th, tw, labels, cfg, student_head_bias=b, teacher_head_bias=tb)
    grads = torch.autograd.grad(out.loss, params)
    ref, ref_kd, ref_ce = ref_loss(project(h, w, b), dense_teacher(project(th, tw, tb)), labels, cfg)
    ref_grads = torch.autograd.grad(ref, params)

    close(out.loss, ref)
    close(out.kd, ref_kd.detach())
    close(out.ce, ref_ce.detach())
    for g, rg in zip(grads, ref_grads, strict=True):
        close(g, rg)


def test_chunked_path_scales_upstream_gradient_and_runs_without_grad(gen):
    cfg = KDLossConfig("jsd", temperature=1.5, chunk_size=4)
    h, w, b, th, tw, tb = student_and_teacher(gen)
    labels = make_labels(gen)
    out = kd_loss_from_hidden(h, w, th, tw, labels, cfg, student_head_bias=b, teacher_head_bias=tb)
    g1 = torch.autograd.grad(out.loss, (h, w))
    out = kd_loss_from_hidden(h, w, th, tw, labels, cfg, student_head_bias=b, teacher_head_bias=tb)
    g3 = torch.autograd.grad(3.0 * out.loss, (h, w))
    for a, c in zip(g1, g3, strict=True):
        close(3.0 * a, c)
    with torch.no_grad():
        frozen = kd_loss_from_hidden(h, w, th, tw, labels, cfg, student_head_bias=b, teacher_head_bias=tb)
    assert frozen.loss.grad_fn is None
    close(frozen.loss, out.loss.detach())


def test_chunked_path_keeps_low_precision_dtypes(gen):
    cfg = KDLossConfig("forward_kl", chunk_size=4)
    h, w, _, th, tw, _ = student_and_teacher(gen, bias=False)
    h16 = h.detach().bfloat16().requires_grad_()
    w16 = w.detach().bfloat16().requires_grad_()
    labels = make_labels(gen)
    out = kd_loss_from_hidden(h16, w16, th.bfloat16(), tw.bfloat16(), labels, cfg)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    ref = kd_loss_from_hidden(h, w, th, tw, labels, cfg)
    close(out.loss, ref.loss.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("labels_kind", ["some_masked", "all_masked"])
def test_ce_only_chunked_path_matches_cross_entropy(gen, labels_kind):
    h, w, b, *_ = student_and_teacher(gen)
    labels = make_labels(gen) if labels_kind == "some_masked" else torch.full((B, T), -100)
    loss = ce_loss_from_hidden(h, w, labels, head_bias=b, chunk_size=3)
    n = max(int((labels != -100).sum()), 1)
    ref = F.cross_entropy(project(h, w, b).reshape(-1, V), labels.reshape(-1), reduction="sum") / n
    close(loss, ref)
    for g, rg in zip(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b)), strict=True):
        close(g, rg)
    # The same through the plain path, with no teacher at all.
    plain = kd_loss_from_logits(project(h, w, b), None, labels, KDLossConfig(alpha=0.0))
    close(plain.loss, ref.detach())
    assert plain.kd.item() == 0.0


def test_teacher_arguments_are_checked(gen):
    h, w, b, th, tw, tb = student_and_teacher(gen)
    labels = make_labels(gen)
    with pytest.raises(ValueError, match="no teacher"):
        kd_loss_from_hidden(h, w, None, None, labels, KDLossConfig(alpha=0.5))
    with pytest.raises(ValueError, match="not both"):
        topk = topk_from_logits(project(th, tw, tb), 3)
        kd_loss_from_logits(project(h, w, b), project(th, tw, tb), labels, KDLossConfig(), teacher_topk=topk)


# ------------------------------------------------------------------------------------------------
# Properties.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_for_identical_distributions(gen, divergence):
    logits = torch.randn(B, T, V, generator=gen)
    logprobs = F.log_softmax(logits / 2.0, dim=-1)
    per_token = token_divergence(logprobs, logprobs.clone(), divergence, beta=0.4, skew=0.2)
    close(per_token, torch.zeros(B, T))
    cfg = KDLossConfig(divergence, temperature=2.0, alpha=1.0)
    out = kd_loss_from_logits(logits, logits.clone(), make_labels(gen), cfg)
    close(out.loss, torch.tensor(0.0))


def test_jsd_limits_are_the_named_kls(gen):
    q_logits, p_logits = torch.randn(2, B * T, V, generator=gen)
    q, p = torch.softmax(q_logits, -1), torch.softmax(p_logits, -1)
    log_q, log_p = q.log(), p.log()
    # F.kl_div(input, target) = KL(target || exp(input)).
    forward = F.kl_div(log_q, p, reduction="none").sum(-1)
    reverse = F.kl_div(log_p, q, reduction="none").sum(-1)
    close(jsd(log_q, log_p, beta=0.0), forward)
    close(jsd(log_q, log_p, beta=1.0), reverse)
    close(forward_kl(log_q, log_p), forward)
    close(reverse_kl(log_q, log_p), reverse)
    # The formula between the ends is a different quantity, bounded by log 2 at beta = 0.5.
    assert torch.all(jsd(log_q, log_p, beta=0.5) <= math.log(2) + 1e-6)


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_batch_is_exact_zero_with_working_backward(gen, divergence, path):
    cfg = KDLossConfig(divergence, temperature=2.0, chunk_size=3)
    h, w, b, th, tw, tb = student_and_teacher(gen)
    labels = torch.full((B, T), -100)
    if path == "logits":
        student = project(h, w, b)
        out = kd_loss_from_logits(student, project(th, tw, tb), labels, cfg, num_items=torch.tensor(0))
    else:
        out = kd_loss_from_hidden(h, w, th, tw, labels, cfg, student_head_bias=b, teacher_head_bias=tb)
    assert out.loss.item() == 0.0 and out.kd.item() == 0.0 and out.ce.item() == 0.0
    assert out.loss.grad_fn is not None
    out.loss.backward()
    for x in (h, w, b):
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_num_items_makes_half_batches_sum_to_the_full_batch(gen, path):
    cfg = KDLossConfig("skew_reverse_kl", temperature=2.0, chunk_size=2)
    h, w, b, th, tw, tb = student_and_teacher(gen)
    labels = make_labels(gen)
    n = int((labels != -100).sum())

    def loss(sl, num_items=None):
        if path == "logits":
            return kd_loss_from_logits(project(h[sl], w, b), project(th[sl], tw, tb), labels[sl], cfg, num_items)
        return kd_loss_from_hidden(h[sl], w, th[sl], tw, labels[sl], cfg, num_items, b, tb)

    full = loss(slice(None))
    halves = [loss(slice(0, 1), n), loss(slice(1, 2), torch.tensor(n))]
    close(halves[0].loss + halves[1].loss, full.loss)
    full_grad = torch.autograd.grad(full.loss, w)[0]
    half_grad = torch.autograd.grad(halves[0].loss + halves[1].loss, w)[0]
    close(half_grad, full_grad)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_teacher_vocab_uses_the_shared_ids(gen, divergence):
    cfg = KDLossConfig(divergence, temperature=2.0, chunk_size=4)
    h, w, b, th, tw, tb = student_and_teacher(gen, teacher_vocab=V + 5)
    tb = tb.clone()
    tb[V:] = 50.0  # padded rows would dominate the teacher's softmax if they were used
    labels = make_labels(gen)
    teacher_logits = project(th, tw, tb)

    plain = kd_loss_from_logits(project(h, w, b), teacher_logits, labels, cfg)
    chunked = kd_loss_from_hidden(h, w, th, tw, labels, cfg, student_head_bias=b, teacher_head_bias=tb)
    ref, _, _ = ref_loss(project(h, w, b), dense_teacher(teacher_logits[..., :V]), labels, cfg)
    close(plain.loss, ref)
    close(chunked.loss, ref)

    # An explicit smaller vocab_size cuts both models (and CE) to the first ids.
    labels_small = labels.clamp_max(V - 4)
    labels_small[labels == -100] = -100
    small = kd_loss_from_hidden(h, w, th, tw, labels_small, cfg, None, b, tb, vocab_size=V - 3)
    ref_small, _, _ = ref_loss(
        project(h, w, b)[..., : V - 3], dense_teacher(teacher_logits[..., : V - 3]), labels_small, cfg
    )
    close(small.loss, ref_small)


# ------------------------------------------------------------------------------------------------
# Golden values, worked by hand: p = (0.7, 0.2, 0.1), q = (0.4, 0.4, 0.2).
# ------------------------------------------------------------------------------------------------

# KL(p||q) = 0.7 ln(0.7/0.4) + 0.2 ln(0.2/0.4) + 0.1 ln(0.1/0.2) = 0.7 ln 1.75 - 0.3 ln 2
GOLDEN_FORWARD_KL = 0.18378689738681
# KL(q||p) = 0.4 ln(0.4/0.7) + 0.4 ln(0.4/0.2) + 0.2 ln(0.2/0.1) = 0.6 ln 2 - 0.4 ln 1.75
GOLDEN_REVERSE_KL = 0.19204199316180
# TVD = 0.5 (|0.7-0.4| + |0.2-0.4| + |0.1-0.2|) = 0.5 * 0.6
GOLDEN_TVD = 0.3


@pytest.mark.parametrize(
    ("divergence", "expected"),
    [("forward_kl", GOLDEN_FORWARD_KL), ("reverse_kl", GOLDEN_REVERSE_KL), ("tvd", GOLDEN_TVD)],
)
def test_golden_values(divergence, expected):
    assert math.isclose(0.7 * math.log(1.75) - 0.3 * math.log(2), GOLDEN_FORWARD_KL, rel_tol=1e-12)
    assert math.isclose(0.6 * math.log(2) - 0.4 * math.log(1.75), GOLDEN_REVERSE_KL, rel_tol=1e-12)
    # Logits are log-probs plus an arbitrary shift per model: softmax must undo it.
    teacher = torch.tensor([[[math.log(0.7), math.log(0.2), math.log(0.1)]]]) + 3.0
    student = torch.tensor([[[math.log(0.4), math.log(0.4), math.log(0.2)]]]) - 1.0
    labels = torch.tensor([[0]])
    out = kd_loss_from_logits(student, teacher, labels, KDLossConfig(divergence, alpha=1.0))
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)
    # At T = 2 the same distributions pass through softmax(logits / 2) and the result is scaled by 4.
    doubled = kd_loss_from_logits(2 * student, 2 * teacher, labels, KDLossConfig(divergence, temperature=2, alpha=1))
    assert math.isclose(doubled.loss.item(), 4 * expected, rel_tol=1e-6)
    # CE at T = 1 on label 0: -ln 0.4.
    ce_only = kd_loss_from_logits(student, teacher, labels, KDLossConfig(divergence, alpha=0.0))
    assert math.isclose(ce_only.loss.item(), -math.log(0.4), rel_tol=1e-6)
    per_token = tvd(torch.tensor([0.4, 0.4, 0.2]).log(), torch.tensor([0.7, 0.2, 0.1]).log())
    assert math.isclose(per_token.item(), GOLDEN_TVD, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------
# Cross-check against TRL's generalized_jsd_loss.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_jsd():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        # Importing trl.experimental warns that the API is unstable; that is expected here.
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl(gen, trl_jsd, beta, temperature):
    student = torch.randn(B, T, V, generator=gen)
    teacher = torch.randn(B, T, V, generator=gen)
    labels = make_labels(gen)
    theirs = trl_jsd(student, teacher, labels=labels, beta=beta, temperature=temperature)
    cfg = KDLossConfig("jsd", temperature=temperature, alpha=1.0, beta=beta)
    ours = kd_loss_from_logits(student, teacher, labels, cfg)
    # TRL divides the logits by T but does not multiply by T**2 (Hinton's gradient-scale correction); we do.
    close(ours.loss / temperature**2, theirs)
    n = int((labels != -100).sum())
    theirs_n = trl_jsd(student, teacher, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=2 * n)
    ours_n = kd_loss_from_logits(student, teacher, labels, cfg, num_items=2 * n)
    close(ours_n.loss / temperature**2, theirs_n)


# ------------------------------------------------------------------------------------------------
# Sparse (top-k) teacher targets.
# ------------------------------------------------------------------------------------------------


def test_topk_from_logits(gen):
    logits = torch.randn(B, T, V, generator=gen)
    logprobs, ids = topk_from_logits(logits, 5)
    assert logprobs.shape == ids.shape == (B, T, 5) and ids.dtype == torch.long
    close(logprobs, F.log_softmax(logits, -1).gather(-1, ids))
    assert torch.all(logprobs[..., :-1] >= logprobs[..., 1:])
    assert topk_from_logits(logits, 10 * V)[0].shape[-1] == V


def sparse_teacher_probs(topk_logprobs, topk_ids, student_logits, temperature):
    """Reference over K + 1 buckets: (student probs, teacher probs), each [B, T, K + 1], written from the doc."""
    p_listed = topk_logprobs.exp()
    p_tail = (1 - p_listed.sum(-1, keepdim=True)).clamp_min(1e-8)
    p = torch.cat([p_listed, p_tail], -1) ** (1 / temperature)  # tail softened like one more token
    p = p / p.sum(-1, keepdim=True)
    q_full = torch.softmax(student_logits / temperature, -1)
    q_listed = q_full.gather(-1, topk_ids)
    q = torch.cat([q_listed, 1 - q_listed.sum(-1, keepdim=True)], -1)
    return q, p


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_with_full_vocab_equals_dense(gen, divergence, temperature):
    cfg = KDLossConfig(divergence, temperature=temperature, chunk_size=4)
    h, w, b, th, tw, tb = student_and_teacher(gen)
    labels = make_labels(gen)
    teacher_logits = project(th, tw, tb)
    topk = topk_from_logits(teacher_logits, V)

    dense = kd_loss_from_logits(project(h, w, b), teacher_logits, labels, cfg)
    sparse = kd_loss_from_logits(project(h, w, b), None, labels, cfg, teacher_topk=topk)
    chunked = kd_loss_from_hidden(h, w, None, None, labels, cfg, student_head_bias=b, teacher_topk=topk)
    close(sparse.loss, dense.loss)
    close(chunked.loss, dense.loss)
    dense_grads = torch.autograd.grad(dense.loss, (h, w, b))
    for out in (sparse, chunked):
        for g, dg in zip(torch.autograd.grad(out.loss, (h, w, b)), dense_grads, strict=True):
            close(g, dg)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_topk_with_tail_matches_reference(gen, divergence, temperature):
    cfg = KDLossConfig(divergence, temperature=temperature, alpha=0.7, beta=0.4, skew=0.2, chunk_size=3)
    h, w, b, th, tw, tb = student_and_teacher(gen)
    labels = make_labels(gen)
    topk = topk_from_logits(project(th, tw, tb), 4)
    student_logits = project(h, w, b)

    # The teacher is known only on K ids plus the tail bucket, so the reference works on K + 1 buckets.
    q, p = sparse_teacher_probs(*topk, student_logits, temperature)
    mask = (labels != -100).float()
    n = mask.sum()
    kd = (ref_divergence(divergence, p, q, cfg.beta, cfg.skew) * temperature**2 * mask).sum() / n
    ce = F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1), reduction="sum") / n
    ref = cfg.alpha * kd + (1 - cfg.alpha) * ce
    ref_grads = torch.autograd.grad(ref, (h, w, b))

    plain = kd_loss_from_logits(project(h, w, b), None, labels, cfg, teacher_topk=topk)
    chunked = kd_loss_from_hidden(h, w, None, None, labels, cfg, student_head_bias=b, teacher_topk=topk)
    for out in (plain, chunked):
        close(out.loss, ref)
        for g, rg in zip(torch.autograd.grad(out.loss, (h, w, b)), ref_grads, strict=True):
            close(g, rg)


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: peaked logits, tail masses underflow to 0 in fp32
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("targets", ["dense", "topk", "topk_padded_ids", "topk_whole_vocab"])
def test_closed_form_forward_kl_matches_autograd(gen, targets, temperature, alpha, scale):
    # The chunked path differentiates forward KL in closed form; the plain path lets autograd do it.
    cfg = KDLossConfig("forward_kl", temperature=temperature, alpha=alpha, chunk_size=4)
    h, w, b, th, tw, tb = student_and_teacher(gen)
    with torch.no_grad():
        w.mul_(scale)
    labels = make_labels(gen)
    teacher_logits = project(th, tw, tb) * scale
    dense, topk = None, None
    if targets == "dense":
        dense = teacher_logits
    elif targets == "topk_whole_vocab":
        topk = topk_from_logits(teacher_logits, V)
    else:
        topk = topk_from_logits(teacher_logits, 5)
        if targets == "topk_padded_ids":
            topk[1][..., -1] = V + 3  # a padded id: its mass falls into the tail
    plain = kd_loss_from_logits(project(h, w, b), dense, labels, cfg, teacher_topk=topk)
    chunked = kd_loss_from_hidden(
        h, w, th if dense is not None else None, tw * scale if dense is not None else None, labels, cfg,
        student_head_bias=b, teacher_head_bias=tb * scale if dense is not None else None, teacher_topk=topk,
    )  # fmt: skip
    for out in (plain, chunked):
        assert torch.isfinite(out.loss)
    close(chunked.loss, plain.loss)
    close(chunked.kd, plain.kd)
    close(chunked.ce, plain.ce)
    plain_grads = torch.autograd.grad(plain.loss, (h, w, b))
    for g, pg in zip(torch.autograd.grad(chunked.loss, (h, w, b)), plain_grads, strict=True):
        assert torch.isfinite(g).all()
        # x40 logits are up to ~1e3: fp32 rounding of two correct computations differs at ~1e-7 of that.
        close(g, pg, rtol=RTOL if scale == 1 else 1e-4, atol=ATOL if scale == 1 else 1e-4)


@pytest.mark.parametrize("upstream", [1.0, 3.0])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_tied_lookup_folds_its_gradient_into_the_heads(gen, upstream, padding_idx):
    # A tied model: the input embedding is the LM head. The folded lookup must give the weight the same gradient
    # as nn.Embedding's own backward (padding row included) summed with the head's.
    emb = torch.nn.Embedding(V, HS, padding_idx=padding_idx)
    mixer = torch.randn(HS, HS, generator=gen) * 0.3
    ids = torch.randint(0, V, (B, T), generator=gen)
    ids[0, :2] = 2
    labels = make_labels(gen)
    _, _, _, th, tw, _ = student_and_teacher(gen)
    cfg = KDLossConfig(temperature=2.0, alpha=0.5, chunk_size=3)

    def weight_grad(fold: bool) -> torch.Tensor:
        emb.weight.grad = None
        lookup = TiedEmbeddingLookup(emb) if fold else None
        hidden = torch.tanh((lookup(ids) if fold else emb(ids)) @ mixer)  # a stand-in for the decoder trunk
        out = kd_loss_from_hidden(hidden, emb.weight, th, tw, labels, cfg, tied_lookup=lookup)
        (out.loss * upstream).backward()
        return emb.weight.grad

    close(weight_grad(fold=True), weight_grad(fold=False))

    # Without a head gradient (the lookup used alone) it makes its own dense gradient, as nn.Embedding does.
    emb.weight.grad = None
    (TiedEmbeddingLookup(emb)(ids) * 2).sum().backward()
    alone = emb.weight.grad
    emb.weight.grad = None
    (emb(ids) * 2).sum().backward()
    close(alone, emb.weight.grad)


def test_sparse_ids_outside_the_vocab_fall_into_the_tail(gen):
    cfg = KDLossConfig("reverse_kl", temperature=2.0, chunk_size=4)
    student = torch.randn(B, T, V, generator=gen)
    logprobs, ids = topk_from_logits(torch.randn(B, T, V + 6, generator=gen), 5)
    ids[..., -1] = V + 2  # a padded id: not a student token
    labels = make_labels(gen)
    with_padded = kd_loss_from_logits(student, None, labels, cfg, teacher_topk=(logprobs, ids))
    without = kd_loss_from_logits(student, None, labels, cfg, teacher_topk=(logprobs[..., :-1], ids[..., :-1]))
    close(with_padded.loss, without.loss)
    assert torch.isfinite(with_padded.loss)


def test_sparse_zero_teacher_tail_is_floored(gen):
    # Rounded API logprobs can sum to 1 or more: the tail is floored at TAIL_FLOOR instead of making reverse KL
    # infinite for any student that puts mass outside the listed ids.
    logprobs = torch.zeros(B, T, 1)  # "probability 1" for one id
    ids = torch.zeros(B, T, 1, dtype=torch.long)
    student = torch.randn(B, T, V, generator=gen, requires_grad=True)
    labels = make_labels(gen)
    out = kd_loss_from_logits(
        student, None, labels, KDLossConfig("reverse_kl", alpha=1.0), teacher_topk=(logprobs, ids)
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(student.grad).all()
    p = torch.tensor([1.0, TAIL_FLOOR]) / (1.0 + TAIL_FLOOR)  # [listed id, tail], renormalised
    q0 = torch.softmax(student.detach(), -1)[..., 0]
    q = torch.stack([q0, 1 - q0], -1)
    mask = (labels != -100).float()
    ref = ((q * (q.log() - p.log())).sum(-1) * mask).sum() / mask.sum()
    close(out.loss.detach(), ref)


# ------------------------------------------------------------------------------------------------
# Multi-teacher mixtures.
# ------------------------------------------------------------------------------------------------


def test_mix_teacher_logprobs_is_the_log_of_the_weighted_mixture(gen):
    a, c = torch.randn(2, B, T, V, generator=gen)
    mixed = mix_teacher_logprobs([a, c], [3.0, 1.0], temperature=2.0)
    expected = (0.75 * torch.softmax(a / 2, -1) + 0.25 * torch.softmax(c / 2, -1)).log()
    close(mixed, expected)
    close(mix_teacher_logprobs([a], temperature=2.0), F.log_softmax(a / 2, -1))
    with pytest.raises(ValueError, match="non-negative"):
        mix_teacher_logprobs([a, c], [1.0, -1.0])


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_multi_teacher_paths_match_reference(gen, divergence):
    cfg = KDLossConfig(divergence, temperature=2.0, chunk_size=3)
    h, w, b, th, tw, tb = student_and_teacher(gen)
    th2 = torch.randn(B, T, 10, generator=gen)
    tw2 = torch.randn(V + 2, 10, generator=gen)  # the second teacher has a padded vocabulary
    labels = make_labels(gen)
    logits1, logits2 = project(th, tw, tb), project(th2, tw2, None)[..., :V]

    def mixture(t):
        return 0.25 * torch.softmax(logits1 / t, -1) + 0.75 * torch.softmax(logits2 / t, -1)

    ref, _, _ = ref_loss(project(h, w, b), mixture, labels, cfg)
    ref_grads = torch.autograd.grad(ref, (h, w))
    plain = kd_loss_from_logits(project(h, w, b), [logits1, logits2], labels, cfg, teacher_weights=[1, 3])
    chunked = kd_loss_from_hidden(
        h, w, [th, th2], [tw, tw2], labels, cfg, None, b, [tb, None], teacher_weights=[1.0, 3.0]
    )
    for out in (plain, chunked):
        close(out.loss, ref)
        for g, rg in zip(torch.autograd.grad(out.loss, (h, w)), ref_grads, strict=True):
            close(g, rg)


# ------------------------------------------------------------------------------------------------
# Hidden-state and attention transfer.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss(gen, kind):
    student = torch.randn(B, T, HS, generator=gen, requires_grad=True)
    teacher = torch.randn(B, T, HT, generator=gen)
    mask = make_labels(gen) != -100
    proj = torch.nn.Linear(HS, HT)
    loss = hidden_state_loss(student, teacher, mask, kind, projection=proj)
    s = proj(student)
    if kind == "mse":
        per = ((s - teacher) ** 2).mean(-1)
    else:
        per = 1 - (s * teacher).sum(-1) / (s.norm(dim=-1) * teacher.norm(dim=-1))
    ref = (per * mask).sum() / mask.sum()
    close(loss, ref)
    grads = torch.autograd.grad(loss, (student, proj.weight))
    for g, rg in zip(grads, torch.autograd.grad(ref, (student, proj.weight)), strict=True):
        close(g, rg)
    close(hidden_state_loss(teacher, teacher.clone(), mask, kind), torch.tensor(0.0))
    with pytest.raises(ValueError, match="projection"):
        hidden_state_loss(student, teacher, mask, kind)
    empty = hidden_state_loss(student, teacher, torch.zeros_like(mask), kind, projection=proj)
    assert empty.item() == 0.0
    empty.backward()


def causal_attention(gen, heads):
    scores = torch.randn(B, heads, T, T, generator=gen)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)


def test_attention_transfer_loss(gen):
    student = causal_attention(gen, 2).requires_grad_()
    teacher = causal_attention(gen, 2)
    mask = make_labels(gen) != -100
    loss = attention_transfer_loss(student, teacher, mask)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # KL(teacher row || student row) over the visible keys only (log(1) = 0 at hidden keys keeps grads finite).
    s_log, t_log = torch.where(causal, student, 1.0).log(), torch.where(causal, teacher, 1.0).log()
    per = (teacher * (t_log - s_log)).sum(-1).mean(1)  # [B, T]
    ref = (per * mask).sum() / mask.sum()
    close(loss, ref)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()
    close(grad, torch.autograd.grad(ref, student)[0])
    close(attention_transfer_loss(teacher, teacher.clone(), mask), torch.tensor(0.0))
    # Different head counts: compared after averaging over heads.
    assert torch.isfinite(attention_transfer_loss(student, causal_attention(gen, 4), mask))
    assert attention_transfer_loss(student, teacher, torch.zeros_like(mask)).item() == 0.0


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as excinfo:
        KDLossConfig("kl", temperature=0.0, alpha=1.5, beta=-0.1, skew=2.0, chunk_size=0)
    message = str(excinfo.value)
    for field in ("divergence", "temperature", "alpha", "beta", "skew", "chunk_size"):
        assert field in message
