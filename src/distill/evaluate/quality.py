"""Quality of a model's answers: text metrics against a reference, perplexity, fidelity to the teacher, health.

Every score here comes from a library or from the models' own logits; nothing is re-implemented:

* ROUGE-1/2/L: `rouge_score` (F-measure, stemming on), averaged over prompts, in [0, 1];
* BLEU and chrF: `sacrebleu`, corpus level, in [0, 100];
* exact match: the task preset's `extract_answer` on both sides (`data/presets.py`), in [0, 1];
* perplexity, per-token KL(teacher || model) and top-1 agreement: teacher-forced forward passes over
  prompt + answer, counting the answer's tokens only;
* health: `data/filters.py`'s `is_repetitive` and `distinct_n`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.filters import distinct_n, is_repetitive
from distill.teachers.base import Message
from distill.teachers.local import chat_prompt_ids

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

# --------------------------------------------------------------------------------------------- text metrics


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over pairs (`rouge_score`, Porter stemming), each in [0, 1]."""
    _check_pairs(predictions, references)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = _scorer.score(ref, pred)  # rouge_score takes (target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (`sacrebleu` defaults: 13a tokenisation, exponential smoothing), in [0, 100]."""
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (`sacrebleu` defaults: character 6-grams, beta 2), in [0, 100]."""
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L ([0, 1]), BLEU and chrF ([0, 100]) of predictions against references."""
    return {
        **rouge(predictions, references),
        "bleu": bleu(predictions, references),
        "chrf": chrf(predictions, references),
    }


def exact_match(
    predictions: Sequence[str], references: Sequence[str], extract: Callable[[str | None], str | None]
) -> float:
    """Share of pairs whose extracted answers are equal; a reference with no extractable answer never matches."""
    _check_pairs(predictions, references)
    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        gold = extract(ref)
        hits += gold is not None and extract(pred) == gold
    return hits / len(predictions)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


# --------------------------------------------------------------------------------------------- teacher forcing


@dataclass
class TokenStats:
    """Token-weighted sums over answer tokens, turned into means by the properties."""

    tokens: int = 0
    nll: float = 0.0  # sum of -log p(answer token)
    kl: float = 0.0  # sum over tokens of KL(teacher || model), nats
    top1: int = 0  # tokens where the model's argmax equals the teacher's
    compared: int = 0  # tokens that entered kl / top1
    skipped: list[str] = field(default_factory=list)  # why some comparisons were left out

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.nll / self.tokens) if self.tokens else None

    @property
    def mean_kl(self) -> float | None:
        return self.kl / self.compared if self.compared else None

    @property
    def top1_agreement(self) -> float | None:
        return self.top1 / self.compared if self.compared else None


def _encode(tokenizer: PreTrainedTokenizerBase, messages: list[Message], answer: str) -> tuple[list[int], int]:
    """(prompt + answer ids, prompt length). The answer is the plain text re-encoded, no EOS appended."""
    prompt = chat_prompt_ids(tokenizer, messages)
    return prompt + tokenizer(answer, add_special_tokens=False)["input_ids"], len(prompt)


@torch.inference_mode()
def _answer_logits(model: PreTrainedModel, rows: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Per row, the fp32 logits that predict each answer token: a list of [answer_len, V] tensors.

    Right padding with an attention mask; logits at position t predict token t + 1, so the answer
    tokens [p, n) are predicted by positions [p - 1, n - 1).
    """
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
    # Slice before upcasting: only answer positions are ever kept, [B, L, V] fp32 would be wasted memory.
    return [logits[r, p - 1 : len(ids) - 1].float().cpu() for r, (ids, p) in enumerate(rows)]


def teacher_forced_stats(
    models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]],
    conversations: Sequence[list[Message]],
    answers: Sequence[str],
    reference_model: str | None = None,
    batch_size: int = 4,
) -> dict[str, TokenStats]:
    """Score every model on the same (prompt, answer) pairs in one pass over the data.

    Per model: the perplexity of the answers (answer tokens only). With `reference_model` (the
    teacher), also the mean per-token KL(reference || model) and the top-1 agreement with the
    reference's argmax, from both models' own logits. When vocab sizes differ, both distributions
    are taken over the shared first min(V) ids. A model whose tokenizer splits a text differently
    from the reference's cannot be compared token by token: that row is left out of its KL/top-1
    and the reason recorded in `skipped`. Empty answers add nothing.
    """
    stats = {name: TokenStats() for name in models}
    pairs = [(m, a) for m, a in zip(conversations, answers, strict=True) if a]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = {name: [_encode(tok, m, a) for m, a in chunk] for name, (_, tok) in models.items()}
        logits = {name: _answer_logits(model, encoded[name]) for name, (model, _) in models.items()}
        for name, rows in encoded.items():
            st = stats[name]
            for r, (ids, p) in enumerate(rows):
                target = torch.tensor(ids[p:])
                if target.numel() == 0:
                    continue
                logp = F.log_softmax(logits[name][r], dim=-1)
                st.nll -= float(logp.gather(-1, target[:, None]).sum())
                st.tokens += target.numel()
                if reference_model is None or name == reference_model:
                    continue
                if encoded[reference_model][r] != (ids, p):
                    st.skipped.append(f"prompt {start + r}: tokenised differently from {reference_model}")
                    continue
                v = min(logits[name][r].shape[-1], logits[reference_model][r].shape[-1])
                ref_logp = F.log_softmax(logits[reference_model][r][:, :v], dim=-1)
                mod_logp = F.log_softmax(logits[name][r][:, :v], dim=-1)
                # KL(p_ref || p_mod) per token, summed over the vocab: [T, V] -> [T]
                st.kl += float(F.kl_div(mod_logp, ref_logp, log_target=True, reduction="none").sum(-1).sum())
                st.top1 += int((ref_logp.argmax(-1) == mod_logp.argmax(-1)).sum())
                st.compared += target.numel()
    return stats


# --------------------------------------------------------------------------------------------- health


def answer_health(answers: Sequence[str], finish_reasons: Sequence[str] | None = None) -> dict[str, float | int]:
    """Degeneration signs in a model's answers: repetition loops, low diversity, empty or cut-off answers."""
    n = len(answers)
    if n == 0:
        return {"n": 0}
    nonempty = [a for a in answers if a.strip()]
    out: dict[str, float | int] = {
        "n": n,
        "empty_rate": 1 - len(nonempty) / n,
        "repetitive_rate": sum(is_repetitive(a) for a in answers) / n,
        "distinct_1": sum(distinct_n(a, 1) for a in nonempty) / len(nonempty) if nonempty else 0.0,
        "distinct_2": sum(distinct_n(a, 2) for a in nonempty) / len(nonempty) if nonempty else 0.0,
        "mean_chars": sum(len(a) for a in answers) / n,
    }
    if finish_reasons is not None:
        out["truncated_rate"] = sum(r == "length" for r in finish_reasons) / n
    return out
