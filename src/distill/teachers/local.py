"""Local (transformers) generation: the `local` teacher backend, also used to evaluate any model.

Batched generation sorts prompts by length and fills each batch with similar lengths, so left
padding wastes little compute; the KV cache is `generate`'s own. White-box: the teacher can also
return the top-k log-probabilities of every generated token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.teachers.base import Completion, GenerationParams, Message, Prompt, apply_system_prompt


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of the messages rendered with the tokenizer's chat template, ready for the answer."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here; 4.x returns the list itself.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    # No template (base models, tiny test models): plain "role: content" lines.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    params: GenerationParams,
    seed_offset: int = 0,
) -> list[tuple[list[int], str, list[dict] | None]]:
    """Generate one answer per prompt: (answer ids, finish reason, per-token top log-probs or None)."""
    device = model.device
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):  # left padding: every answer starts at column `width`
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    sample = params.temperature > 0
    kwargs: dict = dict(max_new_tokens=params.max_new_tokens, do_sample=sample, pad_token_id=pad)
    if sample:
        torch.manual_seed(params.seed + seed_offset)
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:  # silence the model's own sampling defaults
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if params.logprobs:
        kwargs.update(output_scores=True, return_dict_in_generate=True)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    sequences = out.sequences if params.logprobs else out
    new = sequences[:, width:].tolist()
    stop_ids = _stop_ids(model, tokenizer)
    results = []
    for row, ids in enumerate(new):
        end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
        answer = ids if end is None else ids[:end]
        reason = "stop" if end is not None else "length"
        top = None
        if params.logprobs:
            top = []
            for step in range(len(answer)):
                logp = torch.log_softmax(out.scores[step][row].float(), dim=-1)
                values, idx = logp.topk(params.logprobs)
                top.append(
                    {
                        "token": tokenizer.decode([answer[step]]),
                        "token_id": answer[step],
                        "logprob": float(logp[answer[step]]),
                        "top": [[int(i), float(v)] for v, i in zip(values.tolist(), idx.tolist(), strict=True)],
                    }
                )
        results.append((answer, reason, top))
    return results


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[Message]],
    params: GenerationParams,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[str, str, int, int]]:
    """Answer each conversation once; returns (text, finish reason, prompt tokens, answer tokens) in input order."""
    prompt_ids = [chat_prompt_ids(tokenizer, m) for m in conversations]
    out: list = [None] * len(prompt_ids)
    for batch in length_buckets([len(p) for p in prompt_ids], params.batch_size):
        answers = generate_batch(model, tokenizer, [prompt_ids[i] for i in batch], params)
        for i, (ids, reason, _) in zip(batch, answers, strict=True):
            out[i] = (tokenizer.decode(ids, skip_special_tokens=True).strip(), reason, len(prompt_ids[i]), len(ids))
        if on_batch:
            on_batch(len(batch))
    return out


class LocalTeacher:
    """The `local` backend: a transformers causal LM on this machine."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str = "local",
        system_prompt: str | None = None,
    ):
        self.model, self.tokenizer, self.name, self.system_prompt = model, tokenizer, name, system_prompt

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> Iterator[list[Completion]]:
        jobs = [(p, s) for p in prompts for s in range(params.n)]
        prompt_ids = {
            p.id: chat_prompt_ids(self.tokenizer, apply_system_prompt(p.messages, self.system_prompt)) for p in prompts
        }
        for batch in length_buckets([len(prompt_ids[p.id]) for p, _ in jobs], params.batch_size):
            chunk = [jobs[i] for i in batch]
            seed_offset = min(s for _, s in chunk) * 100_003 + batch[0]
            outs = generate_batch(self.model, self.tokenizer, [prompt_ids[p.id] for p, _ in chunk], params, seed_offset)
            yield [
                Completion(
                    prompt_id=p.id,
                    sample=s,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    finish_reason=reason,
                    prompt_tokens=len(prompt_ids[p.id]),
                    completion_tokens=len(ids),
                    logprobs=top,
                )
                for (p, s), (ids, reason, top) in zip(chunk, outs, strict=True)
            ]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
