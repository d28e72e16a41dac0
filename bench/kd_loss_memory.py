"""Peak memory and time of one KD loss forward + backward: plain full-logit path vs the chunked fused path.

Run with no arguments: ``python bench/kd_loss_memory.py``. Cases: forward KL, T = 2, alpha = 0.5, 4,096 valid
tokens, hidden size 576 for student and teacher, vocabularies of 49,152 (SmolLM) and 151,936 (Qwen), all fp32:

* ``plain``: ``student_logits = hidden @ W.T`` and the teacher's logits are materialised, then
  ``kd_loss_from_logits``;
* ``chunked``: ``kd_loss_from_hidden`` with the default ``chunk_size`` (``--chunk-sizes 1024 256`` adds rows).

How peak memory is measured: every case runs in a fresh subprocess, so allocator caches and earlier cases cannot
hide or inflate anything. Inputs (hidden states, head weights) are created and a small warm-up runs before the
baseline, so the number is what the loss itself needs on top of its inputs: logits, temporaries and gradients. On
CUDA it is ``max_memory_allocated()`` above the baseline; on CPU the process's peak RSS above the baseline, with the
kernel's high-water mark reset at the baseline (details and the fallback in bench/_common.py, ``PeakMemory``).

The last line printed is ``name=value`` pairs for docs/benchmarks.md.
"""

import argparse
import os
import tempfile

import torch

from _common import PeakMemory, Stopwatch, device_name, emit_case, pick_device, print_table, run_case, summary_line
from distill.losses import KDLossConfig, kd_loss_from_hidden, kd_loss_from_logits

TOKENS = 4096
HIDDEN = 576
VOCABS = (49_152, 151_936)
DEFAULT_CHUNK = KDLossConfig().chunk_size
# [tokens, vocab] fp32 tensors the plain path holds at its peak: measured 7.0 on CPU (both logits, both
# log-softmaxes, teacher probs, the divergence's temporaries, then their gradients), plus a margin.
PLAIN_COPIES = 7.5


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
    device, _ = pick_device()  # always fp32 here: the loss's own precision is the subject
    cfg = KDLossConfig("forward_kl", temperature=2.0, alpha=0.5, chunk_size=chunk_size)
    # Warm-up on small shapes: first-call kernel and allocator set-up should not count as the loss's time.
    run_loss(path, *make_inputs(64, 1024, device), cfg)
    h, w, th, tw, labels = make_inputs(tokens, vocab, device)
    meter = PeakMemory(device)
    meter.start()
    with Stopwatch(device) as clock:
        loss = run_loss(path, h, w, th, tw, labels, cfg)
    peak = meter.peak_bytes()
    torch.save({"h": h.grad.cpu(), "w": w.grad.cpu()}, grads_file)
    emit_case({"peak_mib": peak / 2**20, "seconds": clock.seconds, "loss": loss.item(), "method": meter.method})


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
    print(f"KD loss forward+backward, forward_kl, T=2, alpha=0.5, hidden {HIDDEN}, fp32, on {device_name()}")
    rows, summary, grad_diff = [], {}, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in VOCABS:
            tokens = tokens_that_fit(vocab)
            results = {}
            for path, chunk in [("plain", 0)] + [("chunked", c) for c in chunk_sizes]:
                name = path if path == "plain" else f"chunked/{chunk}"
                grads_file = os.path.join(tmp, f"{vocab}_{path}_{chunk}.pt")
                results[name] = run_case(__file__, vocab, path, max(chunk, 1), tokens, grads_file)
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
    table = [(v, n, name, round(r["peak_mib"]), f"{r['seconds']:.2f}", f"{r['loss']:.5f}") for v, n, name, r in rows]
    print_table(["vocab", "tokens", "path", "peak MiB", "seconds", "loss"], table)
    summary["grad_max_abs_diff"] = grad_diff
    print(summary_line(summary))


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
