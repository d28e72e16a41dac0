"""`evaluate_models`: teacher, student and baselines through one harness on the same test prompts.

The stages, in order:

1. every model answers every prompt, greedy, same length and batch (`teachers.local.generate_texts`);
   the teacher's fresh answers become "the teacher's answer" that fidelity is measured against;
2. quality against the gold `reference` (where records have one) and fidelity to the teacher;
3. one teacher-forced pass over the teacher's answers (perplexity, KL, top-1 for every model) and
   one over the references (perplexity);
4. efficiency, one model at a time, on a few short prompts;
5. health of every model's answers, and the forgetting check (student vs initial student);
6. the comparison against the teacher and the gate verdict.

The returned dict is `metrics.json`: `meta` (task, roles, main metric, settings), `models` (per model:
`main`, `quality` against the gold reference, `fidelity` to the teacher, `efficiency`), `comparison`
(ratios against the teacher and the gate), `health` (per model, plus `forgetting`) and `samples`
(every prompt with every model's answer).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import EvaluationConfig, GateConfig
from distill.data.presets import TaskPreset, get_preset
from distill.errors import DistillError, GateFailed
from distill.evaluate.compare import check_gate, compare_models, gate_summary
from distill.evaluate.efficiency import measure_efficiency
from distill.evaluate.quality import answer_health, exact_match, rouge, teacher_forced_stats, text_metrics
from distill.teachers.base import GenerationParams, Message
from distill.teachers.local import generate_texts

log = logging.getLogger("distill")

INITIAL_STUDENT = "initial student"  # the key of the un-distilled student in `models`
EFFICIENCY_NEW_TOKENS = 32
TEACHER_FORCED_BATCH = 4  # full-vocab logits of two models at once: keep eval batches small

Models = dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def evaluate_models(
    models: Models,
    records: list[dict],
    cfg: EvaluationConfig,
    params: GenerationParams,
    task: str,
    teacher: str = "teacher",
    student: str = "student",
    general_prompts: list[list[dict]] | None = None,
    model_dirs: dict[str, Path] | None = None,
    progress: bool = True,
) -> dict:
    """Measure every model in `models` on `records` (the test split) and compare each with the teacher.

    `records` hold `messages` (the prompt), optionally `reference` (gold) and `completion` (the
    teacher's stored answer). Generation is greedy with `cfg.max_new_tokens` (else
    `params.max_new_tokens`) and `cfg.batch_size`. Returns the content of `metrics.json`.
    """
    if teacher not in models:
        raise DistillError(f"evaluation: no model named {teacher!r} among {sorted(models)}; it is the teacher.")
    records = records[: cfg.limit] if cfg.limit else records
    if not records:
        raise DistillError("evaluation: the test split is empty. Give data.split.test a larger share or add prompts.")
    for i, r in enumerate(records):
        if not r.get("messages"):
            raise DistillError(f"evaluation: test record {i} has no 'messages'; expected a list of chat messages.")
    preset = get_preset(task)
    started = time.perf_counter()
    gen = replace(
        params,
        temperature=0.0,
        n=1,
        logprobs=0,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens or params.max_new_tokens,
    )
    names = [teacher, *[n for n in models if n != teacher]]
    conversations = [r["messages"] for r in records]
    references = [r.get("reference") or None for r in records]

    with _progress(progress) as bar:
        outputs = {n: _generate(bar, n, *models[n], conversations, gen) for n in names}
        answers = {n: [text for text, *_ in outputs[n]] for n in names}
        reasons = {n: [reason for _, reason, *_ in outputs[n]] for n in names}

        main_name, main_against = _main_metric(preset, references)
        per_model = {
            n: _quality(preset, answers[n], answers[teacher], references, n == teacher, main_name, main_against)
            for n in names
        }
        _step(bar, "teacher-forced pass over the teacher's answers")
        on_teacher = teacher_forced_stats(models, conversations, answers[teacher], teacher, TEACHER_FORCED_BATCH)
        with_ref = [i for i, r in enumerate(references) if r]
        on_reference = {}
        if with_ref:
            _step(bar, "teacher-forced pass over the references")
            on_reference = teacher_forced_stats(
                models,
                [conversations[i] for i in with_ref],
                [references[i] for i in with_ref],
                None,
                TEACHER_FORCED_BATCH,
            )
        for n in names:
            q, f = per_model[n]["quality"], per_model[n]["fidelity"]
            q["perplexity_teacher_answers"] = on_teacher[n].perplexity
            q["perplexity_reference"] = on_reference[n].perplexity if on_reference else None
            if f is not None:
                st = on_teacher[n]
                f.update(kl_per_token=st.mean_kl, top1_agreement=st.top1_agreement, tokens_compared=st.compared)
                if st.skipped:  # e.g. a baseline with another tokenizer: no token-level comparison possible
                    f["not_compared"] = {"prompts": len(st.skipped), "first_reason": st.skipped[0]}

        # A few short prompts keep the efficiency runs cheap; every model gets the same ones.
        shortest = sorted(range(len(conversations)), key=lambda i: len(prompt_text(conversations[i])))
        few = [conversations[i] for i in shortest[: max(1, min(len(conversations), cfg.batch_size))]]
        new_tokens = min(EFFICIENCY_NEW_TOKENS, gen.max_new_tokens)
        for n in names:
            _step(bar, f"efficiency: {n}")
            per_model[n]["efficiency"] = measure_efficiency(
                *models[n],
                few,
                batch_size=cfg.batch_size,
                repeats=cfg.latency_repeats,
                new_tokens=new_tokens,
                model_dir=(model_dirs or {}).get(n),
            )
        health = {"models": {n: answer_health(answers[n], reasons[n]) for n in names}}
        health["forgetting"] = _forgetting(bar, models, student, general_prompts, gen)

    metrics: dict = {
        "meta": {
            "task": preset.name,
            "teacher": teacher,
            "student": student,
            "models": names,
            "roles": {n: _role(n, teacher, student) for n in names},
            "n_prompts": len(records),
            "n_with_reference": len(with_ref),
            "main_metric": {"name": main_name, "against": main_against, "higher_is_better": True},
            "generation": gen.as_dict(),
            "efficiency_prompts": len(few),  # the shortest test prompts, by characters
            "samples_in_report": cfg.samples_in_report,
            "stored_completions": _stored_agreement(records, answers[teacher]),
            "device": str(models[teacher][0].device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "models": per_model,
    }
    metrics["comparison"] = compare_models(per_model, teacher, main_name, cfg.price_per_hour)
    metrics["comparison"]["gate"] = gate_summary(metrics, cfg.gate)
    metrics["health"] = health
    metrics["samples"] = [
        {
            "prompt": prompt_text(r["messages"]),
            "reference": r.get("reference"),
            "stored_completion": r.get("completion"),
            "answers": {n: answers[n][i] for n in names},
            "finish_reasons": {n: reasons[n][i] for n in names},
        }
        for i, r in enumerate(records)
    ]
    metrics["meta"]["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def prompt_text(messages: list[Message]) -> str:
    """A prompt for people: the user's message alone, or `role: content` lines when there are several."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _role(name: str, teacher: str, student: str) -> str:
    return {teacher: "teacher", student: "student", INITIAL_STUDENT: "initial student"}.get(name, "baseline")


def _main_metric(preset: TaskPreset, references: list[str | None]) -> tuple[str, str]:
    """(metric, what it is scored against). Without any gold reference the teacher's answer stands in for it."""
    metric = "exact_match" if preset.metric == "exact_match" else "rougeL"
    return metric, "reference" if any(references) else "teacher"


def _quality(
    preset: TaskPreset,
    answers: list[str],
    teacher_answers: list[str],
    references: list[str | None],
    is_teacher: bool,
    main_name: str,
    main_against: str,
) -> dict:
    """Quality against gold references, fidelity to the teacher's answers, and the main metric's value."""
    with_ref = [i for i, r in enumerate(references) if r]
    quality: dict = {"n": len(answers), "n_with_reference": len(with_ref)}
    if with_ref:
        preds, refs = [answers[i] for i in with_ref], [references[i] for i in with_ref]
        quality.update(text_metrics(preds, refs))
        if preset.metric == "exact_match":
            quality["exact_match"] = exact_match(preds, refs, preset.extract_answer)
    fidelity = None
    if not is_teacher:
        fidelity = {
            "exact_agreement": _agreement(preset, answers, teacher_answers),
            **text_metrics(answers, teacher_answers),
        }
    if main_against == "reference":
        main = quality.get(main_name)
    elif main_name == "exact_match":
        main = exact_match(answers, teacher_answers, preset.extract_answer)
    else:
        main = rouge(answers, teacher_answers)["rougeL"]
    return {"main": main, "quality": quality, "fidelity": fidelity}


def _agreement(preset: TaskPreset, answers: list[str], teacher_answers: list[str]) -> float:
    """Share of prompts where the model gives the teacher's answer: the extracted final answer for exact-match
    tasks, else the whole text with whitespace normalised."""
    if preset.metric == "exact_match":
        return exact_match(answers, teacher_answers, preset.extract_answer)
    same = sum(" ".join(a.split()) == " ".join(t.split()) for a, t in zip(answers, teacher_answers, strict=True))
    return same / len(answers)


def _stored_agreement(records: list[dict], fresh: list[str]) -> dict | None:
    """How close the teacher's fresh answers are to the ones stored at generation time (dtype, batch and
    backend differences show up here)."""
    pairs = [(r["completion"], fresh[i]) for i, r in enumerate(records) if r.get("completion")]
    if not pairs:
        return None
    stored, now = zip(*pairs, strict=True)
    same = sum(a.strip() == b.strip() for a, b in pairs) / len(pairs)
    return {"n": len(pairs), "identical": same, "rougeL": rouge(list(now), list(stored))["rougeL"]}


def _forgetting(
    bar: Progress | None,
    models: Models,
    student: str,
    general_prompts: list[list[dict]] | None,
    gen: GenerationParams,
) -> dict:
    """Did distillation damage the student's general behaviour? Student vs initial student on general prompts.

    Reports each one's answer health, how much their answers overlap (ROUGE-L), and the mean per-token
    KL(initial || student) on the initial student's own answers: how far the student's distribution
    moved from where it started, on text the initial student would write.
    """
    if not general_prompts:
        return {"skipped": "no general prompts given"}
    missing = [n for n in (student, INITIAL_STUDENT) if n not in models]
    if missing:
        return {"skipped": f"no {' or '.join(repr(n) for n in missing)} model to compare"}
    pair = {INITIAL_STUDENT: models[INITIAL_STUDENT], student: models[student]}
    outs = {n: _generate(bar, f"{n} (general prompts)", *pair[n], general_prompts, gen) for n in pair}
    texts = {n: [o[0] for o in outs[n]] for n in pair}
    _step(bar, "forgetting: teacher-forced pass")
    st = teacher_forced_stats(pair, general_prompts, texts[INITIAL_STUDENT], INITIAL_STUDENT, TEACHER_FORCED_BATCH)
    result = {
        "n_prompts": len(general_prompts),
        "health": {n: answer_health(texts[n], [o[1] for o in outs[n]]) for n in pair},
        "rougeL_student_vs_initial": rouge(texts[student], texts[INITIAL_STUDENT])["rougeL"],
        "kl_initial_to_student": st[student].mean_kl,
        "top1_agreement": st[student].top1_agreement,
        "perplexity_of_initial_answers": {n: st[n].perplexity for n in pair},
    }
    h, h0 = result["health"][student], result["health"][INITIAL_STUDENT]
    kl = result["kl_initial_to_student"]
    result["summary"] = (
        f"On {len(general_prompts)} general prompts the student's answers overlap the initial student's by "
        f"ROUGE-L {result['rougeL_student_vs_initial']:.2f}; "
        + (f"per-token KL(initial || student) is {kl:.3f} nats; " if kl is not None else "")
        + f"repetitive answers {h['repetitive_rate']:.0%} (initial {h0['repetitive_rate']:.0%}), "
        f"empty {h['empty_rate']:.0%} (initial {h0['empty_rate']:.0%})."
    )
    return result


# --------------------------------------------------------------------------------------------- progress


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        yield bar


def _generate(
    bar: Progress | None,
    label: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    gen: GenerationParams,
) -> list[tuple[str, str, int, int]]:
    task = bar.add_task(f"answering: {label}", total=len(conversations)) if bar else None
    on_batch = (lambda k: bar.advance(task, k)) if bar else None
    return generate_texts(model, tokenizer, conversations, gen, on_batch=on_batch)


def _step(bar: Progress | None, label: str) -> None:
    log.debug("evaluation: %s", label)
    if bar:
        bar.console.log(label)


def evaluate_file(
    *,
    teacher: str,
    student: str,
    data: Path,
    baselines: Sequence[str] = (),
    task: str = "conversation",
    limit: int | None = None,
    max_new_tokens: int = 64,
    out_dir: Path = Path("runs/eval"),
    min_retention: float | None = None,
    min_speedup: float | None = None,
) -> Path:
    """`distill eval`: compare a student with its teacher (and baselines) on any prompt file; returns report.md.

    Raises `GateFailed` naming every missed threshold (after the report is written).
    """
    from distill.data.formats import load_prompts
    from distill.evaluate.report import write_report
    from distill.io import atomic_write_json
    from distill.models import load_model, resolve_reference

    prompts = load_prompts(data, task=task, limit=limit)
    records = [{"messages": p.messages, "reference": p.reference} for p in prompts]
    refs = {"teacher": teacher, "student": student, **{b: b for b in baselines}}
    dirs = {name: resolve_reference(ref) for name, ref in refs.items()}  # resolve once: size on disk + loading
    models = {name: load_model(str(folder)) for name, folder in dirs.items()}
    cfg = EvaluationConfig(
        max_new_tokens=max_new_tokens, gate=GateConfig(min_retention=min_retention, min_speedup=min_speedup)
    )
    params = GenerationParams(max_new_tokens=max_new_tokens, batch_size=cfg.batch_size)
    metrics = evaluate_models(models, records, cfg, params, task, model_dirs=dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    md, _ = write_report(out_dir, metrics)
    failed = check_gate(metrics, cfg.gate)
    if failed:
        raise GateFailed("deploy gate failed: " + "; ".join(failed) + f". Report: {md}")
    return md
