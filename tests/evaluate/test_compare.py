"""Retention, speed-up, ratio and cost arithmetic; the gate names each threshold it misses."""

from __future__ import annotations

import pytest

from distill.config import GateConfig
from distill.evaluate.compare import check_gate, compare_models, cost_per_million_tokens, gate_summary


def _model(main, decode, throughput, memory, size, params, rouge=None):
    return {
        "main": main,
        "quality": {"rougeL": rouge} if rouge is not None else {},
        "efficiency": {
            "decode_tokens_per_s": {"mean": decode, "std": 0.0},
            "throughput_tokens_per_s": {"mean": throughput, "std": 0.0},
            "ttft_s": {"mean": 0.1, "std": 0.0},
            "latency_s": {"mean": 1.0, "std": 0.0, "p50": 1.0, "p95": 1.0},
            "peak_memory_bytes": memory,
            "size_bytes": size,
            "parameters": params,
        },
    }


def _metrics(student_main=0.6, teacher_main=0.8) -> dict:
    models = {
        "teacher": _model(teacher_main, 10.0, 100.0, 1000, 2000, 400, rouge=0.5),
        "student": _model(student_main, 25.0, 300.0, 400, 500, 100, rouge=0.4),
    }
    return {
        "meta": {"student": "student", "teacher": "teacher"},
        "models": models,
        "comparison": compare_models(models, "teacher", "exact_match", price_per_hour=2.0),
    }


def test_ratios():
    c = _metrics()["comparison"]["models"]
    s, t = c["student"], c["teacher"]
    assert s["retention"] == pytest.approx(0.75)
    assert s["speedup"] == pytest.approx(2.5)
    assert s["throughput_ratio"] == pytest.approx(3.0)
    assert s["memory_ratio"] == pytest.approx(0.4)
    assert s["size_ratio"] == pytest.approx(0.25)
    assert s["parameter_ratio"] == pytest.approx(0.25)
    assert s["quality_ratios"]["rougeL"] == pytest.approx(0.8)
    assert t["retention"] == t["speedup"] == t["memory_ratio"] == 1.0
    # $2/hour at 100 tok/s: 360,000 tokens an hour -> $5.56 per million; 3x the throughput costs a third.
    assert t["cost_per_million_tokens"] == pytest.approx(2 / 360_000 * 1e6)
    assert s["cost_per_million_tokens"] == pytest.approx(t["cost_per_million_tokens"] / 3)
    assert cost_per_million_tokens(1.0, 0) is None


def test_retention_is_none_when_the_teacher_scores_zero():
    assert _metrics(teacher_main=0.0)["comparison"]["models"]["student"]["retention"] is None


def test_gate_names_the_failed_thresholds():
    metrics = _metrics()
    failed = check_gate(metrics, GateConfig(min_retention=0.8, min_speedup=3.0, max_memory_ratio=0.5))
    assert failed == ["retention 0.75 < min_retention 0.80", "speedup 2.50 < min_speedup 3.00"]
    assert check_gate(metrics, GateConfig(max_memory_ratio=0.3)) == ["memory_ratio 0.40 > max_memory_ratio 0.30"]
    assert check_gate(metrics, GateConfig(min_retention=0.7, min_speedup=2.0, max_memory_ratio=0.5)) == []
    assert check_gate(metrics, GateConfig()) == []
    summary = gate_summary(metrics, GateConfig(min_retention=0.8))
    assert summary["passed"] is False and summary["checked"] is True and "min_retention" in summary["failed"][0]


def test_gate_fails_when_the_figure_is_missing():
    failed = check_gate(_metrics(teacher_main=0.0), GateConfig(min_retention=0.5))
    assert len(failed) == 1 and "min_retention" in failed[0] and "could not be measured" in failed[0]
