"""Efficiency of one model, measured the same way for every model: size, memory, first-token time, speed.

All generation goes through `teachers.local.generate_batch` (greedy), the same path the quality
figures use. Every timed figure is preceded by one untimed warm-up run and repeated
`repeats` times; each is reported as `{"mean", "std", "values"}`.

Outputs are forced to exactly `new_tokens` tokens (the model's `generation_config.min_new_tokens`
is set for the duration, like vLLM's `ignore_eos`), so a model that stops early does not look fast.

* `ttft_s`: time to first token, a generate call with `max_new_tokens=1` at batch 1 (prefill + one step);
* `latency_s`: one request at batch 1 producing `new_tokens` tokens, with p50/p95 over the requests;
* `decode_tokens_per_s`: batch 1, `(new_tokens - 1) / (latency - ttft)` on the same prompt: decoding alone;
* `throughput_tokens_per_s`: `batch_size` prompts at once, `batch_size * new_tokens / time`;
* `peak_memory_bytes`: on CUDA, `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, over
  all timed runs (weights included, since they are allocated on the GPU). On CPU, the weights' bytes
  plus the peak increase of the process RSS over the RSS just before generating, sampled every 5 ms
  by a background thread (psutil). The CPU figure is approximate: the allocator may keep memory of
  an earlier model and reuse it (freed memory is handed back with `malloc_trim` first, where glibc
  has it), and peaks shorter than the sampling interval are missed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import psutil
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.models import count_parameters
from distill.teachers.base import GenerationParams, Message
from distill.teachers.local import chat_prompt_ids, generate_batch


def measure_efficiency(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[Message]],
    *,
    batch_size: int = 8,
    repeats: int = 3,
    new_tokens: int = 32,
    model_dir: Path | None = None,
) -> dict:
    """Size, peak memory, time to first token, decode speed, batched throughput and latency of one model."""
    if not conversations:
        raise ValueError("measure_efficiency needs at least one prompt")
    prompts = [chat_prompt_ids(tokenizer, m) for m in conversations]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    one = GenerationParams(max_new_tokens=1, batch_size=1)
    full = GenerationParams(max_new_tokens=new_tokens, batch_size=1)
    batched = GenerationParams(max_new_tokens=new_tokens, batch_size=batch_size)
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]

    def run(prompt_batch: list[list[int]], params: GenerationParams) -> None:
        with _fixed_length(model, params.max_new_tokens):
            generate_batch(model, tokenizer, prompt_batch, params)

    timed = _Timer(model.device)
    # Warm-up outside the memory window: it also pages in memory-mapped safetensors weights, which would
    # otherwise count twice (once as weight bytes, once as RSS growth).
    run([prompts[0]], one)
    with _PeakMemory(model, weights) as mem:
        ttft = [timed(run, [prompts[i % len(prompts)]], one) for i in range(repeats)]
        run([prompts[0]], full)
        latency = [timed(run, [prompts[i % len(prompts)]], full) for i in range(repeats)]
        run(batch, batched)
        batch_time = [timed(run, batch, batched) for _ in range(repeats)]

    # Decoding alone: what request i took beyond its first token (same prompt in both lists). Timer
    # noise on a very fast model can make that non-positive; the end-to-end rate is then the fallback.
    decode = [
        (new_tokens - 1) / (t - t1) if t > t1 and new_tokens > 1 else new_tokens / t
        for t, t1 in zip(latency, ttft, strict=True)
    ]
    return {
        "parameters": count_parameters(model),
        "weights_bytes": weights,
        "size_bytes": folder_bytes(model_dir) if model_dir else weights,
        "size_source": "folder" if model_dir else "parameters",
        "peak_memory_bytes": mem.peak_bytes,
        "memory_method": mem.method,
        "device": str(model.device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "ttft_s": _spread(ttft),
        "decode_tokens_per_s": _spread(decode),
        "throughput_tokens_per_s": _spread([batch_size * new_tokens / t for t in batch_time]),
        "latency_s": {**_spread(latency), "p50": _pct(latency, 50), "p95": _pct(latency, 95)},
    }


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path` (a saved model folder)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class _Timer:
    """Wall time of one call, with the GPU drained before and after so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, *args) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


@contextlib.contextmanager
def _fixed_length(model: PreTrainedModel, n: int) -> Iterator[None]:
    """Make generate produce exactly `n` new tokens (its `max_new_tokens`): EOS is masked until then."""
    old = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = n
    try:
        yield
    finally:
        model.generation_config.min_new_tokens = old


class _PeakMemory:
    """Peak memory while the block runs; see the module docstring for the method on CPU and on CUDA."""

    def __init__(self, model: PreTrainedModel, weights_bytes: int, interval_s: float = 0.005):
        self.device = model.device
        self.weights = weights_bytes
        self.interval = interval_s
        self.peak_bytes = 0
        self.method = "cuda_max_memory_allocated" if self.device.type == "cuda" else "weights_plus_peak_rss_increase"

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is honest
        self._process = psutil.Process()
        self._baseline = self._peak_rss = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        self.peak_bytes = self.weights + self._peak_rss - self._baseline
