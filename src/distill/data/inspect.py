"""`distill data inspect PATH`: what is in a completion dataset (or a prompt file) before training on it.

`inspect_dataset` gathers plain, JSON-ready numbers; `render_inspection` draws them with rich.
Reading is read-only: inspecting a store while a generation still writes to it is safe.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from distill.config import FilterConfig
from distill.data.filters import filter_completions
from distill.data.formats import read_prompts
from distill.data.store import META_FILE, read_store
from distill.errors import DistillError

N_SAMPLES = 3
SAMPLE_CHARS = 300


def inspect_dataset(path: str | Path, samples: int = N_SAMPLES) -> dict[str, Any]:
    """Counts, finish reasons, length histograms, a default filter pass and a few samples.

    `path` is a store folder, a JSONL file of store records, or any prompt file `data.prompts`
    accepts (then the prompts are described instead).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DistillError(f"{path}: not found. Pass a dataset folder (with part-*.jsonl) or a JSONL/prompt file.")
    if path.is_dir() and (any(path.glob("part-*.jsonl")) or (path / META_FILE).exists()):
        return _describe_records(path, read_store(path), samples, meta=_read_meta(path))
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson") and _first_is_record(path):
        return _describe_records(path, _read_jsonl_records(path), samples, meta=None)
    return _describe_prompts(path, samples)


def _describe_records(path: Path, records: list[dict], samples: int, meta: dict | None) -> dict[str, Any]:
    per_prompt = Counter(r.get("prompt_id") for r in records)
    kept, summary = filter_completions(records, FilterConfig())
    kept_ids = {id(r) for r in kept}
    return {
        "kind": "completions",
        "path": str(path),
        "meta": meta,
        "records": len(records),
        "prompts": len(per_prompt),
        "samples_per_prompt": _stats(list(per_prompt.values())),
        "with_reference": sum(1 for r in records if r.get("reference")),
        "finish_reasons": dict(Counter(r.get("finish_reason", "?") for r in records).most_common()),
        "teachers": dict(Counter(r.get("teacher", "?") for r in records).most_common()),
        "chars": _stats([len(r.get("completion") or "") for r in records], histogram=True),
        "tokens": _stats([int(r.get("completion_tokens") or 0) for r in records], histogram=True),
        "filters": summary.as_dict(),
        "samples": [
            {
                "id": r.get("id"),
                "prompt": _clip(_last_user(r.get("messages") or [])),
                "completion": _clip(r.get("completion") or ""),
                "finish_reason": r.get("finish_reason"),
                "kept": id(r) in kept_ids,
            }
            for r in _spread(records, samples)
        ],
    }


def _describe_prompts(path: Path, samples: int) -> dict[str, Any]:
    found = read_prompts(path)
    prompts = found.prompts
    return {
        "kind": "prompts",
        "path": str(path),
        "format": found.format,
        "prompts": len(prompts),
        "duplicates": found.duplicates,
        "shapes": dict(found.shapes),
        "with_reference": sum(1 for p in prompts if p.reference),
        "chars": _stats([len(_last_user(p.messages)) for p in prompts], histogram=True),
        "samples": [
            {"id": p.id, "prompt": _clip(_last_user(p.messages)), "reference": _clip(p.reference or "")}
            for p in _spread(prompts, samples)
        ],
    }


def render_inspection(info: dict[str, Any]) -> Group:
    """A rich renderable of `inspect_dataset`'s result (print it with a rich Console)."""
    parts: list[Any] = []
    overview = Table(title=f"{info['kind']}: {info['path']}", show_header=False, title_justify="left")
    overview.add_column(style="bold")
    overview.add_column()
    if info["kind"] == "completions":
        spp = info["samples_per_prompt"]
        overview.add_row("records", str(info["records"]))
        overview.add_row("prompts", str(info["prompts"]))
        overview.add_row("samples per prompt", f"{spp['min']}-{spp['max']} (mean {spp['mean']:.2f})")
        overview.add_row("with reference", str(info["with_reference"]))
        overview.add_row("finish reasons", _counts(info["finish_reasons"]))
        overview.add_row("teachers", _counts(info["teachers"]))
        if info.get("meta"):
            overview.add_row("meta", json.dumps(info["meta"], sort_keys=True))
    else:
        overview.add_row("format", info["format"])
        overview.add_row("prompts", str(info["prompts"]))
        overview.add_row("repeated prompts dropped", str(info["duplicates"]))
        overview.add_row("shapes", _counts(info["shapes"]))
        overview.add_row("with reference", str(info["with_reference"]))
    parts.append(overview)

    label = "completion" if info["kind"] == "completions" else "prompt"
    parts.append(_histogram_table(f"{label} length (chars)", info["chars"]))
    if info["kind"] == "completions":
        parts.append(_histogram_table("completion length (tokens)", info["tokens"]))
        parts.append(_filter_table(info["filters"]))
    for s in info["samples"]:
        body = Text()
        body.append("prompt: ", style="bold")
        body.append(s["prompt"] + "\n")
        if "completion" in s:
            body.append("completion: ", style="bold")
            body.append(s["completion"])
            title = f"{s['id']} ({s['finish_reason']}, {'kept' if s['kept'] else 'dropped by filters'})"
        else:
            body.append("reference: ", style="bold")
            body.append(s["reference"] or "-")
            title = str(s["id"])
        parts.append(Panel(body, title=title, title_align="left"))
    return Group(*parts)


# --------------------------------------------------------------------------------------------- helpers


def _histogram_table(title: str, stats: dict[str, Any]) -> Table:
    table = Table(title=f"{title}: min {stats['min']}, median {stats['median']}, max {stats['max']}")
    table.add_column("range", justify="right")
    table.add_column("count", justify="right")
    table.add_column("")
    top = max((n for _, n in stats["histogram"]), default=0)
    for bucket, n in stats["histogram"]:
        table.add_row(bucket, str(n), "█" * round(30 * n / top) if top else "")
    return table


def _filter_table(filters: dict[str, Any]) -> Table:
    table = Table(title="default filters (data.filters defaults)")
    table.add_column("filter")
    table.add_column("dropped", justify="right")
    for reason, n in filters["dropped"].items():
        if n:
            table.add_row(reason, str(n))
    table.add_row("kept", f"{filters['kept']} of {filters['total']}", style="bold")
    return table


def _stats(values: list[int], histogram: bool = False) -> dict[str, Any]:
    if not values:
        out: dict[str, Any] = {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    else:
        out = {"min": min(values), "median": statistics.median(values), "mean": statistics.fmean(values)}
        out["max"] = max(values)
    if histogram:
        out["histogram"] = _histogram(values)
    return out


def _histogram(values: list[int]) -> list[list]:
    """[[bucket label, count], ...] over power-of-two buckets "0", "1", "2-3", "4-7", ... (none left out between)."""
    if not values:
        return []
    counts = Counter(max(v, 0).bit_length() for v in values)  # bucket k holds [2**(k-1), 2**k - 1]
    out = []
    for k in range(min(counts), max(counts) + 1):
        lo, hi = (0, 0) if k == 0 else (2 ** (k - 1), 2**k - 1)
        out.append([str(lo) if lo == hi else f"{lo}-{hi}", counts.get(k, 0)])
    return out


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counter.items()) or "-"


def _spread(items: list, k: int) -> list:
    """Up to k items spread evenly over the list (deterministic)."""
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def _last_user(messages: list[dict]) -> str:
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def _clip(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " …"


def _read_meta(path: Path) -> dict | None:
    meta = path / META_FILE
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {"error": f"{meta} is not valid JSON"}


def _first_is_record(path: Path) -> bool:
    """Whether a JSONL file holds store records (not prompts): its first record has `completion` and `prompt_id`."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False  # let the prompt loader report the broken line
                return isinstance(first, dict) and "completion" in first and "prompt_id" in first
    return False


def _read_jsonl_records(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillError(f"{path}: line {n}: not valid JSON ({e.msg}). Fix or remove that line.") from None
            if not isinstance(record, dict) or "completion" not in record:
                raise DistillError(f"{path}: line {n}: not a completion record (no 'completion' field).")
            records.append(record)
    return records
