"""Tiny random models and data made in the tests: no downloads, seconds to build.

Teacher and student are *different* tiny Llamas (other depths, other seeds), so the KD term is not
zero from the start. Importable from any test module (`from tiny import tiny_llama`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "user: what is two plus two ?",
    "assistant: two plus two is four .",
    "user: name a colour of the sky .",
    "assistant: the sky is blue on a clear day .",
    "user: how many legs does a cat have ?",
    "assistant: a cat has four legs and a tail .",
    "system: you are a helpful assistant .",
    "user: say hello to the world in one word .",
    "assistant: hello world , it is a fine day to learn and to teach .",
    "a dog is an animal . the sun is a star . water is wet . the moon is bright at night .",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on `CORPUS` (about 60 tokens), with pad and eos."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_llama(
    layers: int, seed: int, tokenizer, vocab_size: int = 96, hidden: int = 64, tied: bool = False
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


SENTENCES = ["the sky is blue on a clear day .", "a cat has four legs and a tail .", "two plus two is four ."]


def qa_records(n: int = 24) -> list[dict]:
    """Store-like records (`messages` + `completion`) over the tiny vocabulary, n a multiple of 6."""
    return [
        {"messages": [{"role": "user", "content": f"what is {w} ?"}], "completion": SENTENCES[i % 3]}
        for i, w in enumerate(["sky", "cat", "two", "dog", "sun", "moon"] * (n // 6))
    ]


@torch.no_grad()
def kl_to_teacher(student, teachers, batch, weights=None) -> float:
    """Mean forward KL(teacher || student) over the answer positions of a collated batch.

    `teachers` is one model or a list (their mixture with `weights`, default equal: multi-teacher KD).
    """
    teachers = teachers if isinstance(teachers, list | tuple) else [teachers]
    weights = torch.tensor(weights or [1.0] * len(teachers), dtype=torch.float32)
    mask = batch["labels"][:, 1:] != -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**inputs).logits[:, :-1][mask].float().log_softmax(-1)
    probs = [t(**inputs).logits[:, :-1][mask].float().softmax(-1) for t in teachers]
    p = sum(w * q for w, q in zip(weights / weights.sum(), probs, strict=True))
    v = min(s.shape[-1], p.shape[-1])
    p, s = p[:, :v], s[:, :v]
    return float((p * (p.clamp_min(1e-30).log() - s)).sum(-1).mean())


def write_prompts(path: Path, n: int = 30) -> Path:
    words = ["sky", "cat", "dog", "sun", "moon", "water", "world", "day"]
    rows = [{"prompt": f"what is the {words[i % len(words)]} ? say it {i} times ."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def torchrun(args: list[str], cwd: Path, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc ARGS`` on CPU (gloo) with a free loopback port; tests/ on the path."""
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={port}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
