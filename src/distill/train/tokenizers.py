"""Teacher / student tokenizer compatibility, checked before any token-level (logit) KD.

Logit KD compares two distributions id by id, so both models must mean the same token by every id: the
token -> id maps must be equal, not just the vocabulary sizes (two tokenizers of 32,000 entries can share
almost nothing). What may differ is the number of *embedding rows*: checkpoints pad their embedding matrix
(Qwen2.5: 151,936 rows in the small models, 152,064 in the large ones, one tokenizer of 151,665 entries).
The loss then uses the ids both heads share, the first ``min(rows)``; every real token id is below that.
"""

from __future__ import annotations

import hashlib
import json

from transformers import PreTrainedTokenizerBase

from distill.errors import DistillError

SEQUENCE_HINT = (
    "Token-level KD (distillation.mode: logit / on_policy, logit_cache, extra_teachers) needs one vocabulary. "
    "Use `distillation.mode: sequence` (sequence-level KD: SFT on the teacher's text, works across tokenizers), "
    "or a student that uses the teacher's tokenizer."
)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id map (added and special tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def shared_vocab_size(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_rows: int,
    student_rows: int,
    *,
    teacher_name: str = "teacher",
    student_name: str = "student",
    hint: str = SEQUENCE_HINT,
) -> int:
    """Check that both models tokenize alike and return how many ids their heads share.

    Args:
        teacher_tokenizer, student_tokenizer: compared by their token -> id maps.
        teacher_rows, student_rows: output-head rows (``model.get_output_embeddings().weight.shape[0]``), which may
            exceed the tokenizer's size (padded embeddings).
        teacher_name, student_name: how the two are called in the error message (e.g. an extra teacher's ref).
        hint: what to do about a mismatch, appended to the error message.

    Raises:
        DistillError: the maps differ, or a real token id has no row in one of the heads.
    """
    t_map, s_map = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_map != s_map:
        only_t = sorted(t_map.keys() - s_map.keys(), key=t_map.get)
        only_s = sorted(s_map.keys() - t_map.keys(), key=s_map.get)
        moved = sorted(k for k in t_map.keys() & s_map.keys() if t_map[k] != s_map[k])
        parts = []
        if only_t:
            parts.append(f"{len(only_t)} tokens only in the {teacher_name}'s (e.g. {_examples(only_t)})")
        if only_s:
            parts.append(f"{len(only_s)} only in the {student_name}'s (e.g. {_examples(only_s)})")
        if moved:
            parts.append(f"{len(moved)} with other ids (e.g. {_examples(moved)})")
        raise DistillError(
            f"the {teacher_name} and {student_name} tokenizers differ ({len(t_map)} vs {len(s_map)} entries; "
            f"{', '.join(parts)}). {hint}"
        )
    shared = min(teacher_rows, student_rows)
    top = max(t_map.values(), default=-1) + 1
    if top > shared:
        which, rows = (teacher_name, teacher_rows) if teacher_rows < student_rows else (student_name, student_rows)
        raise DistillError(
            f"the tokenizer has ids up to {top - 1} but the {which}'s output head has only {rows} rows: "
            f"the model does not match its tokenizer. {hint}"
        )
    return shared


def head_rows(model) -> int:
    """Rows of a causal LM's output head (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.get_output_embeddings().weight.shape[0])


def _examples(tokens: list[str], n: int = 3) -> str:
    return ", ".join(repr(t) for t in tokens[:n])
