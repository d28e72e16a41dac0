"""Two CPU processes (torchrun, gloo): the Trainer's DDP wraps the student, and the loss must run the student's
forward through the wrapper or DDP never averages the gradients. Equal weights on both ranks after training on
different data shards show that it does; the training log is written once, with the terms of both ranks. The
same holds with transfer terms (learned projections used outside the wrapper's forward), on-policy batches and a
LoRA student. And a step on 2 processes has the loss and gradient of one process on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import torchrun

SCRIPT = """
import sys
from pathlib import Path

import torch

from distill.config import DistillationConfig, LoraConfig, StudentConfig, TrainingConfig, TransferPair
from distill.student import add_lora
from distill.train import transfer
from distill.train.data import encode_records
from distill.train.trainer import train_student
from tiny import make_tokenizer, qa_records, tiny_llama

case = sys.argv[2]
tok = make_tokenizer()
# Different widths under transfer: the cosine pair then trains a projection.
teacher, student = tiny_llama(2, 0, tok), tiny_llama(1, 1, tok, hidden=32 if case == "transfer" else 64, tied=True)
if case == "lora":  # a PEFT wrapper under the DDP wrapper; only the adapters train
    student = add_lora(student, StudentConfig(lora=LoraConfig(r=4, alpha=8, dropout=0.0)))
examples = encode_records(tok, qa_records(24), 64)
training = TrainingConfig(max_steps=3, batch_size=4, save_every=100, eval_every=100, learning_rate=1e-2)
dist = {
    "logit": DistillationConfig(alpha=0.5),
    "lora": DistillationConfig(alpha=0.5),
    "transfer": DistillationConfig(
        alpha=0.5, transfer=[TransferPair(teacher=1, student=0), TransferPair(teacher=0, student=0, loss="attention")]
    ),
    "on_policy": DistillationConfig(alpha=0.5, mode="on_policy", on_policy_fraction=1.0),
}[case]
projections = []
detach = transfer.LayerTransfer.detach
def keep_projections(model):  # the projections leave the student before it is returned
    attached = getattr(transfer.base_model(model), transfer.ATTRIBUTE, None)
    if attached is not None:
        projections[:] = [p.detach().clone() for p in attached.parameters()]
    detach(model)
if case == "transfer":
    transfer.LayerTransfer.detach = staticmethod(keep_projections)
model, _ = train_student(student, tok, teacher, examples, [], training, dist, Path(sys.argv[1]))
rank = torch.distributed.get_rank()
flat = torch.cat([p.detach().flatten() for p in [*model.parameters(), *projections]]).double()
print(f"RANK {rank} WEIGHTS {flat.sum().item():.12e} {flat.abs().sum().item():.12e} {len(projections)}", flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU, as in CI")
@pytest.mark.parametrize("case", ["logit", "transfer", "on_policy", "lora"])
def test_ddp_training_keeps_the_ranks_in_sync(tmp_path, case):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    done = torchrun([str(script), str(tmp_path / "run"), case], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = sorted(line.split(" WEIGHTS ")[1] for line in done.stdout.splitlines() if " WEIGHTS " in line)
    assert len(weights) == 2, done.stdout
    assert weights[0] == weights[1], "the ranks' students differ: DDP did not average the gradients"
    assert weights[0].endswith(" 1" if case == "transfer" else " 0")  # the projection was compared too
    # One writer, and terms that add up to the logged loss (alpha 0.5): each process's terms are only its part.
    rows = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        transfer_terms = sum(v for k, v in r.items() if k.startswith("transfer/"))
        assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"] + transfer_terms, rel=1e-4)
        assert (transfer_terms > 0) == (case == "transfer")


EQUIVALENCE = """
import sys
from pathlib import Path

from distill.config import DistillationConfig, TrainingConfig
from distill.distributed import main_process_first
from distill.logit_cache import LogitCache, build_logit_cache, cache_settings
from distill.train.data import encode_records
from distill.train.trainer import train_student
from tiny import make_tokenizer, qa_records, tiny_llama

out, batch, accumulation, signal = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tok = make_tokenizer()
teacher, student = tiny_llama(2, 0, tok), tiny_llama(1, 1, tok, tied=True)
examples = encode_records(tok, qa_records(12), 64)  # one step sees all 12, however they are split
training = TrainingConfig(
    max_steps=1, batch_size=batch, gradient_accumulation_steps=accumulation, warmup_ratio=0.0, save_every=100,
    eval_every=100,
)
dist = DistillationConfig(alpha=0.5, temperature=2.0, logit_cache=signal == "cache")
cache = {}
if signal == "cache":  # each process looks its examples' rows up in one cache
    with main_process_first():
        settings = cache_settings(tok, {"train": examples}, 16, [{"model": "tiny", "weight": 1.0}])
        path = out.parent / (out.name + "-cache")
        if (path / "cache.json").is_file():
            cache = {"logit_cache": LogitCache.open(path, settings)}
        else:
            cache = {"logit_cache": build_logit_cache(path, [(teacher, 1.0)], {"train": examples}, settings)}
    teacher = None
train_student(student, tok, teacher, examples, [], training, dist, out, **cache)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU, as in CI")
@pytest.mark.parametrize("signal", ["live", "cache"])
def test_ddp_step_equals_one_process_on_the_whole_batch(tmp_path, signal):
    """2 processes x 3 examples x 2 accumulation steps = 1 process x 12 examples: same loss, same gradient.

    The loss is normalised by the tokens of the whole step on all processes, and DDP averages the gradients;
    a missing or doubled world-size factor, or a per-micro-batch normalisation, changes the gradient norm. With
    the logit cache, each process must also find its own examples' rows.
    """
    script = tmp_path / "equivalence.py"
    script.write_text(EQUIVALENCE)
    done = torchrun([str(script), str(tmp_path / "ddp"), "3", "2", signal], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    single = [sys.executable, str(script), str(tmp_path / "one"), "12", "1", signal]
    done = subprocess.run(single, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp, one = (json.loads((tmp_path / d / "training_log.jsonl").read_text().splitlines()[0]) for d in ("ddp", "one"))
    for key in ("loss", "kd", "ce", "grad_norm"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-4), key
