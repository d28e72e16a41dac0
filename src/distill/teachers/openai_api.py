"""A teacher behind any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM, SGLang, llama.cpp, TGI).

Requests go out concurrently from an asyncio loop, with retries, client-side rate limits and
round-robin over several base URLs; `generate` stays a plain sync generator for the pipeline.

Why `httpx` and not the `openai` client: every decision here rests on the raw response (the
status code, the `Retry-After` header, whether the body is JSON at all, non-standard fields such
as `top_k`), and retries must be counted by reason. `httpx` hands us exactly that; the official
client (itself built on `httpx`) would have to be turned off (`max_retries=0`) and its typed
exceptions mapped back to status codes, and it validates bodies into models we would re-read.

Samples: `params.n` samples of a prompt are `n` separate requests with seeds `seed + sample`
(not one request with `n`), because many OpenAI-compatible servers ignore or reject `n > 1`.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import math
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from distill.config import ApiConfig
from distill.errors import DistillError
from distill.teachers.base import Completion, GenerationParams, Prompt, apply_system_prompt

log = logging.getLogger("distill")

_DONE = object()  # end-of-run marker on the queue between the request thread and `generate`
_FATAL_STATUS = {401: "the API key was refused", 403: "access was denied", 404: "no such endpoint or model"}
_MAX_RETRY_AFTER_S = 300.0  # a larger Retry-After is more likely garbage than advice


@dataclass
class RequestStats:
    """Counts of one `generate` call: HTTP requests sent, retries by reason, samples that failed."""

    requests: int = 0
    retries: Counter[str] = field(default_factory=Counter)  # reason ("429", "500", "timeout", ...) -> count
    failures: int = 0

    def summary(self) -> str:
        total = sum(self.retries.values())
        text = f"{self.requests} requests, {total} retries"
        if total:
            text += " (" + ", ".join(f"{reason}: {k}" for reason, k in self.retries.most_common()) + ")"
        if self.failures:
            text += f", {self.failures} failed"
        return text


class _Secret:
    """Holds the API key so that no repr, traceback local dump or `vars()` shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "'***'"


class _RetryableError(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class _PromptError(Exception):
    """This request cannot succeed by retrying (e.g. HTTP 400): the sample fails, the run goes on."""


class _Pacer:
    """A token bucket holding one request's worth: reservations are spaced so at most `per_minute` units pass.

    `acquire(amount)` books `amount / rate` seconds of the shared timeline and sleeps until its slot;
    `settle(delta)` corrects a booking once the true amount is known (negative gives time back).
    """

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0  # units per second
        self.next_at = 0.0  # time.monotonic() at which the next booking may start

    async def acquire(self, amount: float = 1.0) -> None:
        now = time.monotonic()
        start = max(now, self.next_at)
        self.next_at = start + amount / self.rate
        if start > now:
            await asyncio.sleep(start - now)

    def settle(self, delta: float) -> None:
        self.next_at += delta / self.rate


class OpenAITeacher:
    """A teacher served over HTTP by anything that speaks OpenAI's chat-completions protocol.

    `stats` holds the counts of the last `generate` call. Backoff timings are keyword arguments
    so tests can shrink them; they are not part of the job file.
    """

    def __init__(
        self,
        model: str,
        api: ApiConfig,
        system_prompt: str | None = None,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        if not api.base_urls:
            raise DistillError("teacher.api.base_urls is empty: give at least one URL, e.g. http://127.0.0.1:8000/v1")
        for url in api.base_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise DistillError(
                    f"teacher.api.base_urls: {url!r} is not an http(s) URL; expected e.g. https://api.openai.com/v1"
                )
        self.model = model
        self.api = api
        self.system_prompt = system_prompt
        self.name = f"openai:{model}"
        self.stats = RequestStats()
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._base_urls = [u.rstrip("/") for u in api.base_urls]
        self._key = _Secret(_resolve_api_key(api.api_key_env, self._base_urls))
        self._next_url = 0
        self._resume_at = 0.0  # monotonic time before which nothing is sent (server-wide Retry-After)

    def __repr__(self) -> str:
        return (
            f"OpenAITeacher(model={self.model!r}, base_urls={self._base_urls!r}, api_key_env={self.api.api_key_env!r})"
        )

    def close(self) -> None:
        """Nothing to release: each `generate` call opens and closes its own HTTP connections."""

    # ----------------------------------------------------------------------------------- sync face

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> Iterator[list[Completion]]:
        """Answer every prompt `params.n` times; yield completions in batches as they finish.

        The requests run on an asyncio loop in a private thread, so they keep flowing while the
        caller stores a batch, and this works even when the caller already runs an event loop.
        Samples that still fail after `api.max_retries` retries are not yielded: once everything
        else is done a `DistillError` says how many failed, so a rerun can resume them.
        """
        self.stats = RequestStats()
        jobs = [(prompt, sample) for prompt in prompts for sample in range(params.n)]
        if not jobs:
            return
        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["failed"] = asyncio.run(self._run(jobs, params, results.put, stop))
            except BaseException as e:  # handed to the caller's thread below
                outcome["error"] = e
            finally:
                results.put(_DONE)

        started = time.monotonic()
        thread = threading.Thread(target=run, name=f"distill-{self.name}", daemon=True)
        thread.start()
        try:
            done = False
            while not done:
                batch: list[Completion] = []
                item = results.get()
                while True:
                    if item is _DONE:
                        done = True
                        break
                    batch.append(item)
                    if len(batch) >= self.api.concurrency:
                        break
                    try:
                        item = results.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    yield batch
        finally:
            stop.set()  # also when the caller stops early: cancels what is in flight
            thread.join()
        log.info("%s: %s in %.1f s", self.name, self.stats.summary(), time.monotonic() - started)
        if "error" in outcome:
            raise outcome["error"]
        failed: list[tuple[Prompt, int, str]] = outcome["failed"]
        if failed:
            prompts_failed = len({p.id for p, _, _ in failed})
            raise DistillError(
                f"{self.name}: {prompts_failed} of {len(prompts)} prompts failed ({len(failed)} of {len(jobs)} "
                f"samples, up to {self.api.max_retries + 1} attempts each); last error: {failed[-1][2]}. "
                f"The answers that succeeded ({len(jobs) - len(failed)}) were returned; run again to retry only "
                "the failed ones, or check the server and raise teacher.api.max_retries or teacher.api.timeout_s."
            )

    # ----------------------------------------------------------------------------------- async core

    async def _run(self, jobs, params: GenerationParams, emit, stop: threading.Event) -> list[tuple[Prompt, int, str]]:
        """Answer all jobs with at most `api.concurrency` requests in flight; return the failed ones."""
        api = self.api
        sem = asyncio.Semaphore(api.concurrency)
        pacers = (
            _Pacer(api.requests_per_minute) if api.requests_per_minute else None,
            _Pacer(api.tokens_per_minute) if api.tokens_per_minute else None,
        )
        failed: list[tuple[Prompt, int, str]] = []
        pending = iter(jobs)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=api.concurrency)

        async with httpx.AsyncClient(timeout=httpx.Timeout(api.timeout_s), limits=limits) as client:

            async def worker() -> None:
                # Workers outnumber the semaphore so that one sleeping in backoff does not idle a slot.
                for prompt, sample in pending:
                    try:
                        emit(await self._answer(client, prompt, sample, params, sem, pacers))
                    except (_RetryableError, _PromptError) as e:
                        self.stats.failures += 1
                        failed.append((prompt, sample, str(e)))

            tasks = [asyncio.create_task(worker()) for _ in range(min(len(jobs), 2 * api.concurrency))]
            try:
                running = set(tasks)
                while running and not stop.is_set():
                    done, running = await asyncio.wait(running, timeout=0.1, return_when=asyncio.FIRST_EXCEPTION)
                    for task in done:
                        if task.exception() is not None:
                            raise task.exception()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return failed

    async def _answer(self, client, prompt: Prompt, sample: int, params: GenerationParams, sem, pacers) -> Completion:
        """One sample of one prompt, retried on transient errors; raises the last error when out of retries."""
        body = self._request_body(prompt, sample, params)
        # Tokens booked before the call (chars / 4 for the prompt, the whole answer budget), corrected after.
        estimate = math.ceil(sum(len(m.get("content") or "") for m in body["messages"]) / 4) + params.max_new_tokens
        requests_pacer, tokens_pacer = pacers
        for attempt in range(self.api.max_retries + 1):
            async with sem:
                if (wait := self._resume_at - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if requests_pacer:
                    await requests_pacer.acquire()
                if tokens_pacer:
                    await tokens_pacer.acquire(estimate)
                url = self._base_urls[self._next_url % len(self._base_urls)]
                self._next_url += 1
                self.stats.requests += 1
                try:
                    data = await self._post(client, url, body)
                    completion = _parse_completion(data, prompt.id, sample)
                except _RetryableError as e:
                    error = e
                else:
                    if tokens_pacer:
                        used = completion.prompt_tokens + completion.completion_tokens
                        tokens_pacer.settle((used or estimate) - estimate)
                    return completion
            if attempt == self.api.max_retries:
                raise error
            self.stats.retries[error.reason] += 1
            if error.retry_after is not None:
                delay = error.retry_after
                self._resume_at = max(self._resume_at, time.monotonic() + delay)  # the server asked everyone
            else:
                delay = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))  # full jitter
            log.debug(
                "%s: %s on %s (attempt %d), retrying in %.2f s", self.name, error.reason, prompt.id, attempt, delay
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _request_body(self, prompt: Prompt, sample: int, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": apply_system_prompt(prompt.messages, self.system_prompt),
            "max_tokens": params.max_new_tokens,  # not max_completion_tokens: the field every server knows
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed + sample,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k  # an extension (vLLM, SGLang, llama.cpp); OpenAI itself rejects it
        top = max(params.logprobs, self.api.top_logprobs)
        if top > 0:
            body["logprobs"] = True
            body["top_logprobs"] = top
        return body

    async def _post(self, client: httpx.AsyncClient, base_url: str, body: dict[str, Any]) -> Any:
        """POST one request; return the decoded JSON or raise `_RetryableError` / `_PromptError`."""
        url = f"{base_url}/chat/completions"
        headers = {"Authorization": f"Bearer {self._key.value}"}
        try:
            async with asyncio.timeout(self.api.timeout_s):  # httpx's timeouts are per read, this is per request
                response = await client.post(url, json=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            raise _RetryableError("timeout", f"no answer from {url} within {self.api.timeout_s:g} s") from None
        except httpx.TransportError as e:
            raise _RetryableError("connection", f"connection to {url} failed: {self._redact(str(e))}") from None
        status = response.status_code
        if status != 200:
            detail = f"HTTP {status} from {url}: {self._redact(response.text[:300])}"
            if status in _FATAL_STATUS:
                raise DistillError(
                    f"{self.name}: {_FATAL_STATUS[status]} ({detail}). Check teacher.model (the served model "
                    f"name), teacher.api.base_urls (ending in /v1) and the key in ${self.api.api_key_env}."
                )
            if status == 429 or status == 408 or status >= 500:
                retry_after = _retry_after(response.headers.get("retry-after")) if status in (429, 503) else None
                raise _RetryableError(str(status), detail, retry_after)
            raise _PromptError(detail)
        try:
            return response.json()
        except ValueError:
            snippet = self._redact(response.text[:100])
            raise _RetryableError(
                "malformed", f"{url} answered HTTP 200 with a body that is not JSON: {snippet!r}"
            ) from None

    def _redact(self, text: str) -> str:
        key = self._key.value
        return text.replace(key, "***") if len(key) >= 4 else text


def _parse_completion(data: Any, prompt_id: str, sample: int) -> Completion:
    """One chat-completions response -> `Completion`; a body of the wrong shape is retried as malformed."""
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        usage = data.get("usage") or {}
        return Completion(
            prompt_id=prompt_id,
            sample=sample,
            text=text,
            finish_reason=choice.get("finish_reason") or "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            logprobs=parse_logprobs(choice.get("logprobs")),
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        text = json.dumps(data)[:100] if not isinstance(data, str) else data[:100]
        raise _RetryableError("malformed", f"a response without the chat-completions shape ({e!r}): {text}") from None


def parse_logprobs(logprobs: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """`choices[i].logprobs` -> `[{"token", "logprob", "top": [[token, logprob], ...]}]` per generated token."""
    content = (logprobs or {}).get("content")
    if not content:
        return None
    return [
        {
            "token": t["token"],
            "logprob": float(t["logprob"]),
            "top": [[x["token"], float(x["logprob"])] for x in t.get("top_logprobs") or []],
        }
        for t in content
    ]


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resolve_api_key(env_name: str, base_urls: list[str]) -> str:
    key = os.environ.get(env_name, "").strip()
    if key:
        return key
    if all(_is_loopback(u) for u in base_urls):
        return "no-key"  # local servers (vLLM, llama.cpp) accept any key
    remote = next(u for u in base_urls if not _is_loopback(u))
    raise DistillError(
        f"teacher.api.api_key_env: the environment variable {env_name} is not set, and {remote} needs an API key. "
        f"Set it (export {env_name}=...) or name another variable in teacher.api.api_key_env."
    )
