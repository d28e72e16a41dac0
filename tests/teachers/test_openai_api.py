"""The HTTP teacher against a real server on 127.0.0.1 (FastAPI + uvicorn) with injected faults."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from contextlib import ExitStack

import httpx
import pytest

from distill.config import ApiConfig
from distill.errors import DistillError
from distill.teachers.base import GenerationParams, Prompt, Teacher, apply_system_prompt
from distill.teachers.openai_api import OpenAITeacher

try:  # tests/teachers as a package or as a plain folder on sys.path (pytest's default)
    from .fake_openai_server import FakeOpenAI, serve
except ImportError:
    from fake_openai_server import FakeOpenAI, serve


@pytest.fixture
def start():
    """`start(**FakeOpenAI kwargs) -> (fake, base_url)`; every server started is stopped after the test."""
    with ExitStack() as stack:

        def _start(**kwargs):
            fake = FakeOpenAI(**kwargs)
            return fake, stack.enter_context(serve(fake.app))

        yield _start


def prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"id{i}", messages=[{"role": "user", "content": f"p{i}"}]) for i in range(n)]


def teacher(*urls: str, **api) -> OpenAITeacher:
    return OpenAITeacher("fake-model", ApiConfig(base_urls=list(urls), **api), backoff_s=0.01)


def run(t: OpenAITeacher, ps: list[Prompt], **params):
    batches = list(t.generate(ps, GenerationParams(**params)))
    return [c for b in batches for c in b], batches


def test_every_fault_is_retried_and_every_prompt_answered_once(start, caplog):
    caplog.set_level(logging.INFO, logger="distill")
    fake, url = start()
    fake.fail("p0", "429")
    fake.fail("p1", "500", "503")  # two faults in a row for one prompt
    fake.fail("p2", "timeout")
    fake.fail("p3", "malformed")
    fake.fail("p4", "drop")
    t = teacher(url, timeout_s=0.5, concurrency=4)
    assert isinstance(t, Teacher)

    completions, batches = run(t, prompts(8), n=2)

    ids = [c.id for c in completions]
    assert len(ids) == len(set(ids)) == 16
    assert set(ids) == {f"id{i}-{s}" for i in range(8) for s in range(2)}
    assert all(c.text == f"echo: p{c.prompt_id[2:]}" for c in completions)
    assert all(len(b) <= 4 for b in batches)
    assert t.stats.retries == Counter({"429": 1, "500": 1, "503": 1, "timeout": 1, "malformed": 1, "connection": 1})
    assert t.stats.requests == len(fake.requests) == 16 + 6
    assert t.stats.failures == 0
    summary = [r.getMessage() for r in caplog.records if r.name == "distill" and "requests" in r.getMessage()]
    assert len(summary) == 1
    assert "22 requests, 6 retries (" in summary[0]
    assert "timeout: 1" in summary[0] and "malformed: 1" in summary[0] and "connection: 1" in summary[0]


@pytest.mark.parametrize("status", ["429", "503"])
def test_retry_after_is_honoured(start, status):
    fake, url = start(retry_after="0.4")
    fake.fail("p0", status)
    t = teacher(url)  # backoff without Retry-After would be <= 0.01 s

    started = time.monotonic()
    completions, _ = run(t, prompts(1))
    elapsed = time.monotonic() - started

    assert [c.id for c in completions] == ["id0-0"]
    assert elapsed >= 0.4
    assert t.stats.retries == Counter({status: 1})


def test_request_carries_the_sampling_params(start):
    fake, url = start()
    t = OpenAITeacher("fake-model", ApiConfig(base_urls=[url]), system_prompt="Be brief.")

    completions, _ = run(t, prompts(1), n=2, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=7, seed=10)

    bodies = sorted((r["body"] for r in fake.requests), key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == [10, 11]  # one request per sample, seed + sample
    first = bodies[0]
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "p0"}]
    assert (first["model"], first["temperature"], first["top_p"], first["top_k"], first["max_tokens"]) == (
        "fake-model",
        0.7,
        0.9,
        5,
        7,
    )
    assert "logprobs" not in first
    c = completions[0]
    assert (c.finish_reason, c.prompt_tokens, c.completion_tokens, c.logprobs) == (
        "stop",
        3,
        2,
        None,
    )  # 2 + 1 words in, 2 out

    run(t, prompts(1), top_k=0)
    assert "top_k" not in fake.requests[-1]["body"]  # not every server accepts it


def test_logprobs_are_parsed(start):
    fake, url = start()
    completions, _ = run(teacher(url), prompts(1), logprobs=3)

    assert fake.requests[0]["body"]["logprobs"] is True
    assert fake.requests[0]["body"]["top_logprobs"] == 3
    assert completions[0].logprobs == [
        {"token": "echo:", "logprob": 0.0, "top": [["echo:", 0.0], ["alt1", -1.0], ["alt2", -2.0]]},
        {"token": "p0", "logprob": -0.5, "top": [["p0", -0.5], ["alt1", -1.5], ["alt2", -2.5]]},
    ]

    # api.top_logprobs asks for them too, even when the generation settings do not.
    completions, _ = run(teacher(url, top_logprobs=1), prompts(1))
    assert fake.requests[-1]["body"]["top_logprobs"] == 1
    assert completions[0].logprobs[1] == {"token": "p0", "logprob": -0.5, "top": [["p0", -0.5]]}


def test_round_robin_over_two_servers(start):
    fake_a, url_a = start()
    fake_b, url_b = start()
    completions, _ = run(teacher(url_a, url_b), prompts(10))

    assert len(completions) == 10
    assert len(fake_a.requests) == len(fake_b.requests) == 5


def test_concurrency_limit(start):
    fake, url = start(delay_s=0.1)
    completions, _ = run(teacher(url, concurrency=3), prompts(12))

    assert len(completions) == 12
    assert fake.max_in_flight == 3  # never more, and the limit is actually used


def test_requests_per_minute(start):
    fake, url = start()
    t = teacher(url, concurrency=8, requests_per_minute=600)  # 10 per second

    started = time.monotonic()
    completions, _ = run(t, prompts(10))
    elapsed = time.monotonic() - started

    assert len(completions) == 10
    assert elapsed >= 0.8


def test_tokens_per_minute_books_the_estimate_and_settles_on_usage(start):
    fake, url = start()
    t = teacher(url, concurrency=1, tokens_per_minute=600)  # 10 tokens per second
    # Booked before each call: ceil(2 chars / 4) + 20 = 21 tokens; the server reports 1 + 2 = 3 used.
    started = time.monotonic()
    completions, _ = run(t, prompts(4), max_new_tokens=20)
    elapsed = time.monotonic() - started

    assert len(completions) == 4
    assert elapsed >= 0.8  # 3 gaps of 3 tokens at 10/s once settled
    assert elapsed < 3.0  # not the 3 x 2.1 s the bookings alone would cost


def test_permanent_failure_is_reported_after_the_rest_is_yielded(start, caplog):
    caplog.set_level(logging.INFO, logger="distill")
    fake, url = start()
    fake.fail("p2", "500", always=True)
    t = teacher(url, max_retries=1)

    got = []
    with pytest.raises(DistillError, match=r"1 of 5 prompts failed") as err:
        for batch in t.generate(prompts(5), GenerationParams()):
            got.extend(batch)

    assert sorted(c.id for c in got) == ["id0-0", "id1-0", "id3-0", "id4-0"]
    assert "HTTP 500" in str(err.value)
    assert sum(r["body"]["messages"][-1]["content"] == "p2" for r in fake.requests) == 2  # 1 try + 1 retry
    assert t.stats.failures == 1 and t.stats.retries == Counter({"500": 1})
    assert any("1 failed" in r.getMessage() for r in caplog.records)


def test_client_error_is_not_retried_and_auth_error_stops_the_run(start):
    fake, url = start()
    fake.fail("p1", "400")
    with pytest.raises(DistillError, match=r"1 of 3 prompts failed.*HTTP 400"):
        run(teacher(url), prompts(3))
    assert len(fake.requests) == 3

    fake.fail("p0", "401", always=True)
    with pytest.raises(DistillError, match=r"API key was refused.*OPENAI_API_KEY"):
        run(teacher(url, concurrency=1), prompts(3))


def test_api_key_is_sent_but_never_shown(start, caplog, monkeypatch):
    secret = "sk-test-0123456789-very-secret"
    monkeypatch.setenv("DISTILL_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    fake, url = start()
    fake.fail("p0", "500")
    fake.fail("p1", "500", always=True)
    t = teacher(url, api_key_env="DISTILL_TEST_KEY", max_retries=1)

    with pytest.raises(DistillError) as err:
        run(t, prompts(3))

    assert {r["authorization"] for r in fake.requests} == {f"Bearer {secret}"}
    assert caplog.records  # the retries and the summary were logged
    for shown in (caplog.text, repr(t), str(vars(t)), str(err.value)):
        assert secret not in shown


def test_missing_key_is_an_error_only_for_remote_servers(start, monkeypatch):
    monkeypatch.delenv("DISTILL_NO_SUCH_KEY", raising=False)
    with pytest.raises(DistillError, match="DISTILL_NO_SUCH_KEY"):
        teacher("https://api.example.com/v1", api_key_env="DISTILL_NO_SUCH_KEY")

    fake, url = start()  # a loopback server gets a dummy key
    completions, _ = run(teacher(url, api_key_env="DISTILL_NO_SUCH_KEY"), prompts(1))
    assert len(completions) == 1
    assert fake.requests[0]["authorization"].startswith("Bearer ")


def test_caller_stopping_early_cancels_the_rest(start):
    fake, url = start(delay_s=0.05)
    gen = teacher(url, concurrency=2).generate(prompts(40), GenerationParams())
    first = next(gen)
    gen.close()
    seen = len(fake.requests)
    time.sleep(0.2)

    assert first
    assert len(fake.requests) == seen < 40


def test_generate_works_inside_a_running_event_loop(start):
    fake, url = start()

    async def main():
        return run(teacher(url), prompts(2))

    completions, _ = asyncio.run(main())
    assert len(completions) == 2


def test_fake_server_drop_really_drops_the_connection(start):
    fake, url = start()
    fake.fail("p0", "drop")
    body = {"model": "m", "messages": [{"role": "user", "content": "p0"}]}
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{url}/chat/completions", json=body, timeout=5)


def test_system_prompt_only_when_the_prompt_has_none():
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]
    assert apply_system_prompt(own, "Teacher's.") == own
    assert apply_system_prompt(own[1:], "Teacher's.") == [{"role": "system", "content": "Teacher's."}, own[1]]
    assert apply_system_prompt(own[1:], None) == own[1:]
