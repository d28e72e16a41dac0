"""Local-teacher generation throughput: our batched, length-bucketed generation vs one prompt at a time.

Run with no arguments: ``python bench/generate.py`` (``DISTILL_HOME`` pointing at a cache where the built-in teacher
is already converted saves ~40 s on the first run). Six processes (3 cases x 2 interleaved runs, ``--repeats``; the
best run of each case counts): about 8 minutes on 2 CPU cores, with 2 threads or ``--threads 1``, while other jobs
kept 1-2 of them busy. On a machine busier than that use ``--threads 1``: with 2 threads, OpenMP threads wait on
each other while descheduled, small decoding matmuls slow down 3-10x, unevenly between cases, so the ratios mean
nothing and the run can take half an hour (see ``use_threads`` in bench/_common.py).

What is measured, on the built-in teacher (SmolLM2-135M-Instruct), CUDA in bf16 when available, else CPU in fp32:

* ``ours/bN``: ``LocalTeacher.generate`` with ``batch_size`` N (16 is the job default, and 32): prompts sorted by
  length into batches, left-padded, one ``model.generate`` call per batch;
* ``one-by-one``: the plain loop a user would write first: ``model.generate`` on one chat-templated prompt at a
  time, no padding.

Both get the same 64 prompts (the first 64 ``prompt`` fields of examples/quickstart_prompts.jsonl as user messages,
rendered with the tokenizer's chat template), the same ``max_new_tokens`` (32), greedy decoding, and one short
warm-up call before the clock starts. Tokens are counted the same way for both: the answer's tokens up to and
excluding the first end-of-sequence token (the model's or the tokenizer's EOS), so tokens generated after a short
answer finished, while the rest of its batch goes on, do not count. ``tok/s`` is those tokens over the wall-clock
seconds of the whole loop (tokenising, generating and decoding all prompts), in the best of the case's runs.

``agree`` is the number of prompts whose decoded answer is identical to the one-by-one answer. Greedy decoding is
deterministic, but left padding changes the shapes of the matmuls, so near-ties in the logits can flip a token now
and then and the answer diverges from there; a few disagreements are expected, many would be a bug.

Peak memory: each case runs in a fresh subprocess; the figure is what generation adds above the loaded model (see
bench/_common.py for the method: peak RSS on CPU, ``max_memory_allocated`` on CUDA). Batching trades memory (a KV
cache per batch row) for speed.

The last line printed holds the headline figures: ``speedup`` (ours at batch 16 over one-by-one, tokens/s),
``speedup_b32``, the raw tokens/s, and the agreement.
"""

from __future__ import annotations

import json
import warnings

import torch

from _common import (
    PROMPTS_FILE,
    TEACHER,
    PeakMemory,
    Stopwatch,
    best,
    case_main,
    device_name,
    emit_case,
    load_average,
    pick_device,
    print_table,
    run_cases,
    summary_line,
)
from distill.models import load_model
from distill.teachers.base import GenerationParams, Prompt
from distill.teachers.local import LocalTeacher

N_PROMPTS = 64
MAX_NEW_TOKENS = 32
BATCH_SIZES = (16, 32)


def load_prompts(n: int = N_PROMPTS) -> list[str]:
    with PROMPTS_FILE.open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:n]


def stop_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def run_ours(model, tokenizer, prompts: list[str], batch_size: int) -> tuple[list[str], list[int]]:
    """``LocalTeacher.generate``: answers (decoded) and answer token counts, in prompt order."""
    teacher = LocalTeacher(model, tokenizer)
    params = GenerationParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, batch_size=batch_size)
    todo = [Prompt(id=str(i), messages=[{"role": "user", "content": p}]) for i, p in enumerate(prompts)]
    done = {c.prompt_id: c for batch in teacher.generate(todo, params) for c in batch}
    answers = [done[str(i)] for i in range(len(prompts))]
    return [c.text for c in answers], [c.completion_tokens for c in answers]


@torch.inference_mode()
def run_one_by_one(model, tokenizer, prompts: list[str]) -> tuple[list[str], list[int]]:
    """The peer: a plain loop of ``model.generate`` calls, one unpadded prompt each."""
    stops = stop_ids(model, tokenizer)
    texts, counts = [], []
    for p in prompts:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), len(new))
        texts.append(tokenizer.decode(new[:end], skip_special_tokens=True).strip())
        counts.append(end)
    return texts, counts


def child(case: str) -> None:
    """One measured case in its own process; prints one JSON line."""
    warnings.filterwarnings("ignore")
    device, dtype = pick_device()
    model, tokenizer = load_model(TEACHER, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    prompts = load_prompts()
    if case == "one-by-one":
        run = lambda ps: run_one_by_one(model, tokenizer, ps)  # noqa: E731
    else:
        batch_size = int(case.removeprefix("ours/b"))
        run = lambda ps: run_ours(model, tokenizer, ps, batch_size)  # noqa: E731
    run(prompts[:2])  # warm-up: first-call kernel and allocator set-up is not generation speed
    meter = PeakMemory(device)
    meter.start()
    with Stopwatch(device) as clock:
        texts, counts = run(prompts)
    emit_case(
        {
            "texts": texts,
            "tokens": sum(counts),
            "seconds": clock.seconds,
            "peak_mib": meter.peak_bytes() / 2**20,
            "method": meter.method,
        }
    )


def main(repeats: int) -> None:
    print(
        f"teacher generation: {N_PROMPTS} prompts, max_new_tokens={MAX_NEW_TOKENS}, greedy, "
        f"{TEACHER} on {device_name()} ({'bf16' if torch.cuda.is_available() else 'fp32'}), best of {repeats}"
    )
    print(f"at start: {load_average()}")
    cases = ["one-by-one", *(f"ours/b{b}" for b in BATCH_SIZES)]
    runs = run_cases(__file__, {case: (case,) for case in cases}, repeats)
    print(f"at end:   {load_average()}")
    # Time: the best run; memory: the largest (it does not depend on the machine's load).
    results = {c: {**best(runs[c], "seconds"), "peak_mib": max(r["peak_mib"] for r in runs[c])} for c in cases}
    base = results["one-by-one"]
    rows = []
    for case in cases:
        res = results[case]
        res["tok_s"] = res["tokens"] / res["seconds"]
        res["agree"] = sum(a == b for a, b in zip(res["texts"], base["texts"], strict=True))
        all_seconds = " ".join(f"{r['seconds']:.1f}" for r in runs[case])
        speedup = res["tok_s"] / base["tok_s"]
        agree = f"{res['agree']}/{N_PROMPTS}"
        rows.append([case, res["tokens"], res["seconds"], all_seconds, res["tok_s"], speedup, agree, res["peak_mib"]])
    print(f"memory method: {base['method']}")
    print_table(["case", "tokens", "best s", "all runs s", "tok/s", "speedup", "agree", "peak MiB"], rows)
    for b in BATCH_SIZES:
        ours = results[f"ours/b{b}"]
        differ = [i for i, (a, ref) in enumerate(zip(ours["texts"], base["texts"], strict=True)) if a != ref]
        for i in differ[:3]:  # a few examples: where the answers part ways
            print(f"b{b} differs at prompt {i}:\n  ours:       {ours['texts'][i]!r}")
            print(f"  one-by-one: {base['texts'][i]!r}")
    ours, ours32 = results[f"ours/b{BATCH_SIZES[0]}"], results[f"ours/b{BATCH_SIZES[1]}"]
    figures = {
        "speedup": ours["tok_s"] / base["tok_s"],
        "speedup_b32": ours32["tok_s"] / base["tok_s"],
        "ours_tok_s": ours["tok_s"],
        "ours_b32_tok_s": ours32["tok_s"],
        "baseline_tok_s": base["tok_s"],
        "agreement": ours["agree"] / N_PROMPTS,
        "agreement_b32": ours32["agree"] / N_PROMPTS,
    }
    print(summary_line(figures))


if __name__ == "__main__":
    case_main(__doc__.splitlines()[0], main, child)
