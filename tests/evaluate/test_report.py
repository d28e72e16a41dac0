"""A real (tiny) evaluation run -> metrics.json layout -> report.md and a self-contained report.html."""

from __future__ import annotations

import json
import re

import pytest

from distill.errors import DistillError
from distill.evaluate.harness import INITIAL_STUDENT, evaluate_models
from distill.evaluate.report import write_report
from distill.teachers.base import GenerationParams


def test_metrics_layout(math_metrics):
    m = math_metrics
    assert set(m) == {"meta", "models", "comparison", "health", "samples"}
    json.dumps(m, allow_nan=False)  # plain JSON for machines
    assert m["meta"]["main_metric"] == {"name": "exact_match", "against": "reference", "higher_is_better": True}
    assert list(m["models"]) == ["teacher", "student", INITIAL_STUDENT]
    for name, section in m["models"].items():
        q = section["quality"]
        for key in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "perplexity_reference"):
            assert q[key] is not None, (name, key)
        assert section["main"] == q["exact_match"]
        assert (section["fidelity"] is None) == (name == "teacher")
        assert section["efficiency"]["decode_tokens_per_s"]["mean"] > 0
        assert m["health"]["models"][name]["n"] == 3
    f = m["models"]["student"]["fidelity"]
    assert {"exact_agreement", "rougeL", "kl_per_token", "top1_agreement"} <= set(f)
    assert f["kl_per_token"] > 0
    assert m["comparison"]["gate"]["checked"] and m["comparison"]["gate"]["thresholds"] == {"min_retention": 0.5}
    forgetting = m["health"]["forgetting"]
    assert forgetting["n_prompts"] == 2 and forgetting["kl_initial_to_student"] > 0 and forgetting["summary"]
    assert m["meta"]["stored_completions"]["n"] == 1
    assert len(m["samples"]) == 3 and set(m["samples"][0]["answers"]) == set(m["models"])


def test_without_references_the_teacher_is_the_reference(tiny_models, make_eval_config):
    records = [
        {"messages": [{"role": "user", "content": "hello ."}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    m = evaluate_models(
        {k: tiny_models[k] for k in ("teacher", "student")},
        records,
        make_eval_config(),
        GenerationParams(max_new_tokens=4),
        "conversation",
        progress=False,
    )
    assert m["meta"]["main_metric"]["against"] == "teacher"
    assert m["models"]["teacher"]["main"] in (0.0, 1.0)  # ROUGE-L of its answers against themselves (0 if empty)
    assert m["health"]["forgetting"] == {"skipped": "no general prompts given"}
    assert m["models"]["student"]["quality"]["perplexity_reference"] is None


def test_unknown_teacher_is_a_readable_error(tiny_models, make_eval_config):
    with pytest.raises(DistillError, match="teacher"):
        evaluate_models(tiny_models, [], make_eval_config(), GenerationParams(), "math", teacher="nope", progress=False)


def test_report_files(report_dir):
    md_path, html_path = write_report(report_dir)  # reads metrics.json and training_log.jsonl
    assert md_path == report_dir / "report.md" and html_path == report_dir / "report.html"
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# Distillation report")
    assert re.search(r"\*\*The student (keeps \d+% of the teacher's exact match|scores )", md)
    for title in ("## Quality", "## Fidelity to the teacher", "## Efficiency", "## Against the teacher", "## Health"):
        assert title in md
    assert "| Model |" in md and "| teacher |" in md and "| student |" in md
    assert "**Gate:" in md and "## Sample answers" in md and "## Forgetting" in md
    assert "<script>" not in md  # model and prompt text is escaped

    page = html_path.read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') >= 4  # loss curves, quality, scatter, efficiency
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for title in ("Quality", "Speed and memory", "Health", "Sample answers", "Training", "Retention"):
        assert title in page


def test_report_without_training_log(math_metrics, tmp_path):
    _, html_path = write_report(tmp_path, math_metrics)
    page = html_path.read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') == 3
    assert "<h2>Training</h2>" not in page


def test_missing_metrics_is_a_readable_error(tmp_path):
    with pytest.raises(DistillError, match="metrics.json"):
        write_report(tmp_path)
