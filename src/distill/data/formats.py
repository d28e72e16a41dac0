"""Prompt files -> `Prompt`s: the file formats and record shapes people already have.

Formats: JSONL, JSON (a list of objects, or `{"data": [...]}`), CSV/TSV, Parquet, and a folder saved
with `datasets.save_to_disk`. Record shapes, detected per record (first match wins):

    messages                         chat list; a final assistant message becomes the reference
    prompt (+ completion)            `prompt` is a string or a chat list (TRL's prompt/completion)
    instruction (+ input, output)    Alpaca: input goes after the instruction, after a blank line
    instruction + context/response   Dolly
    question (+ answer)              GSM8K and most QA sets

`data.columns` (keys `prompt`, `reference`, `system`, `id`) names the source columns explicitly and
overrides detection. Ids come from an `id` column, else from a hash of the final prompt messages, so
the same file always gives the same ids; repeated prompts are kept once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import DataConfig
from distill.data.presets import TaskPreset, get_preset
from distill.errors import DistillError
from distill.teachers.base import Message, Prompt

log = logging.getLogger(__name__)

COLUMN_KEYS = ("prompt", "reference", "system", "id")
ROLES = ("system", "user", "assistant")
SHAPES_HELP = (
    "`messages` (chat list); `prompt` (+ `completion`); `instruction` + `input`/`output` (Alpaca); "
    "`instruction` + `context`/`response` (Dolly); `question` (+ `answer`)"
)
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class PromptFile:
    """What `read_prompts` found: the prompts plus counts worth telling the user."""

    path: Path
    format: str  # jsonl | json | csv | tsv | parquet | hf
    prompts: list[Prompt]
    duplicates: int = 0  # records whose prompt repeated an earlier one (dropped)
    shapes: Counter = field(default_factory=Counter)  # shape name -> records


def load_prompts(
    path: str | Path,
    columns: dict[str, str] | None = None,
    task: str | TaskPreset = "conversation",
    limit: int | None = None,
    system_prompt: str | None = None,
) -> list[Prompt]:
    """Read a prompt file into `Prompt`s with stable ids (see the module docstring for formats and shapes)."""
    return read_prompts(path, columns=columns, task=task, limit=limit, system_prompt=system_prompt).prompts


def prompts_from_config(
    cfg: DataConfig, path: str | Path | None = None, system_prompt: str | None = None
) -> list[Prompt]:
    """`load_prompts` driven by the job's `data` section; `path` is `cfg.prompts` already resolved by the job."""
    return load_prompts(
        path if path is not None else cfg.prompts,
        columns=cfg.columns or None,
        task=cfg.task,
        limit=cfg.limit,
        system_prompt=system_prompt,
    )


def read_prompts(
    path: str | Path,
    columns: dict[str, str] | None = None,
    task: str | TaskPreset = "conversation",
    limit: int | None = None,
    system_prompt: str | None = None,
) -> PromptFile:
    """Like `load_prompts`, but also reports the format, the shapes seen and the duplicates dropped."""
    path = Path(path).expanduser()
    preset = get_preset(task)
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(COLUMN_KEYS))
    if unknown:
        raise DistillError(
            f"data.columns: unknown key(s) {', '.join(unknown)}. Expected keys: {', '.join(COLUMN_KEYS)}, each "
            "mapped to a column of the prompt file, e.g. {prompt: question, reference: answer}."
        )
    fmt, records = _open(path)
    out = PromptFile(path=path, format=fmt, prompts=[])
    try:
        _collect(records, out, path, columns, preset, system_prompt, limit)
    finally:
        records.close()
    if not out.prompts:
        raise DistillError(f"{path}: no prompts found. Add records of one of the shapes {SHAPES_HELP}.")
    if out.duplicates:
        log.info("%s: %d repeated prompt(s) kept once", path, out.duplicates)
    return out


def _collect(
    records: Iterator[tuple[str, dict]],
    out: PromptFile,
    path: Path,
    columns: dict[str, str],
    preset: TaskPreset,
    system_prompt: str | None,
    limit: int | None,
) -> None:
    seen: dict[str, tuple[str, str]] = {}  # id -> (canonical messages, where first seen)
    for where, record in records:
        shape, prompt = _to_prompt(record, where, path, columns, preset, system_prompt)
        out.shapes[shape] += 1
        canonical = _canonical(prompt.messages)
        if prompt.id in seen:
            first_canonical, first_where = seen[prompt.id]
            if first_canonical != canonical:
                raise DistillError(
                    f"{path}: {where}: id {prompt.id!r} was already used by {first_where} for a different prompt. "
                    "Ids must be unique: fix the id column, or drop it to let Distill derive ids from the content."
                )
            out.duplicates += 1
            continue
        seen[prompt.id] = (canonical, where)
        out.prompts.append(prompt)
        if limit is not None and len(out.prompts) >= limit:
            return


def prompt_id(messages: list[Message]) -> str:
    """A short stable id for prompt messages: 12 hex chars of the sha1 of their canonical JSON."""
    return hashlib.sha1(_canonical(messages).encode("utf-8")).hexdigest()[:12]


def _canonical(messages: list[Message]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------- formats


def _open(path: Path) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(format name, iterator of (location for messages, record dict))."""
    if not path.exists():
        raise DistillError(f"{path}: prompt file not found. Check data.prompts (relative to the job file's folder).")
    if path.is_dir():
        return "hf", _read_hf(path)
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DistillError(
            f"{path}: unknown prompt file type {path.suffix or '(no extension)'!r}. Use one of "
            f"{', '.join(sorted(_EXTENSIONS))}, or a folder saved with datasets' save_to_disk."
        )
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet}
    return fmt, reader[fmt](path)


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        n = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DistillError(f"{path}: near line {n + 1}: not UTF-8 text ({e.reason}). Save as UTF-8.") from None
            if not line:
                return
            n += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillError(
                    f"{path}: line {n}: not valid JSON ({e.msg}, column {e.colno}). Fix or remove that line."
                ) from None
            if not isinstance(record, dict):
                raise DistillError(
                    f"{path}: line {n}: expected a JSON object per line, got {type(record).__name__}. "
                    'Each line must be one record such as {"prompt": "..."}.'
                )
            yield f"line {n}", record


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno}, column {e.colno}"
            raise DistillError(f"{path}: {where}: not valid JSON ({e.msg}). Fix it there.") from None
        except UnicodeDecodeError as e:
            raise DistillError(f"{path}: not UTF-8 text ({e.reason}). Save the file as UTF-8.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DistillError(f'{path}: expected a JSON list of records, or an object with a "data" list.')
    for n, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DistillError(f"{path}: record {n}: expected a JSON object, got {type(record).__name__}.")
        yield f"record {n}", record


def _read_csv(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            for n, row in enumerate(reader, start=1):
                if None in row:  # more cells than header names
                    raise DistillError(
                        f"{path}: line {reader.line_num}: row {n} has more cells than the header has names. "
                        "Quote cells that contain the delimiter."
                    )
                yield f"line {reader.line_num} (row {n})", {k: _cell(v) for k, v in row.items()}
        except UnicodeDecodeError as e:
            raise DistillError(f"{path}: not UTF-8 text ({e.reason}). Save the file as UTF-8.") from None
        except csv.Error as e:
            raise DistillError(f"{path}: line {reader.line_num}: not valid CSV ({e}). Fix that line.") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DistillError(f"{path}: not a readable Parquet file ({e}).") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", row


def _read_hf(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DistillError(
            f"{path}: a folder, but not a dataset saved with datasets' save_to_disk ({e}). "
            "Point data.prompts at a prompt file or a saved dataset folder."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DistillError(
                f"{path}: the saved dataset has splits {', '.join(ds)} and none is called 'train'. "
                f"Point data.prompts at one split folder, e.g. {path / next(iter(ds))}."
            )
    for n, row in enumerate(ds, start=1):
        yield f"row {n}", row


def _cell(value: str | None) -> Any:
    """CSV cells are strings; a cell holding a JSON chat list (for `messages`) is parsed."""
    if value is None:
        return None
    s = value.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            parsed = json.loads(s)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed):
            return parsed
    return value


# --------------------------------------------------------------------------------------------- shapes


@dataclass
class _Raw:
    """A record reduced to its parts, before the template and the system prompt."""

    prompt: str | list[Message]
    reference: str | None = None
    system: str | None = None


def _detect(record: dict) -> tuple[str, _Raw] | None:
    """First matching shape of a record, or None."""
    if "messages" in record:
        return "messages", _Raw(record["messages"])
    if "prompt" in record:
        return "prompt/completion", _Raw(record["prompt"], record.get("completion"))
    if "instruction" in record and not ({"context", "response"} & record.keys()):
        return "alpaca", _Raw(_join(record["instruction"], record.get("input")), record.get("output"))
    if "instruction" in record:
        return "dolly", _Raw(_join(record["instruction"], record.get("context")), record.get("response"))
    if "question" in record:
        return "question/answer", _Raw(record["question"], record.get("answer"))
    return None


def _join(instruction: Any, extra: Any) -> Any:
    extra = _as_text(extra)
    if not extra or not isinstance(instruction, str):
        return instruction
    return f"{instruction.rstrip()}\n\n{extra}"


def _to_prompt(
    record: dict, where: str, path: Path, columns: dict[str, str], preset: TaskPreset, system_prompt: str | None
) -> tuple[str, Prompt]:
    def column(key: str) -> Any:
        name = columns[key]
        if name not in record:
            raise DistillError(
                f"{path}: {where}: data.columns.{key} names column {name!r}, which this record lacks. "
                f"Fields found: {', '.join(map(str, record)) or '(none)'}. Fix data.columns."
            )
        return record[name]

    if "prompt" in columns:
        shape, raw = "columns", _Raw(column("prompt"))
    else:
        found = _detect(record)
        if found is None:
            fields = ", ".join(map(str, record)) or "(none)"
            example = f"{{prompt: {next(iter(record), 'COLUMN')}}}"
            raise DistillError(
                f"{path}: {where}: no known record shape in fields [{fields}]. Expected one of: {SHAPES_HELP}. "
                f"Or name the columns in the job file, e.g. data.columns: {example}."
            )
        shape, raw = found
    if "reference" in columns:
        raw.reference = column("reference")
    if "system" in columns:
        raw.system = _as_text(column("system"))

    messages, reference = _messages(raw, where, path, preset)
    system = raw.system or system_prompt
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})

    id_value = column("id") if "id" in columns else record.get("id")
    pid = _as_text(id_value) or prompt_id(messages)
    return shape, Prompt(id=pid, messages=messages, reference=reference)


def _messages(raw: _Raw, where: str, path: Path, preset: TaskPreset) -> tuple[list[Message], str | None]:
    """(prompt messages with the template applied, reference)."""
    reference = _reference(raw.reference, where, path)
    if isinstance(raw.prompt, list):
        messages = _chat(raw.prompt, where, path)
        if messages and messages[-1]["role"] == "assistant":
            final = messages.pop()["content"]
            reference = reference if reference is not None else (final if final.strip() else None)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users or not any(messages[i]["content"].strip() for i in users):
            raise DistillError(
                f"{path}: {where}: the chat has no non-empty user message before the final answer. "
                "Add the user's prompt, or remove the record."
            )
        last = messages[users[-1]]
        messages[users[-1]] = {"role": "user", "content": preset.format(last["content"])}
        return messages, reference
    text = _as_text(raw.prompt)
    if not text or not text.strip():
        raise DistillError(f"{path}: {where}: the prompt is empty. Fill it in or remove the record.")
    return [{"role": "user", "content": preset.format(text)}], reference


def _chat(value: list, where: str, path: Path) -> list[Message]:
    messages = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DistillError(
                f"{path}: {where}: message {i} must be an object with 'role' and 'content', got {str(m)[:80]!r}."
            )
        role, content = m["role"], m["content"]
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if role not in ROLES or not isinstance(content, str):
            raise DistillError(
                f"{path}: {where}: message {i} has role {role!r} and content of type {type(content).__name__}; "
                f"expected a role among {', '.join(ROLES)} and text content."
            )
        messages.append({"role": role, "content": content})
    return messages


def _reference(value: Any, where: str, path: Path) -> str | None:
    if isinstance(value, list):  # conversational completion: [{"role": "assistant", "content": ...}]
        parts = [m for m in _chat(value, where, path) if m["role"] == "assistant"]
        value = "".join(m["content"] for m in parts)
    text = _as_text(value)
    return text if text and text.strip() else None


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)
