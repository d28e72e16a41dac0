"""Prompt loading: every record shape, every file format, column mapping, stable ids and readable errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from distill.config import DataConfig
from distill.data.formats import load_prompts, prompt_id, prompts_from_config, read_prompts
from distill.data.presets import get_preset
from distill.errors import DistillError


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# --------------------------------------------------------------------------------------------- shapes


def test_messages_shape_final_assistant_becomes_reference(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        {"role": "assistant", "content": "Hello!"},
        user("What is 2+2?"),
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": chat}, {"messages": [user("Open question")]}])
    first, second = load_prompts(path)
    assert first.messages == chat[:-1]
    assert first.reference == "4"
    assert second.messages == [user("Open question")]
    assert second.reference is None


def test_prompt_completion_shape_string_and_chat(tmp_path):
    records = [
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": [user("Capital of Italy?")], "completion": [{"role": "assistant", "content": "Rome"}]},
        {"prompt": "No answer here"},
    ]
    a, b, c = load_prompts(write_jsonl(tmp_path / "p.jsonl", records))
    assert (a.messages, a.reference) == ([user("Capital of France?")], "Paris")
    assert (b.messages, b.reference) == ([user("Capital of Italy?")], "Rome")
    assert c.reference is None


def test_alpaca_shape_appends_input_after_blank_line(tmp_path):
    records = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a color.", "input": "", "output": "Blue"},
    ]
    a, b = load_prompts(write_jsonl(tmp_path / "alpaca.jsonl", records))
    assert a.messages == [user("Translate to French.\n\nGood morning")]
    assert a.reference == "Bonjour"
    assert b.messages == [user("Name a color.")]


def test_dolly_shape(tmp_path):
    record = {"instruction": "Who wrote it?", "context": "Hamlet is by Shakespeare.", "response": "Shakespeare"}
    (p,) = load_prompts(write_jsonl(tmp_path / "dolly.jsonl", [record]))
    assert p.messages == [user("Who wrote it?\n\nHamlet is by Shakespeare.")]
    assert p.reference == "Shakespeare"
    assert read_prompts(tmp_path / "dolly.jsonl").shapes == {"dolly": 1}


def test_question_answer_shape_with_task_template(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2 apples + 3 apples?", "answer": "2+3=5\n#### 5"}])
    (p,) = load_prompts(path, task="math")
    assert p.messages == [user(get_preset("math").format("2 apples + 3 apples?"))]
    assert "#### <number>" in p.messages[0]["content"]
    assert p.reference == "2+3=5\n#### 5"


def test_template_applies_to_last_user_message_of_a_chat(tmp_path):
    chat = [user("first"), {"role": "assistant", "content": "ok"}, user("Long text to sum up")]
    (p,) = load_prompts(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]), task="summarization")
    assert p.messages[0] == user("first")
    assert p.messages[-1] == user(get_preset("summarization").format("Long text to sum up"))


def test_first_matching_shape_wins(tmp_path):
    # Both `messages` and `question` present: `messages` comes first in the detection order.
    record = {"messages": [user("from messages")], "question": "from question"}
    (p,) = load_prompts(write_jsonl(tmp_path / "m.jsonl", [record]))
    assert p.messages == [user("from messages")]


def test_system_prompt_added_unless_the_record_has_one(tmp_path):
    records = [{"prompt": "Hi"}, {"messages": [{"role": "system", "content": "Own system"}, user("Yo")]}]
    a, b = load_prompts(write_jsonl(tmp_path / "s.jsonl", records), system_prompt="You are helpful.")
    assert a.messages == [{"role": "system", "content": "You are helpful."}, user("Hi")]
    assert b.messages[0] == {"role": "system", "content": "Own system"}
    assert len(b.messages) == 2


def test_column_mapping_overrides_detection(tmp_path):
    records = [
        {"uid": "a1", "query": "Why is the sky blue?", "gold": "Rayleigh scattering", "persona": "A physicist.",
         "question": "ignored because the mapping wins"},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "custom.jsonl", records)
    columns = {"prompt": "query", "reference": "gold", "system": "persona", "id": "uid"}
    (p,) = load_prompts(path, columns=columns)
    assert p.id == "a1"
    assert p.messages == [{"role": "system", "content": "A physicist."}, user("Why is the sky blue?")]
    assert p.reference == "Rayleigh scattering"


def test_partial_column_mapping_keeps_detection(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "answer": "A", "label": "gold label"}])
    (p,) = load_prompts(path, columns={"reference": "label"})
    assert p.messages == [user("Q?")]
    assert p.reference == "gold label"


def test_prompts_from_config_uses_data_section(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": f"Q{i}?", "answer": str(i)} for i in range(5)])
    cfg = DataConfig(prompts=str(path), task="math", limit=2)
    prompts = prompts_from_config(cfg)
    assert len(prompts) == 2
    assert prompts[0].messages[0]["content"].endswith("Q0?")


# --------------------------------------------------------------------------------------------- formats

RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi"},
    {"instruction": "Add.", "input": "1 + 2", "output": "3"},
    {"instruction": "Say bye.", "input": "", "output": "Bye"},
]
EXPECTED = [
    ([user("Say hi.")], "Hi"),
    ([user("Add.\n\n1 + 2")], "3"),
    ([user("Say bye.")], "Bye"),
]


def _write_format(tmp_path: Path, fmt: str) -> Path:
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", RECORDS)
    if fmt == "json":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(RECORDS, indent=2))
        return path
    if fmt == "json-data":
        path = tmp_path / "p.json"
        path.write_text(json.dumps({"data": RECORDS}))
        return path
    if fmt == "csv":
        path = tmp_path / "p.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(RECORDS[0]))
            writer.writeheader()
            writer.writerows(RECORDS)
        return path
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
        return path
    if fmt == "hf":
        import datasets

        path = tmp_path / "hf_dataset"
        datasets.Dataset.from_list(RECORDS).save_to_disk(str(path))
        return path
    if fmt == "hf-dict":
        import datasets

        path = tmp_path / "hf_dict"
        test = datasets.Dataset.from_list([{"question": "not this split"}])
        datasets.DatasetDict({"test": test, "train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(path))
        return path
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-data", "csv", "parquet", "hf", "hf-dict"])
def test_every_format_gives_the_same_prompts(tmp_path, fmt):
    found = read_prompts(_write_format(tmp_path, fmt))
    assert [(p.messages, p.reference) for p in found.prompts] == EXPECTED
    assert found.format == {"json-data": "json", "hf-dict": "hf"}.get(fmt, fmt)
    # Content-hash ids do not depend on the container format.
    assert [p.id for p in found.prompts] == [prompt_id(m) for m, _ in EXPECTED]


def test_parquet_and_hf_hold_chat_lists(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [user("Q1"), {"role": "assistant", "content": "A1"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chat_hf"))
    for path in (tmp_path / "chat.parquet", tmp_path / "chat_hf"):
        (p,) = load_prompts(path)
        assert (p.messages, p.reference) == ([user("Q1")], "A1")


def test_csv_cell_with_json_chat_list(tmp_path):
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerow([json.dumps([user("Hello, there"), {"role": "assistant", "content": "Hi"}])])
    (p,) = load_prompts(path)
    assert (p.messages, p.reference) == ([user("Hello, there")], "Hi")


def test_hf_dataset_dict_without_train_and_several_splits_is_an_error(tmp_path):
    import datasets

    path = tmp_path / "hf"
    rows = [{"question": "Q"}]
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows), "b": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(path)
    )
    with pytest.raises(DistillError, match="none is called 'train'"):
        load_prompts(path)


# --------------------------------------------------------------------------------------------- ids, dedupe, limit


def test_ids_are_stable_across_loads_and_copies(tmp_path):
    records = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    first = load_prompts(write_jsonl(tmp_path / "a.jsonl", records))
    again = load_prompts(write_jsonl(tmp_path / "b.jsonl", records))
    assert [p.id for p in first] == [p.id for p in again]
    assert len({p.id for p in first}) == 20
    assert all(len(p.id) == 12 and int(p.id, 16) >= 0 for p in first)
    # The id follows the content, not the position.
    shifted = load_prompts(write_jsonl(tmp_path / "c.jsonl", records[5:]))
    assert [p.id for p in shifted] == [p.id for p in first[5:]]


def test_id_column_is_used(tmp_path):
    prompts = load_prompts(write_jsonl(tmp_path / "ids.jsonl", [{"id": 7, "prompt": "a"}, {"id": "x", "prompt": "b"}]))
    assert [p.id for p in prompts] == ["7", "x"]


def test_duplicate_prompts_collapse_to_the_first(tmp_path):
    records = [
        {"question": "Same?", "answer": "first"},
        {"question": "Other?", "answer": "o"},
        {"question": "Same?", "answer": "second"},
        {"question": "Same?", "answer": "third"},
    ]
    found = read_prompts(write_jsonl(tmp_path / "dup.jsonl", records))
    assert [p.reference for p in found.prompts] == ["first", "o"]
    assert found.duplicates == 2


def test_same_explicit_id_for_different_prompts_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": "a", "prompt": "one"}, {"id": "a", "prompt": "two"}])
    with pytest.raises(DistillError, match=r"line 2: id 'a' was already used by line 1"):
        load_prompts(path)


def test_limit_counts_unique_prompts(tmp_path):
    records = [{"prompt": "a"}, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    assert [p.messages[0]["content"] for p in load_prompts(write_jsonl(tmp_path / "l.jsonl", records), limit=2)] == [
        "a",
        "b",
    ]


def test_limit_stops_reading_before_a_later_broken_line(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\nnot json\n')
    assert len(load_prompts(path, limit=2)) == 2


# --------------------------------------------------------------------------------------------- errors


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "ok too"}\n{"prompt": "oops",,}\n{"prompt": "fine"}\n')
    with pytest.raises(DistillError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "line 3" in msg
    assert "Fix or remove that line" in msg


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{oops\n')
    with pytest.raises(DistillError, match="line 3"):
        load_prompts(path)


def test_unknown_shape_names_the_fields_and_data_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "fine"}, {"query": "x", "gold": "y"}])
    with pytest.raises(DistillError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg
    assert "query" in msg and "gold" in msg
    assert "messages" in msg and "instruction" in msg and "question" in msg
    assert "data.columns" in msg


def test_mapped_column_missing_from_a_record(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"query": "x"}, {"other": "y"}])
    with pytest.raises(DistillError, match=r"line 2: data.columns.prompt names column 'query'.*Fields found: other"):
        load_prompts(path, columns={"prompt": "query"})


def test_unknown_column_key(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"query": "x"}])
    with pytest.raises(DistillError, match=r"data.columns: unknown key\(s\) answer"):
        load_prompts(path, columns={"answer": "query"})


def test_missing_file(tmp_path):
    with pytest.raises(DistillError, match=r"nope.jsonl: prompt file not found.*data.prompts"):
        load_prompts(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    with pytest.raises(DistillError) as e:
        load_prompts(path)
    assert "'.txt'" in str(e.value) and ".jsonl" in str(e.value) and ".parquet" in str(e.value)


def test_plain_folder_is_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(DistillError, match="save_to_disk"):
        load_prompts(tmp_path / "folder")


@pytest.mark.parametrize(
    "record",
    [{"prompt": "   "}, {"question": ""}, {"messages": [{"role": "system", "content": "s"}]}, {"prompt": None}],
)
def test_empty_prompt_names_the_row(tmp_path, record):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(DistillError, match=r"e.jsonl: line 2: .*(empty|no non-empty user message)"):
        load_prompts(path)


def test_empty_csv_cell_names_the_row(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("question,answer\nQ1,A1\n,A2\n")
    with pytest.raises(DistillError, match=r"line 3 \(row 2\): the prompt is empty"):
        load_prompts(path)


def test_bad_chat_message(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(DistillError, match="line 1: message 1 has role 'robot'"):
        load_prompts(path)


def test_json_not_a_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "a"}')
    with pytest.raises(DistillError, match="expected a JSON list"):
        load_prompts(path)


def test_invalid_json_file_names_the_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(DistillError, match="line 3"):
        load_prompts(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DistillError, match="no prompts found"):
        load_prompts(path)


def test_unknown_task():
    with pytest.raises(DistillError, match="data.task: unknown task 'poetry'"):
        get_preset("poetry")
