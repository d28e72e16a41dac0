"""A teacher run in-process by vLLM's offline engine (`teacher.backend: vllm`, CUDA machines).

vLLM is an optional dependency, imported when the teacher is made, so the rest of Distill works
without it. The engine batches and schedules requests itself; we hand it chunks of prompts only
so that finished answers reach the dataset store while the run goes on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from distill.errors import DistillError
from distill.teachers.base import Completion, GenerationParams, Prompt, apply_system_prompt

# Prompts per `LLM.chat` call: large enough to keep the engine's continuous batching full,
# small enough that an interrupted run loses little.
CHUNK_PROMPTS = 256


class VLLMTeacher:
    """`vllm.LLM(model).chat(...)` behind the `Teacher` protocol; `engine_kwargs` go to `vllm.LLM`."""

    def __init__(
        self,
        model: str,
        system_prompt: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise DistillError(
                "the vllm backend needs the vllm package: pip install 'distill[vllm]' on a CUDA machine"
            ) from None
        self._vllm = vllm
        self.model = model
        self.system_prompt = system_prompt
        self.name = f"vllm:{model}"
        self.llm = vllm.LLM(model=model, dtype=dtype, trust_remote_code=trust_remote_code, **engine_kwargs)

    def __repr__(self) -> str:
        return f"VLLMTeacher(model={self.model!r})"

    def sampling_params(self, params: GenerationParams) -> Any:
        """Our `GenerationParams` as a `vllm.SamplingParams` (all `n` samples in one request)."""
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,  # -1 disables top-k in every vLLM release
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            logprobs=params.logprobs or None,
        )

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> Iterator[list[Completion]]:
        """Answer every prompt `params.n` times; one yielded batch per chunk of `CHUNK_PROMPTS` prompts."""
        sampling = self.sampling_params(params)
        chunk = max(params.batch_size, CHUNK_PROMPTS)
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            conversations = [apply_system_prompt(p.messages, self.system_prompt) for p in part]
            outputs = self.llm.chat(conversations, sampling, use_tqdm=False)
            yield [c for prompt, out in zip(part, outputs, strict=True) for c in to_completions(prompt, out, params)]

    def close(self) -> None:
        """Drop the engine so its GPU memory can be reclaimed."""
        self.llm = None


def to_completions(prompt: Prompt, output: Any, params: GenerationParams) -> list[Completion]:
    """One vLLM `RequestOutput` (with `n` `CompletionOutput`s) -> `Completion`s."""
    prompt_tokens = len(output.prompt_token_ids or [])
    return [
        Completion(
            prompt_id=prompt.id,
            sample=o.index,
            text=o.text,
            finish_reason=o.finish_reason or "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(o.token_ids),
            logprobs=_logprobs(o.token_ids, o.logprobs, params.logprobs) if params.logprobs else None,
        )
        for o in output.outputs
    ]


def _logprobs(token_ids: Sequence[int], positions: Any, k: int) -> list[dict[str, Any]] | None:
    """vLLM's per-position `{token_id: Logprob}` -> `[{"token", "logprob", "top": [[token, logprob], ...]}]`.

    vLLM returns the top `k` candidates plus the sampled token when it is not among them, so the
    sampled token is looked up by id and `top` is cut back to the `k` most likely.
    """
    if positions is None:
        return None
    out = []
    for token_id, candidates in zip(token_ids, positions, strict=False):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda lp: lp.logprob, reverse=True)[:k]
        out.append(
            {
                "token": chosen.decoded_token or "",
                "logprob": float(chosen.logprob),
                "top": [[lp.decoded_token or "", float(lp.logprob)] for lp in ranked],
            }
        )
    return out
