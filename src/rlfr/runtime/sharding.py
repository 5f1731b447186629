"""Sharded training (FSDP, configured by ``accelerate launch --config_file configs/accelerate/fsdp*.yaml``).

Under FSDP the policy's parameters and optimizer state are split across processes; everything that reads
or writes them whole goes through here, and does nothing special without FSDP (DDP or one process):

- ``is_fsdp(accelerator)``;
- ``prepare_replicated(accelerator, module, optimizer)``: the flow is small next to the policy, so it is
  replicated (DDP), not sharded, whatever accelerate does to the policy;
- ``finish_prepare(accelerator, model, tap)``: after the policy is prepared, refuse LoRA under FSDP1 and run
  one forward through it, so that FSDP2 takes the outermost module as its root (a LoRA policy's ``generate``
  would otherwise enter below it);
- ``root_gathered(accelerator, model)``: the root's own weights gathered, for calls that enter below it
  (generation, evaluation);
- ``full_state_dict(accelerator, model, trainable_only)``: the full (unsharded) weights, gathered on the
  main process for a checkpoint (None elsewhere, and None without FSDP: the model saves its own);
- ``optimizer_state`` / ``load_optimizer_state``: the optimizer state as a checkpoint holds it (FSDP: the
  full state keyed by parameter name, gathered on the main process);
- ``load_model_state(accelerator, model, state)``: full weights (every process holds them) into the
  possibly sharded model;
- ``all_finite(accelerator, module)``: every parameter finite on every process (one answer for all).

All of them except ``prepare_replicated`` are collective under FSDP: every process calls them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn

from rlfr.errors import ConfigError


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _offload(accelerator) -> bool:
    """Gather to the CPU of the main process only (``cpu_offload``): on GPUs. A CPU run (tests) gathers on
    every process, since FSDP1's offload of CPU tensors crashes (a segfault in torch 2.13)."""
    return accelerator.device.type != "cpu"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # lazy: FSDP only; takes seconds

    return StateDictOptions(full_state_dict=True, **kw)


def prepare_replicated(accelerator, module: nn.Module, optimizer):
    """(module, optimizer) prepared for data parallelism without sharding: under FSDP the module is wrapped
    in DDP by hand (accelerate would shard it); otherwise ``accelerator.prepare`` (DDP or nothing)."""
    if not is_fsdp(accelerator):
        return accelerator.prepare(module, optimizer)
    module = module.to(accelerator.device)
    if accelerator.num_processes > 1:
        ids = [accelerator.local_process_index] if accelerator.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module, accelerator.prepare_optimizer(optimizer)  # prepare() insists on a model under FSDP2


def finish_prepare(accelerator, model: nn.Module, tap=None) -> None:
    """After ``accelerator.prepare(policy, optimizer)`` under FSDP: refuse LoRA under FSDP1, and run one token
    through the prepared policy (no grad, ``tap`` paused). Nothing without FSDP.

    FSDP2 makes the first module to run forward its root, and needs that to be the outermost sharded module.
    A LoRA policy's ``generate`` enters at the base model inside the PEFT wrapper (the root), so an RL step
    that starts with a rollout would fail ("FSDP requires a single root module"); this forward settles it.
    Under FSDP1, PEFT finds no adapter weights to save (it looks them up under module names that carry FSDP1's
    wrapper prefix) and Hugging Face gradient checkpointing of adapted blocks fails its recomputation check."""
    if not is_fsdp(accelerator):
        return
    if not accelerator.is_fsdp2 and any(hasattr(m, "peft_config") for m in model.modules()):
        raise ConfigError(
            "LoRA under FSDP needs fsdp_version: 2 (configs/accelerate/fsdp.yaml); with FSDP1 PEFT saves empty "
            "adapters and checkpointed adapted blocks fail their recomputation"
        )
    ids = torch.zeros((1, 1), dtype=torch.long, device=accelerator.device)
    with tap.paused() if tap is not None else contextlib.nullcontext(), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for m in model.modules():  # FSDP2 keeps the root's weights gathered after a forward (for the backward)
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()


@contextlib.contextmanager
def root_gathered(accelerator, model: nn.Module) -> Iterator[None]:
    """Under FSDP, the weights the root module owns itself (final norm, ...) gathered inside.

    ``generate`` of a LoRA policy, and evaluation, call the base model inside the PEFT wrapper, below the
    root: every sharded block gathers its own weights, but the root's pre-forward never runs. Nothing
    happens without FSDP."""
    if not is_fsdp(accelerator):
        yield
        return
    if hasattr(model, "unshard") and hasattr(model, "reshard"):  # FSDP2: an FSDPModule
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
        return
    from torch.distributed.fsdp import FullyShardedDataParallel  # lazy: FSDP1 only; takes seconds

    with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
        yield


def full_state_dict(accelerator, model: nn.Module, trainable_only: bool = False) -> dict | None:
    """Under FSDP: the full state dict on the main process, on the CPU (None on the others); with
    ``trainable_only`` only the parameters that train (a LoRA run's adapters). None without FSDP."""
    if not is_fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # lazy: FSDP only; takes seconds

    state = get_model_state_dict(
        model, options=_options(cpu_offload=_offload(accelerator), ignore_frozen_params=trainable_only)
    )
    if not accelerator.is_main_process:
        return None
    # gathered copies of a tied weight (embeddings = output layer) are separate tensors; alias them again so
    # that save_pretrained drops the duplicate, as it does for an unsharded model
    tied: dict[int, list[str]] = {}
    for name, p in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(_clean(name))
    for first, *others in tied.values():
        for name in others:
            if first in state and name in state:
                state[name] = state[first]
    return state


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def optimizer_state(accelerator, model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer state to checkpoint: ``optimizer.state_dict()``, or under FSDP the full state keyed by
    parameter name (gathered on the main process; the others get ``{}``)."""
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    # lazy: FSDP only; takes seconds
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(
        model, _inner(optimizer), options=_options(cpu_offload=_offload(accelerator))
    )
    return state if accelerator.is_main_process else {}


def load_optimizer_state(accelerator, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Inverse of ``optimizer_state`` (under FSDP every process passes the full state it read). Either form
    loads either way: a checkpoint written with FSDP resumes without it, and the other way round."""
    by_name = any(isinstance(k, str) for g in state.get("param_groups", []) for k in g["params"])
    if not is_fsdp(accelerator) and not by_name:
        optimizer.load_state_dict(state)
        return
    # lazy: FSDP only; takes seconds
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not by_name:  # ``optimizer.state_dict()`` numbers the parameters in the optimizer's order
        names = {id(p): _clean(n) for n, p in model.named_parameters()}
        order = [names[id(p)] for g in _inner(optimizer).param_groups for p in g["params"]]
        state = {
            "state": {order[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[k] for k in g["params"]]} for g in state["param_groups"]],
        }
    set_optimizer_state_dict(model, _inner(optimizer), state, options=_options())


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def load_model_state(accelerator, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights named as the unwrapped model names them (checked by the reader, e.g.
    ``runtime.checkpoint.read_policy_weights``; keys absent from ``state`` keep their values)."""
    if not is_fsdp(accelerator):
        accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict  # lazy: FSDP only; takes seconds

    set_model_state_dict(model, state, options=_options(strict=False))


def all_finite(accelerator, module: nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite; under FSDP each process checks its shards and the
    answer is agreed on, so that all processes raise, or none."""
    local = all(bool(torch.isfinite(_local(p)).all()) for p in module.parameters())
    if not is_fsdp(accelerator):
        return local
    bad = torch.tensor(float(not local), device=accelerator.device)
    return not bool(accelerator.reduce(bad, "max"))


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this process's shard
