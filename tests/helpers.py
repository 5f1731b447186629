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


# Qwen's vision special tokens, added to the character-level test tokenizer; the chat template below places
# one image placeholder per {"type": "image"} part, as Qwen2.5-VL's own template does.
VL_SPECIAL_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VL_MIN_PIXELS, VL_MAX_PIXELS = 28 * 28, 56 * 56 * 2  # at most 8 merged tokens (32 patches) per image


def make_tiny_vl_model_dir(path, num_layers: int = 4, seed: int = 0):
    """A tiny random-init Qwen2.5-VL (text: 4 blocks, hidden 32; vision: 2 blocks, hidden 32) with a
    character-level tokenizer carrying Qwen's vision tokens and an image processor (PIL backend, images
    resized to at most ``VL_MAX_PIXELS``), saved to ``path`` like a hub model. -> path"""
    from pathlib import Path

    import transformers as tf

    from tiny_run import make_tokenizer

    path = Path(path)
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *VL_SPECIAL_TOKENS]})
    tok.chat_template = VL_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_SPECIAL_TOKENS}
    text = dict(
        _COMMON, vocab_size=len(tok), num_hidden_layers=num_layers, max_position_embeddings=1024,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32)
    config = tf.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )  # fmt: skip
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = tf.Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    tf.Qwen2VLImageProcessorPil(min_pixels=VL_MIN_PIXELS, max_pixels=VL_MAX_PIXELS).save_pretrained(path)
    return path


class ParityVerifier:
    """Scores a text by the parity of its character codes (so counts vary on a random-init model), records
    every text it sees, and raises on call ``fail_on`` (1-based) to simulate a killed evaluation."""

    class Killed(Exception):
        pass

    def __init__(self, fail_on: int | None = None):
        self.calls, self.texts, self.fail_on = 0, [], fail_on

    def verify_batch(self, texts, answers):
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.Killed
        self.texts += texts
        return [float(sum(map(ord, t)) % 2) for t in texts]


# Two arms over three seeds on four problems (greedy 0/1, sampled: correct of 2), worked by hand in the tests:
# per-seed differences a - b of +0.25, 0, +0.25 greedy and +0.125, 0, +0.125 sampled.
SEED_ARMS_A = {"0": {"greedy": [1, 1, 0, 0], "sampled": [2, 1, 0, 0]},
               "1": {"greedy": [1, 1, 1, 0], "sampled": [2, 2, 0, 0]},
               "2": {"greedy": [1, 0, 0, 0], "sampled": [1, 0, 0, 0]}}  # fmt: skip
SEED_ARMS_B = {"0": {"greedy": [1, 0, 0, 0], "sampled": [1, 1, 0, 0]},
               "1": {"greedy": [1, 1, 1, 0], "sampled": [2, 2, 0, 0]},
               "2": {"greedy": [0, 0, 0, 0], "sampled": [0, 0, 0, 0]}}  # fmt: skip
