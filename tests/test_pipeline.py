"""`distill run` end to end on tiny models: every stage, reuse on rerun, resume after SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from distill.config import load_job
from distill.errors import DistillError, GateFailed
from distill.pipeline import run_job
from tiny import torchrun


def test_run_end_to_end_then_reuse(tiny_job, caplog):
    caplog.set_level(logging.INFO, logger="distill")
    report = run_job(load_job(tiny_job))
    run = report.parent
    for name in (
        "job.yaml",
        "data_summary.json",
        "metrics.json",
        "report.md",
        "report.html",
        "timings.json",
        "student/config.json",
        "student/model.safetensors",
        "training/training_log.jsonl",
    ):
        assert (run / name).exists(), name
    shards = list((run / "synthetic").glob("part-*.jsonl"))
    records = [json.loads(line) for s in shards for line in s.read_text().splitlines()]
    assert len(records) == 30 and len({r["id"] for r in records}) == 30
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["run"]["timings_s"]) >= {"prepare", "generate", "train", "evaluate"}
    assert "student" in (run / "report.md").read_text()

    caplog.clear()
    run_job(load_job(tiny_job))
    assert "generate: reusing 30 finished answers" in caplog.text
    assert "train: reusing the trained student" in caplog.text

    # A failed deploy gate still leaves a complete run behind: report, metrics and stage times.
    (run / "timings.json").unlink()
    with pytest.raises(GateFailed, match="min_speedup 1000"):
        run_job(load_job(tiny_job, ["evaluation.gate.min_speedup=1000"]))
    assert set(json.loads((run / "timings.json").read_text())) >= {"generate", "train", "evaluate", "report"}


def _generate_cmd(job):
    return [sys.executable, "-m", "distill.cli", "generate", str(job)]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU, as in CI")
def test_run_under_torchrun_trains_on_both_processes_and_writes_once(tiny_job, distill_home):
    """`torchrun -m distill run`: the data and the report are made once, training is data-parallel."""
    done = torchrun(["-m", "distill", "run", str(tiny_job)], cwd=tiny_job.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert out.count("done. report:") == 1 and out.count("student: ") == 1, out[-3000:]
    run = tiny_job.parent / "runs" / "tiny"
    shards = (run / "synthetic").glob("part-*.jsonl")
    records = [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]
    assert len(records) == 30 and len({r["id"] for r in records}) == 30  # generated once, not once per process
    assert (run / "report.md").is_file() and (run / "student" / "model.safetensors").is_file()
    # Data-parallel: each step saw batch_size examples on each of the 2 processes.
    n_train = json.loads((run / "data_summary.json").read_text())["splits"]["train"]
    state = json.loads(next((run / "training" / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["log_history"][0]["epoch"] == pytest.approx(2 * 4 / n_train)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU, as in CI")
def test_bad_input_under_torchrun_is_reported_once_by_the_main_process(tiny_job, distill_home):
    prompts = tiny_job.parent / "prompts.jsonl"
    prompts.write_text("".join(prompts.read_text().splitlines(keepends=True)[:2]))
    done = torchrun(["-m", "distill", "run", str(tiny_job)], cwd=tiny_job.parent)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert out.count("2 prompts; at least 3 are needed") == 1, out[-3000:]
    assert "[rank1]" not in out, out[-3000:]  # no second traceback from a process left waiting


def test_generation_killed_and_restarted_loses_and_duplicates_nothing(tiny_job, tmp_path):
    spec = yaml.safe_load(tiny_job.read_text())
    spec["generation"].update(batch_size=2, max_new_tokens=24)
    tiny_job.write_text(yaml.safe_dump(spec))
    store = tmp_path / "runs" / "tiny" / "synthetic"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_generate_cmd(tiny_job), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = sum(len(p.read_text().splitlines()) for p in store.glob("part-*.jsonl")) if store.exists() else 0
        if lines >= 6 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = sum(len(p.read_text().splitlines()) for p in store.glob("part-*.jsonl"))
    assert 0 < partial < 30, "the kill must land mid-run"
    done = subprocess.run(_generate_cmd(tiny_job), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    ids = [json.loads(line)["id"] for p in store.glob("part-*.jsonl") for line in p.read_text().splitlines()]
    assert len(ids) == 30 and len(set(ids)) == 30


def test_api_teacher_answers_train_a_student_given_by_reference(tiny_job, tiny_student_dir):
    from distill.pipeline import generate, prepare, split, train
    from teachers.fake_openai_server import FakeOpenAI, serve

    spec = yaml.safe_load(tiny_job.read_text())
    spec["student"] = {"from": str(tiny_student_dir)}
    spec["distillation"] = {"mode": "sequence"}
    with serve(FakeOpenAI().app) as url:
        spec["teacher"] = {"model": "fake", "backend": "openai", "api": {"base_urls": [url]}}
        tiny_job.write_text(yaml.safe_dump(spec))
        job = load_job(tiny_job)
        with pytest.raises(DistillError, match="distill run: the evaluate stage measures the teacher itself"):
            run_job(job)  # refused before any generation
        assert not job.run_dir.exists()
        run = prepare(job)
        parts = split(run, generate(run))
    assert all(r["completion"].startswith("echo: ") for r in parts["train"])  # the API teacher's answers
    student_dir = train(run, parts)
    assert (student_dir / "model.safetensors").is_file()
    log = [json.loads(line) for line in (run.dir / "training" / "training_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if r["split"] == "train"]
    assert train_rows and train_rows[-1]["ce"] < train_rows[0]["ce"]
