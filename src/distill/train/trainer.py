"""The student's training loop: `transformers.Trainer` with the KD loss in `compute_loss`.

Building on `Trainer` gives checkpoints and exact resume, schedules, gradient accumulation and
checkpointing, bf16/fp16, TensorBoard and DDP/FSDP/DeepSpeed through `accelerate`. What Distill
adds: the teacher in the loop (under no_grad), the chunked KD loss computed from final hidden
states (so no [batch, seq, vocab] logits exist), every loss term logged on its own, a warning when
one term dwarfs another, and an overfitting alarm.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    EarlyStoppingCallback,
    ProgressCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from distill.config import DistillationConfig, TrainingConfig
from distill.losses import KDLossConfig, kd_loss_from_hidden
from distill.train.data import Collator

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


def head_of(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """(decoder trunk, output-head weight [V, H], bias or None) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return base.get_decoder(), head.weight, getattr(head, "bias", None)


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states [B, T, H]: what the head turns into logits."""
    trunk, _, _ = head_of(model)
    return trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


@dataclass
class LossTerms:
    """Running sums of the loss terms between two logging steps."""

    kd: float = 0.0
    ce: float = 0.0
    n: int = 0


class DistillTrainer(Trainer):
    """`Trainer` whose loss is KD against a teacher (or SFT on teacher text when alpha is 0)."""

    def __init__(self, *args, teacher: PreTrainedModel | None, kd: KDLossConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.kd = kd
        self.terms = LossTerms()
        # compute_loss divides by the token count of the whole optimisation step (num_items_in_batch),
        # so Trainer must not divide by the accumulation steps a second time.
        self.loss_is_scaled_for_ga = True
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]  # position t predicts token t+1
        hidden = final_hidden(model, inputs["input_ids"], inputs["attention_mask"])[:, :-1]
        _, weight, bias = head_of(model)
        teacher_hidden = teacher_weight = teacher_bias = None
        if self.teacher is not None and self.kd.alpha > 0:
            with torch.no_grad():
                teacher_hidden = final_hidden(self.teacher, inputs["input_ids"], inputs["attention_mask"])[:, :-1]
                _, teacher_weight, teacher_bias = head_of(self.teacher)
        if num_items_in_batch is None:
            num_items_in_batch = labels.ne(-100).sum()
        out = kd_loss_from_hidden(
            hidden, weight, teacher_hidden, teacher_weight, labels, self.kd,
            num_items=num_items_in_batch, student_head_bias=bias, teacher_head_bias=teacher_bias,
        )
        if model.training:
            self.terms.kd += float(out.kd)
            self.terms.ce += float(out.ce)
            self.terms.n += 1
        return (out.loss, {"kd": out.kd, "ce": out.ce}) if return_outputs else out.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.terms.n:
            # Per-micro-batch terms are normalised by the whole step's token count: their sum per step is the
            # step's term. Report the mean per optimisation step since the last log.
            steps = max(1, self.terms.n / self.args.gradient_accumulation_steps)
            logs["kd"] = self.terms.kd / steps
            logs["ce"] = self.terms.ce / steps
            self.terms = LossTerms()
        super().log(logs, *args, **kwargs)


class JsonlLogger(TrainerCallback):
    """Writes every logged value to `training_log.jsonl` (the report plots it) and watches the loss terms."""

    def __init__(self, path: Path, alpha: float):
        self.path = path
        self.alpha = alpha
        self.warned_balance = False
        self.history: list[tuple[float, float]] = []  # (train loss, validation loss) at each evaluation
        self.last_train: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            row = {"step": state.global_step, "split": "train", "loss": logs["loss"]}
            row.update({k: logs[k] for k in ("kd", "ce", "learning_rate", "grad_norm") if k in logs})
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
        if self.warned_balance or not (0 < self.alpha < 1) or "kd" not in logs:
            return
        kd, ce = self.alpha * logs["kd"], (1 - self.alpha) * logs["ce"]
        if min(kd, ce) > 0 and max(kd, ce) / min(kd, ce) > 100:
            big, small = ("kd", "ce") if kd > ce else ("ce", "kd")
            log.warning(
                "loss term %s (%.3g) outweighs %s (%.3g) by more than 100x: %s barely affects training; "
                "adjust distillation.alpha or distillation.temperature", big, max(kd, ce), small, min(kd, ce), small,
            )
            self.warned_balance = True

    def _check_overfitting(self, val_loss: float) -> None:
        if self.last_train is None:
            return
        self.history.append((self.last_train, val_loss))
        if len(self.history) >= 3:
            (t0, v0), (t1, v1), (t2, v2) = self.history[-3:]
            if t2 < t1 < t0 and v2 > v1 > v0:
                log.warning(
                    "overfitting: validation loss rose twice (%.4f -> %.4f -> %.4f) while training loss fell; "
                    "consider fewer steps, more data or training.early_stopping_patience", v0, v1, v2,
                )


class RichProgress(TrainerCallback):
    """One progress bar for the steps with the latest loss terms (replaces Trainer's tqdm bars and dict prints)."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
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
            self.status = f"loss {logs['loss']:.3f}" + (f" kd {logs['kd']:.3f} ce {logs['ce']:.3f}" if "kd" in logs else "")
        if "eval_loss" in logs:
            self.bar.console.log(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")
        self.bar.update(self.task, status=getattr(self, "status", ""))

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.stop()


def training_arguments(cfg: TrainingConfig, out_dir: Path, has_validation: bool) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported()
                                                               else "fp32")
    eval_steps = min(cfg.eval_every, cfg.max_steps)
    # Checkpoints must fall on evaluation steps for best-model tracking.
    save_steps = max(eval_steps, (cfg.save_every // eval_steps) * eval_steps)
    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
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
    )


def train_student(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None,
    train_examples: list[dict],
    validation_examples: list[dict],
    training: TrainingConfig,
    distillation: DistillationConfig,
    out_dir: Path,
) -> tuple[PreTrainedModel, dict]:
    """Train the student; resumes from the last checkpoint in `out_dir` if one exists. Returns (model, summary)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    kd = loss_config(distillation)
    args = training_arguments(training, out_dir / "checkpoints", bool(validation_examples))
    callbacks: list[TrainerCallback] = [JsonlLogger(out_dir / "training_log.jsonl", kd.alpha), RichProgress()]
    if training.early_stopping_patience and validation_examples:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    trainer = DistillTrainer(
        model=student,
        args=args,
        train_dataset=train_examples,
        eval_dataset=validation_examples or None,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        teacher=teacher if kd.alpha > 0 else None,
        kd=kd,
    )
    trainer.remove_callback(ProgressCallback)
    last = _last_checkpoint(out_dir / "checkpoints")
    if last:
        log.info("resuming training from %s", last)
    else:
        (out_dir / "training_log.jsonl").unlink(missing_ok=True)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_validation_loss": trainer.state.best_metric,
        "resumed_from": str(last) if last else None,
    }
    return trainer.model, summary


def _last_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
