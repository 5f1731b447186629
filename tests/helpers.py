"""Tiny random-init Hugging Face causal LMs built from configs (no hub access), shared by the tests.

``tiny_model(arch)`` returns a seeded model in eval mode: 4 blocks, hidden 32, vocab 128, eager attention
(deterministic on CPU). ``arch`` is one of ``TINY_ARCHS`` (+ ``"qwen3"``, ``"mistral"``, ``"qwen2_5_vl"``).
"""

from __future__ import annotations

import torch
from torch import nn

TINY_ARCHS = ("qwen2", "llama", "gemma3")
VOCAB = 128

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def tiny_config(arch: str, num_layers: int = 4, **overrides):
    """The config of ``tiny_model(arch, num_layers)``; ``overrides`` replace any field."""
    import transformers as tf

    kw = dict(_COMMON, num_hidden_layers=num_layers)
    if arch == "qwen2":
        config = tf.Qwen2Config(**{**kw, **overrides})
    elif arch == "qwen3":
        config = tf.Qwen3Config(**{**kw, "head_dim": 8, **overrides})
    elif arch == "llama":
        config = tf.LlamaConfig(**{**kw, **overrides})
    elif arch == "mistral":
        config = tf.MistralConfig(**{**kw, **overrides})
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(
            **{**kw, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16, **overrides}
        )
    elif arch == "qwen2_5_vl":
        text = {**kw, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, **overrides}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32)
        text.update(bos_token_id=None, eos_token_id=None)
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    return config


def tiny_model(arch: str, num_layers: int = 4, seed: int = 0, **overrides) -> nn.Module:
    """A seeded random-init causal LM (eval mode, eager attention) built from ``tiny_config``."""
    import transformers as tf

    config = tiny_config(arch, num_layers, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    if arch == "gemma3":
        model = tf.Gemma3ForCausalLM(config)
    elif arch == "qwen2_5_vl":
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_batch(batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` and an all-ones ``attention_mask`` of shape (batch, seq)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def enable_checkpointing(model: nn.Module, reentrant: bool) -> None:
    """Gradient checkpointing on every block (transformers 5 name first, the v4 name as fallback).

    Hugging Face only checkpoints in train mode with grad enabled.
    """
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
