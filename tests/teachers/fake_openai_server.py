"""A real OpenAI-compatible HTTP server for tests: FastAPI on uvicorn, 127.0.0.1, a free port, a thread.

The answer is a pure function of the request (`echo: <last user message>`), every request is
recorded, and faults are injected per prompt: `server.fail("hello", "429", "timeout")` makes the
first two requests for the prompt "hello" fail with those faults, in order; later ones succeed.

    app = FakeOpenAI()
    with serve(app.app) as base_url:   # "http://127.0.0.1:PORT/v1"
        ...
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

FAULTS = ("400", "401", "429", "500", "503", "timeout", "malformed", "drop")


class _DroppedResponse(Response):
    """Status line and headers promising a body, then nothing: the connection drops mid-response.

    The ASGI callable returns without completing the response, and uvicorn's answer to that is to
    close the socket ("ASGI callable returned without completing response"). The client has read
    `200 OK` and a Content-Length of 1000, then hits end-of-stream: for `httpx` a RemoteProtocolError,
    which is exactly what a crashed server or a reset load balancer looks like.
    """

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})


class FakeOpenAI:
    """State of one fake server: recorded requests, in-flight counts and the fault plan."""

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        retry_after: str | None = "0",
        hang_s: float = 2.0,
        model: str = "fake-model",
    ) -> None:
        self.delay_s = delay_s  # every answer takes this long (to make requests overlap)
        self.retry_after = retry_after  # Retry-After header on 429/503 (None: no header)
        self.hang_s = hang_s  # how long a "timeout" fault stalls (longer than the client's timeout)
        self.model = model
        self.requests: list[dict[str, Any]] = []  # {"body": ..., "authorization": ..., "fault": ...}
        self.in_flight = 0
        self.max_in_flight = 0
        self._plan: dict[str, list[str]] = {}
        self._always: dict[str, str] = {}
        self._lock = threading.Lock()
        self.app = self._build()

    def fail(self, prompt: str, *faults: str, always: bool = False) -> None:
        """The next requests for `prompt` fail with `faults` in order (or every request, `always`)."""
        assert all(f in FAULTS for f in faults), faults
        if always:
            (self._always[prompt],) = faults
        else:
            self._plan.setdefault(prompt, []).extend(faults)

    def _next_fault(self, prompt: str) -> str | None:
        with self._lock:
            if prompt in self._always:
                return self._always[prompt]
            plan = self._plan.get(prompt)
            return plan.pop(0) if plan else None

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            prompt = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
            fault = self._next_fault(prompt)
            self.requests.append({"body": body, "authorization": request.headers.get("authorization"), "fault": fault})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                return await self._answer(request, body, prompt, fault)
            finally:
                self.in_flight -= 1

        return app

    async def _answer(self, request: Request, body: dict, prompt: str, fault: str | None) -> Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
        if fault in ("400", "401"):
            return JSONResponse({"error": {"message": f"fault {fault}"}}, status_code=int(fault))
        if fault == "429":
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429, headers=headers)
        if fault == "500":
            return JSONResponse({"error": {"message": "internal error"}}, status_code=500)
        if fault == "503":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503, headers=headers)
        if fault == "malformed":
            return Response(b'{"choices": [{"mess', media_type="application/json")
        if fault == "drop":
            return _DroppedResponse()
        if fault == "timeout":
            deadline = time.monotonic() + self.hang_s
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.05)
        return JSONResponse(self.completion(body, prompt))

    def completion(self, body: dict, prompt: str) -> dict[str, Any]:
        """The deterministic answer to a request, in the chat-completions shape."""
        text = f"echo: {prompt}"
        words = text.split(" ")
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {
                "content": [
                    {
                        "token": w,
                        "logprob": -0.5 * i,
                        "bytes": list(w.encode()),
                        "top_logprobs": [{"token": w, "logprob": -0.5 * i}]
                        + [{"token": f"alt{j}", "logprob": -0.5 * i - j} for j in range(1, k)],
                    }
                    for i, w in enumerate(words)
                ]
            }
        prompt_tokens = sum(len(str(m["content"]).split()) for m in body["messages"])
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            },
        }


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yield its `/v1` base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # binding here, not picking a port to pass on, leaves no race
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,  # leave the test process's logging alone
        log_level="critical",
        access_log=False,
        lifespan="off",
        http="h11",  # _DroppedResponse relies on how the h11 protocol handles an unfinished response
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake OpenAI server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
