"""One KD training step with the teacher in the loop: our `train_student` vs TRL's `GKDTrainer`, same batch.

Run with no arguments: ``python bench/kd_step.py`` (``DISTILL_HOME`` pointing at a cache where the built-in teacher
is already converted saves ~40 s). Ten processes (5 cases x 2 interleaved runs, ``--repeats``): about 6.5 minutes
on an idle 2-core machine; on a machine busy with other jobs ``--threads 1`` gives steadier figures (see
``use_threads`` in bench/_common.py) and ``--repeats 1`` halves the time.

Setting, the same for every case: teacher SmolLM2-135M-Instruct (30 layers, vocabulary 49,152); student its depth-
pruned copy with 10 of the 30 layers (``prune_layers(teacher, uniform_layers(30, 10))``); one fixed batch of 4
sequences of 256 tokens (a chat-templated user message of ~128 tokens made of quickstart prompts, then an answer
whose ~128 tokens carry the labels), encoded with ``encode_records`` and padded by ``Collator``; forward KL at
``T = 2`` with ``alpha = 1`` (pure KD: GKD has no hard-label term); AdamW with the learning rate and schedule of
our default ``TrainingConfig``; CUDA in bf16 when available, else CPU in fp32. Cases, each in a fresh process:

* ``ours``: :func:`distill.train.trainer.train_student`, the function ``distill run`` calls, with the teacher in
  memory. Its progress bar (``RichProgress``, display only) is swapped for the measuring callback.
* ``trl``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy samples), ``beta=0`` (forward KL),
  ``temperature=2``, given the same pre-tokenised examples and our ``Collator`` (so the same batch), the same
  optimiser settings, no gradient checkpointing (SFTConfig turns it on by default; ours is off). Note: GKD's
  ``temperature`` only shapes its on-policy sampling; its loss is computed at T = 1 whatever it is set to, so the
  two losses differ by the temperature (a division of the logits, negligible in cost).
* ``ours+cache``: ``train_student`` reading the teacher's top-64 log-probs from an offline logit cache
  (:mod:`distill.logit_cache`) built beforehand from the same examples (building it is not timed: it is done
  once per dataset); the teacher is freed before training, as in a real cached run.
* ``trl+ckpt`` and ``ours+cache+ckpt``: the same two with activation (gradient) checkpointing on, which is
  ``GKDConfig``'s own default (``training.gradient_checkpointing: true`` for ours). With the teacher gone and
  the logits chunked, what is left of our step's memory is mostly the student's activations, which only
  checkpointing removes; this pair compares both trainers at that setting.

Each case runs 1 warm-up step and then 2 measured steps with ``Trainer.train()``; a callback times each step from
``on_step_begin`` to ``on_step_end``: forward of teacher and student, loss, backward, gradient clipping, optimiser
step and ``zero_grad``. ``step s`` is the best measured step of all runs of the case (the least disturbed by other
jobs on the machine); every step time is printed too, the warm-up step first.
``tok/s`` counts all tokens of the batch (4 x 256, prompt and answer: both models process every one), so it is
the same work for every case. The breakdown (``teacher s``, ``student fwd s``, ``optim s``, ``rest s`` = LM
head + loss + backward + clipping) comes from forward hooks on the two decoder trunks and the optimiser callbacks.

Memory, per case (see bench/_common.py for the method: RSS on CPU, ``max_memory_allocated`` on CUDA):

* ``weights MiB``: what the models hold (teacher + student; the student alone with the cache), read in once before
  the baseline: safetensors weights are memory-mapped and would otherwise page in during the first step and count
  as training memory;
* ``train MiB``: the peak during training above the loaded models (the baseline is taken in ``on_train_begin``):
  gradients, optimiser state, activations, logits and loss temporaries. The headline ``memory_ratio`` is ours over
  TRL on this figure;
* ``total MiB``: weights + train, the footprint of the run above the Python process with its imports;
  ``total_memory_ratio`` compares these (this is where the cache's dropped teacher shows);
* ``step MiB``: the peak of one measured step above the state just before it (optimiser state already exists,
  gradients are not allocated yet): the step's working memory.

The last line printed holds the headline figures: ``speedup`` (TRL step time / ours), ``memory_ratio``,
``total_memory_ratio``, the same for the cache (``cache_*``, against ``trl``) and for the checkpointed pair
(``ckpt_cache_*``, ``ours+cache+ckpt`` against ``trl+ckpt``).
"""

from __future__ import annotations

import gc
import itertools
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from _common import (
    MIB,
    PROMPTS_FILE,
    TEACHER,
    PeakMemory,
    best,
    case_main,
    device_name,
    emit_case,
    load_average,
    memory_state,
    pick_device,
    print_table,
    run_cases,
    summary_line,
    synchronize,
)
from distill.config import DistillationConfig, TrainingConfig
from distill.models import load_model
from distill.student import decoder_layers, prune_layers, uniform_layers
from distill.teachers.local import chat_prompt_ids
from distill.train import trainer as distill_trainer
from distill.train.data import IGNORE, Collator, encode_records

KEEP_LAYERS = 10
BATCH = 4
SEQ_LEN = 256
WARMUP_STEPS = 1
MEASURED_STEPS = 2
TEMPERATURE = 2.0
ALPHA = 1.0
CACHE_TOP_K = 64


def make_examples(tokenizer) -> list[dict]:
    """BATCH encoded examples of SEQ_LEN tokens: a ~SEQ_LEN/2-token user message, then an answer with labels."""
    with PROMPTS_FILE.open(encoding="utf-8") as f:
        sentences = itertools.cycle([json.loads(line)["prompt"] for line in f if line.strip()])
    records = []
    for _ in range(BATCH):
        user: list[str] = []
        while len(chat_prompt_ids(tokenizer, [{"role": "user", "content": " ".join(user)}])) < SEQ_LEN // 2:
            user.append(next(sentences))
        answer: list[str] = []
        while len(tokenizer(" ".join(answer), add_special_tokens=False)["input_ids"]) < SEQ_LEN // 2 + 8:
            answer.append(next(sentences))
        records.append({"messages": [{"role": "user", "content": " ".join(user)}], "completion": " ".join(answer)})
    return encode_records(tokenizer, records, max_length=SEQ_LEN)  # truncated to exactly SEQ_LEN tokens


class StepProbe(TrainerCallback):
    """Times every optimisation step (and its parts) and tracks peak memory; see the module docstring."""

    def __init__(self, device: torch.device, student, teacher=None) -> None:
        self.device = device
        self.meter = PeakMemory(device)
        self.steps: list[dict] = []
        self.in_step = False
        self.train_base = 0
        self.abs_peak = 0
        self._hook(student, "student_fwd_s")
        if teacher is not None:
            self._hook(teacher, "teacher_s")

    def _hook(self, model, key: str) -> None:
        # The decoder trunk (the layers' parent): ours calls it directly (no LM head), TRL through the model's
        # forward; both go through it exactly once per model and step.
        trunk, _, _ = decoder_layers(model)

        def pre(module, args, kwargs):
            if self.in_step:
                synchronize(self.device)
                module._probe_start = time.perf_counter()

        def post(module, args, kwargs, output):
            if self.in_step:
                synchronize(self.device)
                self.current[key] += time.perf_counter() - module._probe_start

        trunk.register_forward_pre_hook(pre, with_kwargs=True)
        trunk.register_forward_hook(post, with_kwargs=True)

    def _absolute_peak(self) -> None:
        self.abs_peak = max(self.abs_peak, self.meter.peak_bytes() + self.meter.base)

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.start()
        self.train_base = self.meter.base

    def on_step_begin(self, args, state, control, **kwargs):
        self._absolute_peak()
        measured = state.global_step >= WARMUP_STEPS
        if measured and self.meter.resettable:
            self.meter.start()  # the step's own peak, above the warm state
        self.current = {"measured": measured, "teacher_s": 0.0, "student_fwd_s": 0.0, "optim_s": 0.0}
        self.in_step = True
        synchronize(self.device)
        self.current["start"] = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.current["optim_start"] = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.current["optim_s"] += time.perf_counter() - self.current.pop("optim_start")

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        step = self.current
        step["step_s"] = time.perf_counter() - step.pop("start")
        self.in_step = False
        if step["measured"] and self.meter.resettable:
            step["step_mib"] = self.meter.peak_bytes() / MIB
        self._absolute_peak()
        step["rest_s"] = step["step_s"] - step["teacher_s"] - step["student_fwd_s"] - step["optim_s"]
        self.steps.append(step)

    def result(self, weights_bytes: int, batch: dict) -> dict:
        measured = [s for s in self.steps if s["measured"]]
        best = min(measured, key=lambda s: s["step_s"])
        return {
            **{k: best[k] for k in ("step_s", "teacher_s", "student_fwd_s", "optim_s", "rest_s")},
            "all_step_s": [round(s["step_s"], 3) for s in self.steps],
            "step_mib": best.get("step_mib"),
            "weights_mib": weights_bytes / MIB,
            "train_mib": (self.abs_peak - self.train_base) / MIB,
            "tokens": int(batch["attention_mask"].sum()),
            "label_tokens": int(batch["labels"][:, 1:].ne(IGNORE).sum()),
            "method": self.meter.method,
        }


def training_config(checkpointing: bool = False) -> TrainingConfig:
    return TrainingConfig(
        max_steps=WARMUP_STEPS + MEASURED_STEPS, batch_size=BATCH, gradient_checkpointing=checkpointing
    )


def run_ours(
    student, tokenizer, teacher, examples, out_dir: Path, probe: StepProbe, cache=None, checkpointing=False
) -> None:
    """`train_student` as `distill run` calls it; only its progress bar is replaced by the probe."""
    distill_cfg = DistillationConfig(
        mode="logit", loss="forward_kl", temperature=TEMPERATURE, alpha=ALPHA, logit_cache=cache is not None
    )
    if not hasattr(distill_trainer, "RichProgress"):
        raise SystemExit("distill.train.trainer.RichProgress is gone: update bench/kd_step.py to add its probe")
    distill_trainer.RichProgress = lambda: probe  # display only; the probe takes its slot among the callbacks
    kwargs = {"logit_cache": cache} if cache is not None else {}
    distill_trainer.train_student(
        student, tokenizer, teacher, examples, [], training_config(checkpointing), distill_cfg, out_dir, **kwargs
    )


def run_trl(student, tokenizer, teacher, examples, out_dir: Path, probe: StepProbe, checkpointing=False) -> None:
    """TRL's GKD trainer on the same examples and batches, with our optimiser settings."""
    from datasets import Dataset
    from trl.import_utils import TRLExperimentalWarning

    warnings.filterwarnings("ignore", category=TRLExperimentalWarning)
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    ours = distill_trainer.training_arguments(training_config(), out_dir / "ours-args", False)
    shared = (
        "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
        "warmup_steps", "lr_scheduler_type", "optim", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon",
        "seed", "bf16", "fp16", "use_cpu", "dataloader_num_workers",
    )  # fmt: skip
    args = GKDConfig(
        output_dir=str(out_dir / "trl"),
        **{name: getattr(ours, name) for name in shared},
        gradient_checkpointing=checkpointing,
        lmbda=0.0,
        beta=0.0,
        temperature=TEMPERATURE,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=Collator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        callbacks=[probe],
    )
    trainer.train()


def build_cache(teacher, tokenizer, examples, out_dir: Path):
    from distill.logit_cache import build_logit_cache, cache_settings

    splits = {"train": examples}
    settings = cache_settings(tokenizer, splits, CACHE_TOP_K, [{"model": TEACHER, "weight": 1.0}])
    return build_logit_cache(out_dir / "logit-cache", [(teacher, 1.0)], splits, settings)


@torch.no_grad()
def touch_weights(*models) -> None:
    """Read every parameter once. Safetensors weights are memory-mapped and only become resident when first read,
    so without this a model's first forward pass (inside the training) would count its weights as training memory.
    """
    for model in models:
        for p in model.parameters():
            p.sum()


def child(case: str) -> None:
    """One measured case in its own process; prints one JSON line."""
    warnings.filterwarnings("ignore")
    device, dtype = pick_device()
    meter = PeakMemory(device)
    meter.start()
    empty = meter.base  # the process with its imports, before any model
    teacher, tokenizer = load_model(TEACHER, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    n_layers = len(decoder_layers(teacher)[2])
    student = prune_layers(teacher, uniform_layers(n_layers, KEEP_LAYERS))
    examples = make_examples(tokenizer)
    batch = Collator(tokenizer.pad_token_id)(examples)
    checkpointing = case.endswith("+ckpt")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if case.startswith("ours+cache"):
            cache = build_cache(teacher, tokenizer, examples, out)
            del teacher  # a cached run never loads the teacher
            gc.collect()
            touch_weights(student)
            probe = StepProbe(device, student)
            weights = _settled_bytes(meter) - empty
            run_ours(student, tokenizer, None, examples, out / "run", probe, cache=cache, checkpointing=checkpointing)
        else:
            touch_weights(teacher, student)
            probe = StepProbe(device, student, teacher)
            weights = _settled_bytes(meter) - empty
            if case == "ours":
                run_ours(student, tokenizer, teacher, examples, out / "run", probe)
            else:
                run_trl(student, tokenizer, teacher, examples, out, probe, checkpointing=checkpointing)
    emit_case(probe.result(weights, batch))


def _settled_bytes(meter: PeakMemory) -> int:
    meter.start()  # collects garbage and returns freed heap first
    return meter.base


def main(repeats: int) -> None:
    print(
        f"KD training step: forward KL, T={TEMPERATURE:g}, alpha={ALPHA:g}, batch {BATCH} x {SEQ_LEN} tokens, "
        f"student {KEEP_LAYERS}/30 layers of {TEACHER}, on {device_name()} "
        f"({'bf16' if torch.cuda.is_available() else 'fp32'}); best of {repeats} runs x {MEASURED_STEPS} steps per case"
    )
    print(f"at start: {load_average()}; {memory_state()}")
    cases = ["ours", "trl", "ours+cache", "trl+ckpt", "ours+cache+ckpt"]
    runs = run_cases(__file__, {case: (case,) for case in cases}, repeats)
    print(f"at end:   {load_average()}")
    results = {}
    for case in cases:  # time: the best step of all runs; memory: the largest figure (it does not depend on load)
        results[case] = r = dict(best(runs[case], "step_s"))
        for key in ("weights_mib", "train_mib", "step_mib"):
            values = [run[key] for run in runs[case] if run[key] is not None]
            r[key] = max(values) if values else None
        r["total_mib"] = r["weights_mib"] + r["train_mib"]
        r["all_step_s"] = " | ".join(" ".join(f"{t:.1f}" for t in run["all_step_s"]) for run in runs[case])
    # Each case against the TRL case with the same checkpointing setting.
    peer = {case: results["trl+ckpt" if case.endswith("+ckpt") else "trl"] for case in cases}

    print("\ntime of one training step (best measured step; 'rest' = LM head + loss + backward + grad clipping)")
    rows = [
        [case, r["step_s"], r["tokens"] / r["step_s"], peer[case]["step_s"] / r["step_s"], r["teacher_s"],
         r["student_fwd_s"], r["optim_s"], r["rest_s"], r["all_step_s"]]
        for case, r in results.items()
    ]  # fmt: skip
    print_table(
        ["case", "step s", "tok/s", "speedup", "teacher s", "student fwd s", "optim s", "rest s",
         "all steps s (warm-up first, per run)"],
        rows,
    )  # fmt: skip
    print("speedup and the ratios below: against `trl`, or `trl+ckpt` for the +ckpt cases")

    print(f"\npeak memory above the process with its imports ({results['trl']['method']})")
    rows = [
        [case, r["weights_mib"], r["train_mib"], r["total_mib"], "n/a" if r["step_mib"] is None else r["step_mib"],
         r["train_mib"] / peer[case]["train_mib"], r["total_mib"] / peer[case]["total_mib"]]
        for case, r in results.items()
    ]  # fmt: skip
    print_table(["case", "weights MiB", "train MiB", "total MiB", "step MiB", "train/TRL", "total/TRL"], rows)

    ours = results["ours"]
    print(
        f"\ntokens per step: {ours['tokens']} (all of them: tok/s counts these), of which {ours['label_tokens']} "
        "carry labels"
    )
    figures: dict[str, object] = {}
    for prefix, case in (("", "ours"), ("cache_", "ours+cache"), ("ckpt_cache_", "ours+cache+ckpt")):
        r, trl = results[case], peer[case]
        figures[prefix + "speedup"] = trl["step_s"] / r["step_s"]
        figures[prefix + "memory_ratio"] = r["train_mib"] / trl["train_mib"]
        figures[prefix + "total_memory_ratio"] = r["total_mib"] / trl["total_mib"]
    trl = results["trl"]
    figures.update(ours_tok_s=ours["tokens"] / ours["step_s"], trl_tok_s=trl["tokens"] / trl["step_s"])
    print(summary_line(figures))


if __name__ == "__main__":
    case_main(__doc__.splitlines()[0], main, child)
