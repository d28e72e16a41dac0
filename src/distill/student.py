"""Student initialisation: a depth-pruned copy of the teacher, a fresh model from its config, or any model.

Depth pruning (DistilBERT, Minitron, ShortGPT) keeps the teacher's embeddings, a subset of its
decoder layers, its final norm and its head. Which layers to keep matters a lot for how much the
student knows on day one: `importance` keeps the layers with the largest *block influence*
(1 - cosine(h_in, h_out), ShortGPT), measured on a few real prompts.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.config import StudentConfig
from distill.errors import DistillError
from distill.models import count_parameters, load_model

log = logging.getLogger("distill")

# Where common architectures keep their decoder layers (Llama, Qwen, Mistral, Gemma, Phi / GPT-2 / GPT-NeoX).
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model: PreTrainedModel) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent module, attribute name, layer list) of the model's stack of decoder layers."""
    for path in _LAYER_PATHS:
        parent: torch.nn.Module | None = model
        *head, last = path.split(".")
        for part in head:
            parent = getattr(parent, part, None)
        layers = getattr(parent, last, None) if parent is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            return parent, last, layers
    raise DistillError(
        f"student.layers: cannot find the decoder layers of {type(model).__name__}; "
        "use `from: config` or give a ready student model instead"
    )


def uniform_layers(n_teacher: int, n_keep: int) -> list[int]:
    """`n_keep` indices spread evenly over `n_teacher` layers, always keeping the first and the last."""
    if n_keep == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (n_keep - 1)) for i in range(n_keep)})


@torch.inference_mode()
def block_influence(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 128
) -> list[float]:
    """ShortGPT block influence of every decoder layer: mean over tokens of 1 - cos(h_in, h_out)."""
    n = len(decoder_layers(model)[2])
    totals = torch.zeros(n, dtype=torch.float64)
    count = 0
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).to(model.device)
        hidden = model(**enc, output_hidden_states=True).hidden_states  # n+1 tensors of [1, T, H]
        for i in range(n):
            cos = torch.nn.functional.cosine_similarity(hidden[i][0].float(), hidden[i + 1][0].float(), dim=-1)
            totals[i] += (1 - cos).sum().item()
        count += enc["input_ids"].shape[1]
    return (totals / max(count, 1)).tolist()


def importance_layers(scores: Sequence[float], n_keep: int) -> list[int]:
    """Keep the `n_keep` most influential layers; the first and last are always kept (they map in/out of the
    embedding space and pruning them costs the most in practice)."""
    n = len(scores)
    must = {0, n - 1} if n_keep >= 2 else {0}
    rest = sorted((i for i in range(n) if i not in must), key=lambda i: -scores[i])
    return sorted(must | set(rest[: n_keep - len(must)]))


def prune_layers(teacher: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """A new model made of the teacher's embeddings, the decoder layers `keep` (in order), norm and head."""
    n = len(decoder_layers(teacher)[2])
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise DistillError(f"student.layers: {bad} out of range; the teacher has layers 0..{n - 1}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    for attr in ("layer_types",):  # per-layer settings (sliding vs full attention) follow their layer
        value = getattr(config, attr, None)
        if isinstance(value, list) and len(value) == n:
            setattr(config, attr, [value[i] for i in keep])
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    src_layers = decoder_layers(teacher)[2]
    dst_layers = decoder_layers(student)[2]
    layer_prefix = _prefix_of(teacher, src_layers)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(layer_prefix + ".")}
    for j, i in enumerate(keep):
        for k, v in src_layers[i].state_dict().items():
            state[f"{layer_prefix}.{j}.{k}"] = v
    missing, unexpected = student.load_state_dict(state, strict=False)
    # A tied head shows up as "missing" lm_head.weight; anything else is a real mismatch.
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DistillError(
            f"depth pruning failed for {type(teacher).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    assert len(dst_layers) == len(keep)
    return student.to(teacher.device)


def _prefix_of(model: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise DistillError("cannot locate the decoder layers in the model's state dict")


def build_student(
    cfg: StudentConfig,
    teacher: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    calibration_texts: Sequence[str] = (),
    *,
    dtype: str = "auto",
    device: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Make the student described by `cfg`; returns (model, tokenizer, info for the log and the report).

    `teacher` may be None (a teacher behind an API) only when `cfg.from_` is a model reference.
    """
    if teacher is None and cfg.from_ in ("teacher", "config"):
        raise DistillError(f"student.from: {cfg.from_} needs the teacher in memory (teacher.backend: local)")
    info: dict = {"from": cfg.from_, "teacher_parameters": None if teacher is None else count_parameters(teacher)}
    if cfg.from_ == "teacher":
        n = len(decoder_layers(teacher)[2])
        if isinstance(cfg.layers, list):
            keep = sorted(cfg.layers)
        else:
            n_keep = cfg.layers or max(1, n // 2)
            if n_keep > n:
                raise DistillError(f"student.layers: {n_keep} > the teacher's {n} layers")
            if cfg.layer_selection == "importance" and calibration_texts:
                scores = block_influence(teacher, tokenizer, calibration_texts)
                keep = importance_layers(scores, n_keep)
                info["block_influence"] = [round(s, 5) for s in scores]
            else:
                keep = uniform_layers(n, n_keep)
        student = prune_layers(teacher, keep)
        info["kept_layers"] = keep
        student_tok = tokenizer
    elif cfg.from_ == "config":
        config = copy.deepcopy(teacher.config)
        for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(cfg, field) is not None:
                setattr(config, field, getattr(cfg, field))
        if isinstance(cfg.layers, int):
            config.num_hidden_layers = cfg.layers
        if getattr(config, "head_dim", None) and cfg.hidden_size:
            config.head_dim = config.hidden_size // config.num_attention_heads
        if hasattr(config, "layer_types") and isinstance(config.layer_types, list):
            config.layer_types = config.layer_types[: config.num_hidden_layers]
            config.layer_types += [config.layer_types[-1]] * (config.num_hidden_layers - len(config.layer_types))
        try:
            student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype).to(teacher.device)
        except (ValueError, AssertionError) as e:
            raise DistillError(f"student: the overridden config is not valid: {e}") from None
        student_tok = tokenizer
    else:
        student, student_tok = load_model(cfg.from_, dtype=dtype, device=device)
    info["student_parameters"] = count_parameters(student)
    if cfg.lora is not None:
        student = add_lora(student, cfg)
        info["trainable_parameters"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return student, student_tok, info


def add_lora(model: PreTrainedModel, cfg: StudentConfig) -> PreTrainedModel:
    """Wrap the student with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    assert lora is not None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
