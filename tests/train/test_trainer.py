"""A few KD steps bring a tiny student closer to a different tiny teacher; resume continues the run."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from distill.config import DistillationConfig, TrainingConfig
from distill.train.data import IGNORE, Collator, encode_example, encode_records
from distill.train.modes import DistillLoss
from distill.train.trainer import JsonlLogger, loss_config, train_student
from tiny import SENTENCES, kl_to_teacher, qa_records, tiny_llama


def test_encode_example_masks_the_prompt(tiny_tokenizer):
    ex = encode_example(tiny_tokenizer, [{"role": "user", "content": "what is two ?"}], "two plus two .", 64)
    n_answer = sum(label != IGNORE for label in ex["labels"])
    assert n_answer == len(tiny_tokenizer("two plus two .", add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert ex["labels"][-1] == tiny_tokenizer.eos_token_id
    assert ex["labels"][0] == IGNORE and len(ex["labels"]) == len(ex["input_ids"])
    assert encode_example(tiny_tokenizer, [{"role": "user", "content": "a " * 80}], "x", 16) is None


def test_kd_steps_lower_the_kl_and_resume(tmp_path, tiny_tokenizer):
    teacher = tiny_llama(2, 0, tiny_tokenizer)
    student = tiny_llama(1, 1, tiny_tokenizer)
    examples = encode_records(tiny_tokenizer, qa_records(), 64)
    batch = Collator(tiny_tokenizer.pad_token_id)(examples[:12])
    before = kl_to_teacher(student, teacher, batch)
    training = TrainingConfig(
        max_steps=12,
        batch_size=4,
        learning_rate=3e-3,
        eval_every=4,
        save_every=4,
        warmup_ratio=0.0,
        lr_scheduler="constant",
    )
    distillation = DistillationConfig(mode="logit", loss="forward_kl", temperature=1.0, alpha=1.0)
    model, summary = train_student(
        student, tiny_tokenizer, teacher, examples, examples[:6], training, distillation, tmp_path
    )
    after = kl_to_teacher(model, teacher, batch)
    assert after < 0.7 * before, (before, after)
    assert summary["steps"] == 12
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if r["split"] == "train"]
    assert {"loss", "kd", "ce"} <= set(train_rows[0]) and len(train_rows) == 12
    assert sum(r["split"] == "validation" for r in log) == 3
    assert train_rows[-1]["kd"] < train_rows[0]["kd"]

    # Resume: a longer run in the same folder continues from the last checkpoint (step 12), not from 0.
    longer = training.model_copy(update={"max_steps": 16})
    _, summary2 = train_student(
        tiny_llama(1, 1, tiny_tokenizer),
        tiny_tokenizer,
        teacher,
        examples,
        examples[:6],
        longer,
        distillation,
        tmp_path,
    )
    assert summary2["resumed_from"].endswith("checkpoint-12") and summary2["steps"] == 16
    log2 = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log2 if r["split"] == "train"]
    assert steps == list(range(1, 17))  # one unbroken curve


def test_sequence_mode_needs_no_teacher(tmp_path, tiny_tokenizer):
    student = tiny_llama(1, 1, tiny_tokenizer)
    examples = encode_records(tiny_tokenizer, qa_records(12), 64)
    training = TrainingConfig(max_steps=3, batch_size=4, eval_every=3, save_every=3)
    _, summary = train_student(
        student, tiny_tokenizer, None, examples, [], training, DistillationConfig(mode="sequence"), tmp_path
    )
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and all(r["kd"] == 0 for r in log if r["split"] == "train")


def test_early_stopping_keeps_the_best_checkpoint_and_raises_the_overfitting_alarm(tmp_path, tiny_tokenizer, caplog):
    # Training answers all say one thing and validation answers another: validation loss soon rises.
    msgs = [[{"role": "user", "content": f"what is {w} ?"}] for w in ["sky", "cat", "dog", "sun", "moon", "two"]]
    train = encode_records(tiny_tokenizer, [{"messages": m, "completion": SENTENCES[0]} for m in msgs[:4] * 3], 64)
    val = encode_records(tiny_tokenizer, [{"messages": m, "completion": SENTENCES[1]} for m in msgs[4:]], 64)
    training = TrainingConfig(
        max_steps=30,
        batch_size=4,
        learning_rate=1e-2,
        eval_every=2,
        save_every=2,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        early_stopping_patience=2,
    )
    distillation = DistillationConfig(mode="sequence")
    caplog.set_level(logging.WARNING, logger="distill")
    model, summary = train_student(
        tiny_llama(1, 1, tiny_tokenizer), tiny_tokenizer, None, train, val, training, distillation, tmp_path
    )
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    val_losses = {r["step"]: r["loss"] for r in log if r["split"] == "validation"}
    best_step = min(val_losses, key=val_losses.get)
    assert summary["steps"] < 30, "early stopping never fired"
    assert summary["steps"] == max(val_losses) == best_step + 2 * training.early_stopping_patience
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert summary["best_validation_loss"] == pytest.approx(val_losses[best_step])
    # The returned model is the best checkpoint's, not the last step's.
    with torch.no_grad():
        loss = DistillLoss(loss_config(distillation))(model.eval(), Collator(tiny_tokenizer.pad_token_id)(val)).loss
    assert float(loss) == pytest.approx(val_losses[best_step], rel=1e-4)
    assert "overfitting: validation loss rose twice" in caplog.text


def test_balance_warning_names_the_outweighed_term(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="distill")
    logger = JsonlLogger(tmp_path / "log.jsonl", {"kd": 0.5, "ce": 0.5, "transfer/0": 1.0, "transfer/1": 0.0})
    state = type("State", (), {"global_step": 1, "is_world_process_zero": True})()
    logger.on_log(None, state, None, logs={"loss": 1.0, "kd": 1.0, "ce": 2.0, "transfer/0": 1e-4, "transfer/1": 1e-9})
    assert "loss term ce (1) outweighs transfer/0 (0.0001)" in caplog.text
    assert "transfer/1" not in caplog.text  # weight 0: not part of the loss
    row = json.loads((tmp_path / "log.jsonl").read_text())
    assert row["transfer/0"] == 1e-4 and row["kd"] == 1.0
    caplog.clear()
    logger.on_log(None, state, None, logs={"loss": 1.0, "kd": 1.0, "ce": 1.5})
    assert "outweighs" not in caplog.text


def test_length_grouped_batches_carry_less_padding(tmp_path, tiny_tokenizer, monkeypatch):
    answer = "the sky is blue on a clear day and a cat has four legs and a tail ."
    records = [  # answers of 1 to 16 words
        {"messages": [{"role": "user", "content": "what is two ?"}], "completion": answer.rsplit(" ", 16 - i % 16)[0]}
        for i in range(48)
    ]
    examples = encode_records(tiny_tokenizer, records, 64)
    masks: list[torch.Tensor] = []
    call = DistillLoss.__call__

    def record(self, model, inputs, num_items=None):
        masks.append(inputs["attention_mask"])
        return call(self, model, inputs, num_items)

    monkeypatch.setattr(DistillLoss, "__call__", record)

    def padding(grouped: bool) -> float:
        masks.clear()
        training = TrainingConfig(max_steps=12, batch_size=4, eval_every=100, save_every=100, group_by_length=grouped)
        student, teacher = tiny_llama(1, 1, tiny_tokenizer), tiny_llama(2, 0, tiny_tokenizer)
        train_student(
            student, tiny_tokenizer, teacher, examples, [], training, DistillationConfig(), tmp_path / str(grouped)
        )
        assert len(masks) == 12  # one epoch: every example once
        return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    grouped, random = padding(True), padding(False)
    assert grouped < 0.6 * random, (grouped, random)  # measured: 0.09 against 0.23
