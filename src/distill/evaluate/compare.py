"""Every model measured against the teacher: quality retention, speed-up, memory and size ratios, cost; the gate.

Ratios are model / teacher, so 0.83 retention means "keeps 83% of the teacher's score" and a
speed-up of 2.4 means "decodes 2.4x as many tokens per second". A ratio whose teacher value is
missing or zero is None rather than a number that means nothing.

Retention uses the main metric chosen by the harness (`metrics["meta"]["main_metric"]`). With a
gold reference that is the preset's metric (exact match or ROUGE-L) scored against it. Without
one (open conversation) the teacher's answer is the only reference there is: the main metric is
then ROUGE-L against the teacher's answer, the teacher scores 1.0 on it by definition, and
retention reads as "how much of the teacher's answer the model reproduces".
"""

from __future__ import annotations

from distill.config import GateConfig

# Quality figures where higher is better; each gets a model / teacher ratio in `quality_ratios`.
HIGHER_IS_BETTER = ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf")


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def cost_per_million_tokens(price_per_hour: float, throughput_tokens_per_s: float | None) -> float | None:
    """Hardware cost of generating one million tokens at the measured batched throughput."""
    if not throughput_tokens_per_s:
        return None
    return price_per_hour / (throughput_tokens_per_s * 3600) * 1e6


def compare_models(models: dict[str, dict], teacher: str, main_metric: str, price_per_hour: float) -> dict:
    """Per model: retention of the main metric, ratios of every quality figure, speed, memory, size, cost.

    `models` is `metrics["models"]`: per model `main` (the main metric's value), `quality` and `efficiency`.
    """
    t = models[teacher]
    out = {}
    for name, m in models.items():
        q, e, tq, te = m.get("quality", {}), m.get("efficiency", {}), t.get("quality", {}), t.get("efficiency", {})
        throughput = _mean(e.get("throughput_tokens_per_s"))
        out[name] = {
            "retention": ratio(m.get("main"), t.get("main")),
            "quality_ratios": {k: ratio(q.get(k), tq.get(k)) for k in HIGHER_IS_BETTER if q.get(k) is not None},
            # Lower is better: 1.1 means 10% more perplexed than the teacher on the teacher's own answers.
            "perplexity_ratio": ratio(q.get("perplexity_teacher_answers"), tq.get("perplexity_teacher_answers")),
            "speedup": ratio(_mean(e.get("decode_tokens_per_s")), _mean(te.get("decode_tokens_per_s"))),
            "throughput_ratio": ratio(throughput, _mean(te.get("throughput_tokens_per_s"))),
            "latency_ratio": ratio(_p50(e), _p50(te)),
            "ttft_ratio": ratio(_mean(e.get("ttft_s")), _mean(te.get("ttft_s"))),
            "memory_ratio": ratio(e.get("peak_memory_bytes"), te.get("peak_memory_bytes")),
            "size_ratio": ratio(e.get("size_bytes"), te.get("size_bytes")),
            "parameter_ratio": ratio(e.get("parameters"), te.get("parameters")),
            "cost_per_million_tokens": cost_per_million_tokens(price_per_hour, throughput),
        }
    return {"reference_model": teacher, "main_metric": main_metric, "price_per_hour": price_per_hour, "models": out}


def _mean(figure: dict | float | None) -> float | None:
    return figure.get("mean") if isinstance(figure, dict) else figure


def _p50(e: dict) -> float | None:
    return (e.get("latency_s") or {}).get("p50")


# (GateConfig field, key in comparison["models"][student], whether the threshold is a floor or a ceiling)
_GATES = (
    ("min_retention", "retention", "min"),
    ("min_speedup", "speedup", "min"),
    ("max_memory_ratio", "memory_ratio", "max"),
)


def check_gate(metrics: dict, gate: GateConfig) -> list[str]:
    """The thresholds of `gate` the student misses, one readable line each; empty when it passes.

    A threshold whose figure could not be measured (e.g. retention when the teacher scores 0)
    counts as failed: a gate that cannot be checked must not pass silently.
    """
    student = metrics["meta"]["student"]
    figures = metrics["comparison"]["models"].get(student, {})
    failed = []
    for field, key, kind in _GATES:
        threshold = getattr(gate, field)
        if threshold is None:
            continue
        value = figures.get(key)
        if value is None:
            failed.append(f"{key} could not be measured for {student!r}, but {field} {threshold:.2f} is set")
        elif kind == "min" and value < threshold:
            failed.append(f"{key} {value:.2f} < {field} {threshold:.2f}")
        elif kind == "max" and value > threshold:
            failed.append(f"{key} {value:.2f} > {field} {threshold:.2f}")
    return failed


def gate_summary(metrics: dict, gate: GateConfig) -> dict:
    """The gate's thresholds, the failed ones and the verdict, as stored in `metrics["comparison"]["gate"]`."""
    thresholds = {f: getattr(gate, f) for f, _, _ in _GATES if getattr(gate, f) is not None}
    failed = check_gate(metrics, gate)
    return {"thresholds": thresholds, "failed": failed, "passed": not failed, "checked": bool(thresholds)}
