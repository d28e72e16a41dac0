"""Checks on teacher outputs before they become training data; every dropped record is counted by reason.

The checks run in the order of `REASONS`; a record is counted under the first check it fails.
Deduplication runs last, among the records that passed everything else. `is_repetitive` and
`distinct_n` are also the degeneration checks of evaluation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distill.config import FilterConfig
from distill.data.presets import TaskPreset, get_preset
from distill.errors import DistillError

# Order of the checks, which is also the order of the summary table.
REASONS = (
    "error",  # the teacher failed on this prompt (finish reason "error")
    "empty",
    "truncated",
    "repetitive",
    "too_short",
    "too_long",
    "regex",
    "json_schema",
    "no_reference",  # match_reference on a prompt without a usable gold answer
    "wrong_answer",
    "duplicate",
    "near_duplicate",
)

NEAR_DUPLICATE_JACCARD = 0.9


@dataclass
class FilterSummary:
    """How many records went in, how many were kept, and how many each check dropped."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped)}

    def __str__(self) -> str:
        rows = [(reason, n) for reason, n in self.dropped.items() if n]
        width = max([len("kept"), *(len(r) for r, _ in rows)])
        lines = [f"{'filter':<{width}}  dropped"]
        lines += [f"{reason:<{width}}  {n:>7}" for reason, n in rows]
        share = f" ({self.kept / self.total:.0%})" if self.total else ""
        lines.append(f"{'kept':<{width}}  {self.kept:>7} of {self.total}{share}")
        return "\n".join(lines)


def filter_completions(
    completions: list[dict], cfg: FilterConfig, preset: TaskPreset | str | None = None
) -> tuple[list[dict], FilterSummary]:
    """Keep the store records (see `data/store.py`) that pass `cfg`; the summary counts each drop by reason.

    `preset` (a `TaskPreset` or task name) reads final answers for `cfg.match_reference`.
    """
    if cfg.match_reference and preset is None:
        raise ValueError("filter_completions: match_reference needs the task preset")
    preset = get_preset(preset) if preset is not None else None
    pattern = _compile(cfg.regex)
    summary = FilterSummary(total=len(completions))
    passed = []
    for record in completions:
        reason = _first_failure(record, cfg, pattern, preset)
        if reason:
            summary.dropped[reason] += 1
        else:
            passed.append(record)
    kept = _dedupe(passed, cfg.dedupe, summary)
    summary.kept = len(kept)
    return kept, summary


def _first_failure(record: dict, cfg: FilterConfig, pattern: re.Pattern | None, preset: TaskPreset | None):
    text = record.get("completion") or ""
    stripped = text.strip()
    if record.get("finish_reason") == "error":
        return "error"
    if cfg.drop_empty and not stripped:
        return "empty"
    if cfg.drop_truncated and record.get("finish_reason") == "length":
        return "truncated"
    if cfg.drop_repetitive and is_repetitive(text):
        return "repetitive"
    if len(stripped) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(stripped) > cfg.max_chars:
        return "too_long"
    if pattern is not None and not pattern.search(text):
        return "regex"
    if cfg.json_schema is not None:
        value = parse_json_answer(text)
        if value is _INVALID or schema_errors(value, cfg.json_schema):
            return "json_schema"
    if cfg.match_reference:
        gold = preset.extract_answer(record.get("reference"))
        if gold is None:
            return "no_reference"
        if preset.extract_answer(text) != gold:
            return "wrong_answer"
    return None


def _compile(regex: str | None) -> re.Pattern | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise DistillError(f"data.filters.regex: not a valid regular expression ({e}): {regex!r}") from None


# --------------------------------------------------------------------------------------------- dedupe


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def _shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = _normalize(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; 1.0 for two empty sets."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _dedupe(records: list[dict], mode: str, summary: FilterSummary) -> list[dict]:
    """Keep the first of each group of duplicate answers to the same prompt."""
    if mode == "none":
        return records
    kept, seen = [], set()
    shingles_by_prompt: dict[str, list[set]] = {}
    for record in records:
        text = record.get("completion") or ""
        key = (record.get("prompt_id"), _normalize(text))
        if key in seen:
            summary.dropped["duplicate"] += 1
            continue
        if mode == "near":
            mine = _shingles(text)
            earlier = shingles_by_prompt.setdefault(record.get("prompt_id"), [])
            # Texts under 3 words have no shingles; only the exact check above applies to them.
            if mine and any(jaccard(mine, other) >= NEAR_DUPLICATE_JACCARD for other in earlier):
                summary.dropped["near_duplicate"] += 1
                continue
            earlier.append(mine)
        seen.add(key)
        kept.append(record)
    return kept


# --------------------------------------------------------------------------------------------- degeneration


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(text: str | Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams (lower case); several texts are pooled. 0.0 without n-grams."""
    texts = [text] if isinstance(text, str) else list(text)
    grams = [g for t in texts for g in _ngrams(t.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def tail_repeats(words: list[str], period: int) -> int:
    """How many times the last `period` words repeat back to back at the end (1 = no repetition)."""
    n = len(words)
    matched = 0  # words that equal the word `period` places before them, counted back from the end
    while matched < n - period and words[n - 1 - matched] == words[n - 1 - matched - period]:
        matched += 1
    return 1 + matched // period


def is_repetitive(
    text: str, max_period: int = 8, min_repeats: int = 4, min_words: int = 12, long_words: int = 64
) -> bool:
    """True for an answer stuck in a loop.

    Three signs: a word n-gram (n <= `max_period`) repeated `min_repeats`+ times back to back at the
    end, covering at least `min_words` words (a loop that ran until the token limit); on long answers
    (`long_words`+ words), fewer than 1 in 4 word bigrams distinct (a loop in the middle); or a
    character pattern repeated 8+ times over the last 100+ characters (loops without spaces).
    """
    words = text.split()
    for period in range(1, max_period + 1):
        repeats = tail_repeats(words, period)
        if repeats >= min_repeats and repeats * period >= min_words:
            return True
    if len(words) >= long_words and distinct_n(text, 2) < 0.25:
        return True
    tail = text.rstrip()[-400:]
    loop = _CHAR_LOOP.search(tail)
    return bool(loop and len(loop.group(0)) >= 100)


_CHAR_LOOP = re.compile(r"(.{1,20}?)\1{7,}$", re.DOTALL)


# --------------------------------------------------------------------------------------------- json schema

_INVALID = object()
_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)\n?```", re.DOTALL)


def parse_json_answer(text: str) -> Any:
    """The JSON value an answer holds: the whole text, or the first ```json fenced block; `_INVALID` if none."""
    for candidate in (text.strip(), *(m.group(1) for m in _FENCE.finditer(text))):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return _INVALID


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def schema_errors(value: Any, schema: dict, path: str = "$") -> list[str]:
    """Problems of `value` against a JSON schema subset: type, enum, required, properties,
    additionalProperties, items. Other keywords are ignored. An empty list means valid."""
    if not isinstance(schema, dict):
        return []
    errors = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        unknown = [k for k in kinds if k not in _TYPES]
        if unknown:
            raise DistillError(f"data.filters.json_schema: unknown type {unknown[0]!r}; expected one of {list(_TYPES)}")
        if not any(_TYPES[k](value) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing required {k!r}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected property {k!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(v, schema["additionalProperties"], f"{path}.{k}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors
