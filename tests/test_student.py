"""Student initialisation: depth pruning copies the teacher's chosen layers exactly."""

from __future__ import annotations

import pytest
import torch

from distill.config import StudentConfig
from distill.errors import DistillError
from distill.models import count_parameters
from distill.student import build_student, decoder_layers, importance_layers, prune_layers, uniform_layers
from tiny import tiny_llama


@pytest.fixture
def teacher(tiny_tokenizer):
    return tiny_llama(6, 0, tiny_tokenizer)


def test_uniform_layers_keep_first_and_last():
    assert uniform_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert uniform_layers(4, 2) == [0, 3]
    assert uniform_layers(5, 1) == [0]


def test_importance_layers_keep_the_most_influential():
    scores = [0.9, 0.1, 0.5, 0.05, 0.7, 0.3]
    assert importance_layers(scores, 4) == [0, 2, 4, 5]  # first and last always, then 4 (0.7) and 2 (0.5)


def test_pruned_weights_equal_the_teachers_chosen_layers(teacher):
    keep = [0, 2, 5]
    student = prune_layers(teacher, keep)
    assert student.config.num_hidden_layers == 3
    t_layers, s_layers = decoder_layers(teacher)[2], decoder_layers(student)[2]
    for j, i in enumerate(keep):
        for (name, a), (_, b) in zip(t_layers[i].state_dict().items(), s_layers[j].state_dict().items(), strict=True):
            assert torch.equal(a, b), f"layer {i} -> {j}: {name} differs"
        assert s_layers[j].self_attn.layer_idx == j  # KV-cache slots follow the new positions
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()  # a copy, not shared
    # The student runs and generates.
    out = student.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


def test_pruning_out_of_range(teacher):
    with pytest.raises(DistillError, match=r"\[9\] out of range; the teacher has layers 0..5"):
        prune_layers(teacher, [0, 9])


def test_build_student_from_teacher_with_importance(teacher, tiny_tokenizer):
    cfg = StudentConfig.model_validate({"from": "teacher", "layers": 3, "layer_selection": "importance"})
    student, _, info = build_student(cfg, teacher, tiny_tokenizer, ["the sky is blue .", "a cat has four legs ."])
    assert len(info["kept_layers"]) == 3 and info["kept_layers"][0] == 0 and info["kept_layers"][-1] == 5
    assert len(info["block_influence"]) == 6
    assert info["student_parameters"] == count_parameters(student) < info["teacher_parameters"]


def test_build_student_from_config(teacher, tiny_tokenizer):
    cfg = StudentConfig.model_validate(
        {
            "from": "config",
            "layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 48,
        }
    )
    student, _, info = build_student(cfg, teacher, tiny_tokenizer)
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 2
    assert student.config.vocab_size == teacher.config.vocab_size
    assert info["student_parameters"] < info["teacher_parameters"]


def test_build_student_from_model_reference(teacher, tiny_tokenizer, tiny_student_dir):
    cfg = StudentConfig.model_validate({"from": str(tiny_student_dir)})
    student, _, info = build_student(cfg, teacher, tiny_tokenizer)
    assert student.config.num_hidden_layers == 1


def test_layers_beyond_the_teacher(teacher, tiny_tokenizer):
    cfg = StudentConfig.model_validate({"from": "teacher", "layers": 9})
    with pytest.raises(DistillError, match="9 > the teacher's 6 layers"):
        build_student(cfg, teacher, tiny_tokenizer)
