"""LoRA adapters on the policy, with PEFT doing the adapter work (docs/lora_fsdp.md).

Contract::

    policy = apply_lora(model, cfg.model.lora)   # a PeftModelForCausalLM (rank > 0), else ``model`` itself
    is_lora(policy)                              # True for a PEFT model (DDP / FSDP1 wrappers are looked through)
    trainable, total = parameter_counts(policy)
    ref = AdapterDisabled(prepared, policy)      # the KL reference: the same weights with the adapters off
    for name, tensor in merged_weights(policy):  # the merged Hugging Face weights, PEFT prefixes removed
        engine.load(name, tensor)                # (vLLM weight sync)
    merged_state_dict(policy)                    # the same as a dict

Why the reference is the policy with its adapters disabled: the base weights are frozen, so
``with model.disable_adapter():`` gives the start model exactly (``tests/test_lora.py`` checks the log-probs
bit for bit against a separately loaded copy) without a second 7B model in memory. The caller pauses latent
capture around it (``rl.step.ref_forward``): it is not the policy's own forward.

Gradient checkpointing with adapters: the embeddings are frozen, so with reentrant checkpointing no input
of a checkpointed block would require grad and the adapters would get none; ``enable_input_require_grads``
(as PEFT's ``prepare_model_for_kbit_training`` does) makes the embedding output require grad. rlfr uses
non-reentrant checkpointing, where this is not needed, but it costs nothing and keeps any wrapper safe.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from rlfr.schema import LoraConfig

__all__ = [
    "AdapterDisabled",
    "apply_lora",
    "is_lora",
    "merged_state_dict",
    "merged_weights",
    "parameter_counts",
]


def _peft_model(model: nn.Module) -> nn.Module | None:
    """The ``PeftModel`` inside DDP / FSDP1 wrappers (FSDP2 keeps the module itself), or None."""
    while not hasattr(model, "peft_config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model if hasattr(model, "peft_config") else None


def is_lora(model: nn.Module) -> bool:
    return _peft_model(model) is not None


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap a causal LM with fresh LoRA adapters (B = 0: the output is unchanged at the start).

    Only the adapters are trainable afterwards. ``rank == 0`` returns ``model`` as it is (full fine-tuning).
    Adapter initialisation draws from torch's RNG: seed before calling for a reproducible run."""
    if cfg.rank == 0:
        return model
    # lazy: importing PEFT takes seconds; only rank > 0 needs it
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model  # lazy: as above

    targets = cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if tuple(targets) == ("all-linear",) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.24
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"model.lora.target_modules={list(targets)}: {e}. Linear layers of this model: {names}"
        ) from e
    return peft_model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (tied weights counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


class AdapterDisabled(nn.Module):
    """The reference policy of a LoRA run: ``policy``'s forward with the adapters of ``peft_model`` off.

    ``policy`` is the module the trainer calls (as prepared by accelerate: DDP, FSDP), ``peft_model`` the
    ``PeftModel`` inside it. Neither is registered as a submodule: the reference owns no parameters. The
    forward runs in eval mode (no dropout), as a separately loaded reference would."""

    def __init__(self, policy: nn.Module, peft_model: nn.Module) -> None:
        super().__init__()
        if _peft_model(peft_model) is None:
            raise TypeError(f"AdapterDisabled needs a PEFT model, got {type(peft_model).__name__}")
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_peft", _peft_model(peft_model))

    def forward(self, *args, **kwargs):
        was_training = self._peft.training
        self._peft.eval()
        try:
            with self._peft.disable_adapter():
                return self._policy(*args, **kwargs)
        finally:
            self._peft.train(was_training)


@torch.no_grad()
def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the merged model, named as the base Hugging Face model names them.

    Each adapted weight is ``W + delta`` (PEFT's ``get_delta_weight``, the same sum ``merge_and_unload``
    computes), produced one at a time so that a caller streaming weights (vLLM sync) never holds a second
    copy of the model; the adapters' own tensors are left out, and ``.base_layer`` is removed from names.
    A model without adapters yields its state dict. Call it on an unsharded model (under FSDP, gather the
    full state first)."""
    peft_model = _peft_model(model)
    if peft_model is None:
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer  # lazy: importing PEFT takes seconds; only a LoRA model needs it

    base = peft_model.get_base_model()
    lora = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for key, value in base.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue  # lora_A / lora_B / lora_embedding_* / lora_magnitude_vector
        if ".base_layer." not in key:
            yield key, value
            continue
        module_name, _, leaf = key.partition(".base_layer.")
        layer = lora.get(module_name)
        name = f"{module_name}.{leaf}"
        if layer is None or leaf != "weight":
            yield name, value
            continue
        merged = value.clone()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
                merged += layer.get_delta_weight(adapter)
        yield name, merged


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``dict(merged_weights(model))``: the state dict of the merged model (see ``merged_weights``)."""
    return dict(merged_weights(model))
