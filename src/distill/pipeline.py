"""`distill run`: the stages in order, in one run folder, skipping what is already done.

    prepare   read the job, the prompts and the teacher (all input checked before anything is written)
    generate  the teacher answers every prompt           -> runs/NAME/synthetic/part-*.jsonl
    split     filter the answers, split 80/10/10          -> runs/NAME/data_summary.json
    train     build the student, distil it                -> runs/NAME/student/, training_log.jsonl
    evaluate  teacher vs student vs baselines             -> runs/NAME/metrics.json
    report                                                -> runs/NAME/report.md, report.html

Each stage is also a function of its own (and a CLI command); a rerun resumes generation where it
stopped, reuses finished data and a trained student, and resumes training from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distill.config import JobConfig
from distill.data.filters import filter_completions
from distill.data.formats import load_prompts
from distill.data.presets import get_preset
from distill.data.splits import assign_splits, split_records
from distill.data.store import CompletionStore, record_from
from distill.distributed import is_main_process, main_process_first, wait_for_everyone
from distill.errors import DistillError, GateFailed
from distill.io import atomic_dir, atomic_write_json, atomic_write_text, read_json
from distill.models import count_parameters, load_model
from distill.student import build_student
from distill.teachers.base import GenerationParams, Prompt, Teacher
from distill.teachers.local import LocalTeacher
from distill.train.data import encode_records
from distill.train.trainer import train_student

log = logging.getLogger("distill")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )


@dataclass
class Run:
    """What the stages share: the job, its folder, loaded models and per-stage timings."""

    job: JobConfig
    prompts: list[Prompt]
    teacher_model: object | None = None
    teacher_tokenizer: object | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.job.run_dir

    def stage(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 1)


# --------------------------------------------------------------------------------------------- stages


def prepare(job: JobConfig) -> Run:
    """Check every input (prompts, teacher) before the run folder is touched."""
    t0 = time.perf_counter()
    if job.training.num_threads:  # every stage: generation and evaluation too
        torch.set_num_threads(job.training.num_threads)
    prompts = load_prompts(
        job.resolve(job.data.prompts),
        columns=job.data.columns or None,
        task=job.data.task,
        limit=job.data.limit,
        system_prompt=job.teacher.system_prompt,
    )
    if len(prompts) < 3:
        raise DistillError(f"{job.data.prompts}: {len(prompts)} prompts; at least 3 are needed to split the data")
    run = Run(job=job, prompts=prompts)
    if job.teacher.backend == "local":
        run.teacher_model, run.teacher_tokenizer = load_model(
            job.teacher.model,
            dtype=job.teacher.dtype,
            device=job.teacher.device,
            trust_remote_code=job.teacher.trust_remote_code,
        )
        log.info("teacher %s: %s parameters", job.teacher.model, f"{count_parameters(run.teacher_model):,}")
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.dir / "job.yaml", yaml.safe_dump(job.model_dump(mode="json", by_alias=True), sort_keys=False))
    run.stage("prepare", time.perf_counter() - t0)
    return run


def make_teacher(run: Run) -> Teacher:
    cfg = run.job.teacher
    if cfg.backend == "local":
        return LocalTeacher(run.teacher_model, run.teacher_tokenizer, name=cfg.model, system_prompt=cfg.system_prompt)
    if cfg.backend == "openai":
        from distill.teachers.openai_api import OpenAITeacher

        return OpenAITeacher(cfg.model, cfg.api, system_prompt=cfg.system_prompt)
    from distill.teachers.vllm_teacher import VLLMTeacher

    return VLLMTeacher(
        cfg.model, system_prompt=cfg.system_prompt, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )


def generate(run: Run) -> CompletionStore:
    """The teacher answers every prompt `n` times; finished answers are kept across interruptions."""
    t0 = time.perf_counter()
    job = run.job
    params = GenerationParams.from_config(job.generation)
    meta = {
        "teacher": job.teacher.model,
        "system_prompt": job.teacher.system_prompt,
        "params": params.as_dict(),
        "prompts": _fingerprint([p.messages for p in run.prompts]),
    }
    store = CompletionStore(run.dir / "synthetic")
    changed = store.meta_diff(meta)
    if changed and store.done_ids():
        raise DistillError(
            f"{store.path}: holds answers made with other settings ({'; '.join(changed)}). "
            f"Use a new `name:` for this job, or delete that folder to regenerate."
        )
    if store.read_meta() is None or changed:
        store.write_meta(meta)
    done = store.done_ids()
    todo = [p for p in run.prompts if any(f"{p.id}-{s}" not in done for s in range(params.n))]
    total = len(run.prompts) * params.n
    if not todo:
        log.info("generate: reusing %d finished answers in %s", len(done), store.path)
        run.stage("generate", time.perf_counter() - t0)
        return store
    if done:
        log.info("generate: resuming; %d of %d answers already done", len(done), total)
    teacher = make_teacher(run)
    with progress_bar() as bar:
        task = bar.add_task("teacher answers", total=total, completed=len(done))
        by_id = {p.id: p for p in todo}
        for batch in teacher.generate(todo, params):
            fresh = [c for c in batch if c.id not in done]
            store.append([record_from(by_id[c.prompt_id], c, teacher.name, params) for c in fresh])
            bar.advance(task, len(fresh))
    run.stage("generate", time.perf_counter() - t0)
    return store


def prepare_data(job: JobConfig) -> tuple[Run, dict[str, list[dict]]]:
    """prepare, generate and split: the data every later stage starts from.

    Under a launcher the main process does the work first and the others then reuse it, as a rerun would.
    """
    with main_process_first():
        run = prepare(job)
        return run, split(run, generate(run))


def split(run: Run, store: CompletionStore) -> dict[str, list[dict]]:
    """Filter the teacher's answers and split them by prompt into train / validation / test."""
    job = run.job
    records = store.read_all()
    kept, summary = filter_completions(records, job.data.filters, get_preset(job.data.task))
    assignment = assign_splits(sorted({r["prompt_id"] for r in records}), job.data.split, job.data.seed)
    parts = split_records(kept, assignment)
    log.info(
        "data: %d answers, %d kept; train %d, validation %d, test %d",
        len(records),
        len(kept),
        *(len(parts.get(k, [])) for k in ("train", "validation", "test")),
    )
    if not parts.get("train"):
        raise DistillError(f"no training data left after filtering ({summary}); relax data.filters")
    atomic_write_json(
        run.dir / "data_summary.json",
        {
            "filters": summary.as_dict(),
            "splits": {k: len(v) for k, v in parts.items()},
        },
    )
    return parts


def train(run: Run, parts: dict[str, list[dict]]) -> Path:
    """Build the student and distil the teacher into it; returns the saved student folder."""
    import gc

    from distill.train.modes import load_extra_teachers
    from distill.train.tokenizers import head_rows
    from distill.train.trainer import check_teacher_signal

    t0 = time.perf_counter()
    job = run.job
    dist = job.distillation
    out = run.dir / "student"
    if (out / "config.json").is_file():
        log.info("train: reusing the trained student in %s", out)
        run.stage("train", time.perf_counter() - t0)
        return out
    student, tokenizer, info = initial_student(run, parts)
    size = f"{info['student_parameters']:,} parameters"
    if info["teacher_parameters"]:
        teacher_params = info["teacher_parameters"]
        size += f" (teacher {teacher_params:,}, {100 * info['student_parameters'] / teacher_params:.0f}%)"
    log.info("student: %s%s", size, f"; kept layers {info['kept_layers']}" if "kept_layers" in info else "")
    if is_main_process():
        atomic_write_json(run.dir / "student_init.json", info)
    teacher = run.teacher_model if dist.mode != "sequence" else None
    check_teacher_signal(dist, teacher=teacher is not None, cache=dist.logit_cache and teacher is not None)
    max_len = job.training.max_length
    train_ex = encode_records(tokenizer, parts["train"], max_len)
    val_ex = encode_records(tokenizer, parts.get("validation", []), max_len)
    cache, extra = None, []
    if teacher is not None and dist.logit_cache:
        with main_process_first():
            cache = cache_logits(run, parts, tokenizer)
        # The cache is the teacher signal now: free the teacher's memory for the student's training, and load it
        # again afterwards for the evaluation.
        teacher = run.teacher_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("train: teacher freed; training from the logit cache")
    elif teacher is not None and dist.extra_teachers:
        extra = load_extra_teachers(dist.extra_teachers, job.teacher, run.teacher_tokenizer, head_rows(teacher))
    model, summary = train_student(
        student,
        tokenizer,
        teacher,
        train_ex,
        val_ex,
        job.training,
        dist,
        run.dir / "training",
        teacher_tokenizer=run.teacher_tokenizer,
        extra_teachers=extra,
        logit_cache=cache,
    )
    del extra
    if is_main_process():  # every process holds the same weights after DDP training; one writes them
        with atomic_dir(out) as tmp:
            if hasattr(model, "merge_and_unload"):  # LoRA: ship merged weights
                model = model.merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        atomic_write_json(run.dir / "training_summary.json", summary)
    wait_for_everyone()  # no process returns before the student is on disk
    if run.teacher_model is None and job.teacher.backend == "local" and is_main_process():
        del model, student
        gc.collect()
        run.teacher_model, run.teacher_tokenizer = load_model(
            job.teacher.model,
            dtype=job.teacher.dtype,
            device=job.teacher.device,
            trust_remote_code=job.teacher.trust_remote_code,
        )
    run.stage("train", time.perf_counter() - t0)
    return out


def cache_logits(run: Run, parts: dict[str, list[dict]], tokenizer=None):
    """Run the teacher once over the training and validation answers and keep its top-k log-probs.

    Builds `runs/NAME/logit_cache/` or reuses it when it matches this run (tokenizer, k, data, teachers); a cache
    made for other settings is refused with what differs. `tokenizer` is the student's (default: the one the
    train stage will use); the examples are encoded with it exactly as for training.
    """
    from transformers import AutoTokenizer

    from distill.logit_cache import LogitCache, build_logit_cache, cache_settings
    from distill.models import prepare_tokenizer, resolve_reference
    from distill.train.modes import load_extra_teachers
    from distill.train.tokenizers import head_rows, shared_vocab_size

    t0 = time.perf_counter()
    job = run.job
    dist = job.distillation
    if run.teacher_model is None:
        raise DistillError("distillation.logit_cache needs a local teacher (teacher.backend: local)")
    if tokenizer is None:  # the tokenizer build_student gives the student, without building the student
        if job.student.from_ in ("teacher", "config"):
            tokenizer = run.teacher_tokenizer
        else:
            folder = resolve_reference(job.student.from_)
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    max_len = job.training.max_length
    splits = {name: encode_records(tokenizer, parts.get(name, []), max_len) for name in ("train", "validation")}
    members = [{"model": job.teacher.model, "weight": dist.teacher_weight}]
    members += [{"model": e.model, "weight": e.weight} for e in dist.extra_teachers]
    settings = cache_settings(tokenizer, splits, dist.cache_top_k, members, dist.cache_dtype)
    path = run.dir / "logit_cache"
    if (path / "cache.json").is_file():
        cache = LogitCache.open(path, settings)
        log.info("reusing logit cache %s (%d bytes per token)", path, cache.bytes_per_token)
    else:
        rows = head_rows(run.teacher_model)
        shared_vocab_size(run.teacher_tokenizer, tokenizer, rows, rows)
        teachers = [(run.teacher_model, dist.teacher_weight)]
        teachers += load_extra_teachers(dist.extra_teachers, job.teacher, run.teacher_tokenizer, rows)
        with progress_bar() as bar:
            task = bar.add_task("teacher top-k", total=sum(len(v) for v in splits.values()))
            cache = build_logit_cache(
                path,
                teachers,
                splits,
                settings,
                batch_size=job.generation.batch_size,
                chunk_size=dist.chunk_size,
                on_batch=lambda n: bar.advance(task, n),
            )
        del teachers
    run.stage("cache_logits", time.perf_counter() - t0)
    return cache


def initial_student(run: Run, parts: dict[str, list[dict]]):
    """The un-distilled student, made the same way every time (same seed, same calibration prompts)."""
    torch.manual_seed(run.job.training.seed)
    calibration = [_plain_text(r["messages"]) + " " + r["completion"] for r in parts["train"][:16]]
    return build_student(
        run.job.student,
        run.teacher_model,
        run.teacher_tokenizer,
        calibration,
        dtype=run.job.teacher.dtype,
        device=run.job.teacher.device,
    )


def evaluate(run: Run, parts: dict[str, list[dict]], student_dir: Path) -> dict:
    """Teacher vs trained student vs initial student (and baselines) on the test split."""
    from distill.evaluate.harness import evaluate_models

    t0 = time.perf_counter()
    job = run.job
    test = parts.get("test", [])[: job.evaluation.limit]
    if not test:
        raise DistillError("the test split is empty; raise data.split.test or add prompts")
    student, student_tok = load_model(str(student_dir), dtype=job.teacher.dtype, device=job.teacher.device)
    models = {"teacher": (run.teacher_model, run.teacher_tokenizer), "student": (student, student_tok)}
    if job.evaluation.include_initial_student:
        initial, initial_tok, _ = initial_student(run, parts)
        models["initial student"] = (initial.eval(), initial_tok)
    for ref in job.evaluation.baselines:
        models[ref] = load_model(ref, dtype=job.teacher.dtype, device=job.teacher.device)
    params = GenerationParams.from_config(job.generation)
    params = GenerationParams(
        **{
            **params.as_dict(),
            "temperature": 0.0,
            "n": 1,
            "logprobs": 0,
            "max_new_tokens": job.evaluation.max_new_tokens or params.max_new_tokens,
            "batch_size": job.evaluation.batch_size,
        }
    )
    general = [r["messages"] for r in parts.get("validation", [])[:8]]
    metrics = evaluate_models(
        models,
        test,
        job.evaluation,
        params,
        job.data.task,
        general_prompts=general,
        model_dirs={"student": student_dir},
    )
    run.stage("evaluate", time.perf_counter() - t0)
    metrics["run"] = {
        "name": job.name,
        "timings_s": run.timings,
        **read_json(run.dir / "training_summary.json", {}),
        "student_init": read_json(run.dir / "student_init.json", {}),
        "data": read_json(run.dir / "data_summary.json", {}),
    }
    atomic_write_json(run.dir / "metrics.json", metrics)
    return metrics


def report(run: Run, metrics: dict) -> Path:
    from distill.evaluate.compare import check_gate
    from distill.evaluate.report import write_report

    t0 = time.perf_counter()
    md, html = write_report(run.dir, metrics)
    run.stage("report", time.perf_counter() - t0)
    failed = check_gate(metrics, run.job.evaluation.gate)
    if failed:
        raise GateFailed("deploy gate failed: " + "; ".join(failed) + f". Report: {md}")
    return md


# --------------------------------------------------------------------------------------------- the job


def run_job(job: JobConfig) -> Path | None:
    """Run every stage in order; returns the report path (None on a launcher's non-main processes)."""
    if job.teacher.backend != "local":  # checked before hours of API generation, not after
        raise DistillError(
            f"distill run: the evaluate stage measures the teacher itself (KL, speed, memory), and teacher.backend: "
            f"{job.teacher.backend} does not load it. Run the stages one by one instead: `distill generate JOB`, "
            "`distill train JOB` (distillation.mode: sequence), then `distill eval --teacher <a local copy of the "
            "teacher> --student runs/NAME/student --data <prompts>`."
        )
    run, parts = prepare_data(job)
    student_dir = train(run, parts)
    if not is_main_process():  # under a launcher: the other processes only help train (see distill.distributed)
        return None
    metrics = evaluate(run, parts, student_dir)
    try:
        return report(run, metrics)
    finally:  # also when the deploy gate fails: the run itself is complete
        atomic_write_json(run.dir / "timings.json", run.timings)
        log.info("stage times (s): %s", ", ".join(f"{k} {v}" for k, v in run.timings.items()))


def _fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _plain_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)
