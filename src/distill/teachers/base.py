"""The one small interface every teacher backend implements, and the records it exchanges.

A teacher turns prompts (chat messages) into completions. Backends: `local` (transformers,
white-box: can also score text), `openai` (any OpenAI-compatible HTTP endpoint), `vllm`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


def apply_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """The teacher's system prompt before `messages`, unless they bring their own system message."""
    if not system_prompt or any(m.get("role") == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling controls shared by every backend (mirrors `config.GenerationConfig`)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    logprobs: int = 0  # top-k log-probs per generated token to return (0: none)
    batch_size: int = 16

    @classmethod
    def from_config(cls, cfg: Any) -> GenerationParams:
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer: a stable id and the chat messages before the answer."""

    id: str
    messages: list[Message]
    reference: str | None = None  # gold answer when the data has one


@dataclass
class Completion:
    """One teacher answer to one prompt (sample `sample` of `n`)."""

    prompt_id: str
    sample: int
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Per generated token: {"token": str, "logprob": float, "top": [[token, logprob], ...]} when captured.
    logprobs: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.prompt_id}-{self.sample}"


@runtime_checkable
class Teacher(Protocol):
    """What the pipeline needs from a teacher."""

    name: str

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> Iterator[list[Completion]]:
        """Answer every prompt `params.n` times, yielding completions in batches as they finish.

        Yielding batches (not one list at the end) lets the caller append them to the dataset
        store as they come, so an interrupted run keeps what was finished.
        """
        ...

    def close(self) -> None:
        """Release models, sessions and threads."""
        ...
