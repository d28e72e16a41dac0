"""The job file: one YAML document describing a whole distillation, typed and validated once.

Every field is declared here with its documentation (`distill config` prints them). Loading
collects *every* problem at once and reports each with its dotted path and, when known, the
YAML line it came from::

    job.yaml: 2 problems
      line 14  training.learning_rate: must be > 0, got -1
      line 3   teacher.modle: unknown field (did you mean 'model'?)

Command-line overrides use the same paths: `distill run job.yaml training.max_steps=10`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import DistillError

BUILTIN_TEACHER = "builtin:smollm2-135m-instruct"


class Section(BaseModel):
    """Base of every config section: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# --------------------------------------------------------------------------------------------- teacher


class ApiConfig(Section):
    """Settings of an OpenAI-compatible HTTP teacher (`teacher.backend: openai`)."""

    base_urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/v1"],
        description="One or more `.../v1` base URLs; several are used round-robin.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable holding the API key.")
    concurrency: int = Field(8, gt=0, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side request rate limit.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Client-side token rate limit.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one request, in seconds.")
    max_retries: int = Field(6, ge=0, description="Retries on 429, 5xx, timeouts and dropped connections.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Ask the server for this many top log-probs per token.")


class TeacherConfig(Section):
    """The model whose behaviour the student learns."""

    model: str = Field(
        BUILTIN_TEACHER,
        description="Model reference: `builtin:NAME`, a local Hugging Face folder, a `.gguf` file, a hub id, "
        "or the served model name for `backend: openai`.",
    )
    backend: Literal["local", "openai", "vllm"] = Field("local", description="Who runs the teacher.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: `auto` is bfloat16 on CUDA and float32 on CPU."
    )
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the weights. Off by default.")
    system_prompt: str | None = Field(None, description="System message put before every prompt.")
    api: ApiConfig = Field(default_factory=ApiConfig, description="HTTP settings for `backend: openai`.")


# --------------------------------------------------------------------------------------------- student


class LoraConfig(Section):
    """Train low-rank adapters instead of all weights (via `peft`)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Adapter scaling numerator.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field("all-linear", description="Modules that get adapters.")


class StudentConfig(Section):
    """How the student is made."""

    from_: str = Field(
        "teacher",
        alias="from",
        description="`teacher`: a depth-pruned copy of the teacher; `config`: a fresh model from the teacher's "
        "config with the overrides below; anything else: a model reference loaded as is.",
    )
    layers: int | list[int] | None = Field(
        None, description="With `from: teacher`: how many layers to keep, or the exact teacher layer indices."
    )
    layer_selection: Literal["uniform", "importance"] = Field(
        "importance",
        description="With `from: teacher` and a layer count: `uniform` spreads kept layers evenly; `importance` "
        "keeps the layers that change the hidden state most on the training prompts (ShortGPT block influence).",
    )
    hidden_size: int | None = Field(None, gt=0, description="With `from: config`: hidden size override.")
    num_attention_heads: int | None = Field(None, gt=0, description="With `from: config`: attention heads.")
    num_key_value_heads: int | None = Field(None, gt=0, description="With `from: config`: key/value heads.")
    intermediate_size: int | None = Field(None, gt=0, description="With `from: config`: MLP width.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of the full student.")

    @field_validator("layers")
    @classmethod
    def _layers_positive(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        if isinstance(v, list) and (not v or any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError(f"must be a non-empty list of distinct layer indices >= 0, got {v}")
        return v


# --------------------------------------------------------------------------------------------- data


class SplitConfig(Section):
    """Deterministic train/validation/test fractions; all samples of one prompt share a split."""

    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1, got {total:g}")
        return self


class FilterConfig(Section):
    """Checks applied to teacher outputs before training; each drop is counted in the summary."""

    drop_empty: bool = Field(True, description="Drop empty or whitespace-only answers.")
    drop_truncated: bool = Field(False, description="Drop answers cut at `max_new_tokens` (finish reason `length`).")
    drop_repetitive: bool = Field(True, description="Drop answers caught in a repeated n-gram loop.")
    min_chars: int = Field(1, ge=0, description="Drop answers shorter than this many characters.")
    max_chars: int | None = Field(None, gt=0, description="Drop answers longer than this many characters.")
    regex: str | None = Field(None, description="Keep only answers matching this regular expression.")
    json_schema: dict[str, Any] | None = Field(None, description="Keep only answers that are JSON valid here.")
    dedupe: Literal["none", "exact", "near"] = Field("exact", description="Drop duplicate answers to a prompt.")
    match_reference: bool = Field(
        False, description="Rejection sampling: keep only answers whose extracted final answer equals the gold one."
    )


class DataConfig(Section):
    """Where the prompts come from and how they are shaped."""

    prompts: str = Field(
        "examples/quickstart_prompts.jsonl",
        description="Prompt file (JSONL, JSON, CSV, Parquet) or a saved Hugging Face dataset folder; relative "
        "paths are resolved against the job file's folder.",
    )
    task: Literal["conversation", "qa", "summarization", "classification", "nli", "math"] = Field(
        "conversation", description="Task preset: prompt template, answer extraction and default metric."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Explicit column mapping, e.g. `{prompt: question, reference: answer}`."
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N prompts.")
    seed: int = Field(0, description="Seed of the split.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)


# --------------------------------------------------------------------------------------------- generation


class GenerationConfig(Section):
    """How the teacher writes the synthetic answers."""

    max_new_tokens: int = Field(128, gt=0, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k sampling.")
    n: int = Field(1, gt=0, description="Samples per prompt.")
    seed: int = Field(0)
    batch_size: int = Field(16, gt=0, description="Prompts per batch for local teachers.")
    logprobs: int = Field(0, ge=0, description="Store this many top log-probs per generated token (0: none).")


# --------------------------------------------------------------------------------------------- distillation


class TransferPair(Section):
    """One intermediate-layer transfer term."""

    teacher: int = Field(description="Teacher layer index.")
    student: int = Field(description="Student layer index.")
    loss: Literal["mse", "cosine", "attention"] = Field("cosine")
    weight: float = Field(1.0, ge=0)


class ExtraTeacher(Section):
    """A further teacher for multi-teacher distillation (same tokenizer as the main teacher)."""

    model: str
    weight: float = Field(1.0, gt=0)


class DistillationConfig(Section):
    """What the student learns from the teacher."""

    mode: Literal["logit", "sequence", "on_policy"] = Field(
        "logit",
        description="`logit`: match the teacher's token distributions on its answers (+ CE); `sequence`: SFT on the "
        "teacher's text; `on_policy`: the student also learns on its own samples scored by the teacher (GKD).",
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"] = Field(
        "forward_kl", description="Divergence between teacher and student token distributions."
    )
    temperature: float = Field(2.0, gt=0, description="Softening temperature T; the KD term is scaled by T^2.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term; 1 - alpha goes to hard-label CE.")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD interpolation (0 forward KL, 1 reverse KL).")
    skew: float = Field(0.1, ge=0, le=1, description="Skew lambda of skew KL divergences.")
    chunk_size: int = Field(
        256, gt=0, description="Valid positions per chunk of the fused loss; smaller uses less memory."
    )
    on_policy_fraction: float = Field(
        0.5, ge=0, le=1, description="With `mode: on_policy`: fraction of samples the student generates (GKD lambda)."
    )
    on_policy_sampling: Literal["sample", "greedy"] = Field(
        "sample",
        description="How the student writes its on-policy answers: `sample` from its own distribution at T = 1 "
        "(GKD), or `greedy`.",
    )
    logit_cache: bool = Field(False, description="Cache the teacher's top-k log-probs once and train from the cache.")
    cache_top_k: int = Field(64, gt=0, description="Log-probs kept per position in the logit cache.")
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage of cached log-probs: float16 (6 bytes per target with its id) or float32."
    )
    transfer: list[TransferPair] = Field(default_factory=list, description="Hidden-state / attention transfer pairs.")
    extra_teachers: list[ExtraTeacher] = Field(default_factory=list, description="Multi-teacher mixture members.")
    teacher_weight: float = Field(
        1.0,
        gt=0,
        description="Weight of the main teacher in a mixture with `extra_teachers` (weights are renormalised).",
    )


# --------------------------------------------------------------------------------------------- training


class TrainingConfig(Section):
    """Optimisation of the student."""

    max_steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("cosine")
    max_length: int = Field(256, gt=8, description="Longest training sequence (prompt + answer), in tokens.")
    group_by_length: bool = Field(
        False,
        description="Batch sequences of similar length (transformers' LengthGroupedSampler): less padding, so less "
        "teacher and student compute per step, for data whose lengths vary a lot. Batches are then less random.",
    )
    eval_every: int = Field(25, gt=0, description="Validation loss every N steps.")
    save_every: int = Field(50, gt=0, description="Checkpoint every N steps (for resume).")
    early_stopping_patience: int | None = Field(None, gt=0, description="Stop after N evaluations without progress.")
    gradient_checkpointing: bool = Field(False)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="`auto`: bf16 on CUDA, fp32 else.")
    seed: int = Field(0)
    num_threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for torch in every stage (default: all cores). Use 1 on a busy machine: "
        "idle OpenMP threads spin and can make small-batch work many times slower.",
    )


# --------------------------------------------------------------------------------------------- evaluation


class GateConfig(Section):
    """Deploy gate: the run fails (non-zero exit) when a threshold is missed."""

    min_retention: float | None = Field(None, gt=0, description="Student / teacher on the main quality metric.")
    min_speedup: float | None = Field(None, gt=0, description="Student / teacher decode tokens per second.")
    max_memory_ratio: float | None = Field(None, gt=0, description="Student / teacher peak memory.")


class EvaluationConfig(Section):
    """Teacher vs student vs baselines on the held-back test split."""

    max_new_tokens: int | None = Field(None, gt=0, description="Answer length (default: generation.max_new_tokens).")
    limit: int | None = Field(None, gt=0, description="Evaluate on at most N test prompts.")
    baselines: list[str] = Field(default_factory=list, description="Further model references to compare.")
    include_initial_student: bool = Field(True, description="Compare against the un-distilled initial student.")
    batch_size: int = Field(8, gt=0, description="Batch for generation and the throughput figure.")
    latency_repeats: int = Field(3, gt=0, description="Timed repeats per efficiency figure (after one warm-up).")
    price_per_hour: float = Field(1.0, ge=0, description="Hardware price per hour, for the cost per 1M tokens.")
    samples_in_report: int = Field(5, ge=0, description="Side-by-side sample answers shown in the report.")
    gate: GateConfig = Field(default_factory=GateConfig)


# --------------------------------------------------------------------------------------------- job


class OutputConfig(Section):
    """Where results go."""

    dir: str = Field("runs", description="Parent folder of run folders; relative to the working directory.")


class JobConfig(Section):
    """A whole distillation job."""

    name: str = Field("distill", pattern=r"^[A-Za-z0-9._-]+$", description="Run name: the folder under output.dir.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    # Where the job file lives: relative data paths resolve against it. Not part of the file.
    base_dir: Annotated[Path, Field(exclude=True)] = Path(".")

    def resolve(self, path: str) -> Path:
        """A path from the job file, made absolute relative to the job file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir).expanduser().resolve() / self.name


# --------------------------------------------------------------------------------------------- loading


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job file; raise one `DistillError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: job file not found. Pass a YAML job file, e.g. examples/quickstart.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise DistillError(f"{path}:{where}: not valid YAML: {problem}. Fix the syntax there.") from None
    if not isinstance(data, dict):
        raise DistillError(f"{path}: the job file must be a mapping of sections (teacher:, student:, ...).")
    for item in overrides or []:
        apply_override(data, item)
    return validate_job(data, source=path, text=text, base_dir=path.parent.resolve())


def validate_job(data: dict, source: str | Path = "<job>", text: str | None = None, base_dir: Path | None = None):
    """Validate a job mapping; every problem is reported together, with its dotted path and YAML line."""
    lines = _yaml_lines(text) if text else {}
    try:
        job = JobConfig.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err, lines) for err in e.errors()]
    else:
        problems = [_located(loc, msg, lines) for loc, msg in _combination_problems(job)]
    if problems:
        problems.sort(key=_line_key)
        head = f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise DistillError(head + "\n" + "\n".join(f"  {p}" for p in problems))
    if base_dir is not None:
        job.base_dir = base_dir
    return job


Problem = tuple[tuple[str, ...], str]
"""A problem with a job's settings: the dotted path of the field it points at, and what is wrong."""


def teacher_signal_problems(
    dist: DistillationConfig, *, teacher: bool, cache: bool, targets_in_data: bool = False
) -> list[Problem]:
    """Combinations of mode, teacher, logit cache and transfer that cannot work; the one home of these rules.

    Args:
        teacher: a teacher model is (or will be) in memory for training.
        cache: training reads the teacher's targets from a logit cache.
        targets_in_data: the examples carry their own sparse teacher targets.
    """
    problems = []
    if dist.mode == "on_policy" and cache:
        problems.append(
            (
                ("distillation", "logit_cache"),
                "mode: on_policy scores the student's own answers with the live teacher, so it cannot train from a "
                "logit cache; set logit_cache: false",
            )
        )
    if dist.transfer and (not teacher or cache or dist.mode == "sequence"):
        problems.append(
            (
                ("distillation", "transfer"),
                "needs the teacher's layers in memory during training: use mode: logit or on_policy with a local "
                "teacher and logit_cache: false",
            )
        )
    if dist.mode != "sequence" and dist.alpha > 0 and not (teacher or cache or targets_in_data):
        problems.append(
            (
                ("distillation", "mode"),
                f"{dist.mode} needs the teacher's token distributions: a local teacher (teacher.backend: local) or "
                "its logit cache; with a teacher that only gives text (an API) use mode: sequence",
            )
        )
    return problems


def _combination_problems(job: JobConfig) -> list[Problem]:
    """Settings that are valid one by one but cannot work together, caught before any stage runs (an API
    teacher's generation can take hours; a combination that fails at training should fail here instead)."""
    local = job.teacher.backend == "local"
    problems = teacher_signal_problems(job.distillation, teacher=local, cache=job.distillation.logit_cache and local)
    if not local and job.student.from_ in ("teacher", "config"):
        problems.append(
            (
                ("student", "from"),
                f"{job.student.from_} builds the student from the teacher's weights, which teacher.backend: "
                f"{job.teacher.backend} does not load; give a model reference (a local folder or a .gguf file)",
            )
        )
    return problems


def _located(loc: tuple[str, ...], msg: str, lines: dict[tuple, int]) -> str:
    line = _line_for(loc, lines)
    return f"{'line ' + str(line) if line else '':<9}{'.'.join(loc)}: {msg}"


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw job mapping."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise DistillError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. training.max_steps=10")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise DistillError(f"override {item!r}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def _describe(err: dict, lines: dict[tuple, int]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    path = ".".join(loc) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown field"
        section = _section_for(loc[:-1])
        if section is not None:
            names = [f.alias or n for n, f in section.model_fields.items() if n != "base_dir"]
            close = difflib.get_close_matches(loc[-1], names, n=1)
            msg += f" (did you mean '{close[0]}'?)" if close else f"; known fields: {', '.join(names)}"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg.replace("Input should be greater than", "must be >").replace("Input should be", "must be")
        if kind != "missing" and "got" not in msg and "input" in err and not isinstance(err["input"], dict):
            msg += f", got {err['input']!r}"
    return _located(loc, msg, lines) if loc else f"{'':<9}{path}: {msg}"


def _line_key(problem: str) -> int:
    head = problem.split()[:2]
    return int(head[1]) if head and head[0] == "line" else 0


def _section_for(loc: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = JobConfig
    for part in loc:
        field = model.model_fields.get(part) or next((f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return model


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number (for error messages)."""
    out: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, str(k.value))
                out[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = (*path, str(i))
                out[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return out


def _line_for(loc: tuple[str, ...], lines: dict[tuple, int]) -> int | None:
    # Nested model errors carry the path of the failing field; fall back to the closest parent in the file.
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def describe_fields(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(path, default, description) for every field, for `distill config` and the docs."""
    rows = []
    for name, field in model.model_fields.items():
        if name == "base_dir":
            continue
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner and getattr(ann, "__origin__", None) is not list:
            rows.append((key, "", field.description or (inner[0].__doc__ or "").strip().splitlines()[0]))
            rows.extend(describe_fields(inner[0], key + "."))
        else:
            default = "" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((key, default, field.description or ""))
    return rows
