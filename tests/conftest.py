"""Shared fixtures: tiny random models saved as folders, a tiny job, and the optional shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tiny import make_tokenizer, tiny_llama, write_prompts

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved 4-layer tiny teacher folder, usable as a model reference."""
    folder = tmp_path_factory.mktemp("teacher")
    tiny_llama(4, 0, tiny_tokenizer).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved 1-layer tiny model with other weights (a ready-made student or baseline)."""
    folder = tmp_path_factory.mktemp("student")
    tiny_llama(1, 1, tiny_tokenizer).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def distill_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tiny_job(tmp_path, tiny_teacher_dir) -> Path:
    """A job file distilling the tiny teacher on 30 prompts in a few seconds."""
    write_prompts(tmp_path / "prompts.jsonl")
    job = {
        "name": "tiny",
        "teacher": {"model": str(tiny_teacher_dir)},
        "student": {"from": "teacher", "layers": 2},
        "data": {"prompts": "prompts.jsonl", "filters": {"drop_repetitive": False, "dedupe": "none"}},
        "generation": {"max_new_tokens": 8, "batch_size": 8},
        "training": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "save_every": 3, "learning_rate": 1e-3},
        "evaluation": {"max_new_tokens": 6, "batch_size": 4, "latency_repeats": 1, "samples_in_report": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when this checkout has none."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (it lives beside the repository, not in it)")
    return path


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: intra-op threads only spin (3-10x slower on a busy 2-core box); subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
