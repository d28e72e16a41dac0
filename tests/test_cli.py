"""Bad input: one clear message, a non-zero exit, no traceback, nothing half-written under runs/."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml


def distill(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_clean_failure(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "error:" in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def edit_job(path, **sections):
    spec = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(spec))
    return spec


def test_missing_model(tiny_job, tmp_path):
    edit_job(tiny_job, teacher={"model": str(tmp_path / "no-such-model")})
    assert_clean_failure(distill("run", tiny_job), "no-such-model", "no such folder or file")
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nteacher: {model: [oops\n")
    assert_clean_failure(distill("run", job), "job.yaml", "not valid YAML")


def test_unknown_field(tiny_job, tmp_path):
    edit_job(tiny_job, training={"max_stepz": 3})
    assert_clean_failure(distill("run", tiny_job), "training.max_stepz: unknown field (did you mean 'max_steps'?)")
    assert not (tmp_path / "runs").exists()


def test_broken_data_line(tiny_job, tmp_path):
    lines = (tmp_path / "prompts.jsonl").read_text().splitlines()
    lines[4] = '{"prompt": "unterminated'
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    assert_clean_failure(distill("run", tiny_job), "prompts.jsonl", "line 5")
    assert not (tmp_path / "runs").exists()


def test_override_on_the_command_line(tiny_job):
    assert_clean_failure(
        distill("generate", tiny_job, "training.learning_rate=-1"), "training.learning_rate: must be > 0, got -1"
    )


@pytest.mark.parametrize("command", [["config"], ["models", "list"]])
def test_info_commands(command):
    result = distill(*command)
    assert result.returncode == 0, result.stderr
    assert ("teacher.model" in result.stdout) or ("builtin:smollm2-135m-instruct" in result.stdout)
