"""The completion store: append/reread, shards, crash repair, duplicate skipping, SIGKILL resume, meta, inspect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distill.data.inspect import inspect_dataset, render_inspection
from distill.data.store import CompletionStore, read_store, record_from, store_meta
from distill.errors import DistillError
from distill.teachers.base import Completion, GenerationParams, Prompt

SRC = Path(__file__).resolve().parents[2] / "src"


def rec(i: int, sample: int = 0, text: str | None = None) -> dict:
    return {
        "id": f"p{i}-{sample}",
        "prompt_id": f"p{i}",
        "sample": sample,
        "messages": [{"role": "user", "content": f"question {i}"}],
        "completion": text if text is not None else f"answer {i}",
        "finish_reason": "stop",
        "completion_tokens": 2,
    }


def lines_of(store_dir: Path) -> list[str]:
    return [line for shard in sorted(store_dir.glob("part-*.jsonl")) for line in shard.read_text().splitlines()]


def test_append_and_reread(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    assert store.append([rec(0), rec(1)]) == 2
    assert store.append([rec(2)]) == 1
    again = CompletionStore(tmp_path / "ds")
    assert again.read_all() == [rec(0), rec(1), rec(2)]
    assert again.done_ids() == {"p0-0", "p1-0", "p2-0"}
    assert len(again) == 3


def test_shards_roll_over(tmp_path):
    store = CompletionStore(tmp_path / "ds", shard_size=4)
    store.append([rec(i) for i in range(6)])
    store.append([rec(i) for i in range(6, 11)])
    assert [p.name for p in store.shards()] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert [len(p.read_text().splitlines()) for p in store.shards()] == [4, 4, 3]
    # A reopened store continues filling the last shard.
    reopened = CompletionStore(tmp_path / "ds", shard_size=4)
    reopened.append([rec(11), rec(12)])
    assert [len(p.read_text().splitlines()) for p in reopened.shards()] == [4, 4, 4, 1]
    assert [r["id"] for r in reopened.read_all()] == [f"p{i}-0" for i in range(13)]


def test_duplicate_ids_are_skipped(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    store.append([rec(0), rec(1)])
    assert store.append([rec(1, text="a second answer"), rec(2), rec(2)]) == 1
    assert CompletionStore(tmp_path / "ds").append([rec(0), rec(2)]) == 0
    ids = [json.loads(line)["id"] for line in lines_of(tmp_path / "ds")]
    assert ids == ["p0-0", "p1-0", "p2-0"]
    assert store.read_all()[1]["completion"] == "answer 1"  # the first answer stays


def test_partial_trailing_line_is_cut_on_open(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    store.append([rec(0), rec(1)])
    shard = store.shards()[-1]
    with open(shard, "a") as f:  # a write killed midway through record 2
        f.write(json.dumps(rec(2))[:25])
    assert read_store(tmp_path / "ds") == [rec(0), rec(1)]  # read-only readers skip it
    assert shard.read_text().endswith(json.dumps(rec(2))[:25])  # ... and leave it alone

    reopened = CompletionStore(tmp_path / "ds")
    assert reopened.done_ids() == {"p0-0", "p1-0"}
    assert shard.read_text().endswith("\n")
    reopened.append([rec(2)])
    assert [json.loads(line)["id"] for line in lines_of(tmp_path / "ds")] == ["p0-0", "p1-0", "p2-0"]


def test_garbage_after_the_last_newline_is_cut(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    store.append([rec(0)])
    with open(store.shards()[-1], "ab") as f:  # zeros a power cut can leave behind, newline included
        f.write(b"\x00" * 30 + b"\n")
    assert CompletionStore(tmp_path / "ds").read_all() == [rec(0)]


def test_damaged_middle_line_is_an_error(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    store.append([rec(0), rec(1)])
    shard = store.shards()[-1]
    lines = shard.read_text().splitlines()
    shard.write_text("{broken\n" + lines[1] + "\n")
    with pytest.raises(DistillError, match=r"part-00000.jsonl: line 1: not valid JSON"):
        CompletionStore(tmp_path / "ds")


def test_record_without_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="without a string 'id'"):
        CompletionStore(tmp_path / "ds").append([{"completion": "x"}])


def test_unserialisable_record_leaves_the_store_consistent(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    store.append([rec(0)])
    bad = {**rec(1), "completion": object()}
    with pytest.raises(TypeError):
        store.append([bad])
    assert store.done_ids() == {"p0-0"}
    assert store.append([rec(1)]) == 1


def test_record_from():
    prompt = Prompt(id="abc", messages=[{"role": "user", "content": "2+2?"}], reference="#### 4")
    params = GenerationParams(max_new_tokens=16, n=2)
    lp = [{"token": "4", "logprob": -0.1, "top": [["4", -0.1], ["5", -2.3]]}]
    c = Completion("abc", 1, "4", "stop", prompt_tokens=5, completion_tokens=1, logprobs=lp)
    r = record_from(prompt, c, "teacher-x", params)
    assert r == {
        "id": "abc-1",
        "prompt_id": "abc",
        "sample": 1,
        "messages": [{"role": "user", "content": "2+2?"}],
        "completion": "4",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": 1,
        "teacher": "teacher-x",
        "params": params.as_dict(),
        "reference": "#### 4",
        "logprobs": lp,
    }
    assert "logprobs" not in record_from(prompt, Completion("abc", 0, "4", "stop"), "t", params)
    with pytest.raises(ValueError):
        record_from(prompt, Completion("other", 0, "4", "stop"), "t", params)


def test_meta_written_atomically_and_compared(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    meta = store_meta("teacher-a", GenerationParams(temperature=0.7), "data/prompts.jsonl", task="math")
    assert store.matches(meta)  # empty store, no meta yet: anything goes
    store.write_meta(meta)
    assert not list((tmp_path / "ds").glob("*.tmp"))
    assert json.loads((tmp_path / "ds" / "meta.json").read_text()) == meta
    assert CompletionStore(tmp_path / "ds").matches(meta)
    other = store_meta("teacher-b", GenerationParams(temperature=0.7), "data/prompts.jsonl", task="math")
    assert not store.matches(other)
    assert store.meta_diff(other) == ["teacher: stored 'teacher-a', now 'teacher-b'"]


def test_records_without_meta_do_not_match(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    store.append([rec(0)])
    assert not store.matches(store_meta("t", GenerationParams(), "p.jsonl"))


def test_to_parquet(tmp_path):
    import pyarrow.parquet as pq

    store = CompletionStore(tmp_path / "ds")
    with_lp = {**rec(1), "logprobs": [{"token": "a", "logprob": -0.5, "top": [["a", -0.5], ["b", -1.0]]}]}
    store.append([rec(0), with_lp])
    out = store.to_parquet(tmp_path / "out" / "data.parquet")
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ["p0-0", "p1-0"]
    assert rows[0]["logprobs"] is None
    assert json.loads(rows[1]["logprobs"]) == with_lp["logprobs"]
    assert rows[1]["messages"] == rec(1)["messages"]


# --------------------------------------------------------------------------------------------- SIGKILL resume

WRITER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from distill.data.store import CompletionStore

    path, total, tear_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = CompletionStore(path, shard_size=25)
    done = store.done_ids()
    todo = [i for i in range(total) if f"p{i}-0" not in done]
    print("resumed", len(done), flush=True)
    for n, k in enumerate(range(0, len(todo), 5)):
        batch = [
            {"id": f"p{i}-0", "prompt_id": f"p{i}", "sample": 0, "completion": f"answer {i} " * 400}
            for i in todo[k : k + 5]
        ]
        if n == tear_at:  # die halfway through writing a line, as a kill during write() can leave it
            line = json.dumps(batch[0]) + "\\n"
            with open(store.shards()[-1], "a") as f:
                f.write(line[: len(line) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        store.append(batch)
        print("batch", flush=True)
        time.sleep(0.005)
    print("finished", flush=True)
    """
)


def _writer(store_dir: Path, total: int, tear_at: int = -1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store_dir), str(total), str(tear_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen, batches: int | None = None) -> tuple[int, int]:
    """Read the writer's progress; SIGKILL it after `batches` batches (None: let it run or die by itself).

    Returns (records it found done when it started, batches it reported finished).
    """
    resumed = int(proc.stdout.readline().split()[1])
    seen = 0
    for line in proc.stdout:
        if line.strip() != "batch":
            break
        seen += 1
        if seen == batches:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode in (0, -signal.SIGKILL), err
    return resumed, seen


def test_sigkill_then_resume_loses_and_duplicates_nothing(tmp_path):
    store_dir, total = tmp_path / "ds", 300
    # 1: killed (by itself) with half a line on disk after 4 finished batches.
    resumed, seen = _finish(_writer(store_dir, total, tear_at=4))
    assert (resumed, seen) == (0, 4)
    assert not sorted(store_dir.glob("part-*.jsonl"))[-1].read_bytes().endswith(b"\n")
    # 2: resumes past the torn line; SIGKILLed from outside while it writes.
    resumed, seen = _finish(_writer(store_dir, total), batches=8)
    assert resumed == 20  # exactly the 4 finished batches; the torn record is not counted as done
    # 3: resumes again and runs to the end.
    resumed, seen = _finish(_writer(store_dir, total))
    assert resumed >= 20 + 8 * 5  # every batch reported finished survived the kill
    assert resumed + 5 * seen >= total

    for shard in store_dir.glob("part-*.jsonl"):
        assert shard.read_bytes().endswith(b"\n")
    records = [json.loads(line) for line in lines_of(store_dir)]  # no broken line anywhere
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == total
    assert set(ids) == {f"p{i}-0" for i in range(total)}
    assert all(r["completion"] == f"answer {r['prompt_id'][1:]} " * 400 for r in records)


# --------------------------------------------------------------------------------------------- inspect


def test_inspect_store_folder(tmp_path):
    store = CompletionStore(tmp_path / "ds")
    records = [rec(i, s, text=f"answer {i}, sample {s}") for i in range(4) for s in range(2)]
    records[0]["completion"] = ""
    records[1]["finish_reason"] = "length"
    records[3]["completion"] = records[2]["completion"]  # duplicate answer to p1
    store.append(records)
    store.write_meta(store_meta("teacher-a", GenerationParams(), "p.jsonl"))

    info = inspect_dataset(tmp_path / "ds")
    assert info["kind"] == "completions"
    assert info["records"] == 8 and info["prompts"] == 4
    assert info["samples_per_prompt"] == {"min": 2, "median": 2.0, "mean": 2.0, "max": 2}
    assert info["finish_reasons"] == {"stop": 7, "length": 1}
    assert info["filters"]["dropped"]["empty"] == 1
    assert info["filters"]["dropped"]["duplicate"] == 1
    assert info["filters"]["kept"] == 6
    assert sum(n for _, n in info["chars"]["histogram"]) == 8
    assert info["chars"]["histogram"][0] == ["0", 1]
    assert info["meta"]["teacher"] == "teacher-a"
    assert len(info["samples"]) == 3
    json.dumps(info)  # plain data, ready for --json

    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(render_inspection(info))
    text = console.export_text()
    assert "records" in text and "kept" in text and "p0-0" in text


def test_inspect_jsonl_of_records_and_prompt_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(rec(i)) + "\n" for i in range(5)))
    info = inspect_dataset(path)
    assert info["kind"] == "completions" and info["records"] == 5

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": "1"}) + "\n" for i in [1, 2, 2]))
    info = inspect_dataset(prompts)
    assert info["kind"] == "prompts"
    assert info["prompts"] == 2 and info["duplicates"] == 1 and info["with_reference"] == 2
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(render_inspection(info))
    assert "question/answer" in console.export_text()


def test_inspect_missing_path(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        inspect_dataset(tmp_path / "nothing")
