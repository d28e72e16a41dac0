"""Quality metrics against the libraries and hand-known values; teacher-forced KL, top-1 and perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from distill.data.presets import get_preset
from distill.evaluate.quality import (
    _encode,
    answer_health,
    bleu,
    chrf,
    exact_match,
    rouge,
    teacher_forced_stats,
    text_metrics,
)

# ../shared/data/gsm8k relative to the repo root
GSM8K_TEST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "test.jsonl"

PAIRS = [
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("a quick brown fox jumps", "the quick brown dog jumped over"),
    ("nothing in common", "entirely different words here"),
]


def test_rouge_and_bleu_equal_the_libraries():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in PAIRS]
    ours = rouge(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(sum(d[key].fmeasure for d in direct) / len(PAIRS))
    assert bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)


def test_hand_known_values():
    same = ["the cat sat on the mat", "two plus two is four"]
    assert text_metrics(same, same) == pytest.approx({"rouge1": 1, "rouge2": 1, "rougeL": 1, "bleu": 100, "chrf": 100})
    # "the cat" against "the cat sat": precision 1, recall 2/3 -> F1 0.8 for unigrams and the LCS alike.
    r = rouge(["the cat"], ["the cat sat"])
    assert r["rouge1"] == pytest.approx(0.8) and r["rougeL"] == pytest.approx(0.8)
    assert r["rouge2"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # bigrams: 1 of 1 predicted, 1 of 2 reference
    assert rouge(["alpha beta"], ["gamma delta"])["rougeL"] == 0
    assert bleu(["alpha beta gamma delta"], ["epsilon zeta eta theta"]) == 0
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"])


def _gsm8k_references() -> list[str]:
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K test file not found at {GSM8K_TEST.resolve()} (shared data not present)")
    return [json.loads(line)["answer"] for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines() if line]


def test_exact_match_on_gsm8k_references():
    refs = _gsm8k_references()
    extract = get_preset("math").extract_answer
    golds = [extract(r) for r in refs]
    assert all(g is not None for g in golds)
    assert exact_match(refs, refs, extract) == 1.0
    # The gold answer after '####' plus one: every prediction now names a different number.
    perturbed = [r.rsplit("####", 1)[0] + f"#### {int(float(g)) + 1}" for r, g in zip(refs, golds, strict=True)]
    assert exact_match(perturbed, refs, extract) == 0.0
    assert exact_match([refs[0], perturbed[1]], refs[:2], extract) == 0.5


def test_exact_match_needs_a_gold_answer():
    extract = get_preset("math").extract_answer
    assert exact_match(["no number here"], ["no number either"], extract) == 0.0


CONVERSATIONS = [[{"role": "user", "content": "what is two plus two ?"}], [{"role": "user", "content": "hello ."}]]
ANSWERS = ["two plus two is four .", "hello world , it is a fine day ."]


def test_kl_is_zero_and_top1_is_one_against_itself(tiny_models):
    teacher = tiny_models["teacher"]
    stats = teacher_forced_stats({"a": teacher, "b": teacher}, CONVERSATIONS, ANSWERS, "a")
    assert stats["b"].compared == stats["b"].tokens > 0
    assert abs(stats["b"].mean_kl) < 1e-6
    assert stats["b"].top1_agreement == 1.0
    assert stats["a"].perplexity == pytest.approx(stats["b"].perplexity)


def test_kl_against_a_different_model_is_positive(tiny_models):
    # The student's vocab (160) is larger than the teacher's (128): compared on the shared first 128 ids.
    stats = teacher_forced_stats(tiny_models, CONVERSATIONS, ANSWERS, "teacher")
    assert stats["student"].mean_kl > 1e-3
    assert 0 <= stats["student"].top1_agreement <= 1
    assert stats["teacher"].mean_kl is None  # the reference is not compared with itself


def test_kl_direction_and_top1_equal_a_plain_computation(tiny_models):
    (teacher, tok), (student, _) = tiny_models["teacher"], tiny_models["student"]
    stats = teacher_forced_stats({"t": (teacher, tok), "s": (student, tok)}, CONVERSATIONS, ANSWERS, "t", batch_size=2)
    kl, top1, count = 0.0, 0, 0
    for conv, answer in zip(CONVERSATIONS, ANSWERS, strict=True):
        ids, p = _encode(tok, conv, answer)
        with torch.no_grad():
            t_logits = teacher(torch.tensor([ids])).logits[0, p - 1 : len(ids) - 1].float()
            s_logits = student(torch.tensor([ids])).logits[0, p - 1 : len(ids) - 1, : t_logits.shape[-1]].float()
        pt, ps = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
        kl += float((pt * (pt.log() - ps.log())).sum())  # KL(teacher || student), summed over tokens
        top1 += int((pt.argmax(-1) == ps.argmax(-1)).sum())
        count += len(ids) - p
    assert stats["s"].compared == count
    assert stats["s"].mean_kl == pytest.approx(kl / count, rel=1e-4)
    assert stats["s"].top1_agreement == pytest.approx(top1 / count)


def test_perplexity_counts_answer_tokens_only(tiny_models):
    model, tok = tiny_models["teacher"]
    # Batched with padding vs the plain way: one unpadded forward pass per example.
    stats = teacher_forced_stats({"t": (model, tok)}, CONVERSATIONS, ANSWERS, None, batch_size=2)
    nll, count = 0.0, 0
    for conv, answer in zip(CONVERSATIONS, ANSWERS, strict=True):
        ids, p = _encode(tok, conv, answer)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for pos in range(p, len(ids)):
            nll -= float(logp[pos - 1, ids[pos]])
            count += 1
    assert stats["t"].tokens == count
    assert stats["t"].perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_answer_health():
    loop = "the same words again " * 20
    h = answer_health(["a fine varied answer here", "", loop, "another answer"], ["stop", "stop", "length", "stop"])
    assert h["n"] == 4
    assert h["empty_rate"] == 0.25
    assert h["repetitive_rate"] == 0.25
    assert h["truncated_rate"] == 0.25
    assert 0 < h["distinct_2"] < 1
