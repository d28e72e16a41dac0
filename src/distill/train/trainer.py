"""The student's training loop: `transformers.Trainer` with the distillation loss in `compute_loss`.

Building on `Trainer` gives checkpoints and exact resume, schedules, gradient accumulation and
checkpointing, bf16/fp16, TensorBoard and DDP/FSDP/DeepSpeed through `accelerate`. What Distill
adds: the teacher signal in the loop (live teachers under no_grad, or cached top-k targets), the
chunked KD loss computed from final hidden states (so no [batch, seq, vocab] logits exist), GKD's
on-policy batches, intermediate-layer transfer terms, every loss term logged on its own, a warning
when one term dwarfs another, and an overfitting alarm. What each mode feeds the loss is in
`distill.train.modes`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from distill.config import DistillationConfig, TrainingConfig, teacher_signal_problems
from distill.errors import DistillError
from distill.losses import KDLossConfig
from distill.train.data import Collator
from distill.train.modes import DistillLoss, LossParts, OnPolicySampler, final_hidden, head_of
from distill.train.tokenizers import head_rows, shared_vocab_size
from distill.train.transfer import LayerTransfer, restore_attention, use_eager_attention

if TYPE_CHECKING:
    from distill.logit_cache import LogitCache

__all__ = [
    "DistillTrainer",
    "JsonlLogger",
    "check_teacher_signal",
    "final_hidden",
    "head_of",
    "loss_config",
    "train_student",
]

log = logging.getLogger("distill")


def loss_config(cfg: DistillationConfig) -> KDLossConfig:
    """The loss settings of the job; `sequence` mode is plain SFT on the teacher's text (alpha = 0)."""
    alpha = 0.0 if cfg.mode == "sequence" else cfg.alpha
    return KDLossConfig(
        divergence=cfg.loss,
        temperature=cfg.temperature,
        alpha=alpha,
        beta=cfg.beta,
        skew=cfg.skew,
        chunk_size=cfg.chunk_size,
    )


class LossTerms:
    """Running sums of the loss terms (kd, ce, transfer/<i>) between two logging steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, parts: LossParts) -> None:
        values = {"kd": parts.kd, "ce": parts.ce, **{f"transfer/{i}": t for i, t in enumerate(parts.transfer)}}
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.n += 1


class DistillTrainer(Trainer):
    """`Trainer` whose loss is a `DistillLoss` (KD against teachers or cached targets, or SFT when alpha is 0).

    Args:
        loss: turns a batch into the loss and its terms.
        on_policy: with `mode: on_policy`, rewrites part of every training batch with the student's own answers.
    """

    def __init__(self, *args, loss: DistillLoss, on_policy: OnPolicySampler | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_loss = loss
        self.on_policy = on_policy
        self.terms = LossTerms()
        self._micro_at = (-1, 0)  # (optimizer step, micro-batch index within it), seeds on-policy sampling
        # compute_loss divides by the token count of the whole optimisation step (num_items_in_batch),
        # so Trainer must count it for every model (PEFT ones included) and not divide by the accumulation
        # steps a second time.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.on_policy is not None and model.training:
            inputs = self.on_policy(self.accelerator.unwrap_model(model), inputs, *self._next_micro())
        parts = self.distill_loss(model, inputs, num_items_in_batch)
        if model.training:
            self.terms.add(parts)
        loss = parts.loss
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
            # num_items_in_batch counts the tokens of every process, and DDP averages the gradients over them.
            loss = loss * self.args.world_size
        return (loss, {"kd": parts.kd, "ce": parts.ce}) if return_outputs else loss

    def _next_micro(self) -> tuple[int, int]:
        step, micro = self._micro_at
        self._micro_at = (step, micro + 1) if step == self.state.global_step else (self.state.global_step, 0)
        return self._micro_at

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.terms.n:
            # Per-micro-batch terms are normalised by the whole step's token count: their sum per step is the
            # step's term. Report the mean per optimisation step since the last log.
            steps = max(1, self.terms.n / self.args.gradient_accumulation_steps)
            sums = self.terms.sums
            if self.args.world_size > 1:
                # Each process holds its part: with tokens counted across processes the step's term is the sum of
                # the parts (as the logged loss is), else their mean. Every process logs, so all take part.
                names = sorted(sums)
                parts = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=self.args.device)
                how = "sum" if self.args.average_tokens_across_devices else "mean"
                sums = dict(zip(names, self.accelerator.reduce(parts, reduction=how).tolist(), strict=True))
            logs.update({name: total / steps for name, total in sums.items()})
            self.terms = LossTerms()
        super().log(logs, *args, **kwargs)


class JsonlLogger(TrainerCallback):
    """Writes every logged value to `training_log.jsonl` (the report plots it) and watches the loss terms.

    `weights` maps each term name (kd, ce, transfer/<i>) to its weight in the loss, for the balance warning.
    """

    def __init__(self, path: Path, weights: dict[str, float]):
        self.path = path
        self.weights = weights
        self.warned: set[tuple[str, str]] = set()
        self.history: list[tuple[float, float]] = []  # (train loss, validation loss) at each evaluation
        self.last_train: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not state.is_world_process_zero:  # one writer and one set of warnings per run
            return
        if "loss" in logs:
            row = {"step": state.global_step, "split": "train", "loss": logs["loss"]}
            row.update({k: v for k, v in logs.items() if k in self.weights or k in ("learning_rate", "grad_norm")})
            self.last_train = logs["loss"]
            self._check_balance(logs)
        elif "eval_loss" in logs:
            row = {"step": state.global_step, "split": "validation", "loss": logs["eval_loss"]}
            self._check_overfitting(logs["eval_loss"])
        else:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _check_balance(self, logs: dict) -> None:
        # Weighted terms, as they enter the loss; users of other toolkits find a KD weight silently
        # meaningless when one term is orders of magnitude larger than the other.
        weighted = {k: w * logs[k] for k, w in self.weights.items() if w > 0 and k in logs and logs[k] > 0}
        if len(weighted) < 2:
            return
        big = max(weighted, key=weighted.get)
        small = min(weighted, key=weighted.get)
        if weighted[big] / weighted[small] > 100 and (big, small) not in self.warned:
            knob = "the transfer weight" if "transfer" in big + small else "distillation.alpha or .temperature"
            log.warning(
                "loss term %s (%.3g) outweighs %s (%.3g) by more than 100x: %s barely affects training; adjust %s",
                big,
                weighted[big],
                small,
                weighted[small],
                small,
                knob,
            )
            self.warned.add((big, small))

    def _check_overfitting(self, val_loss: float) -> None:
        if self.last_train is None:
            return
        self.history.append((self.last_train, val_loss))
        if len(self.history) >= 3:
            (t0, v0), (t1, v1), (t2, v2) = self.history[-3:]
            if t2 < t1 < t0 and v2 > v1 > v0:
                log.warning(
                    "overfitting: validation loss rose twice (%.4f -> %.4f -> %.4f) while training loss fell; "
                    "consider fewer steps, more data or training.early_stopping_patience",
                    v0,
                    v1,
                    v2,
                )


class RichProgress(TrainerCallback):
    """One progress bar for the steps with the latest loss terms (replaces Trainer's tqdm bars and dict prints)."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar.start()
        self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.status = f"loss {logs['loss']:.3f}" + (
                f" kd {logs['kd']:.3f} ce {logs['ce']:.3f}" if "kd" in logs else ""
            )
        if "eval_loss" in logs:
            self.bar.console.log(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")
        self.bar.update(self.task, status=getattr(self, "status", ""))

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.stop()


def training_arguments(cfg: TrainingConfig, out_dir: Path, has_validation: bool) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    )
    eval_steps = min(cfg.eval_every, cfg.max_steps)
    # Checkpoints must fall on evaluation steps for best-model tracking.
    save_steps = max(eval_steps, (cfg.save_every // eval_steps) * eval_steps)
    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        # Padding costs a teacher forward and a student forward and backward like any token: random batches of the
        # quickstart's answers are 16% padding, length-grouped ones 3% (off by default: docs/benchmarks.md, Demo).
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=1,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        greater_is_better=False,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **({"activation_checkpointing": True} if cfg.gradient_checkpointing else {}),
        seed=cfg.seed,
        use_cpu=not cuda,
        report_to=["tensorboard"],
        remove_unused_columns=False,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
        # Under DDP: every student parameter takes part in each step's loss (the whole model runs through the
        # wrapper), and the transfer projections are used after the wrapper's forward, where DDP's search for
        # unused parameters would mark them ready early and fail in backward ("mark a variable ready only once").
        ddp_find_unused_parameters=False,
    )


def train_student(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None,
    train_examples: Sequence[dict],
    validation_examples: Sequence[dict],
    training: TrainingConfig,
    distillation: DistillationConfig,
    out_dir: Path,
    *,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    extra_teachers: Sequence[tuple[PreTrainedModel, float]] = (),
    logit_cache: LogitCache | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Train the student; resumes from the last checkpoint in `out_dir` if one exists. Returns (model, summary).

    Args:
        student: the model to train (a PEFT model trains its adapters only).
        tokenizer: the student's tokenizer; `train_examples` are encoded with it.
        teacher: the main teacher, in memory; None for `mode: sequence` or a run from `logit_cache`.
        train_examples, validation_examples: encoded examples (`input_ids`, `labels`); examples may also carry
            sparse teacher targets (`teacher_topk`, see `Collator`), which then stand in for the teacher.
        teacher_tokenizer: checked against `tokenizer` (token -> id maps) before any token-level KD; None means
            the teacher uses `tokenizer`.
        extra_teachers: (model, weight) members of a teacher mixture; the main teacher has
            `distillation.teacher_weight`.
        logit_cache: cached top-k teacher targets of these examples; the teacher is then not needed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    kd = loss_config(distillation)
    has_targets = bool(train_examples) and "teacher_topk" in train_examples[0]
    check_teacher_signal(
        distillation, teacher=teacher is not None, cache=logit_cache is not None, targets_in_data=has_targets
    )
    live = teacher is not None and logit_cache is None and (kd.alpha > 0 or bool(distillation.transfer))
    teachers, weights, vocab_size = [], None, None
    if live:
        vocab_size = shared_vocab_size(
            teacher_tokenizer or tokenizer, tokenizer, head_rows(teacher), head_rows(student)
        )
        teachers = [teacher, *(model for model, _ in extra_teachers)]
        if extra_teachers:  # same tokenizer (load_extra_teachers checks), maybe other padding of the head
            weights = [distillation.teacher_weight, *(w for _, w in extra_teachers)]
            vocab_size = min(vocab_size, *(head_rows(model) for model, _ in extra_teachers))
    if logit_cache is not None:
        train_examples = logit_cache.dataset("train", train_examples)
        if validation_examples:
            validation_examples = logit_cache.dataset("validation", validation_examples)
    transfer = LayerTransfer(distillation.transfer, student, teacher) if distillation.transfer else None
    on_policy = None
    if distillation.mode == "on_policy" and distillation.on_policy_fraction > 0:
        on_policy = OnPolicySampler.for_model(
            student,
            tokenizer,
            distillation.on_policy_fraction,
            training.seed,
            greedy=distillation.on_policy_sampling == "greedy",
        )

    args = training_arguments(training, out_dir / "checkpoints", bool(validation_examples))
    term_weights = {"kd": kd.alpha, "ce": 1 - kd.alpha}
    term_weights.update({f"transfer/{i}": p.weight for i, p in enumerate(distillation.transfer)})
    callbacks: list[TrainerCallback] = [JsonlLogger(out_dir / "training_log.jsonl", term_weights)]
    if training.early_stopping_patience and validation_examples:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    attention_before = []
    if transfer is not None:
        transfer.attach(student)  # before Trainer makes the optimizer, so it trains the projections
        if transfer.needs_attention:
            attention_before = [(m, use_eager_attention(m)) for m in (student, teacher)]
    try:
        trainer = DistillTrainer(
            model=student,
            args=args,
            train_dataset=train_examples,
            eval_dataset=validation_examples or None,
            data_collator=Collator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=callbacks,
            loss=DistillLoss(kd, teachers, weights, transfer, vocab_size),
            on_policy=on_policy,
        )
        trainer.remove_callback(ProgressCallback)  # RichProgress replaces the tqdm bars and the dict prints
        trainer.remove_callback(PrinterCallback)
        if trainer.is_world_process_zero():  # one progress bar per run, not one per process
            trainer.add_callback(RichProgress())
        last = _last_checkpoint(out_dir / "checkpoints")
        if last:
            log.info("resuming training from %s", last)
        else:
            (out_dir / "training_log.jsonl").unlink(missing_ok=True)
        result = trainer.train(resume_from_checkpoint=str(last) if last else None)
        model = trainer.model
    finally:
        LayerTransfer.detach(student)
        for m, before in attention_before:
            restore_attention(m, before)
    LayerTransfer.detach(model)
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_validation_loss": trainer.state.best_metric,
        "resumed_from": str(last) if last else None,
    }
    return model, summary


def check_teacher_signal(cfg: DistillationConfig, *, teacher: bool, cache: bool, targets_in_data: bool = False) -> None:
    """Raise one DistillError listing every combination of mode, teacher, cache and transfer that cannot work.

    The rules are `config.teacher_signal_problems`, which also refuses such a job file when it is loaded; this
    guards direct calls of `train_student`, where what is in memory is only known at run time.
    """
    problems = teacher_signal_problems(cfg, teacher=teacher, cache=cache, targets_in_data=targets_in_data)
    if problems:
        raise DistillError("; ".join(f"{'.'.join(path)}: {msg}" for path, msg in problems))


def _last_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
