"""The offline teacher cache: training from it equals training with the live teacher's top-k, and it refuses
to serve a run it was not made for."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml

import distill.logit_cache as logit_cache
from distill.config import DistillationConfig, TrainingConfig, load_job
from distill.errors import DistillError
from distill.logit_cache import LogitCache, build_logit_cache, cache_settings
from distill.losses import KDLossConfig, topk_from_logits
from distill.train.data import Collator, encode_records
from distill.train.modes import DistillLoss
from distill.train.trainer import train_student
from tiny import make_tokenizer, qa_records, tiny_llama

K = 8
TEACHER = [{"model": "tiny-teacher", "weight": 1.0}]


@pytest.fixture(scope="module")
def splits(tiny_tokenizer):
    train = encode_records(tiny_tokenizer, qa_records(24), 64)
    validation = encode_records(tiny_tokenizer, qa_records(6)[:4], 64)
    return {"train": train, "validation": validation}


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer):
    return tiny_llama(2, 0, tiny_tokenizer)


def build(path, teacher, tokenizer, splits, k=K, dtype="float16"):
    settings = cache_settings(tokenizer, splits, k, TEACHER, dtype)
    # batch_size 5: the cache's batches differ from the training batches of 4.
    return build_logit_cache(path, [(teacher, 1.0)], splits, settings, batch_size=5, chunk_size=16), settings


@torch.no_grad()
def live_topk(teacher, example, k=K):
    """The live teacher's top-k at one example's answer positions, computed alone (no batch, no padding)."""
    ids = torch.tensor([example["input_ids"]])
    logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1]
    valid = torch.tensor(example["labels"][1:]) != -100
    logprobs, top = topk_from_logits(logits[valid], k)
    return logprobs.numpy(), top.numpy()


def test_cached_loss_equals_the_live_teachers_topk_in_values_and_grads(tmp_path, tiny_tokenizer, teacher, splits):
    cache, _ = build(tmp_path / "cache", teacher, tiny_tokenizer, splits, dtype="float32")
    collate = Collator(tiny_tokenizer.pad_token_id)
    dataset = cache.dataset("train", splits["train"])
    cached = collate([dataset[i] for i in range(8)])
    plain = collate(splits["train"][:8])
    with torch.no_grad():
        logits = teacher(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits[:, :-1]
    logprobs, ids = topk_from_logits(logits, K)
    live = {**plain, "teacher_topk_logprobs": logprobs, "teacher_topk_ids": ids}
    valid = plain["labels"][:, 1:] != -100
    torch.testing.assert_close(cached["teacher_topk_logprobs"][valid], logprobs[valid])
    assert torch.equal(cached["teacher_topk_ids"][valid], ids[valid])

    student = tiny_llama(1, 1, tiny_tokenizer)
    loss = DistillLoss(KDLossConfig(temperature=2.0, alpha=0.5, chunk_size=5))
    params = [p for p in student.parameters() if p.requires_grad]
    a, b = loss(student, cached), loss(student, live)
    torch.testing.assert_close(a.loss, b.loss)
    assert float(a.kd) > 0
    for ga, gb in zip(torch.autograd.grad(a.loss, params), torch.autograd.grad(b.loss, params), strict=True):
        torch.testing.assert_close(ga, gb)


def test_training_from_the_cache_equals_training_on_live_topk(tmp_path, tiny_tokenizer, teacher, splits):
    cache, _ = build(tmp_path / "cache", teacher, tiny_tokenizer, splits, dtype="float32")
    training = TrainingConfig(
        max_steps=4,
        batch_size=4,
        learning_rate=3e-3,
        eval_every=2,
        save_every=100,
        warmup_ratio=0.0,
        lr_scheduler="constant",
    )
    distillation = DistillationConfig(mode="logit", temperature=2.0, alpha=0.5, logit_cache=True, cache_top_k=K)
    from_cache, summary = train_student(
        tiny_llama(1, 1, tiny_tokenizer),
        tiny_tokenizer,
        None,
        splits["train"],
        splits["validation"],
        training,
        distillation,
        tmp_path / "a",
        logit_cache=cache,
    )
    live = [{**ex, "teacher_topk": live_topk(teacher, ex)} for ex in splits["train"]]
    live_val = [{**ex, "teacher_topk": live_topk(teacher, ex)} for ex in splits["validation"]]
    from_live, summary_live = train_student(
        tiny_llama(1, 1, tiny_tokenizer), tiny_tokenizer, None, live, live_val, training, distillation, tmp_path / "b"
    )
    assert summary["steps"] == 4 and summary["best_validation_loss"] is not None
    assert summary["best_validation_loss"] == pytest.approx(summary_live["best_validation_loss"], rel=1e-5)
    theirs = from_live.state_dict()
    for name, value in from_cache.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    start = tiny_llama(1, 1, tiny_tokenizer).state_dict()
    assert not torch.equal(from_cache.state_dict()["lm_head.weight"], start["lm_head.weight"])  # it did train
    log = [json.loads(line) for line in (tmp_path / "a" / "training_log.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in log if r["split"] == "train")


def test_cache_size_layout_and_float16(tmp_path, tiny_tokenizer, teacher, splits, caplog):
    caplog.set_level(logging.INFO, logger="distill")
    cache, settings = build(tmp_path / "cache", teacher, tiny_tokenizer, splits)  # default: float16
    assert cache.bytes_per_token == K * (2 + 4)
    assert f"{K * 6} bytes per token (float16 log-probs + int32 ids)" in caplog.text
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert {k: meta[k] for k in settings} == settings and meta["bytes_per_token"] == K * 6
    tokens = {name: sum(sum(label != -100 for label in ex["labels"][1:]) for ex in exs) for name, exs in splits.items()}
    assert meta["tokens"] == tokens and cache.tokens("train") == tokens["train"]
    n_examples = sum(len(v) for v in splits.values())
    assert meta["index_bytes"] == 16 * n_examples
    assert meta["total_bytes"] == K * 6 * sum(tokens.values()) + 16 * n_examples
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.npy"))
    assert 0 < on_disk - meta["total_bytes"] <= 9 * 128  # nine .npy headers
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left behind

    exact, _ = build(tmp_path / "exact", teacher, tiny_tokenizer, splits, dtype="float32")
    half, full = cache.topk("train", 3), exact.topk("train", 3)
    assert half[0].dtype == np.float16 and half[1].dtype == np.int32
    np.testing.assert_array_equal(half[1], full[1])
    np.testing.assert_allclose(half[0].astype(np.float32), full[0], rtol=2**-11, atol=1e-6)


def test_cache_refuses_a_run_it_was_not_made_for(tmp_path, tiny_tokenizer, teacher, splits):
    path = tmp_path / "cache"
    _, settings = build(path, teacher, tiny_tokenizer, splits)
    assert LogitCache.open(path, settings).k == K

    with pytest.raises(DistillError, match=r"k \(distillation.cache_top_k\): the cache has 8, this run needs 16"):
        LogitCache.open(path, {**settings, "k": 16})
    with pytest.raises(DistillError, match=r"cache_dtype\): the cache has 'float16', this run needs 'float32'"):
        LogitCache.open(path, {**settings, "dtype": "float32"})

    other = make_tokenizer()
    other.add_tokens(["zebra"])
    assert len(other.get_vocab()) == len(tiny_tokenizer.get_vocab()) + 1
    with pytest.raises(DistillError, match=r"tokenizer \(hash of the token -> id map\)"):
        LogitCache.open(path, cache_settings(other, splits, K, TEACHER))

    first = splits["train"][0]
    changed = {**splits, "train": [{**first, "input_ids": [3] + first["input_ids"][1:]}, *splits["train"][1:]]}
    assert changed["train"][0]["input_ids"] != first["input_ids"]
    with pytest.raises(DistillError, match=r"data \(hash of the encoded examples") as e:
        LogitCache.open(path, cache_settings(tiny_tokenizer, changed, K, TEACHER))
    assert "Delete the folder to rebuild it" in str(e.value)

    with pytest.raises(DistillError, match=r"needs 4; teacher .*needs \[\{\"model\": \"other\""):  # all at once
        LogitCache.open(path, {**settings, "k": 4, "teacher": [{"model": "other", "weight": 1.0}]})
    with pytest.raises(DistillError, match="no logit cache here"):
        LogitCache.open(tmp_path / "nowhere", settings)
    with pytest.raises(DistillError, match="24 cached examples but this run has 23"):
        LogitCache.open(path).dataset("train", splits["train"][:-1])


def test_an_interrupted_build_resumes(tmp_path, tiny_tokenizer, teacher, splits, monkeypatch, caplog):
    real = logit_cache._batch_topk
    calls = {"n": 0, "fail_at": 3}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(logit_cache, "_batch_topk", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        build(tmp_path / "cache", teacher, tiny_tokenizer, splits)
    assert not (tmp_path / "cache").exists() and (tmp_path / ".cache.partial").is_dir()

    caplog.set_level(logging.INFO, logger="distill")
    calls.update(n=0, fail_at=None)
    resumed, _ = build(tmp_path / "cache", teacher, tiny_tokenizer, splits)
    assert "resuming an interrupted build (train 10)" in caplog.text
    assert calls["n"] == 3 + 1  # train: 14 examples left in batches of 5; validation: 4 in one
    assert not (tmp_path / ".cache.partial").exists()
    fresh, _ = build(tmp_path / "fresh", teacher, tiny_tokenizer, splits)
    for split in ("train", "validation"):
        for a, b in zip(resumed.splits[split].__dict__.values(), fresh.splits[split].__dict__.values(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_pipeline_trains_from_the_cache_and_reuses_it(tiny_job, caplog):
    from typer.testing import CliRunner

    from distill import pipeline
    from distill.cli import app

    spec = yaml.safe_load(tiny_job.read_text())
    spec["distillation"] = {"logit_cache": True, "cache_top_k": K, "temperature": 1.0}
    spec["training"].update(max_steps=3, eval_every=3, save_every=3)
    tiny_job.write_text(yaml.safe_dump(spec))
    caplog.set_level(logging.INFO, logger="distill")
    run = pipeline.prepare(load_job(tiny_job))
    parts = pipeline.split(run, pipeline.generate(run))
    student_dir = pipeline.train(run, parts)
    assert (student_dir / "model.safetensors").is_file()
    assert "train: teacher freed; training from the logit cache" in caplog.text
    assert run.teacher_model is not None  # loaded again for the evaluation
    meta = json.loads((run.dir / "logit_cache" / "cache.json").read_text())
    assert meta["k"] == K and meta["teacher"] == [{"model": spec["teacher"]["model"], "weight": 1.0}]
    assert meta["examples"]["train"] == len(parts["train"])
    log = [json.loads(line) for line in (run.dir / "training" / "training_log.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in log if r["split"] == "train")

    caplog.clear()
    result = CliRunner().invoke(app, ["cache-logits", str(tiny_job)])
    assert result.exit_code == 0, result.output
    assert "reusing logit cache" in caplog.text and f"{K * 6} bytes per token" in result.output


def test_on_policy_cannot_train_from_the_cache(tmp_path, tiny_tokenizer, splits):
    cache, _ = build(tmp_path / "cache", tiny_llama(2, 0, tiny_tokenizer), tiny_tokenizer, splits)
    with pytest.raises(DistillError, match="logit_cache: mode: on_policy .* cannot train from a logit cache"):
        train_student(
            tiny_llama(1, 1, tiny_tokenizer),
            tiny_tokenizer,
            None,
            splits["train"],
            [],
            TrainingConfig(max_steps=1),
            DistillationConfig(mode="on_policy", logit_cache=True),
            tmp_path / "run",
            logit_cache=cache,
        )
