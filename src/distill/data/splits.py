"""Deterministic train/validation/test splits by prompt: all samples of one prompt share a split.

Prompt ids are ordered by `sha256(f"{seed}:{id}")` and cut at `round(train * N)` and
`round((train + validation) * N)`, so the fractions are exact (up to rounding), the same seed always
gives the same split, and the split of an id does not depend on the order the ids come in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from distill.config import SplitConfig
from distill.errors import DistillError

SPLITS = ("train", "validation", "test")


def assign_splits(prompt_ids: Iterable[str], cfg: SplitConfig, seed: int) -> dict[str, str]:
    """prompt id -> "train" | "validation" | "test".

    With 3 or more prompts, a split with a nonzero fraction gets at least one prompt (taken from
    the largest split), so a small run still has something to validate and test on.
    """
    ids = list(dict.fromkeys(prompt_ids))  # unique, first-seen order (the order does not matter)
    ids.sort(key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    n = len(ids)
    n_train = round(cfg.train * n)
    n_val = round((cfg.train + cfg.validation) * n) - n_train
    counts = {"train": n_train, "validation": n_val, "test": n - n_train - n_val}
    fractions = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    if n >= 3:
        for name in ("validation", "test", "train"):
            if fractions[name] > 0 and counts[name] == 0:
                donor = max((s for s in SPLITS if counts[s] > 1), key=lambda s: counts[s])
                counts[donor] -= 1
                counts[name] += 1
    out, start = {}, 0
    for name in SPLITS:
        for pid in ids[start : start + counts[name]]:
            out[pid] = name
        start += counts[name]
    return out


def split_records(records: Iterable[dict], assignment: dict[str, str]) -> dict[str, list[dict]]:
    """Group store records by the split of their `prompt_id`; every split is present, maybe empty."""
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in records:
        pid = record.get("prompt_id")
        if pid not in assignment:
            raise DistillError(
                f"record {record.get('id')!r}: prompt id {pid!r} is not among the prompts that were split. "
                "The dataset does not match the prompt file; regenerate it (delete the run's data folder)."
            )
        out[assignment[pid]].append(record)
    return out
