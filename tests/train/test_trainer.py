"""A few KD steps bring a tiny student closer to a different tiny teacher; resume continues the run."""

from __future__ import annotations

import json

import torch

from distill.config import DistillationConfig, TrainingConfig
from distill.train.data import IGNORE, Collator, encode_example, encode_records
from distill.train.trainer import train_student
from tiny import tiny_llama

SENTENCES = ["the sky is blue on a clear day .", "a cat has four legs and a tail .", "two plus two is four ."]


def records(n=24):
    return [
        {"messages": [{"role": "user", "content": f"what is {w} ?"}], "completion": SENTENCES[i % 3]}
        for i, w in enumerate(["sky", "cat", "two", "dog", "sun", "moon"] * (n // 6))
    ]


@torch.no_grad()
def kl_to_teacher(student, teacher, batch) -> float:
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    p = t.log_softmax(-1)
    return float((p.exp() * (p - s.log_softmax(-1))).sum(-1).mean())


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
    examples = encode_records(tiny_tokenizer, records(), 64)
    batch = Collator(tiny_tokenizer.pad_token_id)(examples[:12])
    before = kl_to_teacher(student, teacher, batch)
    training = TrainingConfig(max_steps=12, batch_size=4, learning_rate=3e-3, eval_every=4, save_every=4,
                              warmup_ratio=0.0, lr_scheduler="constant")
    distillation = DistillationConfig(mode="logit", loss="forward_kl", temperature=1.0, alpha=1.0)
    model, summary = train_student(student, tiny_tokenizer, teacher, examples, examples[:6], training, distillation,
                                   tmp_path)
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
    _, summary2 = train_student(tiny_llama(1, 1, tiny_tokenizer), tiny_tokenizer, teacher, examples, examples[:6],
                                longer, distillation, tmp_path)
    assert summary2["resumed_from"].endswith("checkpoint-12") and summary2["steps"] == 16
    log2 = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log2 if r["split"] == "train"]
    assert steps == list(range(1, 17))  # one unbroken curve


def test_sequence_mode_needs_no_teacher(tmp_path, tiny_tokenizer):
    student = tiny_llama(1, 1, tiny_tokenizer)
    examples = encode_records(tiny_tokenizer, records(12), 64)
    training = TrainingConfig(max_steps=3, batch_size=4, eval_every=3, save_every=3)
    _, summary = train_student(student, tiny_tokenizer, None, examples, [], training,
                               DistillationConfig(mode="sequence"), tmp_path)
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and all(r["kd"] == 0 for r in log if r["split"] == "train")
