"""What the student learns from, per `distillation.mode`: the loss of one batch, and GKD's on-policy batches.

* ``sequence``: SFT on the teacher's text (alpha = 0): hard-label CE only, no teacher in memory.
* ``logit``: KD against the teacher's token distributions on its answers (+ CE), from a live teacher, a
  mixture of teachers (`extra_teachers`) or cached top-k log-probs (`logit_cache`, see :mod:`distill.logit_cache`).
* ``on_policy`` (GKD, Agarwal et al. 2024): as ``logit``, but a fraction of each batch is re-written by the
  student itself before the loss (:class:`OnPolicySampler`), so it also learns on the mistakes it makes.

Intermediate-layer terms (`distillation.transfer`) come on top of any mode that has a teacher in memory. The
loss math itself lives in :mod:`distill.losses`; this module only decides what goes into it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import ExtraTeacher, TeacherConfig
from distill.errors import DistillError
from distill.losses import KDLossConfig, TiedEmbeddingLookup, kd_loss_from_hidden
from distill.models import load_model
from distill.train.data import IGNORE, Collator
from distill.train.tokenizers import head_rows, shared_vocab_size
from distill.train.transfer import LayerTransfer, base_model

log = logging.getLogger("distill")


def head_of(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """(decoder trunk, output-head weight [V, H], bias or None) of a causal LM, PEFT-wrapped or not."""
    base = base_model(model)
    head = base.get_output_embeddings()
    _check_whole(head.weight, base)
    return base.get_decoder(), head.weight, getattr(head, "bias", None)


def _check_whole(weight: torch.Tensor, model: torch.nn.Module) -> None:
    """Refuse a head weight that is only this process's shard: the fused loss reads the head outside the model's
    forward, where FSDP (a ``DTensor``) and DeepSpeed ZeRO-3 (an empty placeholder) leave it sharded."""
    if weight.numel() and not _is_dtensor(weight):
        return
    raise DistillError(
        f"the output head of {type(model).__name__} is sharded across processes (FSDP or DeepSpeed ZeRO-3) when the "
        "KD loss reads it, which Distill does not support yet; train with DDP (`torchrun -m distill ...`) "
        "or DeepSpeed ZeRO-1/2, which keep whole weights on every process"
    )


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:  # torch 2.4 kept it private
            from torch.distributed._tensor import DTensor
        except ImportError:  # a torch built without distributed support
            return False
    return isinstance(tensor, DTensor)


def final_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lookup: TiedEmbeddingLookup | None = None,
) -> torch.Tensor:
    """Final (post-norm) hidden states [B, T, H]: what the head turns into logits.

    With `lookup` (see :func:`tied_lookup`), the input embeddings come from it instead of the model's own lookup.
    """
    trunk, _, _ = head_of(model)
    inputs = {"inputs_embeds": lookup(input_ids)} if lookup is not None else {"input_ids": input_ids}
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return trunk(**inputs, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # DDP averages gradients only for a forward that went through the wrapper: run the whole model there (logits
    # for the last position only, unused) and keep what the trunk returned.
    captured: list[torch.Tensor] = []
    handle = trunk.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        model(**inputs, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


def tied_lookup(model: PreTrainedModel) -> TiedEmbeddingLookup | None:
    """A :class:`~distill.losses.TiedEmbeddingLookup` for a training step of `model`, or None when it does not apply:
    the input embedding must be a plain ``nn.Embedding`` (not a subclass that scales or otherwise changes its output)
    whose weight is the LM head's and is being trained."""
    base = base_model(model)
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding or head is None or emb.weight is not head.weight:
        return None
    if not (torch.is_grad_enabled() and emb.weight.requires_grad):
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return None
    return TiedEmbeddingLookup(emb)


# --------------------------------------------------------------------------------------------- the loss


@dataclass
class LossParts:
    """The loss of one micro-batch (``loss`` carries the graph) and its detached terms, for the log."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    transfer: list[torch.Tensor] = field(default_factory=list)
    """Unweighted transfer terms, one per `distillation.transfer` pair."""


class DistillLoss:
    """Turns a collated batch into the training loss; used by `DistillTrainer.compute_loss`.

    The teacher signal is, in this order: cached top-k targets in the batch (``teacher_topk_logprobs`` /
    ``teacher_topk_ids`` ``[B, T-1, K]``, aligned with the shifted labels, put there by the collator); else the
    live teachers (the main one and any extra ones, mixed with ``teacher_weights``); else none, which is only
    allowed with ``alpha == 0`` (sequence mode: plain chunked CE, no teacher forward pass).

    Args:
        kd: the loss settings.
        teachers: live teacher models (the main one first); empty for sequence mode or a cached run.
        teacher_weights: mixture weights matching `teachers` (None: equal).
        transfer: intermediate-layer terms (need the main teacher).
        vocab_size: ids the student and teacher heads share (None: the smallest head).
    """

    def __init__(
        self,
        kd: KDLossConfig,
        teachers: Sequence[PreTrainedModel] = (),
        teacher_weights: Sequence[float] | None = None,
        transfer: LayerTransfer | None = None,
        vocab_size: int | None = None,
    ):
        self.kd = kd
        self.teachers = list(teachers)
        self.teacher_weights = None if teacher_weights is None else list(teacher_weights)
        self.transfer = transfer
        self.vocab_size = vocab_size
        if transfer is not None and not self.teachers:
            raise ValueError("transfer terms need the teacher in memory")
        for t in self.teachers:
            t.eval().requires_grad_(False)

    def __call__(
        self, model: PreTrainedModel, inputs: dict[str, torch.Tensor], num_items: int | torch.Tensor | None = None
    ) -> LossParts:
        labels = inputs["labels"][:, 1:]  # position t predicts token t+1
        if num_items is None:
            num_items = labels.ne(IGNORE).sum()
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        capture = self.transfer.capture(model, "student") if self.transfer else contextlib.nullcontext({})
        _, weight, bias = head_of(model)
        lookup = tied_lookup(model)  # tied head: one [V, H] gradient fewer at the end of backward
        with capture as student_feats:
            hidden = final_hidden(model, ids, mask, lookup)[:, :-1]

        cached = "teacher_topk_logprobs" in inputs
        need_teacher = self.transfer is not None or (self.kd.alpha > 0 and not cached)
        if need_teacher and not self.teachers:
            raise ValueError("this loss has alpha > 0 but no teacher and no cached teacher targets in the batch")
        teacher_hidden, teacher_heads, teacher_biases, teacher_feats = [], [], [], {}
        if need_teacher:
            with torch.no_grad():
                for j, teacher in enumerate(self.teachers):
                    if j > 0 and (cached or self.kd.alpha == 0):
                        break  # the extra teachers only feed the KD term
                    capture = self.transfer.capture(teacher, "teacher") if self.transfer and j == 0 else None
                    with capture or contextlib.nullcontext({}) as feats:
                        teacher_hidden.append(final_hidden(teacher, ids, mask)[:, :-1])
                    teacher_feats.update(feats)
                    _, w, b = head_of(teacher)
                    teacher_heads.append(w)
                    teacher_biases.append(b)

        # alpha == 0 (sequence mode, or transfer terms alone): no teacher goes in and the loss is plain CE.
        dense = self.kd.alpha > 0 and not cached
        topk = (inputs["teacher_topk_logprobs"], inputs["teacher_topk_ids"]) if cached and self.kd.alpha > 0 else None
        out = kd_loss_from_hidden(
            hidden,
            weight,
            teacher_hidden if dense else None,
            teacher_heads if dense else None,
            labels,
            self.kd,
            num_items=num_items,
            student_head_bias=bias,
            teacher_head_bias=teacher_biases if dense else None,
            teacher_topk=topk,
            teacher_weights=self.teacher_weights if dense else None,
            vocab_size=self.vocab_size,
            tied_lookup=lookup,
        )
        loss = out.loss

        transfer_terms = []
        if self.transfer is not None:
            terms = self.transfer.losses(student_feats, teacher_feats, labels.ne(IGNORE), num_items)
            for pair, term in zip(self.transfer.pairs, terms, strict=True):
                if pair.weight > 0:
                    loss = loss + pair.weight * term
            transfer_terms = [t.detach() for t in terms]
        return LossParts(loss, out.kd, out.ce, transfer_terms)


# --------------------------------------------------------------------------------------------- teachers


def load_extra_teachers(
    extra: Sequence[ExtraTeacher], teacher_cfg: TeacherConfig, teacher_tokenizer: PreTrainedTokenizerBase, rows: int
) -> list[tuple[PreTrainedModel, float]]:
    """Load `distillation.extra_teachers` like the main teacher; each must use the main teacher's tokenizer.

    `rows` is the main teacher's head size. Returns (model, weight) pairs in eval mode, without gradients.
    """
    out = []
    for i, member in enumerate(extra):
        model, tokenizer = load_model(
            member.model,
            dtype=teacher_cfg.dtype,
            device=teacher_cfg.device,
            trust_remote_code=teacher_cfg.trust_remote_code,
        )
        shared_vocab_size(
            teacher_tokenizer,
            tokenizer,
            rows,
            head_rows(model),
            teacher_name="teacher",
            student_name=f"extra teacher {member.model!r}",
            hint=f"Every member of distillation.extra_teachers must use the main teacher's tokenizer: remove "
            f"distillation.extra_teachers[{i}] or pick a teacher of the same family.",
        )
        out.append((model.eval().requires_grad_(False), member.weight))
        log.info("extra teacher %s loaded (weight %g)", member.model, member.weight)
    return out


# --------------------------------------------------------------------------------------------- on-policy


class OnPolicySampler:
    """GKD's mixed batches: with probability `fraction` per sample, the student writes the answer itself.

    For a chosen sample the prompt is kept, the student generates (with its KV cache, `model.generate`) at most as
    many tokens as the original answer had, and the sequence is rebuilt as prompt + student answer with labels on
    the answer; the teacher then scores it in the loss as usual. Sampling is at temperature 1 with no top-k / top-p
    / repetition penalty (the student's own distribution, as in GKD; the model's generation defaults are
    overridden), or greedy with ``greedy=True``. The draw of which samples and the sampling itself are seeded by
    (seed, optimizer step, micro-batch), so a resumed run makes the same choices. Generation runs in eval mode
    (no dropout) under no_grad; the student is put back in train mode afterwards.

    The loss keeps the step's original answer-token count as its normaliser (the student's answers are at most as
    long), so gradient accumulation keeps its meaning.
    """

    def __init__(self, fraction: float, seed: int, pad_token_id: int, stop_ids: Sequence[int], greedy: bool = False):
        self.fraction, self.seed, self.greedy = fraction, seed, greedy
        self.pad = pad_token_id
        self.stop_ids = set(stop_ids)
        self.collate = Collator(pad_token_id)

    @classmethod
    def for_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        fraction: float,
        seed: int,
        greedy: bool = False,
    ) -> OnPolicySampler:
        """A sampler that stops where the model's generation config or the tokenizer says the answer ends."""
        eos = base_model(model).generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        return cls(fraction, seed, tokenizer.pad_token_id, sorted(stops), greedy=greedy)

    def __call__(self, model: PreTrainedModel, inputs: dict[str, torch.Tensor], step: int, micro: int = 0):
        """The batch with the chosen samples' answers replaced by the student's (unchanged when none is chosen)."""
        rng = np.random.default_rng([self.seed, step, micro])
        chosen = np.flatnonzero(rng.random(inputs["input_ids"].shape[0]) < self.fraction)
        if len(chosen) == 0:
            return inputs
        ids, labels = inputs["input_ids"].cpu(), inputs["labels"].cpu()
        lengths = inputs["attention_mask"].sum(1).tolist()
        chosen = [r for r in chosen if labels[r].ne(IGNORE).any()]  # nothing to rewrite without an answer
        if not chosen:
            return inputs
        rows = []
        for r in range(ids.shape[0]):
            n = lengths[r]
            answer_at = int(labels[r, :n].ne(IGNORE).int().argmax())  # first label position
            rows.append({"input_ids": ids[r, :n].tolist(), "labels": labels[r, :n].tolist(), "start": answer_at})
        answers = self._generate(model, [rows[r] for r in chosen], int(rng.integers(2**31)))
        for r, answer in zip(chosen, answers, strict=True):
            prompt = rows[r]["input_ids"][: rows[r]["start"]]
            rows[r] = {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}
        batch = self.collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        return {**inputs, **{k: v.to(inputs["input_ids"].device) for k, v in batch.items()}}

    @torch.no_grad()
    def _generate(self, model: PreTrainedModel, rows: list[dict], seed: int) -> list[list[int]]:
        prompts = [r["input_ids"][: r["start"]] for r in rows]
        budgets = [len(r["input_ids"]) - r["start"] for r in rows]  # the original answer lengths
        width = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every answer starts at column `width`
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        kwargs: dict = dict(max_new_tokens=max(budgets), pad_token_id=self.pad, use_cache=True)
        if self.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        finally:
            model.train(was_training)
        answers = []
        for i, new in enumerate(out[:, width:].tolist()):
            new = new[: budgets[i]]
            end = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
            answers.append(new if end is None else new[: end + 1])  # the stop token is learned too
        return answers
