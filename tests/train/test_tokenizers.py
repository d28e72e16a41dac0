"""Logit KD needs one token -> id map; padded embedding rows are fine, another vocabulary is not."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distill.config import DistillationConfig, TrainingConfig
from distill.errors import DistillError
from distill.train.data import encode_records
from distill.train.tokenizers import shared_vocab_size, tokenizer_fingerprint
from distill.train.trainer import train_student
from tiny import qa_records, tiny_llama


def tokenizer_from(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def swapped(tokenizer) -> PreTrainedTokenizerFast:
    """The same tokens, two of them with each other's ids: same size, different map."""
    vocab = tokenizer.get_vocab()
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return tokenizer_from(vocab)


def test_same_tokenizer_with_padded_embeddings_passes_and_trains(tmp_path, tiny_tokenizer):
    assert shared_vocab_size(tiny_tokenizer, tiny_tokenizer, 128, 96) == 96
    teacher = tiny_llama(2, 0, tiny_tokenizer, vocab_size=128)  # padded rows, like 152,064 vs 151,936
    student = tiny_llama(1, 1, tiny_tokenizer, vocab_size=96)
    examples = encode_records(tiny_tokenizer, qa_records(12), 64)
    training = TrainingConfig(max_steps=2, batch_size=4, eval_every=100, save_every=100)
    _, summary = train_student(
        student,
        tiny_tokenizer,
        teacher,
        examples,
        [],
        training,
        DistillationConfig(mode="logit"),
        tmp_path,
        teacher_tokenizer=tiny_tokenizer,
    )
    assert summary["steps"] == 2


def test_a_different_vocabulary_is_refused_with_a_pointer_to_sequence_mode(tmp_path, tiny_tokenizer):
    other = tokenizer_from({"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "hello": 3, "world": 4})
    with pytest.raises(DistillError, match="distillation.mode: sequence") as e:
        shared_vocab_size(other, tiny_tokenizer, 96, 96)
    assert "tokenizers differ" in str(e.value) and "only in the student's" in str(e.value)

    # Same size, other ids: the sizes match, the meaning does not.
    permuted = swapped(tiny_tokenizer)
    assert len(permuted.get_vocab()) == len(tiny_tokenizer.get_vocab())
    assert tokenizer_fingerprint(permuted) != tokenizer_fingerprint(tiny_tokenizer)
    with pytest.raises(DistillError, match="2 with other ids"):
        shared_vocab_size(permuted, tiny_tokenizer, 96, 96)

    # train_student checks before it trains anything.
    examples = encode_records(tiny_tokenizer, qa_records(6), 64)
    with pytest.raises(DistillError, match="distillation.mode: sequence"):
        train_student(
            tiny_llama(1, 1, tiny_tokenizer),
            tiny_tokenizer,
            tiny_llama(2, 0, tiny_tokenizer),
            examples,
            [],
            TrainingConfig(max_steps=1),
            DistillationConfig(mode="logit"),
            tmp_path,
            teacher_tokenizer=permuted,
        )


def test_a_head_smaller_than_the_tokenizer_is_refused(tiny_tokenizer):
    n = len(tiny_tokenizer.get_vocab())
    with pytest.raises(DistillError, match=f"ids up to {n - 1} but the student's output head has only 20 rows"):
        shared_vocab_size(tiny_tokenizer, tiny_tokenizer, 96, 20)
