"""Two CPU processes (torchrun, gloo): the Trainer's DDP wraps the student, and the loss must run the student's
forward through the wrapper or DDP never averages the gradients. Equal weights on both ranks after training on
different data shards show that it does; the training log is written once, with the terms of both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
from pathlib import Path

import torch

from distill.config import DistillationConfig, TrainingConfig
from distill.train.data import encode_records
from distill.train.trainer import train_student
from tiny import make_tokenizer, qa_records, tiny_llama

tok = make_tokenizer()
teacher, student = tiny_llama(2, 0, tok), tiny_llama(1, 1, tok, tied=True)
examples = encode_records(tok, qa_records(24), 64)
training = TrainingConfig(max_steps=3, batch_size=4, save_every=100, eval_every=100, learning_rate=1e-2)
model, _ = train_student(
    student, tok, teacher, examples, [], training, DistillationConfig(alpha=0.5), Path(sys.argv[1])
)
rank = torch.distributed.get_rank()
flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
print(f"RANK {rank} WEIGHTS {flat.sum().item():.12e} {flat.abs().sum().item():.12e}", flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU, as in CI")
def test_ddp_training_keeps_the_ranks_in_sync(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    tests_dir = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(port)]
    done = subprocess.run(
        [*cmd, str(script), str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    weights = sorted(line.split(" WEIGHTS ")[1] for line in done.stdout.splitlines() if " WEIGHTS " in line)
    assert len(weights) == 2, done.stdout
    assert weights[0] == weights[1], "the ranks' students differ: DDP did not average the gradients"
    # One writer, and terms that add up to the logged loss (alpha 0.5): each process's terms are only its part.
    rows = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"], rel=1e-4)
