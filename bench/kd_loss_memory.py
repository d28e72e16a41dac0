"""Peak memory and time of one KD loss forward + backward: plain full-logit path vs the chunked fused path.

Run with no arguments: ``python bench/kd_loss_memory.py``. Cases: forward KL, T = 2, alpha = 0.5, 4,096 valid
tokens, hidden size 576 for student and teacher, vocabularies of 49,152 (SmolLM) and 151,936 (Qwen), all fp32:

* ``plain``: ``student_logits = hidden @ W.T`` and the teacher's logits are materialised, then
  ``kd_loss_from_logits``;
* ``chunked``: ``kd_loss_from_hidden`` with the default ``chunk_size`` (``--chunk-sizes 1024 256`` adds rows).

How peak memory is measured: every case runs in a fresh subprocess, so allocator caches and earlier cases cannot
hide or inflate anything. Inputs (hidden states, head weights) are created and a small warm-up runs before the
baseline, so the number is what the loss itself needs on top of its inputs: logits, temporaries and gradients.

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at
  the baseline.
* CPU: torch's CPU allocations are invisible to ``tracemalloc``, so the process's peak resident set size is used.
  The kernel's high-water mark is reset right before the run (``/proc/self/clear_refs`` = 5) and ``VmHWM`` minus
  ``VmRSS`` at the baseline is reported. Where that reset is not allowed, ``ru_maxrss`` minus its value at the
  baseline is used instead (it can under-report if setting up the inputs peaked higher than the loss).

The last line printed is ``name=value`` pairs for docs/benchmarks.md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from distill.losses import KDLossConfig, kd_loss_from_hidden, kd_loss_from_logits

TOKENS = 4096
HIDDEN = 576
VOCABS = (49_152, 151_936)
DEFAULT_CHUNK = KDLossConfig().chunk_size
# [tokens, vocab] fp32 tensors the plain path holds at its peak: measured 7.0 on CPU (both logits, both
# log-softmaxes, teacher probs, the divergence's temporaries, then their gradients), plus a margin.
PLAIN_COPIES = 7.5


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak bytes allocated above a baseline taken at ``start()``; see the module docstring for the method."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024
            self.method = "cpu VmHWM (reset) - VmRSS"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "cpu ru_maxrss delta"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("cpu VmHWM"):
            return _proc_status_kib("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def make_inputs(tokens: int, vocab: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    batch, length = 4, tokens // 4
    # 0.02-scale weights: logits of a realistic spread (std ~0.5), so softmaxes are neither flat nor one-hot.
    h = torch.randn(batch, length, HIDDEN, generator=gen, device=device).requires_grad_()
    w = (torch.randn(vocab, HIDDEN, generator=gen, device=device) * 0.02).requires_grad_()
    th = torch.randn(batch, length, HIDDEN, generator=gen, device=device)
    tw = torch.randn(vocab, HIDDEN, generator=gen, device=device) * 0.03
    labels = torch.randint(0, vocab, (batch, length), generator=gen, device=device)
    return h, w, th, tw, labels


def run_loss(path: str, h, w, th, tw, labels, cfg: KDLossConfig) -> torch.Tensor:
    if path == "plain":
        student_logits = h @ w.T  # [B, T, V], materialised
        with torch.no_grad():
            teacher_logits = th @ tw.T
        out = kd_loss_from_logits(student_logits, teacher_logits, labels, cfg)
        del student_logits, teacher_logits  # what a careful caller would free before backward
    else:
        out = kd_loss_from_hidden(h, w, th, tw, labels, cfg)
    out.loss.backward()
    return out.loss.detach()


def child(vocab: int, path: str, chunk_size: int, tokens: int, grads_file: str) -> None:
    """One measured case, in its own process; prints one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = KDLossConfig("forward_kl", temperature=2.0, alpha=0.5, chunk_size=chunk_size)
    # Warm-up on small shapes: first-call kernel and allocator set-up should not count as the loss's time.
    run_loss(path, *make_inputs(64, 1024, device), cfg)
    h, w, th, tw, labels = make_inputs(tokens, vocab, device)
    meter = PeakMemory(device)
    meter.start()
    start = time.perf_counter()
    loss = run_loss(path, h, w, th, tw, labels, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = meter.peak_bytes()
    torch.save({"h": h.grad.cpu(), "w": w.grad.cpu()}, grads_file)
    result = {"peak_mib": peak / 2**20, "seconds": seconds, "loss": loss.item(), "method": meter.method}
    print(json.dumps(result))


def run_case(vocab: int, path: str, chunk_size: int, tokens: int, grads_file: str) -> dict:
    cmd = [sys.executable, __file__, "--case", str(vocab), path, str(chunk_size), str(tokens), grads_file]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"case {vocab} {path} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tokens_that_fit(vocab: int) -> int:
    """TOKENS, or fewer on a CPU box whose free memory cannot hold the plain path's logits at this vocabulary."""
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    tokens = TOKENS
    while tokens > 512 and PLAIN_COPIES * tokens * vocab * 4 > 0.9 * free:
        tokens //= 2
    if tokens != TOKENS:
        need = PLAIN_COPIES * TOKENS * vocab * 4 / 2**30
        print(
            f"note: vocab {vocab}: the plain path needs ~{need:.1f} GiB at {TOKENS} tokens but only "
            f"{free / 2**30:.1f} GiB is free; measuring both paths at {tokens} tokens instead"
        )
    return tokens


def main(chunk_sizes: list[int]) -> None:
    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    print(f"KD loss forward+backward, forward_kl, T=2, alpha=0.5, hidden {HIDDEN}, fp32, on {device}")
    rows, summary, grad_diff = [], {}, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in VOCABS:
            tokens = tokens_that_fit(vocab)
            results = {}
            for path, chunk in [("plain", 0)] + [("chunked", c) for c in chunk_sizes]:
                name = path if path == "plain" else f"chunked/{chunk}"
                grads_file = os.path.join(tmp, f"{vocab}_{path}_{chunk}.pt")
                results[name] = run_case(vocab, path, max(chunk, 1), tokens, grads_file)
                results[name]["grads"] = grads_file
                rows.append((vocab, tokens, name, results[name]))
            plain, default = results["plain"], results[f"chunked/{chunk_sizes[0]}"]
            reference = torch.load(plain["grads"])
            diff = 0.0
            for name, res in results.items():
                if name != "plain":
                    grads = torch.load(res["grads"])
                    diff = max(diff, *((grads[k] - reference[k]).abs().max().item() for k in ("h", "w")))
            key = f"{round(vocab / 1000)}k"
            summary[f"memory_ratio_{key}"] = default["peak_mib"] / plain["peak_mib"]
            summary[f"time_ratio_{key}"] = default["seconds"] / plain["seconds"]
            grad_diff = max(grad_diff, diff)
            if tokens != TOKENS:
                summary[f"tokens_{key}"] = tokens

    print(f"memory method: {rows[0][3]['method']}")
    print(f"{'vocab':>8} {'tokens':>6} {'path':<13} {'peak MiB':>10} {'seconds':>8} {'loss':>10}")
    for vocab, tokens, name, res in rows:
        print(f"{vocab:>8} {tokens:>6} {name:<13} {res['peak_mib']:>10.0f} {res['seconds']:>8.2f} {res['loss']:>10.5f}")
    summary["grad_max_abs_diff"] = grad_diff
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=[DEFAULT_CHUNK],
        help=f"chunk sizes of the chunked path (default: {DEFAULT_CHUNK}, the KDLossConfig default; the first one "
        "gives the ratios). Each extra size adds a few minutes on a 2-core CPU.",
    )
    parser.add_argument("--case", nargs=5, metavar=("VOCAB", "PATH", "CHUNK", "TOKENS", "GRADS_FILE"), help="internal")
    args = parser.parse_args()
    if args.case:
        vocab, path, chunk, tokens, grads_file = args.case
        child(int(vocab), path, int(chunk), int(tokens), grads_file)
    else:
        main(args.chunk_sizes)
