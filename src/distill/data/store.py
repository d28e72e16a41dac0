"""The dataset of teacher completions: append-only JSONL shards that survive a crash at any moment.

Layout of a store folder::

    meta.json           teacher, generation params and prompt source the records were made with
    part-00000.jsonl    one record per line, `shard_size` lines per shard
    part-00001.jsonl    ...

Every batch is flushed and fsync'ed before `append` returns, so a finished batch is never lost. A
process killed mid-write leaves at most one partial last line; opening the store cuts it away. Ids
already present are skipped on append, so a resumed run can re-send a batch without duplicating it.
One writer at a time.

A record is a dict::

    id                 "{prompt_id}-{sample}"
    prompt_id, sample  which prompt, which of its `n` samples
    messages           the prompt messages sent to the teacher
    completion         the teacher's answer
    finish_reason      "stop" | "length" | "error"
    prompt_tokens, completion_tokens
    teacher, params    teacher name, generation params (dict)
    reference          the gold answer, or None
    logprobs           per-token top log-probs (only when captured)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.io import atomic_write_text, fsync_dir
from distill.teachers.base import Completion, GenerationParams, Prompt

SHARD_SIZE = 10_000
META_FILE = "meta.json"
_SHARD_GLOB = "part-*.jsonl"


def record_from(prompt: Prompt, c: Completion, teacher_name: str, params: GenerationParams) -> dict[str, Any]:
    """The store record of one teacher completion."""
    if c.prompt_id != prompt.id:
        raise ValueError(f"completion for prompt {c.prompt_id!r} paired with prompt {prompt.id!r}")
    record: dict[str, Any] = {
        "id": c.id,
        "prompt_id": c.prompt_id,
        "sample": c.sample,
        "messages": [dict(m) for m in prompt.messages],
        "completion": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "teacher": teacher_name,
        "params": params.as_dict(),
        "reference": prompt.reference,
    }
    if c.logprobs is not None:
        record["logprobs"] = c.logprobs
    if c.extra:
        record["extra"] = c.extra
    return record


def store_meta(teacher: str, params: GenerationParams | dict, source: str | Path, **extra: Any) -> dict[str, Any]:
    """The `meta.json` content that identifies how a store's records were made."""
    params = params.as_dict() if isinstance(params, GenerationParams) else dict(params)
    return {"teacher": teacher, "params": params, "source": str(source), **extra}


class CompletionStore:
    """An append-only, crash-safe folder of completion records (see the module docstring)."""

    def __init__(self, path: str | Path, shard_size: int = SHARD_SIZE):
        if shard_size <= 0:
            raise ValueError("shard_size must be > 0")
        self.path = Path(path)
        self.shard_size = shard_size
        if self.path.exists() and not self.path.is_dir():
            raise DistillError(f"{self.path}: expected a dataset folder, found a file. Choose another output path.")
        self.path.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        """Cut unfinished last lines and collect the stored ids."""
        self._ids: set[str] = set()
        self._last_lines = 0  # records in the last shard
        for shard in self.shards():
            _repair_tail(shard)
            n = 0
            for record in _read_shard(shard):
                self._ids.add(record["id"])
                n += 1
            self._last_lines = n

    # ------------------------------------------------------------------ reading

    def shards(self) -> list[Path]:
        return sorted(self.path.glob(_SHARD_GLOB))

    def done_ids(self) -> set[str]:
        """Ids of the records already stored."""
        return set(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[dict]:
        for shard in self.shards():
            yield from _read_shard(shard)

    def read_all(self) -> list[dict]:
        """Every record, in the order appended."""
        return list(self)

    # ------------------------------------------------------------------ writing

    def append(self, records: list[dict]) -> int:
        """Write the records whose ids are new, durably (flush + fsync); returns how many were written."""
        fresh = []
        for record in records:
            rid = record.get("id")
            if not isinstance(rid, str) or not rid:
                raise ValueError(f"store record without a string 'id': {str(record)[:120]}")
            if rid not in self._ids:
                self._ids.add(rid)
                fresh.append(record)
        try:
            start = 0
            while start < len(fresh):
                shards = self.shards()
                if not shards or self._last_lines >= self.shard_size:
                    shard, self._last_lines = self.path / f"part-{len(shards):05d}.jsonl", 0
                else:
                    shard = shards[-1]
                chunk = fresh[start : start + self.shard_size - self._last_lines]
                lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk)
                new = not shard.exists()
                with open(shard, "a", encoding="utf-8") as f:
                    f.write(lines)
                    f.flush()
                    os.fsync(f.fileno())
                if new:
                    fsync_dir(self.path)
                self._last_lines += len(chunk)
                start += len(chunk)
        except BaseException:
            # A write may have stopped midway (disk full, Ctrl-C): cut the partial line and recount
            # from disk, so what was not written is not taken as done and the next append starts clean.
            self._load()
            raise
        return len(fresh)

    # ------------------------------------------------------------------ meta

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    def read_meta(self) -> dict[str, Any] | None:
        if not self.meta_path.exists():
            return None
        try:
            return json.loads(self.meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            msg = f"{self.meta_path}: not valid JSON ({e.msg}). Delete it to start the dataset afresh."
            raise DistillError(msg) from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace meta.json atomically (a crash leaves the old or the new file, never half of one)."""
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2, ensure_ascii=False, sort_keys=True) + "\n")

    def meta_diff(self, meta: dict[str, Any]) -> list[str]:
        """What differs between the stored meta and `meta`, one line per field; empty when they match.

        An empty store always matches; records without a meta.json never do (their origin is unknown).
        """
        stored = self.read_meta()
        if stored is None:
            return [f"{self.meta_path} is missing, so the existing records are of unknown origin"] if self._ids else []
        wanted = json.loads(json.dumps(meta))  # tuples -> lists, like the stored JSON
        keys = sorted(set(stored) | set(wanted))
        return [f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]

    def matches(self, meta: dict[str, Any]) -> bool:
        """Whether the existing records were made the way `meta` says (so a rerun may continue them)."""
        return not self.meta_diff(meta)

    # ------------------------------------------------------------------ export

    def to_parquet(self, path: str | Path) -> Path:
        """Export every record to one Parquet file (nested `logprobs`/`extra` as JSON text)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = self.read_all()
        keys = list(dict.fromkeys(k for r in records for k in r))
        as_json = {"logprobs", "extra"}
        columns = {
            k: [json.dumps(r[k]) if k in as_json and r.get(k) is not None else r.get(k) for r in records] for k in keys
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, path)
        return path


def read_store(path: str | Path) -> list[dict]:
    """Every record of a store folder, read-only: an unfinished last line (a writer still at work) is skipped."""
    records = []
    for shard in sorted(Path(path).glob(_SHARD_GLOB)):
        with open(shard, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        for n, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
            if line.strip():
                records.append(_parse_line(line, shard, n))
    return records


# --------------------------------------------------------------------------------------------- files


def _read_shard(shard: Path) -> Iterator[dict]:
    with open(shard, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield _parse_line(line, shard, n)


def _parse_line(line: str, shard: Path, n: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DistillError(
            f"{shard}: line {n}: not valid JSON ({e.msg}). The dataset is damaged; remove that line "
            "(its completion will be generated again) or delete the folder to start afresh."
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise DistillError(f"{shard}: line {n}: not a completion record (no string 'id'). Remove that line.")
    return record


def _repair_tail(shard: Path) -> None:
    """Cut an unfinished last line (a write killed midway): everything after the last newline goes.

    A last line that ends in a newline but is not JSON (e.g. zeros left by a power cut) goes too.
    """
    with open(shard, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        keep = size
        while True:
            end = _last_newline(f, keep)  # offset just past the last "\n" before `keep`, or 0
            if end == keep:  # the data ends with a newline: check the last line parses
                start = _last_newline(f, keep - 1)
                f.seek(start)
                line = f.read(keep - start)
                if not line.strip():
                    break
                try:
                    json.loads(line)
                    break
                except ValueError:  # not JSON, or not UTF-8
                    keep = start
            else:
                keep = end
            if keep == 0:
                break
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def _last_newline(f, before: int, block: int = 1 << 16) -> int:
    """Offset just past the last b"\\n" in the first `before` bytes of `f`; 0 when there is none."""
    pos = before
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0
