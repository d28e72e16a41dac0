"""Tiny random models for the evaluation tests: a 2-layer "teacher", a 1-layer "student", no downloads.

Teacher and student share the word-level tokenizer of tests/tiny.py; the student's
embedding table is larger than the tokenizer (a padded vocab, as real checkpoints have), which
exercises the shared-first-min(V)-ids path of the KL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from distill.config import EvaluationConfig
from distill.evaluate.harness import INITIAL_STUDENT, evaluate_models
from distill.teachers.base import GenerationParams
from tiny import make_tokenizer, tiny_llama

PROMPTS = [
    "what is two plus two ?",
    "name a colour of the sky .",
    "how many legs does a cat have ?",
    "say hello to the world in one word .",
]


def make_models(tokenizer: PreTrainedTokenizerFast) -> dict:
    """{"teacher": 2 layers, "student": 1 layer (padded vocab), "initial student": 1 layer, other seed}."""
    return {
        "teacher": (tiny_llama(2, 0, tokenizer, vocab_size=128), tokenizer),
        "student": (tiny_llama(1, 1, tokenizer, vocab_size=160), tokenizer),
        INITIAL_STUDENT: (tiny_llama(1, 2, tokenizer, vocab_size=160), tokenizer),
    }


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tokenizer) -> dict:
    return make_models(tokenizer)


@pytest.fixture(scope="session")
def tiny_records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": p}], "completion": "two plus two is four ."} for p in PROMPTS]


MATH_RECORDS = [
    {
        "messages": [{"role": "user", "content": "what is two plus two ?"}],
        "reference": "two plus two is four .\n#### 4",
        "completion": "two plus two is four . #### 4",
    },
    {
        "messages": [{"role": "user", "content": "how many legs does a cat have ? <script>alert(1)</script>"}],
        "reference": "a cat has four legs .\n#### 4",
    },
    {"messages": [{"role": "user", "content": "name a colour of the sky ."}], "reference": "blue #### 1"},
]


def eval_config(**overrides) -> EvaluationConfig:
    """Cheap settings: one timed repeat, batch 2."""
    return EvaluationConfig(**{"batch_size": 2, "latency_repeats": 1, "samples_in_report": 3, **overrides})


@pytest.fixture(scope="session")
def make_eval_config():
    """`eval_config` for test modules (they cannot import conftest reliably)."""
    return eval_config


@pytest.fixture(scope="session")
def math_metrics(tiny_models) -> dict:
    """A real `evaluate_models` run on the tiny models: math task with gold references, forgetting check on."""
    general = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    return evaluate_models(
        tiny_models,
        MATH_RECORDS,
        eval_config(gate={"min_retention": 0.5}),
        GenerationParams(max_new_tokens=6),
        "math",
        general_prompts=general,
        progress=False,
    )


@pytest.fixture(scope="session")
def report_dir(math_metrics, tmp_path_factory) -> Path:
    """A run folder with metrics.json (from `math_metrics`) and a training_log.jsonl, no report yet."""
    run = tmp_path_factory.mktemp("run")
    (run / "metrics.json").write_text(json.dumps(math_metrics, indent=2), encoding="utf-8")
    write_training_log(run / "training_log.jsonl")
    return run


def write_training_log(path: Path, steps: int = 40) -> None:
    """Train entries every step and validation entries every 10 steps, as the trainer writes them."""
    with path.open("w", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            loss = 1 + 3 / step**0.5
            f.write(json.dumps({"step": step, "split": "train", "loss": loss, "kd": 0.6 * loss, "ce": 1.2 * loss}))
            f.write("\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "split": "validation", "loss": loss + 0.2}) + "\n")
