"""A tiny, offline causal LM on disk (character-level tokenizer with a chat template) for end-to-end tests.

``make_tiny_model_dir(path, arch="llama")`` writes a 4-block, hidden-32 random-init model and its
tokenizer to ``path`` (no hub access) and returns the path, so every stage can load it by path like a
user's model.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers import decoders

    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model_dir(
    path: str | Path, arch: str = "llama", num_layers: int = 4, seed: int = 0, **config_overrides
) -> Path:
    """``config_overrides`` replace config fields (vLLM's CPU attention needs head_dim >= 32, for example)."""
    import transformers as tf

    path = Path(path)
    tok = make_tokenizer()
    kw = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=num_layers,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    kw.update(config_overrides)
    config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[arch](**kw)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def digit_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """A dense toy reward (fraction of digits in the completion), so a random-init policy sees non-zero
    advantages; plugged in as ``reward.funcs=[tiny_run:digit_reward] reward.correct_if=verifier``."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# Overrides for a seconds-long RL run on the tiny model (2 prompts x 2 samples, 6 new tokens); the flow starts
# from random weights (flow.init=random: a random-init policy has no expert latents worth pretraining a flow on)
# and trains on every rollout (soft_flow 1) because a random-init model never answers correctly.
TINY_TRAIN_OVERRIDES = (
    "flow.init=random",
    "data.train_size=16",
    "data.eval_size=4",
    "rollout.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_new_tokens=6",
    "policy.micro_batch_size=2",
    "policy.lr=1e-3",
    "flow.soft_flow=1.0",
    "eval_max_new_tokens=4",
    "reward.workers=1",
)


def tiny_train_config(model_dir, out, *extra: str):
    """A ``TrainConfig`` for ``TINY_TRAIN_OVERRIDES`` on ``model_dir``, writing to ``out``; ``extra`` wins."""
    from rlfr.config import load_config
    from rlfr.schema import TrainConfig

    overrides = [f"model.name_or_path={model_dir}", *TINY_TRAIN_OVERRIDES, "save_every=2", f"out_dir={out}"]
    return load_config(TrainConfig, overrides=[*overrides, *extra])
