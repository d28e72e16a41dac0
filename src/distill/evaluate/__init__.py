"""Evaluation: teacher vs student vs baselines through one harness, compared, gated and reported.

* `harness.evaluate_models`: the whole evaluation; returns the content of `metrics.json`;
* `quality`: ROUGE/BLEU/chrF/exact match, teacher-forced perplexity, KL and top-1, answer health;
* `efficiency`: size, peak memory, time to first token, decode speed, throughput, latency;
* `compare`: ratios against the teacher (retention, speed-up, memory, size, cost) and `check_gate`;
* `report.write_report`: `report.md` and a self-contained `report.html`.

The names below are imported on first use, so `distill report` does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.evaluate.compare import check_gate
    from distill.evaluate.harness import evaluate_models
    from distill.evaluate.report import write_report

__all__ = ["check_gate", "evaluate_models", "write_report"]

_HOMES = {
    "check_gate": "distill.evaluate.compare",
    "evaluate_models": "distill.evaluate.harness",
    "write_report": "distill.evaluate.report",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'distill.evaluate' has no attribute {name!r}")
