"""Intermediate-layer transfer: match a student layer's hidden states or attention maps to a teacher layer's.

Each `distillation.transfer` pair ``{teacher: 12, student: 3, loss: cosine|mse|attention, weight}`` adds one
term to the loss (logged as ``transfer/<i>``). The math is in :mod:`distill.losses` (`hidden_state_loss`,
`attention_transfer_loss`); this module only collects the inputs:

* Layer outputs are captured with forward hooks on the decoder layers (`distill.student.decoder_layers`), so
  no model keeps all its hidden states (``output_hidden_states``) alive.
* When the widths differ, a learned ``nn.Linear(student, teacher)`` maps the student's states. The projections
  live in a :class:`LayerTransfer` module that is attached to the student under ``distill_transfer`` while it
  trains: the optimizer then trains them, checkpoints keep them and resume restores them, with no change to
  `Trainer`. :meth:`LayerTransfer.detach` drops them before the student is saved.
* Attention maps need the attention *probabilities*, which only the ``eager`` attention returns (SDPA and
  flash attention never materialise them). :func:`use_eager_attention` switches a model to eager for the run
  and gives back the previous setting; eager costs ``O(T^2)`` memory per layer, the price of this loss.

Terms are taken at the positions the KD loss uses (answer tokens) and normalised by the same token count, so
gradient accumulation keeps their meaning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from distill.config import TransferPair
from distill.errors import DistillError
from distill.losses import attention_transfer_loss, hidden_state_loss
from distill.student import decoder_layers

log = logging.getLogger("distill")

ATTRIBUTE = "distill_transfer"
"""Name of the :class:`LayerTransfer` submodule on the student while it trains."""

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a DDP and/or PEFT wrapper (or the model itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(model: nn.Module):
    config = base_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class LayerTransfer(nn.Module):
    """The transfer pairs of a run: which layers to capture, the learned projections and the loss terms."""

    def __init__(self, pairs: Sequence[TransferPair], student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.pairs = list(pairs)
        n_student, n_teacher = len(decoder_layers(base_model(student))[2]), len(decoder_layers(teacher)[2])
        s_cfg, t_cfg = _text_config(student), _text_config(teacher)
        problems = []
        for i, p in enumerate(self.pairs):
            if not 0 <= p.student < n_student:
                problems.append(f"distillation.transfer[{i}].student: layer {p.student} of a {n_student}-layer student")
            if not 0 <= p.teacher < n_teacher:
                problems.append(f"distillation.transfer[{i}].teacher: layer {p.teacher} of a {n_teacher}-layer teacher")
        if problems:
            raise DistillError("; ".join(problems) + " (layer indices start at 0)")
        # One projection per hidden-state pair whose widths differ, keyed by the pair's index.
        self.projections = nn.ModuleDict()
        if s_cfg.hidden_size != t_cfg.hidden_size:
            for i, p in enumerate(self.pairs):
                if p.loss != "attention":
                    self.projections[str(i)] = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size, bias=False)
        heads = (s_cfg.num_attention_heads, t_cfg.num_attention_heads)
        if self.needs_attention and heads[0] != heads[1]:
            log.info(
                "transfer: %d student vs %d teacher attention heads; attention maps are compared head-averaged", *heads
            )
        param = next(base_model(student).parameters())
        self.to(device=param.device, dtype=param.dtype)

    @property
    def needs_attention(self) -> bool:
        return any(p.loss == "attention" for p in self.pairs)

    def attach(self, student: nn.Module) -> None:
        """Make the projections part of the student (trained, checkpointed) while it trains."""
        if len(self.projections):
            base_model(student).add_module(ATTRIBUTE, self)

    @staticmethod
    def detach(student: nn.Module) -> None:
        """Drop the projections from the student (before saving it)."""
        base = base_model(student)
        if hasattr(base, ATTRIBUTE):
            delattr(base, ATTRIBUTE)

    @contextlib.contextmanager
    def capture(self, model: nn.Module, side: str) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
        """Hook the layers this run needs on `side` ("student" or "teacher"); yields {(kind, layer): tensor}.

        ``("hidden", i)`` is layer i's output ``[B, T, H]``; ``("attention", i)`` its attention probabilities
        ``[B, heads, T, T]``.
        """
        layers = decoder_layers(base_model(model))[2]
        found: dict[tuple[str, int], torch.Tensor] = {}
        handles = []

        def keep(key):
            def hook(_module, _args, output):
                out = output[1] if key[0] == "attention" else output
                if isinstance(out, tuple):
                    out = out[0]
                found[key] = out

            return hook

        try:
            for p in self.pairs:
                i = getattr(p, side)
                if p.loss == "attention":
                    handles.append(_attention_module(layers[i]).register_forward_hook(keep(("attention", i))))
                else:
                    handles.append(layers[i].register_forward_hook(keep(("hidden", i))))
            yield found
        finally:
            for h in handles:
                h.remove()

    def losses(
        self,
        student: dict[tuple[str, int], torch.Tensor],
        teacher: dict[tuple[str, int], torch.Tensor],
        mask: torch.Tensor,
        num_items: int | torch.Tensor,
    ) -> list[torch.Tensor]:
        """One unweighted term per pair, on the positions of `mask` ``[B, T - 1]`` (the shifted answer labels)."""
        terms = []
        for i, p in enumerate(self.pairs):
            if p.loss == "attention":
                s, t = student.get(("attention", p.student)), teacher.get(("attention", p.teacher))
                if s is None or t is None:
                    raise DistillError(
                        f"distillation.transfer[{i}]: the model returned no attention probabilities; attention "
                        "transfer needs attn_implementation='eager' (see distill.train.transfer.use_eager_attention)"
                    )
                # Queries 0..T-2 are the positions that predict a label; every key stays.
                terms.append(attention_transfer_loss(s[:, :, :-1], t[:, :, :-1], mask, num_items=num_items))
            else:
                s, t = student[("hidden", p.student)], teacher[("hidden", p.teacher)]
                key = str(i)
                proj = self.projections[key] if key in self.projections else None  # noqa: SIM401 (no ModuleDict.get)
                terms.append(hidden_state_loss(s[:, :-1], t[:, :-1], mask, p.loss, proj, num_items=num_items))
        return terms


def _attention_module(layer: nn.Module) -> nn.Module:
    for name in _ATTENTION_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise DistillError(f"attention transfer: cannot find the attention module of {type(layer).__name__}")


def use_eager_attention(model: nn.Module) -> str | None:
    """Switch `model` to eager attention (to get attention probabilities); returns the setting to restore."""
    base = base_model(model)
    before = getattr(base.config, "_attn_implementation", None)
    if before != "eager":
        base.set_attn_implementation("eager")
        log.info(
            "transfer: %s switched from %s to eager attention for attention-map transfer", type(base).__name__, before
        )
    return before


def restore_attention(model: nn.Module, before: str | None) -> None:
    base = base_model(model)
    if before is not None and getattr(base.config, "_attn_implementation", None) != before:
        base.set_attn_implementation(before)
