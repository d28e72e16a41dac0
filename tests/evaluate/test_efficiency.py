"""Efficiency figures on tiny random models: every figure present and positive, sizes ordered."""

from __future__ import annotations

from distill.evaluate.efficiency import folder_bytes, measure_efficiency

PROMPTS = [[{"role": "user", "content": "what is two plus two ?"}], [{"role": "user", "content": "hello ."}]]
TIMED = ("ttft_s", "decode_tokens_per_s", "throughput_tokens_per_s", "latency_s")


def test_every_figure_present_and_positive(tiny_models, tmp_path):
    teacher, tok = tiny_models["teacher"]
    student, _ = tiny_models["student"]
    student.save_pretrained(tmp_path / "student")
    figures = {
        "teacher": measure_efficiency(teacher, tok, PROMPTS, batch_size=2, repeats=2, new_tokens=4),
        "student": measure_efficiency(
            student, tok, PROMPTS, batch_size=2, repeats=2, new_tokens=4, model_dir=tmp_path / "student"
        ),
    }
    for e in figures.values():
        for key in ("parameters", "weights_bytes", "size_bytes", "peak_memory_bytes"):
            assert e[key] > 0, key
        for key in TIMED:
            assert e[key]["mean"] > 0 and e[key]["std"] >= 0, key
            assert len(e[key]["values"]) == 2 and all(v > 0 for v in e[key]["values"]), key
        assert 0 < e["latency_s"]["p50"] <= e["latency_s"]["p95"]
        assert e["peak_memory_bytes"] >= e["weights_bytes"]  # weights + a non-negative increase
    assert figures["teacher"]["parameters"] > figures["student"]["parameters"]
    assert figures["teacher"]["size_source"] == "parameters"
    assert figures["student"]["size_source"] == "folder"
    assert figures["student"]["size_bytes"] == folder_bytes(tmp_path / "student")
    # fp32 parameters plus the small rotary-frequency buffers
    assert 0 <= figures["teacher"]["weights_bytes"] - 4 * figures["teacher"]["parameters"] < 1024
    assert student.generation_config.min_new_tokens is None  # the fixed-length setting is put back
