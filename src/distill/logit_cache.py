"""Offline teacher cache: the teacher's top-k log-probs at every answer position, computed once, memory-mapped.

Logit KD with a live teacher runs the teacher's forward pass on every step of every epoch, and keeps it in
accelerator memory beside the student. The cache runs it once over the encoded training and validation
examples and keeps, for each *label position* (answer tokens only, where the loss looks), the ``k`` largest
log-probs and their token ids. Training then needs no teacher in memory: the collator attaches the targets
(`distill.train.data.Collator`) and the loss uses them as sparse targets with a tail bucket
(`distill.losses.kd_loss_from_hidden(teacher_topk=...)`).

A cache folder holds::

    cache.json               settings (what the cache is valid for) and sizes
    <split>.logprobs.npy     [tokens, k] float16 (or float32): raw log-softmax at T = 1, sorted high to low per row
    <split>.ids.npy          [tokens, k] int32:   the matching token ids
    <split>.index.npy        [examples, 2] int64: (first row, rows) of each example, in example order

Rows of an example are its label positions t (``labels[t + 1] != -100``) in increasing order. Log-probs are
stored at T = 1, so one cache serves every `distillation.temperature`; the loss softens them itself. float16
keeps a log-prob to within 2^-11 of its size (0.004 at -10, i.e. < 0.5 % of that token's probability), which is
far below the difference between two training runs; `distillation.cache_dtype: float32` doubles the log-prob
bytes for exact values. At k = 64 a token costs 64 x (2 + 4) = 384 bytes (+ 16 bytes per example of index).

`LogitCache.open` refuses a cache that does not match the run (tokenizer, k, data, teacher, dtype), naming what
differs. Building writes into a hidden `.NAME.partial` folder renamed into place at the end; an interrupted
build resumes from the last finished batch when it is started again with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.io import atomic_write_json, read_json
from distill.losses import mix_teacher_logprobs, topk_from_logits
from distill.train.data import IGNORE, Collator
from distill.train.modes import final_hidden, head_of
from distill.train.tokenizers import tokenizer_fingerprint

log = logging.getLogger("distill")

FORMAT = 1
SPLITS = ("train", "validation")
_CHECKED = {
    "format": "cache format",
    "tokenizer": "tokenizer (hash of the token -> id map)",
    "k": "k (distillation.cache_top_k)",
    "data": "data (hash of the encoded examples' input_ids and labels)",
    "teacher": "teacher (model references and weights)",
    "dtype": "log-prob storage (distillation.cache_dtype)",
}


def answer_positions(labels: Sequence[int]) -> int:
    """How many rows an example has in the cache: its positions t with ``labels[t + 1] != -100``."""
    return sum(1 for label in labels[1:] if label != IGNORE)


def data_fingerprint(splits: Mapping[str, Sequence[dict]]) -> str:
    """A short hash of every split's examples (input_ids and labels, in order)."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(f"[{name}:{len(splits[name])}]".encode())
        for ex in splits[name]:
            h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes() + b"|")
            h.update(np.asarray(ex["labels"], dtype=np.int64).tobytes() + b";")
    return h.hexdigest()[:16]


def cache_settings(
    tokenizer: PreTrainedTokenizerBase,
    splits: Mapping[str, Sequence[dict]],
    k: int,
    teacher: object,
    dtype: str = "float16",
) -> dict:
    """What a cache must match to serve a run: pass it to `build_logit_cache` and `LogitCache.open`.

    `teacher` identifies the teacher(s), e.g. ``[{"model": ref, "weight": 1.0}, ...]`` (JSON-serialisable);
    `dtype` is the storage of the log-probs, ``float16`` or ``float32``.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    return {
        "format": FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "k": int(k),
        "data": data_fingerprint(splits),
        "teacher": json.loads(json.dumps(teacher)),
        "dtype": dtype,
    }


@dataclass
class _Split:
    logprobs: np.ndarray  # [tokens, k] memory-mapped
    ids: np.ndarray  # [tokens, k]
    index: np.ndarray  # [examples, 2] (offset, length)


class LogitCache:
    """A finished, validated cache folder; arrays are memory-mapped read-only."""

    def __init__(self, path: Path, meta: dict, splits: dict[str, _Split]):
        self.path, self.meta, self.splits = path, meta, splits

    @classmethod
    def open(cls, path: str | Path, expected: Mapping | None = None) -> LogitCache:
        """Open the cache in `path`; with `expected` (see `cache_settings`) refuse one made for another run."""
        path = Path(path)
        meta = read_json(path / "cache.json")
        if meta is None:
            raise DistillError(
                f"{path}: no logit cache here (cache.json missing); build it with `distill cache-logits`"
            )
        if expected:
            wrong = [
                f"{_CHECKED.get(key, key)}: the cache has {_short(meta.get(key))}, this run needs {_short(value)}"
                for key, value in expected.items()
                if meta.get(key) != value
            ]
            if wrong:
                raise DistillError(
                    f"{path}: this logit cache was made for another run; " + "; ".join(wrong) + ". Delete the "
                    "folder to rebuild it (`distill cache-logits`), or restore the settings it was made with."
                )
        splits = {}
        for name in meta["splits"]:
            splits[name] = _Split(
                *(np.load(path / f"{name}.{part}.npy", mmap_mode="r") for part in ("logprobs", "ids", "index"))
            )
        return cls(path, meta, splits)

    @property
    def k(self) -> int:
        """Targets per position actually stored (``min(k, vocabulary)``)."""
        return int(self.meta["stored_k"])

    @property
    def bytes_per_token(self) -> int:
        """Bytes of log-probs + ids per cached position (the index adds 16 bytes per example)."""
        return int(self.meta["bytes_per_token"])

    def tokens(self, split: str) -> int:
        return int(self.splits[split].logprobs.shape[0])

    def topk(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(log-probs [n, k], ids [n, k]) of example `i`'s n answer positions: views into the memory map."""
        s = self.splits[split]
        offset, length = (int(v) for v in s.index[i])
        return s.logprobs[offset : offset + length], s.ids[offset : offset + length]

    def dataset(self, split: str, examples: Sequence[dict]) -> CachedExamples:
        """`examples` (the ones the cache was made from) with their cached targets, for `Trainer`."""
        if split not in self.splits:
            raise DistillError(f"{self.path}: the logit cache has no {split!r} split (it has {', '.join(self.splits)})")
        return CachedExamples(examples, self, split)


class CachedExamples(Dataset):
    """Encoded examples, each with ``teacher_topk``: its cached (log-probs, ids), read from the memory map."""

    def __init__(self, examples: Sequence[dict], cache: LogitCache, split: str):
        n_cached = len(cache.splits[split].index)
        if len(examples) != n_cached:
            raise DistillError(
                f"{cache.path}: the {split} split has {n_cached} cached examples but this run has {len(examples)}; "
                "delete the cache folder to rebuild it"
            )
        self.examples, self.cache, self.split = examples, cache, split

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {**self.examples[i], "teacher_topk": self.cache.topk(self.split, i)}


# --------------------------------------------------------------------------------------------- building


@torch.no_grad()
def build_logit_cache(
    path: str | Path,
    teachers: Sequence[tuple[PreTrainedModel, float]],
    splits: Mapping[str, Sequence[dict]],
    settings: Mapping,
    *,
    batch_size: int = 8,
    chunk_size: int = 1024,
    on_batch: Callable[[int], None] | None = None,
) -> LogitCache:
    """Run the teacher(s) once over `splits` and write their top-k T = 1 log-probs to a cache folder.

    Args:
        path: the cache folder; replaced when it exists (check it with `LogitCache.open` first).
        teachers: (model, weight) pairs; several are mixed at T = 1 (`losses.mix_teacher_logprobs`) before top-k,
            so the loss's temperature then softens the mixture rather than each member.
        splits: encoded examples per split name (`input_ids`, `labels`), e.g. train and validation.
        settings: `cache_settings(...)` of the run; `settings["k"]` targets are kept per position, stored as
            `settings["dtype"]`.
        batch_size: examples per teacher forward pass.
        chunk_size: answer positions projected to ``[chunk, V]`` logits at a time.
        on_batch: called with the number of examples after each batch (progress bars).
    """
    path = Path(path)
    dtype = settings["dtype"]
    models = [m for m, _ in teachers]
    weights = [float(w) for _, w in teachers]
    vocab = min(head_of(m)[1].shape[0] for m in models)
    k = min(int(settings["k"]), vocab)
    value_dtype = np.dtype(dtype)
    plan = {"settings": dict(settings), "stored_k": k}
    tmp = path.with_name(f".{path.name}.partial")
    if read_json(tmp / "plan.json") != json.loads(json.dumps(plan)):
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    progress = read_json(tmp / "progress.json", {})
    if progress:
        log.info("logit cache: resuming an interrupted build (%s)", ", ".join(f"{s} {n}" for s, n in progress.items()))
    atomic_write_json(tmp / "plan.json", plan)

    names = [name for name in SPLITS if name in splits] + [n for n in splits if n not in SPLITS]
    for name in names:
        examples = splits[name]
        lengths = np.array([answer_positions(ex["labels"]) for ex in examples], dtype=np.int64)
        index = np.stack([np.cumsum(lengths) - lengths, lengths], axis=1) if len(lengths) else np.zeros((0, 2))
        np.save(tmp / f"{name}.index.npy", index.astype(np.int64))
        rows = int(lengths.sum())
        done = int(progress.get(name, 0))
        mode = "r+" if done else "w+"
        values = np.lib.format.open_memmap(tmp / f"{name}.logprobs.npy", mode=mode, dtype=value_dtype, shape=(rows, k))
        ids = np.lib.format.open_memmap(tmp / f"{name}.ids.npy", mode=mode, dtype=np.int32, shape=(rows, k))
        for start in range(done, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            lp, top = _batch_topk(models, weights, batch, k, chunk_size)  # [n, k] each, n = rows of this batch
            first = int(index[start, 0]) if len(batch) else 0
            values[first : first + len(lp)] = lp.clamp_min(float(np.finfo(value_dtype).min)).numpy()
            ids[first : first + len(top)] = top.numpy()
            values.flush()
            ids.flush()
            progress[name] = start + len(batch)
            atomic_write_json(tmp / "progress.json", progress)
            if on_batch:
                on_batch(len(batch))
        del values, ids

    tokens = {name: int(sum(answer_positions(ex["labels"]) for ex in splits[name])) for name in names}
    per_token = k * (value_dtype.itemsize + np.dtype(np.int32).itemsize)
    index_bytes = 16 * sum(len(splits[n]) for n in names)
    meta = {
        **dict(settings),
        "stored_k": k,
        "logprobs": f"{dtype} log-softmax at T = 1 (temperature-independent), top {k} per answer position",
        "ids": "int32",
        "splits": names,
        "examples": {name: len(splits[name]) for name in names},
        "tokens": tokens,
        "bytes_per_token": per_token,
        "index_bytes": index_bytes,
        "total_bytes": per_token * sum(tokens.values()) + index_bytes,
    }
    atomic_write_json(tmp / "cache.json", meta)
    for name in ("plan.json", "progress.json"):
        (tmp / name).unlink(missing_ok=True)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    log.info(
        "logit cache: %s answer tokens, top %d: %d bytes per token (%s log-probs + int32 ids), %.1f MiB in %s",
        f"{sum(tokens.values()):,}",
        k,
        per_token,
        dtype,
        meta["total_bytes"] / 2**20,
        path,
    )
    return LogitCache.open(path)


def _batch_topk(
    models: Sequence[PreTrainedModel], weights: Sequence[float], batch: Sequence[dict], k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (T = 1 log-probs fp32, ids int32) of the batch's answer positions, example by example, on the CPU."""
    device = next(models[0].parameters()).device
    collated = Collator(0)(list(batch))  # any pad id: padded positions are masked and never read
    ids, mask = collated["input_ids"].to(device), collated["attention_mask"].to(device)
    valid = collated["labels"][:, 1:].ne(IGNORE).to(device)  # [B, T-1]
    rows = [final_hidden(m, ids, mask)[:, :-1][valid] for m in models]  # n x [N, H]; row-major = example order
    heads = [head_of(m) for m in models]
    out_lp, out_ids = [], []
    for start in range(0, rows[0].shape[0], chunk_size):
        logits = [
            F.linear(r[start : start + chunk_size], w, b).float() for r, (_, w, b) in zip(rows, heads, strict=True)
        ]
        if len(logits) == 1:
            lp, top = topk_from_logits(logits[0], k)
        else:
            lp, top = mix_teacher_logprobs(logits, weights, temperature=1.0).topk(k, dim=-1)
        out_lp.append(lp.cpu())
        out_ids.append(top.to(torch.int32).cpu())
    if not out_lp:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32)
    return torch.cat(out_lp), torch.cat(out_ids)


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
