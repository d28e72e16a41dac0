"""Every knowledge-distillation loss of Distill, in one module.

Conventions shared by all functions here:

* Per-position tensors are already aligned by the caller: ``student_logits[b, t]`` predicts ``labels[b, t]`` (the
  causal shift happens before). ``labels == ignore_index`` (-100) masks a position.
* Divergences are computed in fp32 (inputs are upcast), summed over valid positions and divided by ``num_items``: the
  number of valid tokens in the whole optimisation step, so that gradient accumulation gives the same gradient as one
  big batch. ``num_items=None`` means "the valid tokens of this call". An all-masked batch returns an exact 0 that is
  still connected to the student inputs, never NaN.
* The teacher's vocabulary may be larger than the student's (padded embeddings, e.g. 152,064 vs 151,936 rows):
  ``vocab_size`` (default: the smaller of the two) keeps only the first ``vocab_size`` ids of both. The hard-label CE
  uses the same ids, so labels must be ``< vocab_size``.
* Temperature: every divergence is taken between ``softmax(teacher / T)`` and ``softmax(student / T)`` and multiplied
  by ``T**2`` (Hinton et al. 2015), for every kind, so that the gradient scale does not shrink as ``T`` grows and
  ``alpha`` keeps its meaning across temperatures. The CE term always uses ``T = 1`` and no ``T**2``.

Two ways to get the loss, equal in values and gradients:

* :func:`kd_loss_from_logits`: the plain reference on materialised ``[B, T, V]`` logits.
* :func:`kd_loss_from_hidden`: the default in training. It takes final hidden states and the LM-head weights, keeps
  only valid positions and projects ``chunk_size`` of them at a time, so neither model's ``[N, V]`` logits ever exist
  (at V = 152k and 4k tokens that is 2.5 GB per fp32 copy, and a loss keeps several copies alive for backward).

Hand-written on purpose: no maintained library does chunked (fused-linear) KD with all of these divergences, sparse
top-k teacher targets and a CPU path. torchtune's chunked KD losses cover the KL family only and still take
materialised logits; Liger-Kernel's fused distillation losses are built for GPUs; TRL materialises full logits.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

# Log-probability standing for "probability 0". A finite value instead of -inf keeps every product and every
# gradient finite (0 * -inf is NaN, and masking the NaN afterwards with where() still sends NaN into backward);
# exp(-1e9) is exactly 0 in fp32, so entries at this value add exactly nothing to any divergence.
NEG_LOGPROB = -1.0e9

# Smallest teacher tail mass for sparse targets (when the listed ids do not cover the vocabulary). API logprobs are
# rounded, so 1 - sum(exp(logprobs)) can come out <= 0; a zero tail would make reverse KL infinite for any student
# that gives the tail any mass. 1e-8 is below fp32 rounding noise of such a sum, so it changes nothing else.
TAIL_FLOOR = 1.0e-8

TeacherTopK = tuple[torch.Tensor, torch.Tensor]
"""Sparse teacher targets: ``(logprobs [B, T, K] float, ids [B, T, K] long)``, log-probs at T = 1, distinct ids."""


@dataclass(frozen=True)
class KDLossConfig:
    """What the KD loss computes; the trainer builds it from the job file."""

    divergence: Divergence = "forward_kl"
    """Per-token divergence between teacher and student: one of ``DIVERGENCES``."""
    temperature: float = 1.0
    """Softmax temperature T for the KD term; the divergence is multiplied by T**2."""
    alpha: float = 0.5
    """Weight of the KD term; ``1 - alpha`` goes to the hard-label cross-entropy on ``labels``."""
    beta: float = 0.5
    """Generalised JSD interpolation (GKD / TRL): 0 is forward KL(p||q), 1 is reverse KL(q||p)."""
    skew: float = 0.1
    """Skew lambda of ``skew_forward_kl`` / ``skew_reverse_kl`` (DistiLLM)."""
    chunk_size: int = 256
    """Valid positions projected to logits at a time by ``kd_loss_from_hidden``; smaller = less memory."""
    ignore_index: int = -100
    """Label value that masks a position."""

    def __post_init__(self) -> None:
        problems = []
        if self.divergence not in DIVERGENCES:
            problems.append(f"divergence={self.divergence!r} is not one of {', '.join(DIVERGENCES)}")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0")
        for name in ("alpha", "beta", "skew"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}={value} must be in [0, 1]")
        if self.chunk_size < 1:
            problems.append(f"chunk_size={self.chunk_size} must be >= 1")
        if problems:
            raise ValueError("invalid KD loss settings: " + "; ".join(problems))


class KDLossOutput(NamedTuple):
    """Result of a KD loss: ``loss`` carries the graph; ``kd`` and ``ce`` are detached, for logging."""

    loss: torch.Tensor
    """``alpha * kd + (1 - alpha) * ce``, normalised by ``num_items``."""
    kd: torch.Tensor
    """KD divergence (times T**2), normalised by ``num_items``."""
    ce: torch.Tensor
    """Hard-label cross-entropy at T = 1, normalised by ``num_items``."""


# ---------------------------------------------------------------------------------------------------------------
# Per-token divergences. Inputs are log-probabilities [..., V] (already temperature-softened), finite (use
# NEG_LOGPROB for "probability 0"); outputs are [...] (summed over the last dim). Argument order is always
# (student, teacher): q is the student, p the teacher.
# ---------------------------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim, from finite log-probs."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else NEG_LOGPROB


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stable via logaddexp (no [2, ..., V] stack)."""
    return torch.logaddexp(log_a + _log_weight(weight_a), log_b + _log_weight(1.0 - weight_a))


def forward_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token: mode-covering, the classic Hinton KD loss."""
    return _kl(teacher_logprobs, student_logprobs)


def reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per token: mode-seeking (MiniLLM)."""
    return _kl(student_logprobs, teacher_logprobs)


def jsd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL's ``generalized_jsd_loss``.

    ``m = beta * p + (1 - beta) * q`` and ``JSD = beta * KL(p || m) + (1 - beta) * KL(q || m)``. Like TRL, the two
    ends are special-cased to the KL they are named after (the formula itself tends to 0 there): ``beta = 0`` is
    forward KL(p || q) and ``beta = 1`` is reverse KL(q || p).
    """
    if beta == 0.0:
        return forward_kl(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl(student_logprobs, teacher_logprobs)
    log_m = _log_mixture(teacher_logprobs, student_logprobs, beta)
    return beta * _kl(teacher_logprobs, log_m) + (1.0 - beta) * _kl(student_logprobs, log_m)


def skew_forward_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p || skew * p + (1 - skew) * q); bounded by -log(skew)."""
    return _kl(teacher_logprobs, _log_mixture(teacher_logprobs, student_logprobs, skew))


def skew_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(q || skew * q + (1 - skew) * p)."""
    return _kl(student_logprobs, _log_mixture(student_logprobs, teacher_logprobs, skew))


def tvd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum |p - q| per token."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


def token_divergence(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    divergence: Divergence,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Dispatch to the named per-token divergence; ``[..., V]`` log-probs in, ``[...]`` out (no T**2 here)."""
    if divergence == "forward_kl":
        return forward_kl(student_logprobs, teacher_logprobs)
    if divergence == "reverse_kl":
        return reverse_kl(student_logprobs, teacher_logprobs)
    if divergence == "jsd":
        return jsd(student_logprobs, teacher_logprobs, beta)
    if divergence == "skew_forward_kl":
        return skew_forward_kl(student_logprobs, teacher_logprobs, skew)
    if divergence == "skew_reverse_kl":
        return skew_reverse_kl(student_logprobs, teacher_logprobs, skew)
    if divergence == "tvd":
        return tvd(student_logprobs, teacher_logprobs)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")


# ---------------------------------------------------------------------------------------------------------------
# Teacher targets: dense mixtures and sparse top-k.
# ---------------------------------------------------------------------------------------------------------------


def mix_teacher_logprobs(
    teacher_logits: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Log of the weighted mixture of the teachers' softened distributions, ``log sum_i w_i softmax(t_i / T)``.

    Args:
        teacher_logits: one ``[..., V_i]`` tensor per teacher (same leading shape).
        weights: non-negative, renormalised to sum to 1; ``None`` means equal weights.
        temperature: softmax temperature applied to every teacher.
        vocab_size: keep the first ``vocab_size`` ids of every teacher (default: the smallest vocabulary).

    Returns:
        fp32 log-probs ``[..., vocab_size]``. With one teacher this is ``log_softmax(t / T)``.
    """
    if len(teacher_logits) == 0:
        raise ValueError("mix_teacher_logprobs needs at least one teacher")
    weights = [1.0] * len(teacher_logits) if weights is None else [float(w) for w in weights]
    if len(weights) != len(teacher_logits) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights {weights} must be {len(teacher_logits)} non-negative numbers, not all 0")
    v = vocab_size or min(t.shape[-1] for t in teacher_logits)
    total = sum(weights)
    mixture = None
    for logits, w in zip(teacher_logits, weights, strict=True):
        if w == 0:
            continue
        logp = F.log_softmax(logits[..., :v].float() / temperature, dim=-1)
        if len(teacher_logits) > 1:
            logp = logp + math.log(w / total)
        # Accumulate pairwise with logaddexp so n teachers never stack into an [n, ..., V] tensor.
        mixture = logp if mixture is None else torch.logaddexp(mixture, logp)
    return mixture


def topk_from_logits(teacher_logits: torch.Tensor, k: int) -> TeacherTopK:
    """Top-k sparse targets from dense logits: full-vocabulary fp32 log-softmax at T = 1, then top-k.

    The cache stores T = 1 log-probs; the loss applies its own temperature. Returns ``(logprobs [..., k] fp32,
    ids [..., k] long)``, sorted by decreasing log-prob; ``k`` is capped at the vocabulary size.
    """
    logprobs = F.log_softmax(teacher_logits.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return values, ids


def _teacher_buckets(
    topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, vocab_size: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's tempered log-probs over K listed ids plus the tail bucket ``[N, K + 1]``, the ids ``[N, K]``
    (unlisted ones replaced by the dummy id 0) and which of them are listed ``[N, K]``; see :func:`_sparse_buckets`.
    """
    topk_ids = topk_ids.long()
    listed = topk_ids < vocab_size  # [N, K]
    ids = topk_ids.masked_fill(~listed, 0)
    with torch.no_grad():
        teacher_listed = topk_logprobs.float().masked_fill(~listed, NEG_LOGPROB)  # [N, K]
        # A row has a tail unless its distinct listed ids cover the vocabulary (only possible when K >= V). Counted
        # on the sorted [N, K] ids: no [N, V] mask needed.
        ranked = ids.masked_fill(~listed, -1).sort(dim=-1).values
        distinct = (ranked[:, :1] >= 0).sum(-1) + ((ranked[:, 1:] != ranked[:, :-1]) & (ranked[:, 1:] >= 0)).sum(-1)
        has_tail = distinct < vocab_size  # [N]
        tail_mass = (1.0 - teacher_listed.exp().sum(-1)).clamp_min(TAIL_FLOOR)
        log_tail = torch.where(has_tail, tail_mass.log(), NEG_LOGPROB)
        teacher = F.log_softmax(torch.cat([teacher_listed, log_tail[:, None]], dim=-1) / temperature, dim=-1)
        teacher.clamp_min_(NEG_LOGPROB)
    return teacher, ids, listed


def _sparse_buckets(
    student_logprobs: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the K listed ids plus one tail bucket: ``[N, K + 1]`` each.

    ``student_logprobs`` is the student's full-vocabulary ``log_softmax(s / T)`` [N, V]; its bucket log-probs are
    exact (the tail is a logsumexp over the unlisted ids). The teacher only gave log-probs at T = 1 for its top K, so
    its tempered distribution is taken over the buckets: ``log_softmax([logp_1 .. logp_K, log tail] / T)``, i.e. the
    tail acts as one pseudo-token. This is a proper distribution for every T, equals the teacher's T = 1
    distribution exactly, and equals the dense tempered teacher exactly when the K ids cover the vocabulary; the
    alternative (softening only the listed ids and keeping the raw tail) would not sum to 1.

    Ids ``>= V`` (rows of a padded teacher vocabulary) are not listed: their teacher mass falls into the tail. When
    the listed ids cover all V ids the tail bucket is empty: probability 0 on both sides.
    """
    teacher, ids, listed = _teacher_buckets(topk_logprobs, topk_ids, student_logprobs.shape[1], temperature)
    student_listed = student_logprobs.gather(1, ids).masked_fill(~listed, NEG_LOGPROB)  # [N, K]
    # Rows without a tail: every entry is NEG_LOGPROB, the logsumexp is NEG_LOGPROB + log(V) and exp() of it is 0.
    student_tail = student_logprobs.masked_fill(_listed_mask(ids, listed, student_logprobs), NEG_LOGPROB).logsumexp(-1)
    student = torch.cat([student_listed, student_tail[:, None]], dim=-1)
    return student, teacher


def _listed_mask(ids: torch.Tensor, listed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N, V] bool: which ids are listed. scatter_add of counts is deterministic even with the dummy id 0."""
    with torch.no_grad():
        counts = torch.zeros(like.shape, device=like.device).scatter_add_(1, ids, listed.float())
    return counts > 0


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces of the plain and the chunked paths.
# ---------------------------------------------------------------------------------------------------------------


def _kd_ce_rows(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    teacher_topk: TeacherTopK | None,
    labels: torch.Tensor,
    cfg: KDLossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KD (times T**2) and CE for fp32 student logits [N, V].

    The teacher is dense log-probs [N, V], top-k targets [N, K], or absent (CE only: kd is 0).
    """
    t = cfg.temperature
    target = labels[:, None]
    if teacher_logprobs is None and teacher_topk is None:
        ce = student_logits.logsumexp(-1) - student_logits.gather(-1, target).squeeze(-1)
        return torch.zeros_like(ce).detach(), ce
    student_logprobs = F.log_softmax(student_logits if t == 1.0 else student_logits / t, dim=-1)  # [N, V]
    if teacher_topk is not None:
        student_b, teacher_b = _sparse_buckets(student_logprobs, *teacher_topk, t)
    else:
        student_b, teacher_b = student_logprobs, teacher_logprobs
    kd = token_divergence(student_b, teacher_b, cfg.divergence, beta=cfg.beta, skew=cfg.skew) * (t * t)
    if t == 1.0:
        ce = -student_logprobs.gather(-1, target).squeeze(-1)
    else:
        ce = student_logits.logsumexp(-1) - student_logits.gather(-1, target).squeeze(-1)
    return kd, ce


def _combine(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    # Skip a zero-weight term rather than multiply it by 0, so an inf in the unused term cannot become NaN.
    if alpha == 1.0:
        return kd
    if alpha == 0.0:
        return ce
    return alpha * kd + (1.0 - alpha) * ce


def _denominator(num_items: int | torch.Tensor | None, n_valid: int, device: torch.device) -> float | torch.Tensor:
    # max(., 1): an all-masked step divides 0 by 1 and stays an exact, finite 0.
    if num_items is None:
        return float(max(n_valid, 1))
    if isinstance(num_items, torch.Tensor):
        return num_items.detach().to(device=device, dtype=torch.float32).clamp_min(1.0)
    return float(max(int(num_items), 1))


def _valid_index(valid: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Flat indices of the true entries of ``valid`` (None when all are true) and their count."""
    flat = valid.reshape(-1)
    index = flat.nonzero().squeeze(1)  # the one host sync: the number of valid rows sets every shape after it
    return (None, flat.numel()) if index.numel() == flat.numel() else (index, index.numel())


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Valid-row indices (None when all are valid), the valid labels [N] and N."""
    index, n_valid = _valid_index(labels != ignore_index)
    flat = labels.reshape(-1)
    return index, (flat if index is None else flat.index_select(0, index)), n_valid


def _select(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``[..., D]`` -> ``[N_valid, D]``; a view when every position is valid, a row gather otherwise."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if index is None else flat.index_select(0, index)


def _check_teacher(n_teachers: int, has_topk: bool, cfg: KDLossConfig, dense_name: str) -> None:
    if n_teachers > 0 and has_topk:
        raise ValueError(f"pass either {dense_name} or teacher_topk, not both")
    if n_teachers == 0 and not has_topk and cfg.alpha != 0.0:
        raise ValueError(f"no teacher: pass {dense_name} or teacher_topk (only alpha=0, CE alone, needs none)")


def _as_list(x: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    if x is None:
        return []
    return [x] if isinstance(x, torch.Tensor) else list(x)


# ---------------------------------------------------------------------------------------------------------------
# Plain path.
# ---------------------------------------------------------------------------------------------------------------


def kd_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | Sequence[torch.Tensor] | None,
    labels: torch.Tensor,
    cfg: KDLossConfig,
    num_items: int | torch.Tensor | None = None,
    *,
    teacher_topk: TeacherTopK | None = None,
    teacher_weights: Sequence[float] | None = None,
    vocab_size: int | None = None,
) -> KDLossOutput:
    """KD + CE loss on materialised logits: the reference the chunked path is tested against.

    Args:
        student_logits: ``[B, T, Vs]``, aligned with ``labels``.
        teacher_logits: ``[B, T, Vt]``, or a list of them (a mixture, see :func:`mix_teacher_logprobs`), or None
            when ``teacher_topk`` is given (or with ``cfg.alpha == 0``: CE only). Never receives gradients.
        labels: ``[B, T]`` next-token ids, ``cfg.ignore_index`` where masked.
        cfg: divergence, temperature, weights.
        num_items: valid tokens in the whole optimisation step (default: in this call).
        teacher_topk: sparse targets ``(logprobs [B, T, K], ids [B, T, K])`` instead of ``teacher_logits``.
        teacher_weights: mixture weights for a list of teachers.
        vocab_size: use only the first ``vocab_size`` ids (default: the smallest vocabulary involved).
    """
    teachers = _as_list(teacher_logits)
    _check_teacher(len(teachers), teacher_topk is not None, cfg, "teacher_logits")
    v = vocab_size or min([student_logits.shape[-1], *(t.shape[-1] for t in teachers)])
    index, valid_labels, n_valid = _valid_rows(labels, cfg.ignore_index)
    # Select valid rows before anything else: masked positions cost nothing and garbage there cannot leak into NaN.
    student = _select(student_logits, index)[:, :v].float()  # [N, V]
    with torch.no_grad():
        if teacher_topk is not None:
            topk = (_select(teacher_topk[0], index), _select(teacher_topk[1], index))  # [N, K] each
            teacher_logprobs = None
        else:
            topk, teacher_logprobs = None, None
            if teachers:
                rows = [_select(t, index)[:, :v] for t in teachers]
                teacher_logprobs = mix_teacher_logprobs(rows, teacher_weights, cfg.temperature)
                teacher_logprobs.clamp_min_(NEG_LOGPROB)
    kd_rows, ce_rows = _kd_ce_rows(student, teacher_logprobs, topk, valid_labels, cfg)
    denom = _denominator(num_items, n_valid, student.device)
    kd, ce = kd_rows.sum() / denom, ce_rows.sum() / denom
    return KDLossOutput(_combine(kd, ce, cfg.alpha), kd.detach(), ce.detach())


# ---------------------------------------------------------------------------------------------------------------
# Chunked, fused-linear path.
# ---------------------------------------------------------------------------------------------------------------


class _TeacherChunks:
    """Teacher targets for valid rows ``[start, end)``, computed on demand without grad: dense or top-k."""

    def __init__(
        self,
        hidden: list[torch.Tensor],
        weight: list[torch.Tensor],
        bias: list[torch.Tensor | None],
        mixture_weights: Sequence[float] | None,
        topk: TeacherTopK | None,
        temperature: float,
    ) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.mixture_weights, self.topk, self.temperature = mixture_weights, topk, temperature

    @torch.no_grad()
    def __call__(self, start: int, end: int) -> tuple[torch.Tensor | None, TeacherTopK | None]:
        if self.topk is not None:
            return None, (self.topk[0][start:end], self.topk[1][start:end])
        if not self.hidden:
            return None, None  # CE only
        # The teacher projects in its own dtype and the [C, V] logits are upcast right after. An fp32 copy of a
        # 152k x 4096 bf16 teacher head would cost 2.5 GB, more than the chunking saves; GPU bf16 matmuls
        # accumulate in fp32 anyway. With fp32 teacher weights (the tests) this is plain fp32.
        teachers = zip(self.hidden, self.weight, self.bias, strict=True)
        logits = [F.linear(h[start:end], w, b).float() for h, w, b in teachers]  # n x [C, V]
        if len(logits) == 1:  # in place: one [C, V] buffer fewer than the general mixture
            logprobs = F.log_softmax(logits.pop().div_(self.temperature), dim=-1)
        else:
            logprobs = mix_teacher_logprobs(logits, self.mixture_weights, self.temperature)
        return logprobs.clamp_min_(NEG_LOGPROB), None


def _has_closed_form(cfg: KDLossConfig) -> bool:
    return cfg.divergence == "forward_kl" or (cfg.divergence == "jsd" and cfg.beta == 0.0)


@torch.no_grad()
def _forward_kl_rows_and_grad(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    teacher_topk: TeacherTopK | None,
    labels: torch.Tensor,
    cfg: KDLossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward KL and CE per row, and the gradient of ``alpha * sum(kd) + (1 - alpha) * sum(ce)`` wrt ``logits``.

    The same numbers as :func:`_kd_ce_rows` followed by autograd, written out because forward KL (the default, and
    the loss of most KD recipes) has a short closed-form gradient, so a chunk needs about 3 ``[C, V]`` buffers
    instead of the ~8 that autograd keeps (log-softmax output, the teacher's probabilities, the products, and their
    gradients) and makes fewer passes over them. With ``u = logits / T``, ``q = softmax(u)`` and teacher ``p``:

    * ``d (T**2 * KL(p || q)) / d logits = T * (q * sum(p) - p)`` (``sum(p)`` is 1 up to rounding; keeping it makes
      this the exact gradient of the value computed);
    * sparse targets (K listed ids and a tail bucket ``p_tail``, student tail mass ``Q = sum of q over unlisted``):
      listed ids as above; an unlisted id j gets ``T * (sum(p) * Q - p_tail) * q_j / Q``, the tail bucket's
      gradient shared in proportion to the student's own probabilities;
    * ``d CE / d logits = softmax(logits) - onehot(label)`` (at T = 1).

    ``logits`` ([C, V] fp32) and ``teacher_logprobs`` ([C, V]) are overwritten. Returns ``(kd * T**2 [C], ce [C],
    grad [C, V])``.
    """
    t, alpha = cfg.temperature, cfg.alpha
    target = labels[:, None]
    lse = torch.logsumexp(logits, -1)  # [C]
    ce = lse - logits.gather(1, target).squeeze(1)
    grad = None
    if alpha < 1.0:
        grad = (logits - lse[:, None]).exp_()  # softmax(logits)
        grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
        grad.mul_(1.0 - alpha)
    if teacher_logprobs is None and teacher_topk is None:  # CE only (alpha == 0)
        return torch.zeros_like(ce), ce, grad
    if t == 1.0:
        logq = logits.sub_(lse[:, None])
    else:
        logq = logits.div_(t)
        logq.sub_(torch.logsumexp(logq, -1, keepdim=True))  # log_softmax(logits / T), in place
    if teacher_topk is None:
        p = teacher_logprobs.exp()
        p_sum = p.sum(-1, keepdim=True)
        kd = teacher_logprobs.sub_(logq).mul_(p).sum(-1)  # sum p * (log p - log q)
        kd_grad = logq.exp_().mul_(p_sum).sub_(p) if alpha > 0.0 else None
    else:
        teacher, ids, listed = _teacher_buckets(*teacher_topk, logq.shape[1], t)  # [C, K + 1], [C, K], [C, K]
        q_listed = logq.gather(1, ids).masked_fill_(~listed, NEG_LOGPROB)  # [C, K]
        # Listed ids -> "probability 0" in place (amin: the dummy id 0 of unlisted entries is left as it is), so the
        # logsumexp below is the student's tail bucket and exp() below is zero on listed ids.
        logq.scatter_reduce_(1, ids, torch.where(listed, NEG_LOGPROB, math.inf), reduce="amin")
        q_tail = torch.logsumexp(logq, -1)  # [C]; NEG_LOGPROB + log(V) when nothing is unlisted
        p = teacher.exp()
        p_sum = p.sum(-1)
        kd = (p * (teacher - torch.cat([q_listed, q_tail[:, None]], dim=-1))).sum(-1)
        kd_grad = None
        if alpha > 0.0:
            # q_j / Q on unlisted ids (0 on listed ones; rows without a tail get 1/V there, times a zero factor).
            kd_grad = logq.sub_(q_tail[:, None]).exp_().mul_((p_sum * q_tail.exp() - p[:, -1])[:, None])
            listed_grad = (p_sum[:, None] * q_listed.exp() - p[:, :-1]).masked_fill_(~listed, 0.0)
            kd_grad.scatter_add_(1, ids, listed_grad)
    if kd_grad is not None:
        kd_grad.mul_(alpha * t)
        grad = kd_grad if grad is None else grad.add_(kd_grad)
    return kd * (t * t), ce, grad


def _fused_linear_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: _TeacherChunks,
    cfg: KDLossConfig,
    denom: float | torch.Tensor,
    want_grads: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Loss, kd, ce (normalised) and, if asked, the gradients wrt hidden [N, H], weight [V, H], bias [V].

    Works one chunk of rows at a time: project to fp32 logits [C, V], get d loss / d logits of that chunk (in
    closed form for forward KL, :func:`_forward_kl_rows_and_grad`; else autograd on the logits -> loss part alone),
    then push it through the linear layer by hand. Only the [C, V] temporaries of one chunk are ever alive.
    """
    n, h_dim = hidden.shape
    device = hidden.device
    # Upcast the student head once (a no-op in fp32): the divergence needs fp32 logits and the weight gradient is
    # accumulated over chunks in fp32, which needs an fp32 [V, H] buffer anyway.
    weight32 = weight.detach().float()
    bias32 = None if bias is None else bias.detach().float()
    need_h, need_w, need_b = want_grads
    any_grad = need_h or need_w or need_b
    grad_h = torch.empty(n, h_dim, dtype=hidden.dtype, device=device) if need_h else None
    grad_w = torch.zeros_like(weight32) if need_w else None  # [V, H] fp32 accumulator
    grad_b = torch.zeros_like(bias32) if need_b else None
    kd_total = torch.zeros((), device=device)
    ce_total = torch.zeros((), device=device)
    # autocast would silently turn the projection back into bf16; the fp32 math is the point of this function.
    with torch.autocast(device_type=device.type, enabled=False):
        for start in range(0, n, cfg.chunk_size):
            end = min(start + cfg.chunk_size, n)
            h_chunk = hidden[start:end].detach().float()  # [C, H]
            logits = F.linear(h_chunk, weight32, bias32)  # [C, V] fp32
            if any_grad and _has_closed_form(cfg):
                kd_rows, ce_rows, grad_logits = _forward_kl_rows_and_grad(
                    logits, *teacher(start, end), labels[start:end], cfg
                )
                del logits
                _apply_logit_grad(grad_logits.div_(denom), h_chunk, weight32, grad_h, grad_w, grad_b, start, end)
                del grad_logits
                kd_total += kd_rows.sum() / denom
                ce_total += ce_rows.sum() / denom
                continue
            with torch.enable_grad():
                logits.requires_grad_(any_grad)
                # No local name for the teacher's [C, V] targets: after the forward only what autograd saved stays.
                kd_rows, ce_rows = _kd_ce_rows(logits, *teacher(start, end), labels[start:end], cfg)
                kd_chunk, ce_chunk = kd_rows.sum() / denom, ce_rows.sum() / denom
                loss_chunk = _combine(kd_chunk, ce_chunk, cfg.alpha)
            del kd_rows, ce_rows
            if any_grad:
                (grad_logits,) = torch.autograd.grad(loss_chunk, logits)  # [C, V]; frees this chunk's graph
                del logits
                _apply_logit_grad(grad_logits, h_chunk, weight32, grad_h, grad_w, grad_b, start, end)
                del grad_logits
            kd_total += kd_chunk.detach()
            ce_total += ce_chunk.detach()
    # clone(): with alpha in {0, 1} the loss would alias kd or ce, which the autograd Function marks non-differentiable.
    loss = _combine(kd_total, ce_total, cfg.alpha).clone()
    return loss, kd_total, ce_total, (grad_h, grad_w, grad_b)


def _apply_logit_grad(grad_logits, h_chunk, weight32, grad_h, grad_w, grad_b, start: int, end: int) -> None:
    """Push one chunk's d loss / d logits [C, V] through the linear layer into the gradient buffers that exist."""
    if grad_h is not None:
        grad_h[start:end] = grad_logits @ weight32
    if grad_w is not None:
        grad_w.addmm_(grad_logits.T, h_chunk)
    if grad_b is not None:
        grad_b += grad_logits.sum(0)


class _FusedLinearKDFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`_fused_linear_kd`: gradients are computed in forward, backward only scales them.

    Why this and not ``torch.utils.checkpoint`` per chunk: both keep one chunk's [C, V] tensors alive at a time,
    but checkpointing runs every chunk's projection and softmax twice (forward, then recompute in backward), while
    this runs forward and backward once and only stores gradients of the inputs' size ([N, H], [V, H]). Same
    design as Liger-Kernel's fused linear cross-entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, cfg, denom, tied_lookup):
        ctx.tied_lookup = tied_lookup
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, kd, ce, grads = _fused_linear_kd(hidden, weight, bias, labels, teacher, cfg, denom, want)
        # save_for_backward, not a ctx attribute: autograd frees saved tensors after backward ([V, H] fp32 here).
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        # The stored gradients are already those of the normalised loss; the usual upstream gradient is 1.
        scale = None if bool(grad_loss == 1) else grad_loss
        out = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            if grad is not None:
                grad = grad if scale is None else grad * scale
                grad = grad.to(dtype)
            out.append(grad)
        if ctx.tied_lookup is not None and out[1] is not None:
            ctx.tied_lookup.head_grad = out[1]
        return *out, None, None, None, None, None


class TiedEmbeddingLookup:
    """The student's input-embedding lookup, for a model whose input embeddings are its LM head (tied weights).

    Why: by default the lookup's backward builds a dense ``[V, H]`` gradient (zeros except the batch's rows) and
    autograd adds it to the head's dense ``[V, H]`` gradient at the very end of backward, where a training step's
    memory peaks: one ``[V, H]`` tensor too many (113 MiB in fp32 for SmolLM2's 49k x 576, 545 MiB for a 152k x 896
    head). Here the fused loss hands its head gradient over (``head_grad``) and the lookup's backward adds its rows
    into it in place (``index_add_``), returning no gradient of its own: the weight's ``.grad`` is the same sum.
    Autograd runs the lookup's backward after the loss's (the lookup feeds everything) and before accumulating the
    weight's gradient (which waits for both). Hand-written: no library folds a tied lookup's gradient this way.

    One instance per forward pass. Falls back to a dense gradient when no head gradient arrived.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError("TiedEmbeddingLookup supports plain nn.Embedding lookups only")
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.head_grad: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _TiedLookupFunction.apply(input_ids, self.weight, self)


class _TiedLookupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, lookup):
        ctx.save_for_backward(input_ids)
        ctx.lookup, ctx.weight_shape = lookup, weight.shape
        return F.embedding(input_ids, weight, lookup.padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.lookup.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            # Zeroed rather than dropped: boolean indexing would make a GPU wait for the host.
            rows = rows.masked_fill((ids == ctx.lookup.padding_idx)[:, None], 0.0)
        target, ctx.lookup.head_grad = ctx.lookup.head_grad, None
        if target is None:
            dense = grad_out.new_zeros(ctx.weight_shape)
            return None, dense.index_add_(0, ids, rows.to(dense.dtype)), None
        target.index_add_(0, ids, rows.to(target.dtype))
        return None, None, None


def kd_loss_from_hidden(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | Sequence[torch.Tensor] | None,
    teacher_head_weight: torch.Tensor | Sequence[torch.Tensor] | None,
    labels: torch.Tensor,
    cfg: KDLossConfig,
    num_items: int | torch.Tensor | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    teacher_topk: TeacherTopK | None = None,
    teacher_weights: Sequence[float] | None = None,
    vocab_size: int | None = None,
    tied_lookup: TiedEmbeddingLookup | None = None,
) -> KDLossOutput:
    """KD + CE loss from final hidden states and LM heads, ``cfg.chunk_size`` valid positions at a time.

    Equal to :func:`kd_loss_from_logits` on ``hidden @ weight.T + bias`` in values and gradients, without ever
    holding ``[N, V]`` logits of either model, in forward or backward. Gradients flow to ``student_hidden``,
    ``student_head_weight`` and ``student_head_bias``; the teacher runs under no_grad.

    Args:
        student_hidden: ``[B, T, Hs]`` final hidden states (after the final norm), aligned with ``labels``.
        student_head_weight: ``[Vs, Hs]`` LM-head weight (tied embeddings are fine).
        teacher_hidden: ``[B, T, Ht]``, or a list of them for a teacher mixture, or None with ``teacher_topk``
            (or with ``cfg.alpha == 0``: CE only, see :func:`ce_loss_from_hidden`).
        teacher_head_weight: ``[Vt, Ht]``, or a list matching ``teacher_hidden``.
        labels: ``[B, T]`` next-token ids, ``cfg.ignore_index`` where masked.
        cfg: divergence, temperature, weights, chunk size.
        num_items: valid tokens in the whole optimisation step (default: in this call).
        student_head_bias: optional ``[Vs]``.
        teacher_head_bias: optional ``[Vt]`` (or a list matching ``teacher_hidden``).
        teacher_topk: sparse targets ``(logprobs [B, T, K], ids [B, T, K])`` instead of a teacher model.
        teacher_weights: mixture weights for a list of teachers (default: equal).
        vocab_size: use only the first ``vocab_size`` ids (default: the smallest vocabulary involved).
        tied_lookup: the :class:`TiedEmbeddingLookup` that made the student's input embeddings, when its weight is
            ``student_head_weight`` itself: the lookup's gradient is then added into the head's in place.
    """
    teacher_hs, teacher_ws = _as_list(teacher_hidden), _as_list(teacher_head_weight)
    _check_teacher(len(teacher_hs), teacher_topk is not None, cfg, "teacher_hidden (with teacher_head_weight)")
    if len(teacher_hs) != len(teacher_ws):
        raise ValueError(f"got {len(teacher_hs)} teacher hidden states but {len(teacher_ws)} teacher head weights")
    teacher_bs = [teacher_head_bias] if isinstance(teacher_head_bias, torch.Tensor) else teacher_head_bias
    teacher_bs = [None] * len(teacher_hs) if teacher_bs is None else list(teacher_bs)
    if len(teacher_bs) != len(teacher_hs):
        raise ValueError(f"got {len(teacher_hs)} teachers but {len(teacher_bs)} teacher head biases")
    v = vocab_size or min([student_head_weight.shape[0], *(w.shape[0] for w in teacher_ws)])

    index, valid_labels, n_valid = _valid_rows(labels, cfg.ignore_index)
    hidden = _select(student_hidden, index)  # [N, Hs]; autograd scatters its gradient back to [B, T, Hs]
    # Slice only a padded head: the backward of even a full-length slice allocates a second [V, H] gradient.
    weight = student_head_weight if v == student_head_weight.shape[0] else student_head_weight[:v]
    if tied_lookup is not None and tied_lookup.weight is not weight:
        tied_lookup = None  # another tensor, or a sliced head: the lookup then makes its own dense gradient
    bias = student_head_bias if student_head_bias is None or v == student_head_bias.shape[0] else student_head_bias[:v]
    with torch.no_grad():
        topk = None
        if teacher_topk is not None:
            topk = (_select(teacher_topk[0], index), _select(teacher_topk[1], index))
        teacher = _TeacherChunks(
            hidden=[_select(h, index) for h in teacher_hs],
            weight=[w[:v] for w in teacher_ws],
            bias=[None if b is None else b[:v] for b in teacher_bs],
            mixture_weights=teacher_weights,
            topk=topk,
            temperature=cfg.temperature,
        )
    denom = _denominator(num_items, n_valid, hidden.device)
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        loss, kd, ce = _FusedLinearKDFunction.apply(
            hidden, weight, bias, valid_labels, teacher, cfg, denom, tied_lookup
        )
    else:
        loss, kd, ce, _ = _fused_linear_kd(hidden, weight, bias, valid_labels, teacher, cfg, denom, (False,) * 3)
    return KDLossOutput(loss, kd, ce)


def ce_loss_from_hidden(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Hard-label CE (T = 1) from hidden states ``[B, T, H]``, without ``[N, V]`` logits: the fused path, no teacher.

    For the CE-only phases of a run (SFT warm-up, ``alpha = 0``); same normalisation as every loss here.
    """
    cfg = KDLossConfig(alpha=0.0, chunk_size=chunk_size, ignore_index=ignore_index)
    return kd_loss_from_hidden(
        hidden, head_weight, None, None, labels, cfg, num_items, student_head_bias=head_bias
    ).loss


# ---------------------------------------------------------------------------------------------------------------
# Intermediate-representation losses.
# ---------------------------------------------------------------------------------------------------------------


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    kind: Literal["mse", "cosine"] = "mse",
    projection: nn.Module | None = None,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden-state matching (TinyBERT / DistilBERT style), summed over valid positions / ``num_items``.

    Args:
        student_hidden: ``[B, T, Hs]``.
        teacher_hidden: ``[B, T, Ht]``; detached, never receives gradients.
        mask: ``[B, T]``, true (or 1) at positions that count.
        kind: ``"mse"``: mean over the hidden dim of the squared error, so the scale does not grow with H;
            ``"cosine"``: ``1 - cos(student, teacher)``.
        projection: maps ``Hs -> Ht`` (e.g. a trainable ``nn.Linear``); required when the sizes differ.
        num_items: normaliser (default: valid positions in this call).
    """
    index, n_valid = _valid_index(mask.bool())
    student = _select(student_hidden, index)  # [N, Hs]; project only the positions that count
    if projection is not None:
        student = projection(student)
    teacher = _select(teacher_hidden.detach(), index).float()  # [N, Ht]
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student hidden size {student.shape[-1]} != teacher hidden size {teacher.shape[-1]}: "
            "pass a projection (e.g. nn.Linear(student_size, teacher_size))"
        )
    student = student.float()
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    elif kind == "cosine":
        per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown hidden_state_loss kind {kind!r}; expected 'mse' or 'cosine'")
    return per_position.sum() / _denominator(num_items, n_valid, student.device)


def attention_transfer_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher row || student row) between attention distributions (MiniLM / TinyBERT), masked.

    Args:
        student_attn: ``[B, Hs, T, T]`` attention probabilities (rows sum to 1, zeros at masked keys).
        teacher_attn: ``[B, Ht, T, T]``; detached. With a different head count both sides are averaged over heads.
        mask: ``[B, T]``, true at query positions that count.
        num_items: normaliser (default: valid query positions in this call).

    Returns:
        The KL averaged over heads, summed over valid query positions, divided by ``num_items``.
    """
    teacher_attn = teacher_attn.detach()
    if student_attn.shape[1] != teacher_attn.shape[1]:
        student_attn = student_attn.mean(1, keepdim=True)
        teacher_attn = teacher_attn.mean(1, keepdim=True)
    # Attention probabilities are exact zeros at masked keys (causal, padding). The teacher's log(0) becomes
    # NEG_LOGPROB so 0 * log 0 = 0; the student clamps *before* the log, as log() of an exact 0 sends 0 / 0 = NaN
    # into backward.
    teacher_log = teacher_attn.float().log().clamp_min(NEG_LOGPROB)
    student_log = student_attn.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    per_query = _kl(teacher_log, student_log).mean(1)  # [B, T]
    index, n_valid = _valid_index(mask.bool())
    return _select(per_query[..., None], index).sum() / _denominator(num_items, n_valid, per_query.device)


__all__ = [
    "DIVERGENCES",
    "NEG_LOGPROB",
    "TAIL_FLOOR",
    "Divergence",
    "KDLossConfig",
    "KDLossOutput",
    "TeacherTopK",
    "attention_transfer_loss",
    "ce_loss_from_hidden",
    "forward_kl",
    "hidden_state_loss",
    "jsd",
    "kd_loss_from_hidden",
    "kd_loss_from_logits",
    "mix_teacher_logprobs",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_divergence",
    "topk_from_logits",
    "tvd",
]
