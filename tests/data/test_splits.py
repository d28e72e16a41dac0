"""Splits: deterministic for a seed, grouped by prompt, exact fractions, small runs still get val/test."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from distill.config import SplitConfig
from distill.data.splits import assign_splits, split_records
from distill.errors import DistillError

IDS = [f"prompt-{i:03d}" for i in range(100)]


def test_exact_fractions_for_100():
    assignment = assign_splits(IDS, SplitConfig(), seed=0)
    assert set(assignment) == set(IDS)
    assert Counter(assignment.values()) == {"train": 80, "validation": 10, "test": 10}


def test_other_fractions():
    counts = Counter(assign_splits(IDS, SplitConfig(train=0.7, validation=0.2, test=0.1), seed=1).values())
    assert counts == {"train": 70, "validation": 20, "test": 10}


def test_deterministic_and_order_independent():
    shuffled = IDS[:]
    random.Random(4).shuffle(shuffled)
    assert assign_splits(IDS, SplitConfig(), seed=3) == assign_splits(shuffled, SplitConfig(), seed=3)


def test_different_seed_different_assignment():
    a = assign_splits(IDS, SplitConfig(), seed=0)
    b = assign_splits(IDS, SplitConfig(), seed=1)
    assert a != b
    assert Counter(b.values()) == Counter(a.values())


def test_samples_of_a_prompt_share_a_split():
    records = [{"id": f"{pid}-{s}", "prompt_id": pid, "sample": s} for pid in IDS[:30] for s in range(4)]
    assignment = assign_splits([r["prompt_id"] for r in records], SplitConfig(), seed=0)
    groups = split_records(records, assignment)
    assert sum(len(v) for v in groups.values()) == len(records)
    where = {}
    for split, rows in groups.items():
        for r in rows:
            assert where.setdefault(r["prompt_id"], split) == split
    assert Counter(where.values()) == {"train": 24, "validation": 3, "test": 3}


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_small_runs_get_validation_and_test(n):
    counts = Counter(assign_splits(IDS[:n], SplitConfig(), seed=0).values())
    assert counts["validation"] >= 1 and counts["test"] >= 1 and counts["train"] >= 1
    assert sum(counts.values()) == n


def test_zero_fraction_stays_empty():
    counts = Counter(assign_splits(IDS[:5], SplitConfig(train=0.9, validation=0.1, test=0.0), seed=0).values())
    assert counts == {"train": 4, "validation": 1}


def test_tiny_inputs():
    assert assign_splits([], SplitConfig(), seed=0) == {}
    assert list(assign_splits(["only"], SplitConfig(), seed=0).values()) == ["train"]


def test_split_records_has_every_split_and_rejects_unknown_prompts():
    groups = split_records([], {})
    assert groups == {"train": [], "validation": [], "test": []}
    with pytest.raises(DistillError, match="does not match the prompt file"):
        split_records([{"id": "x-0", "prompt_id": "x"}], {"y": "train"})
