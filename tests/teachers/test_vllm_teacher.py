"""The vLLM teacher without vLLM: the missing-package message, and the output conversion on a fake engine."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from distill.errors import DistillError
from distill.teachers.base import GenerationParams, Prompt, Teacher
from distill.teachers.vllm_teacher import VLLMTeacher, to_completions


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(DistillError, match=r"pip install 'distill\[vllm\]' on a CUDA machine"):
        VLLMTeacher("some/model")


def _lp(logprob, rank, token):
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=token)


def _request_output():
    """The shape of vLLM's `RequestOutput`: two samples, per-position `{token_id: Logprob}` dicts."""
    sample0 = SimpleNamespace(
        index=0,
        text="Hi there",
        token_ids=[11, 12],
        finish_reason="stop",
        # Position 1 sampled token 12 although 13 was likelier; vLLM adds it beyond the top-k.
        logprobs=[
            {11: _lp(-0.1, 1, "Hi"), 99: _lp(-2.5, 2, "Hello")},
            {13: _lp(-0.4, 1, "!"), 14: _lp(-0.9, 2, ","), 12: _lp(-1.5, 3, " there")},
        ],
    )
    sample1 = SimpleNamespace(
        index=1, text="Yo", token_ids=[7], finish_reason="length", logprobs=[{7: _lp(-0.3, 1, "Yo")}]
    )
    return SimpleNamespace(prompt_token_ids=[1, 2, 3, 4], outputs=[sample0, sample1])


def test_request_output_becomes_completions_with_logprobs():
    params = GenerationParams(n=2, logprobs=2)
    c0, c1 = to_completions(Prompt(id="p", messages=[]), _request_output(), params)

    assert (c0.id, c0.text, c0.finish_reason, c0.prompt_tokens, c0.completion_tokens) == (
        "p-0",
        "Hi there",
        "stop",
        4,
        2,
    )
    assert c0.logprobs == [
        {"token": "Hi", "logprob": -0.1, "top": [["Hi", -0.1], ["Hello", -2.5]]},
        {"token": " there", "logprob": -1.5, "top": [["!", -0.4], [",", -0.9]]},  # sampled token kept, top cut to k
    ]
    assert (c1.id, c1.finish_reason, c1.completion_tokens) == ("p-1", "length", 1)
    assert c1.logprobs == [{"token": "Yo", "logprob": -0.3, "top": [["Yo", -0.3]]}]


def test_no_logprobs_requested_gives_none():
    (c0, _) = to_completions(Prompt(id="p", messages=[]), _request_output(), GenerationParams(n=2))
    assert c0.logprobs is None


class _FakeLLM:
    """Stands in for `vllm.LLM`: records its arguments, echoes the last user message n times."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []

    def chat(self, conversations, sampling_params, use_tqdm=True):
        self.calls.append((conversations, sampling_params))
        outs = []
        for conv in conversations:
            text = "echo: " + conv[-1]["content"]
            samples = [
                SimpleNamespace(index=i, text=text, token_ids=[5, 6], finish_reason="stop", logprobs=None)
                for i in range(sampling_params.n)
            ]
            outs.append(SimpleNamespace(prompt_token_ids=[1] * len(conv), outputs=samples))
        return outs


def test_generate_on_a_fake_engine(monkeypatch):
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = _FakeLLM
    fake_vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)

    teacher = VLLMTeacher("tiny/model", system_prompt="Be brief.", dtype="bfloat16", gpu_memory_utilization=0.5)
    assert isinstance(teacher, Teacher)
    assert teacher.name == "vllm:tiny/model"
    assert teacher.llm.kwargs == {
        "model": "tiny/model",
        "dtype": "bfloat16",
        "trust_remote_code": False,
        "gpu_memory_utilization": 0.5,
    }

    prompts = [Prompt(id=f"q{i}", messages=[{"role": "user", "content": f"hi {i}"}]) for i in range(3)]
    params = GenerationParams(n=2, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12, seed=3)
    batches = list(teacher.generate(prompts, params))

    completions = [c for b in batches for c in b]
    assert sorted(c.id for c in completions) == sorted(f"q{i}-{s}" for i in range(3) for s in range(2))
    assert {c.text for c in completions if c.prompt_id == "q1"} == {"echo: hi 1"}
    conversations, sampling = teacher.llm.calls[0]
    assert conversations[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 0"}]
    assert vars(sampling) == {
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_tokens": 12,
        "seed": 3,
        "logprobs": None,
    }
    teacher.close()
    assert teacher.llm is None
