"""`distill eval` on any prompt file, and the deploy gate's exit code."""

from __future__ import annotations

import json
import subprocess
import sys


def distill_eval(teacher, student, data, out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "distill.cli",
        "eval",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_eval_writes_report_and_gate_fails_by_name(tiny_teacher_dir, tiny_student_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is the sky ? {i}"}) + "\n" for i in range(3)))
    ok = distill_eval(tiny_teacher_dir, tiny_student_dir, data, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "student"}
    assert (tmp_path / "ok" / "report.html").is_file()

    gated = distill_eval(tiny_teacher_dir, tiny_student_dir, data, tmp_path / "gated", "--min-speedup", "1000")
    assert gated.returncode == 3
    assert "Traceback" not in gated.stderr
    assert "deploy gate failed" in gated.stderr and "min_speedup 1000" in gated.stderr
