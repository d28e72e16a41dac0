"""The job file: defaults, every problem reported at once with path and line, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import JobConfig, describe_fields, load_job, validate_job
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    job = validate_job({})
    assert job.teacher.model == "builtin:smollm2-135m-instruct"
    assert job.data.split.train == 0.8 and job.distillation.loss == "forward_kl"


def test_examples_validate():
    for path in (REPO / "examples").glob("*.yaml"):
        job = load_job(path)
        assert job.resolve(job.data.prompts).is_file(), f"{path}: prompts file missing"


def test_every_problem_is_listed_with_path_and_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: x\n"
        "teacher:\n"
        "  modle: foo\n"
        "training:\n"
        "  learning_rate: -1\n"
        "  max_steps: 0\n"
        "data:\n"
        "  split: {train: 0.5, validation: 0.1, test: 0.1}\n"
    )
    with pytest.raises(DistillError) as e:
        load_job(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 4 problems")
    assert "line 3" in msg and "teacher.modle: unknown field (did you mean 'model'?)" in msg
    assert "line 5" in msg and "training.learning_rate: must be > 0, got -1" in msg
    assert "training.max_steps: must be > 0, got 0" in msg
    assert "data.split: train + validation + test must be 1, got 0.7" in msg
    # sorted by line
    assert msg.index("line 3") < msg.index("line 5") < msg.index("line 8")


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nteacher:\n  model: [unclosed\n")
    with pytest.raises(DistillError, match=r"job.yaml: line \d+, column \d+: not valid YAML"):
        load_job(path)


def test_missing_job_file(tmp_path):
    with pytest.raises(DistillError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\n")
    job = load_job(path, ["training.max_steps=7", "student.layers=[0, 2]", "distillation.loss=jsd"])
    assert job.training.max_steps == 7 and job.student.layers == [0, 2] and job.distillation.loss == "jsd"
    with pytest.raises(DistillError, match="training.max_steps: must be > 0"):
        load_job(path, ["training.max_steps=-3"])
    with pytest.raises(DistillError, match="expected KEY.PATH=VALUE"):
        load_job(path, ["training.max_steps"])


def test_relative_paths_resolve_against_the_job_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "job.yaml"
    path.write_text("data: {prompts: p.jsonl}\n")
    assert load_job(path).resolve("p.jsonl") == (tmp_path / "sub" / "p.jsonl").resolve()


def test_every_field_is_documented():
    rows = describe_fields(JobConfig)
    undocumented = [key for key, _, doc in rows if not doc and key.count(".") >= 1 and "split." not in key]
    assert len(rows) > 60
    # A few leaves (split fractions, simple numbers) are self-explanatory; the rest must say what they mean.
    assert len(undocumented) < 12, undocumented


def test_settings_that_cannot_work_together_fail_at_load_time(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "teacher:\n"
        "  model: gpt-4o-mini\n"
        "  backend: openai\n"
        "student:\n"
        "  from: teacher\n"
        "distillation:\n"
        "  mode: on_policy\n"
        "  logit_cache: true\n"
    )
    with pytest.raises(DistillError) as e:
        load_job(path)
    msg = str(e.value)
    # An API teacher can make no logit cache either: the mode is what is wrong, said once.
    assert msg.startswith(f"{path}: 2 problems")
    assert "line 5   student.from: teacher builds the student from the teacher's weights" in msg
    assert "line 7   distillation.mode: on_policy needs the teacher's token distributions" in msg
    # What an API teacher can do: SFT a student given by reference on its answers.
    ok = load_job(path, ["student.from=./my-student", "distillation.mode=sequence"])
    assert ok.teacher.backend == "openai" and ok.distillation.mode == "sequence"
    # With a local teacher, on-policy batches still cannot come from the cache, nor transfer from SFT.
    local = ["teacher.backend=local", "teacher.model=builtin:smollm2-135m-instruct"]
    with pytest.raises(DistillError) as e:
        load_job(path, local)
    assert "line 8   distillation.logit_cache: mode: on_policy scores the student's own answers" in str(e.value)
    transfer = [*local, "distillation.mode=sequence", "distillation.transfer=[{teacher: 2, student: 1}]"]
    with pytest.raises(DistillError, match="distillation.transfer: needs the teacher's layers in memory"):
        load_job(path, transfer)
