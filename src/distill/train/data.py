"""Teacher answers -> token ids and completion-only labels, and the padding collator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distill.teachers.base import Message
from distill.teachers.local import chat_prompt_ids

IGNORE = -100


def encode_example(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], completion: str, max_length: int
) -> dict[str, list[int]] | None:
    """Token ids of prompt + answer with labels only on the answer (the end-of-turn token included).

    Returns None when the prompt alone fills `max_length` (nothing left to learn from).
    """
    prompt = chat_prompt_ids(tokenizer, messages)
    answer = _answer_ids(tokenizer, messages, completion, prompt)
    if len(prompt) >= max_length - 1:
        return None
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


def _answer_ids(tokenizer: PreTrainedTokenizerBase, messages, completion: str, prompt: list[int]) -> list[int]:
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        if full[: len(prompt)] == prompt:
            # The template's own end-of-turn marker is kept, so the student learns when to stop; a trailing
            # newline after it is not (generation stops at the marker).
            answer = full[len(prompt) :]
            while answer and answer[-1] != tokenizer.eos_token_id and tokenizer.decode(answer[-1:]).strip() == "":
                answer.pop()
            return answer
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return answer + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict], max_length: int
) -> list[dict[str, list[int]]]:
    """Encode store records (`messages` + `completion`), dropping those with no answer tokens left."""
    out = []
    for r in records:
        ex = encode_example(tokenizer, r["messages"], r["completion"], max_length)
        if ex is not None:
            out.append(ex)
    return out


class Collator:
    """Right-pads a list of encoded examples into `input_ids`, `attention_mask` and `labels` tensors.

    Examples that carry cached teacher targets (``teacher_topk``: ``(logprobs [n, K], ids [n, K])`` for their
    ``n`` answer positions, see `distill.logit_cache`) also give ``teacher_topk_logprobs`` (fp32) and
    ``teacher_topk_ids`` (long), ``[B, T - 1, K]``, aligned with the shifted labels ``labels[:, 1:]``; positions
    without a label hold zeros, which the loss never reads.
    """

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), width), self.pad, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
            "labels": torch.full((len(features), width), IGNORE, dtype=torch.long),
        }
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(f["labels"])
        if "teacher_topk" in features[0]:
            batch.update(_topk_targets(features, batch["labels"][:, 1:]))
        return batch


def _topk_targets(features: list[dict], shifted_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    k = np.shape(features[0]["teacher_topk"][0])[-1]
    logprobs = torch.zeros((*shifted_labels.shape, k), dtype=torch.float32)
    ids = torch.zeros((*shifted_labels.shape, k), dtype=torch.long)
    for row, f in enumerate(features):
        positions = shifted_labels[row].ne(IGNORE).nonzero().squeeze(1)
        row_logprobs, row_ids = f["teacher_topk"]
        if len(row_logprobs) != len(positions):
            raise ValueError(
                f"cached teacher targets for {len(row_logprobs)} positions, but the example has {len(positions)} "
                "answer tokens: the cache was made from other data"
            )
        # np.array copies: the cache's memory maps are read-only.
        logprobs[row, positions] = torch.from_numpy(np.array(row_logprobs, dtype=np.float32))
        ids[row, positions] = torch.from_numpy(np.array(row_ids, dtype=np.int64))
    return {"teacher_topk_logprobs": logprobs, "teacher_topk_ids": ids}
