"""Output filters: one good and one bad answer per check, the summary, and rejection sampling on GSM8K."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from distill.config import FilterConfig
from distill.data.filters import distinct_n, filter_completions, is_repetitive, schema_errors
from distill.data.formats import load_prompts
from distill.data.presets import get_preset
from distill.data.store import CompletionStore, record_from
from distill.errors import DistillError
from distill.teachers.base import Completion, GenerationParams, Prompt, Teacher

GSM8K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k"

GOOD = "Paris is the capital of France. It has been for a long time."
LOOP = "The answer is " + "the cat " * 40


def rec(text: str, prompt_id: str = "p", sample: int = 0, finish_reason: str = "stop", reference=None) -> dict:
    return {
        "id": f"{prompt_id}-{sample}",
        "prompt_id": prompt_id,
        "sample": sample,
        "completion": text,
        "finish_reason": finish_reason,
        "reference": reference,
    }


def run(cfg: FilterConfig, *records: dict, preset=None):
    kept, summary = filter_completions(list(records), cfg, preset)
    return [r["id"] for r in kept], summary


def only(**fields) -> FilterConfig:
    """A config with every check off except those given."""
    base = {"drop_empty": False, "drop_repetitive": False, "min_chars": 0, "dedupe": "none"}
    return FilterConfig(**{**base, **fields})


# --------------------------------------------------------------------------------------------- one check at a time


def test_empty():
    ids, summary = run(only(drop_empty=True), rec(GOOD, "a"), rec("   \n", "b"), rec("", "c"))
    assert ids == ["a-0"]
    assert summary.dropped["empty"] == 2
    assert run(only(), rec("", "c"))[0] == ["c-0"]  # off: kept


def test_truncated_only_when_asked():
    records = [rec(GOOD, "a"), rec(GOOD + " and then", "b", finish_reason="length")]
    assert run(only(), *records)[0] == ["a-0", "b-0"]
    ids, summary = run(only(drop_truncated=True), *records)
    assert ids == ["a-0"] and summary.dropped["truncated"] == 1


def test_error_completions_always_go():
    ids, summary = run(only(), rec(GOOD, "a"), rec("", "b", finish_reason="error"))
    assert ids == ["a-0"] and summary.dropped["error"] == 1


def test_repetitive():
    ids, summary = run(only(drop_repetitive=True), rec(GOOD, "a"), rec(LOOP, "b"))
    assert ids == ["a-0"] and summary.dropped["repetitive"] == 1


def test_length_bounds():
    cfg = only(min_chars=5, max_chars=20)
    ids, summary = run(cfg, rec("ok", "short"), rec("just right", "mid"), rec("x" * 21, "long"))
    assert ids == ["mid-0"]
    assert summary.dropped["too_short"] == 1 and summary.dropped["too_long"] == 1


def test_regex_keeps_matches_only():
    ids, summary = run(only(regex=r"####\s*\d+"), rec("So 5.\n#### 5", "a"), rec("So five.", "b"))
    assert ids == ["a-0"] and summary.dropped["regex"] == 1


def test_bad_regex_is_a_config_error():
    with pytest.raises(DistillError, match="data.filters.regex"):
        run(only(regex="(unclosed"), rec(GOOD))


SCHEMA = {
    "type": "object",
    "required": ["name", "age"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
    "additionalProperties": False,
}


def test_json_schema():
    good = json.dumps({"name": "Ann", "age": 3, "tags": ["a"]})
    fenced = "Here you go:\n```json\n" + json.dumps({"name": "Bo", "age": 4}) + "\n```"
    bad = [
        "not json at all",
        json.dumps({"name": "Ann"}),  # missing age
        json.dumps({"name": "Ann", "age": "3"}),  # wrong type
        json.dumps({"name": "Ann", "age": 3, "tags": ["c"]}),  # enum in items
        json.dumps({"name": "Ann", "age": 3, "extra": 1}),  # additional property
        json.dumps([1, 2]),
    ]
    records = [rec(good, "good"), rec(fenced, "fenced"), *(rec(t, f"bad{i}") for i, t in enumerate(bad))]
    ids, summary = run(only(json_schema=SCHEMA), *records)
    assert ids == ["good-0", "fenced-0"]
    assert summary.dropped["json_schema"] == len(bad)


def test_schema_errors_say_where():
    assert schema_errors({"name": "x", "age": 1}, SCHEMA) == []
    assert schema_errors({"age": True}, SCHEMA) == ["$: missing required 'name'", "$.age: expected integer, got bool"]
    assert schema_errors(2.0, {"type": "integer"}) == []
    assert schema_errors(None, {"type": ["string", "null"]}) == []


def test_exact_duplicates_per_prompt():
    records = [
        rec("Same answer.", "p", 0),
        rec("  same   ANSWER. ", "p", 1),  # whitespace and case do not make it new
        rec("Same answer.", "q", 0),  # another prompt may give the same answer
        rec("Different answer.", "p", 2),
    ]
    ids, summary = run(only(dedupe="exact"), *records)
    assert ids == ["p-0", "q-0", "p-2"]
    assert summary.dropped["duplicate"] == 1


def test_near_duplicates_per_prompt():
    base = " ".join(f"word{i}" for i in range(60))
    near = base + " extra"  # 3-gram Jaccard 58/59 > 0.9
    far = " ".join(f"other{i}" for i in range(60))
    records = [rec(base, "p", 0), rec(near, "p", 1), rec(far, "p", 2), rec(near, "q", 0)]
    assert run(only(dedupe="exact"), *records)[0] == ["p-0", "p-1", "p-2", "q-0"]
    ids, summary = run(only(dedupe="near"), *records)
    assert ids == ["p-0", "p-2", "q-0"]
    assert summary.dropped["near_duplicate"] == 1


def test_match_reference_on_hand_made_records():
    records = [
        rec("3 + 4 = 7\n#### 7", "a", reference="#### 7"),
        rec("3 + 4 = 8\n#### 8", "b", reference="#### 7"),
        rec("The total is $1,200.00", "c", reference="so 1200\n#### 1,200"),
        rec("#### 7", "d", reference=None),
        rec("7", "e", reference="no number here"),
    ]
    ids, summary = run(only(match_reference=True), *records, preset="math")
    assert ids == ["a-0", "c-0"]
    assert summary.dropped["wrong_answer"] == 1
    assert summary.dropped["no_reference"] == 2


def test_first_failing_check_counts_once_and_summary_adds_up():
    records = [rec("", "a"), rec(LOOP, "b", finish_reason="length"), rec(GOOD, "c"), rec(GOOD, "c", 1)]
    ids, summary = run(FilterConfig(drop_truncated=True), *records)
    assert ids == ["c-0"]
    assert summary.dropped["empty"] == 1
    assert summary.dropped["truncated"] == 1  # truncated is checked before repetitive
    assert summary.dropped["repetitive"] == 0
    assert summary.dropped["duplicate"] == 1
    assert summary.total == 4 and summary.kept == 1
    assert summary.kept + sum(summary.dropped.values()) == summary.total
    d = summary.as_dict()
    assert d["total"] == 4 and d["kept"] == 1 and d["dropped"]["duplicate"] == 1
    table = str(summary)
    assert "truncated" in table and "kept" in table and "1 of 4" in table
    assert "regex" not in table  # reasons that dropped nothing are left out


def test_defaults_keep_ordinary_answers():
    records = [rec(f"Answer number {i}: {GOOD}", f"p{i}") for i in range(10)]
    ids, summary = run(FilterConfig(), *records)
    assert len(ids) == 10 and summary.kept == 10


# --------------------------------------------------------------------------------------------- degeneration


@pytest.mark.parametrize(
    "text",
    [
        LOOP,
        "Step 1: add. " + "I will now compute the sum. " * 6,
        "Sure! " + "ha" * 80,
        "Final answer: " + "!" * 150,
        # A loop in the middle, escaped before the end: caught by the low distinct-2 ratio.
        "Intro. " + "and so on " * 40 + "Done with a different ending here.",
    ],
)
def test_is_repetitive_catches_loops(text):
    assert is_repetitive(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        GOOD,
        "yes yes yes",  # short emphatic repetition is not a loop
        "def f():\n    if x:\n        if y:\n            return {}\n        }\n    }\n}",
        " ".join(f"The item number {i} is listed here." for i in range(30)),
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16",
    ],
)
def test_is_repetitive_leaves_normal_text(text):
    assert not is_repetitive(text)


def test_distinct_n():
    assert distinct_n("a b c d", 2) == 1.0
    assert distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    assert distinct_n("a", 2) == 0.0
    assert distinct_n(["a b", "a b", "c d"], 2) == pytest.approx(2 / 3)  # pooled over texts
    assert distinct_n("The the THE", 1) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------- rejection sampling


class ScriptedTeacher:
    """Answers with the gold `#### N` for even-numbered prompts and with N + 1 for odd ones."""

    name = "scripted"

    def __init__(self):
        self.correct: set[str] = set()

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> Iterator[list[Completion]]:
        gold = get_preset("math")
        batch = []
        for i, prompt in enumerate(prompts):
            answer = int(gold.extract_answer(prompt.reference))
            if i % 2 == 0:
                text = f"Let me think step by step.\nThe answer is {answer}.\n#### {answer}"
                self.correct.add(prompt.id)
            else:
                text = f"Let me think step by step.\nThe answer is {answer + 1}.\n#### {answer + 1}"
            batch.append(Completion(prompt.id, 0, text, "stop", prompt_tokens=10, completion_tokens=12))
            if len(batch) == params.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        pass


def test_rejection_sampling_on_gsm8k(tmp_path):
    test_file = GSM8K / "test.jsonl"
    if not test_file.exists():
        pytest.skip(f"GSM8K not found at {test_file.resolve()}")
    prompts = load_prompts(test_file, task="math", limit=40)
    teacher = ScriptedTeacher()
    assert isinstance(teacher, Teacher)
    params = GenerationParams(batch_size=8)
    by_id = {p.id: p for p in prompts}
    store = CompletionStore(tmp_path / "store")
    for batch in teacher.generate(prompts, params):
        store.append([record_from(by_id[c.prompt_id], c, teacher.name, params) for c in batch])

    kept, summary = filter_completions(store.read_all(), FilterConfig(match_reference=True), get_preset("math"))

    assert {r["prompt_id"] for r in kept} == teacher.correct
    assert len(kept) == 20
    assert summary.dropped["wrong_answer"] == 20
    assert summary.dropped["no_reference"] == 0
    assert summary.total == 40 and summary.kept == 20
