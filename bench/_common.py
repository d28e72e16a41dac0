"""Helpers shared by the scripts under ``bench/``: device choice, timing, peak memory, subprocess cases, output.

Every bench script follows the same shape: ``main()`` runs each measured case in a fresh subprocess (the same
script with ``--case ...``), the child prints one JSON line (:func:`emit_case`), the parent prints a table
(:func:`print_table`) and, as its very last line, the headline figures as ``name=value`` pairs
(:func:`summary_line`), which docs/benchmarks.md records.

Peak memory (:class:`PeakMemory`), always relative to a baseline taken (``start()``) in the child after the models
and inputs are loaded and before the measured work, so the figure is what the measured work adds:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``, minus
  ``torch.cuda.memory_allocated()`` at the baseline.
* CPU: torch's CPU allocations are invisible to ``tracemalloc``, so the process's peak resident set size (RSS) is
  used. At the baseline, garbage is collected and glibc is asked to return freed heap to the kernel
  (``malloc_trim``), so memory freed while loading cannot silently absorb the measured work's allocations. Then the
  kernel's RSS high-water mark is reset (``/proc/self/clear_refs`` = 5) and the figure is ``VmHWM`` minus ``VmRSS``
  at the baseline. Where that reset is not allowed, ``ru_maxrss`` (``getrusage(RUSAGE_SELF)``) minus its value at
  the baseline is used instead; that can under-report when loading peaked higher than the measured work, which is
  why each case runs in its own process. Safetensors weights are memory-mapped: their pages join the RSS only when
  first read, so run the model once (or read its parameters) before the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MIB = 2**20


TEACHER = "builtin:smollm2-135m-instruct"
"""The teacher every bench script measures: the built-in one, so no download is needed."""
PROMPTS_FILE = Path(__file__).resolve().parent.parent / "examples" / "quickstart_prompts.jsonl"
"""The quickstart's prompts: what the bench scripts feed the teacher."""


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when a GPU is visible, else CPU in fp32 (what Distill itself picks with ``dtype: auto``)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def use_threads(n: int | None) -> None:
    """Pin torch's CPU threads here and in every case process started after (``OMP_NUM_THREADS``); None: torch's
    default (one per core). On a machine shared with other jobs, 1 thread avoids OpenMP threads waiting on each
    other while descheduled, which can slow a 2-thread run 3-10x and makes timings meaningless."""
    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def case_main(description: str, main: Callable[[int], None], child: Callable[[str], None]) -> None:
    """The command line of a bench script whose cases run in their own processes (see :func:`run_cases`): no
    arguments runs them all and prints the table; ``--case NAME`` is one case's process."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=2, help="runs of every case, interleaved; the best counts")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: one per core); 1 on a busy machine")
    parser.add_argument("--case", help="run one measured case (internal)")
    args = parser.parse_args()
    if args.case:
        child(args.case)
    else:
        use_threads(args.threads)
        main(args.repeats)


def device_name() -> str:
    """A short description of the machine the figures come from, for the table's title."""
    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name()}"
    return f"cpu x{torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Wall-clock seconds of a ``with`` block; waits for queued CUDA work on entry and exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak bytes above a baseline taken at :meth:`start`; see the module docstring for the method.

    :meth:`start` may be called again to measure a later part of the run on its own (CUDA, and CPU where the
    high-water mark can be reset); :attr:`resettable` says whether that works.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.base = 0

    @property
    def resettable(self) -> bool:
        return self.device.type == "cuda" or self.method.startswith("cpu VmHWM")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated - memory_allocated at baseline"
            return
        _release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024
            self.method = "cpu VmHWM (reset at baseline) - VmRSS at baseline"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "cpu ru_maxrss - ru_maxrss at baseline"

    def current_bytes(self) -> int:
        """Memory in use now (allocated on CUDA, resident on CPU), on the same scale as the baseline."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated()
        return _proc_status_kib("VmRSS") * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("cpu VmHWM"):
            return _proc_status_kib("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def emit_case(result: dict) -> None:
    """Print a child's result as the last line of its stdout (what :func:`run_case` reads)."""
    print(json.dumps(result), flush=True)


def run_case(script: str | Path, *args: object, timeout: float | None = None) -> dict:
    """Run ``python SCRIPT --case ARGS...`` in a fresh process and return the JSON its last stdout line holds."""
    cmd = [sys.executable, str(script), "--case", *map(str, args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"case {' '.join(map(str, args))} took longer than {timeout:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"case {' '.join(map(str, args))} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_cases(script: str | Path, cases: dict[str, Sequence[object]], repeats: int = 1) -> dict[str, list[dict]]:
    """Run every case ``repeats`` times, interleaved (A B C A B C), each in a fresh process: results per case.

    Interleaving spreads each case over the whole run, so a burst of other work on a shared machine does not land
    on one case only; take the best (:func:`best`) of each case's runs.
    """
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, args in cases.items():
            results[name].append(run_case(script, *args))
    return results


def best(runs: Sequence[dict], key: str) -> dict:
    """The run with the smallest ``key`` (time): the one least disturbed by other jobs on the machine."""
    return min(runs, key=lambda r: r[key])


def load_average() -> str:
    """The machine's load average, printed with the figures: timings taken on a busy machine say so."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average n/a"
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cpus"


def memory_state() -> str:
    """Free memory and page cache (Linux): code that allocates and frees much memory per step runs slower when the
    kernel must first reclaim page cache for every fresh allocation, so timings say which state they were taken in.
    """
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f}
    except (OSError, ValueError, IndexError):
        return "memory state n/a"
    return f"memory: {info.get('MemFree', 0):,} MiB free, {info.get('Cached', 0):,} MiB page cache"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned text table. Floats get 3 significant digits (no exponent below 1e6); pass a string to
    format a value yourself. Columns whose every cell reads as a number are right-aligned, others left-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    print(line(headers).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row).rstrip())


def summary_line(figures: dict[str, object]) -> str:
    """The ``name=value`` pairs of the headline figures (floats with 3 significant digits), space separated."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
