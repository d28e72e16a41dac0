"""Each distillation mode trains a tiny student towards a different tiny teacher; the mode hooks do what they say."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distill.config import DistillationConfig, LoraConfig, StudentConfig, TrainingConfig, TransferPair
from distill.losses import KDLossConfig, kd_loss_from_logits
from distill.student import add_lora
from distill.train import modes
from distill.train.data import IGNORE, Collator, encode_records
from distill.train.modes import DistillLoss, OnPolicySampler
from distill.train.trainer import loss_config, train_student
from tiny import kl_to_teacher, qa_records, tiny_llama

KD = dict(mode="logit", loss="forward_kl", temperature=1.0, alpha=1.0)


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return encode_records(tiny_tokenizer, qa_records(24), 64)


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, examples):
    return Collator(tiny_tokenizer.pad_token_id)(examples[:12])


def fit(tmp_path, tokenizer, student, teacher, examples, distillation, steps=10, save_every=100, **kwargs):
    training = TrainingConfig(
        max_steps=steps,
        batch_size=4,
        learning_rate=3e-3,
        eval_every=save_every,
        save_every=save_every,
        warmup_ratio=0.0,
        lr_scheduler="constant",
    )
    model, _ = train_student(student, tokenizer, teacher, examples, [], training, distillation, tmp_path, **kwargs)
    rows = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    return model, [r for r in rows if r["split"] == "train"]


# --------------------------------------------------------------------------------------------- sequence


def test_sequence_mode_loss_is_plain_cross_entropy_in_values_and_grads(tiny_tokenizer, batch):
    student = tiny_llama(1, 1, tiny_tokenizer)
    loss = DistillLoss(loss_config(DistillationConfig(mode="sequence", temperature=2.0, chunk_size=7)))
    ours = loss(student, batch)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(ours.loss, ref)
    assert float(ours.kd) == 0.0 and float(ours.ce) == pytest.approx(float(ref.detach()))
    params = [p for p in student.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(ours.loss, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------- on-policy


def test_on_policy_sampler_rewrites_the_chosen_answers(tiny_tokenizer, batch):
    student = tiny_llama(1, 1, tiny_tokenizer).train()
    sampler = OnPolicySampler.for_model(student, tiny_tokenizer, fraction=1.0, seed=0)
    out = sampler(student, batch, step=3)
    assert student.training, "generate must not leave the student in eval mode"
    assert OnPolicySampler.for_model(student, tiny_tokenizer, 0.0, 0)(student, batch, step=3) is batch
    changed = 0
    for r in range(batch["input_ids"].shape[0]):
        old_ids = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
        old_labels = batch["labels"][r][batch["attention_mask"][r].bool()].tolist()
        start = next(i for i, label in enumerate(old_labels) if label != IGNORE)
        new_ids = out["input_ids"][r][out["attention_mask"][r].bool()].tolist()
        new_labels = out["labels"][r][out["attention_mask"][r].bool()].tolist()
        assert new_ids[:start] == old_ids[:start]  # the prompt is kept
        assert new_labels[:start] == [IGNORE] * start and new_labels[start:] == new_ids[start:]
        answer = new_ids[start:]
        assert 1 <= len(answer) <= len(old_ids) - start  # at most the original answer length
        assert all(t != tiny_tokenizer.eos_token_id for t in answer[:-1])  # cut after the first stop token
        changed += answer != old_ids[start:]
    assert changed >= 10  # a random student does not write the teacher's answers
    again = sampler(student, batch, step=3)
    assert torch.equal(again["input_ids"], out["input_ids"])  # seeded by (seed, step, micro-batch)
    assert not torch.equal(sampler(student, batch, step=4)["input_ids"], out["input_ids"])
    half = OnPolicySampler.for_model(student, tiny_tokenizer, fraction=0.5, seed=0)(student, batch, step=3)
    kept = [torch.equal(half["input_ids"][r, : batch["input_ids"].shape[1]], batch["input_ids"][r]) for r in range(12)]
    assert 0 < sum(kept) < 12


def test_greedy_on_policy_answers_do_not_depend_on_the_draw(tiny_tokenizer, batch):
    student = tiny_llama(1, 1, tiny_tokenizer).train()
    greedy = OnPolicySampler.for_model(student, tiny_tokenizer, fraction=1.0, seed=0, greedy=True)
    first = greedy(student, batch, step=3)
    assert torch.equal(greedy(student, batch, step=4)["input_ids"], first["input_ids"])
    sampled = OnPolicySampler.for_model(student, tiny_tokenizer, fraction=1.0, seed=0)(student, batch, step=3)
    assert not torch.equal(sampled["input_ids"], first["input_ids"])


@pytest.mark.parametrize("sampling", ["sample", "greedy"])
def test_on_policy_mode_lowers_the_kl(tmp_path, tiny_tokenizer, examples, batch, sampling):
    teacher, student = tiny_llama(2, 0, tiny_tokenizer), tiny_llama(1, 1, tiny_tokenizer)
    before = kl_to_teacher(student, teacher, batch)
    distillation = DistillationConfig(
        **{**KD, "mode": "on_policy"}, on_policy_fraction=0.5, on_policy_sampling=sampling
    )
    model, rows = fit(tmp_path, tiny_tokenizer, student, teacher, examples, distillation)
    assert kl_to_teacher(model, teacher, batch) < 0.5 * before


# --------------------------------------------------------------------------------------------- multi-teacher


def test_tied_student_gets_the_same_gradients_with_the_folded_lookup(tiny_tokenizer, batch, monkeypatch):
    teacher = tiny_llama(2, 0, tiny_tokenizer)
    student = tiny_llama(1, 1, tiny_tokenizer, tied=True).train()
    assert modes.tied_lookup(student) is not None  # this model takes the folded path

    def grads():
        student.zero_grad(set_to_none=True)
        DistillLoss(KDLossConfig(temperature=2.0, alpha=0.5), [teacher])(student, batch).loss.backward()
        return {name: p.grad.clone() for name, p in student.named_parameters()}

    folded = grads()
    monkeypatch.setattr(modes, "tied_lookup", lambda model: None)  # the model's own nn.Embedding backward
    plain = grads()
    assert folded.keys() == plain.keys()
    for name, g in folded.items():
        torch.testing.assert_close(g, plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shard", ["zero3_placeholder", "dtensor"])
def test_a_sharded_head_is_refused_with_a_clear_error(tiny_tokenizer, batch, shard):
    """The fused loss reads the head outside the forward; a shard there must not reach the matmuls."""
    from distill.errors import DistillError

    teacher, student = tiny_llama(2, 0, tiny_tokenizer), tiny_llama(1, 1, tiny_tokenizer)
    loss = DistillLoss(KDLossConfig(), [teacher])
    assert torch.isfinite(loss(student, batch).loss)  # whole weights: fine
    if shard == "zero3_placeholder":  # what DeepSpeed ZeRO-3 leaves outside the forward
        student.lm_head.weight = torch.nn.Parameter(torch.empty(0))
        with pytest.raises(DistillError, match="sharded across processes"):
            loss(student, batch)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:  # FSDP's DTensor, on a one-process mesh
        mesh = init_device_mesh("cpu", (1,))
        student.lm_head.weight = torch.nn.Parameter(distribute_tensor(student.lm_head.weight.data, mesh, [Shard(0)]))
        with pytest.raises(DistillError, match="FSDP or DeepSpeed ZeRO-3"):
            loss(student, batch)
    finally:
        torch.distributed.destroy_process_group()


def test_multi_teacher_loss_is_the_weighted_mixture(tiny_tokenizer, batch):
    student, a, b = tiny_llama(1, 1, tiny_tokenizer), tiny_llama(2, 0, tiny_tokenizer), tiny_llama(2, 5, tiny_tokenizer)
    cfg = KDLossConfig(temperature=2.0, alpha=0.7)
    ours = DistillLoss(cfg, [a, b], [1.0, 0.25])(student, batch).loss
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teachers = [a(**inputs).logits[:, :-1], b(**inputs).logits[:, :-1]]
    ref = kd_loss_from_logits(
        student(**inputs).logits[:, :-1], teachers, batch["labels"][:, 1:], cfg, teacher_weights=[1.0, 0.25]
    ).loss
    torch.testing.assert_close(ours, ref)
    only_a = DistillLoss(cfg, [a])(student, batch).loss
    assert not torch.allclose(ours, only_a)


def test_multi_teacher_mode_lowers_the_kl_to_the_mixture(tmp_path, tiny_tokenizer, examples, batch):
    a, b, student = tiny_llama(2, 0, tiny_tokenizer), tiny_llama(2, 5, tiny_tokenizer), tiny_llama(1, 1, tiny_tokenizer)
    before = kl_to_teacher(student, [a, b], batch, [1.0, 0.5])
    model, _ = fit(tmp_path, tiny_tokenizer, student, a, examples, DistillationConfig(**KD), extra_teachers=[(b, 0.5)])
    assert kl_to_teacher(model, [a, b], batch, [1.0, 0.5]) < 0.5 * before


@pytest.mark.parametrize("teacher_weight", [1e3, 1e-3])
def test_teacher_weight_sets_the_main_teachers_share(tmp_path, tiny_tokenizer, examples, batch, teacher_weight):
    a, b, student = tiny_llama(2, 0, tiny_tokenizer), tiny_llama(2, 5, tiny_tokenizer), tiny_llama(1, 1, tiny_tokenizer)
    dist = DistillationConfig(**KD, teacher_weight=teacher_weight)
    model, _ = fit(tmp_path, tiny_tokenizer, student, a, examples, dist, extra_teachers=[(b, 1.0)])
    to_a, to_b = kl_to_teacher(model, [a], batch), kl_to_teacher(model, [b], batch)
    # A dominant main teacher pulls the student to it; a negligible one leaves it to the extra teacher.
    assert (to_a < to_b) if teacher_weight > 1 else (to_b < to_a)


# --------------------------------------------------------------------------------------------- transfer


@pytest.mark.parametrize(("kind", "weight"), [("cosine", 1.0), ("mse", 100.0), ("attention", 100.0)])
def test_transfer_terms_train_and_are_logged(tmp_path, tiny_tokenizer, examples, batch, kind, weight):
    teacher = tiny_llama(2, 0, tiny_tokenizer)
    student = tiny_llama(2, 1, tiny_tokenizer, hidden=32)  # other width: hidden-state pairs need a projection
    before = kl_to_teacher(student, teacher, batch)
    distillation = DistillationConfig(**KD, transfer=[TransferPair(teacher=1, student=1, loss=kind, weight=weight)])
    model, rows = fit(tmp_path, tiny_tokenizer, student, teacher, examples, distillation, save_every=5)
    terms = [r["transfer/0"] for r in rows]
    assert len(terms) == 10 and terms[-1] < 0.8 * terms[0], terms
    assert kl_to_teacher(model, teacher, batch) < 0.8 * before
    assert not any("distill_transfer" in k for k in model.state_dict()), "projections must not ship with the student"
    assert model.config._attn_implementation == "sdpa"  # eager only while training
    saved = [load_file(tmp_path / f"checkpoints/checkpoint-{s}/model.safetensors") for s in (5, 10)]
    key = "distill_transfer.projections.0.weight"
    if kind == "attention":
        assert key not in saved[0]
    else:  # checkpointed (so resume restores it) and trained by the optimizer
        assert saved[0][key].shape == (64, 32) and not torch.equal(saved[0][key], saved[1][key])


def test_transfer_rejects_layers_out_of_range(tmp_path, tiny_tokenizer, examples):
    from distill.errors import DistillError

    distillation = DistillationConfig(**KD, transfer=[TransferPair(teacher=7, student=0)])
    with pytest.raises(DistillError, match=r"transfer\[0\].teacher: layer 7 of a 2-layer teacher"):
        fit(
            tmp_path,
            tiny_tokenizer,
            tiny_llama(1, 1, tiny_tokenizer),
            tiny_llama(2, 0, tiny_tokenizer),
            examples,
            distillation,
        )


# --------------------------------------------------------------------------------------------- LoRA


def test_lora_student_trains_its_adapters_with_the_chunked_loss(tmp_path, tiny_tokenizer, examples, batch):
    teacher = tiny_llama(2, 0, tiny_tokenizer)
    student = add_lora(tiny_llama(1, 1, tiny_tokenizer), StudentConfig(lora=LoraConfig(r=8, alpha=16, dropout=0.0)))
    frozen = {k: v.clone() for k, v in student.named_parameters() if not v.requires_grad}
    adapters = {k: v.clone() for k, v in student.named_parameters() if v.requires_grad}
    before = kl_to_teacher(student, teacher, batch)
    model, _ = fit(tmp_path, tiny_tokenizer, student, teacher, examples, DistillationConfig(**KD))
    assert kl_to_teacher(model, teacher, batch) < 0.8 * before
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in frozen.items())
    assert any(not torch.equal(params[k], v) for k, v in adapters.items())
