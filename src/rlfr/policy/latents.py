"""Tap the policy's latent space: forward hooks on decoder blocks (docs/RLFR_METHOD.md §1).

Contract (the trainer calls exactly this)::

    tap = LatentTap(model, fractions=(0.25, 0.5, 0.75))   # model: the module whose forward you call
    out = model(input_ids, attention_mask=mask, labels=labels)
    latents = tap.latents()          # (L, B, T, d) float, detached, from the latest top-level forward
    tap.layer_values                 # (L,) float32, block_index / num_blocks: the flow's layer input
    with tap.paused():               # no captures, e.g. during generate
        model.generate(...)
    with tap.recording() as steps:   # every forward's captures kept, e.g. generate's prefill and decode steps
        model.generate(...)          # steps: one (L, B, t, d) tensor per top-level forward, in order
    with torch.no_grad(), tap.latents_only():   # only the latents: the forward stops after the deepest
        model(input_ids, attention_mask=mask)   # hooked block (no later block, final norm, LM head, logits)
    latents = tap.latents()
    tap.remove()                     # or: with LatentTap(model) as tap: ...

Block index of fraction p in a model with L blocks: ``round(p * L)``, moved to ``L - 1`` if it equals ``L``.
``round`` is Python's (round half to even) because that is what the authors used, and a released flow
checkpoint is conditioned on ``block_index / L``: with L = 30, p = 0.75 gives 22 (not 23). The published
sizes (28, 32, 36 blocks) are multiples of 4 and never hit a tie.

Why the captures are detached. The flow is trained on the policy's latents and scores them; its loss
must never push gradient into the policy (the policy is trained by the RL loss only). Detaching in the
hook makes that structural: whatever the trainer does with ``latents()``, no graph reaches the policy.

Why a capture session per top-level forward. A forward pre-hook on the model starts a new session; each
hooked block keeps the first output it produces in a session and ignores any later one. Gradient
checkpointing re-runs a block during backward; where the checkpoint wraps ``__call__`` (older
transformers, FSDP/DeepSpeed-style wrappers, ``torch.utils.checkpoint(block, ...)``) that re-run fires the
forward hook again, and would otherwise overwrite or duplicate the capture. Re-runs inside backward are
recognised (``torch._C._current_graph_task_id() != -1``) and counted in ``recompute_count``; a block that
runs twice in one session outside backward raises, because that means the pre-hook sits on a module
that was not called (see "Wrapped models"). In transformers 5 the checkpoint wraps ``forward`` of a
``GradientCheckpointingLayer``, so module hooks already stay outside it and the re-run never reaches us;
the dedupe is kept for every other setup.

Why stop the forward early (``latents_only``). Where only latents are needed (flow pretraining, ``rlfr inspect``,
the TRL bridge's latent forward) everything after the deepest hooked block is wasted, the LM head most of all: its
logits are 2.5 GB per 8,192-token sequence at a 152k vocabulary in bf16. Inside ``latents_only()`` that block's hook
raises a private exception right after its capture and the context manager swallows it (only it). This works for
any architecture without re-implementing its forward (embeddings, rotary or 3-D positions, masks, vision merging:
running "embedding + first k blocks" by hand would need a copy of each family's forward), and the latents are
bit-identical to a full forward's: the same modules ran on the same inputs. An aborted forward would skip FSDP's
post-forward (resharding), so a model holding FSDP modules is refused; the RL update, which needs log-probs, runs
the full forward.

Wrapped models. Blocks are found through DDP/DeepSpeed ``.module``, ``torch.compile``'s ``._orig_mod`` and
PEFT's ``base_model.model``. The session pre-hook goes on the module you pass. Pass the unwrapped Hugging
Face model: a wrapper's forward calls the inner model's ``__call__``, so the pre-hook fires whichever of
the two you call, whereas a pre-hook on the wrapper never fires when the inner model is called directly
(e.g. ``unwrapped.generate``).

Departures from the authors' code (docs/RLFR_METHOD.md §8, items 1-2):

1. Their hook stores latents during the checkpointed forward and forces ``requires_grad = True`` onto a
   flow loss that has no graph under reentrant checkpointing, so online flow updates do nothing. Here
   the flow loss is built by the trainer from detached latents outside any checkpoint; the graph runs
   through the flow's parameters only (``tests/test_flow_gradients.py`` checks that every flow parameter
   gets gradient and changes, with reentrant and non-reentrant checkpointing).
2. Their RL hook does not detach the target latent, so a working graph would send flow-loss gradient into
   the policy. Every capture here is detached.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["LatentTap", "block_indices", "decoder_blocks"]

# Attribute paths to the decoder blocks, tried in order on the model and on each unwrapped inner module.
_KNOWN_PATHS = (
    "model.layers",  # Llama, Qwen2, Qwen3, Mistral, Gemma3ForCausalLM
    "model.language_model.layers",  # Qwen2.5-VL / Gemma3 ForConditionalGeneration (transformers 5)
    "language_model.layers",  # the VL base model itself
    "model.language_model.model.layers",  # older VL layouts
    "language_model.model.layers",
    "layers",  # a base model (LlamaModel, ...)
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
)
_VISION_NAMES = ("visual", "vision")


def _inner_modules(model: nn.Module) -> list[nn.Module]:
    """The model and every module it wraps (DDP ``.module``, ``._orig_mod``, PEFT ``base_model.model``)."""
    found = [model]
    while True:
        m = found[-1]
        inner = None
        if isinstance(getattr(m, "module", None), nn.Module):  # DDP, FSDP1, DeepSpeed engine
            inner = m.module
        elif isinstance(getattr(m, "_orig_mod", None), nn.Module):  # torch.compile
            inner = m._orig_mod
        elif hasattr(m, "peft_config") and isinstance(getattr(m, "base_model", None), nn.Module):
            # PEFT: PeftModel.base_model is a tuner (LoraModel) whose .model is the Hugging Face model.
            # (A plain HF model's `base_model` property is its own backbone, so only follow it for PEFT.)
            tuner = m.base_model
            inner = tuner.model if isinstance(getattr(tuner, "model", None), nn.Module) else tuner
        if inner is None or any(inner is f for f in found):
            return found
        found.append(inner)


def _num_layers(modules: Sequence[nn.Module]) -> int | None:
    for m in modules:
        config = getattr(m, "config", None)
        if config is None:
            continue
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        elif hasattr(config, "text_config"):
            config = config.text_config
        n = getattr(config, "num_hidden_layers", None)
        if isinstance(n, int):
            return n
    return None


def _get_path(module: nn.Module, path: str) -> object | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (or its wrapper), as an ``nn.ModuleList``.

    Known attribute paths are tried first (on the model and on every module it wraps); then the single
    ``nn.ModuleList`` of length ``config.num_hidden_layers`` (text config for VLMs) outside a vision tower.
    """
    modules = _inner_modules(model)
    n = _num_layers(modules)
    for m in modules:
        for path in _KNOWN_PATHS:
            blocks = _get_path(m, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and (n is None or len(blocks) == n):
                return blocks
    if n is not None:
        matches = {
            id(sub): (name, sub)
            for name, sub in modules[-1].named_modules()
            if isinstance(sub, nn.ModuleList)
            and len(sub) == n
            and not any(v in name.lower() for v in _VISION_NAMES)
        }
        if len(matches) == 1:
            return next(iter(matches.values()))[1]
        if len(matches) > 1:
            names = sorted(name for name, _ in matches.values())
            raise ValueError(
                f"{type(model).__name__}: several ModuleLists of length num_hidden_layers={n} could be the "
                f"decoder blocks: {names}"
            )
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__} (inner: "
        f"{[type(m).__name__ for m in modules]}); tried {list(_KNOWN_PATHS)} and a search for a ModuleList "
        f"of length config.num_hidden_layers={n}"
    )


def block_indices(num_blocks: int, fractions: Sequence[float]) -> list[int]:
    """Block index ``round(p * num_blocks)`` per fraction p, moved to ``num_blocks - 1`` if it equals it.

    Python's ``round`` (half to even), as in the authors' code: 28 -> [7, 14, 21], 32 -> [8, 16, 24],
    36 -> [9, 18, 27], 30 -> [8, 15, 22]. Raises ValueError for p outside [0, 1] or duplicate indices.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if len(fractions) == 0:
        raise ValueError("fractions is empty")
    indices = []
    for p in fractions:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"layer fraction must be in [0, 1], got {p}")
        indices.append(min(round(p * num_blocks), num_blocks - 1))
    if len(set(indices)) != len(indices):
        raise ValueError(
            f"fractions {list(fractions)} give duplicate block indices {indices} for {num_blocks} blocks"
        )
    return indices


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _StopForward(Exception):
    """Raised by the deepest hooked block inside ``LatentTap.latents_only()`` once it is captured; only
    ``latents_only()`` catches it (the model's own ``try/finally`` clean-up runs on the way out)."""


def _fsdp_modules(model: nn.Module) -> list[str]:
    """Names of the FSDP (1 or 2) modules in ``model``; none unless torch's FSDP was imported at all."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel  # lazy: imported already

    return [n for n, m in model.named_modules() if isinstance(m, (FSDPModule, FullyShardedDataParallel))]


class LatentTap:
    """Capture detached outputs of the decoder blocks at ``fractions`` of the depth, one per forward.

    Attributes: ``indices`` (hooked block indices), ``num_blocks``, ``layer_values`` ((L,) float32,
    index / num_blocks), ``capture_count`` / ``recompute_count`` (per hooked block, since creation or the
    last ``clear()``: captures kept, and checkpoint re-runs ignored), ``sessions`` (top-level forwards seen).
    """

    def __init__(self, model: nn.Module, fractions: Sequence[float] = (0.25, 0.5, 0.75)) -> None:
        blocks = decoder_blocks(model)
        self.num_blocks = len(blocks)
        self.indices = block_indices(self.num_blocks, fractions)
        self.layer_values = torch.tensor(self.indices, dtype=torch.float32) / self.num_blocks
        self._paused = False
        self._record: list[torch.Tensor] | None = (
            None  # inside recording(): every finished session's captures
        )
        self._stop_slot: int | None = None  # set inside latents_only(): the deepest hooked block's slot
        self._model = model
        self._captured: list[torch.Tensor | None] = [None] * len(self.indices)
        self.capture_count = [0] * len(self.indices)
        self.recompute_count = [0] * len(self.indices)
        self.sessions = 0
        self._handles = [model.register_forward_pre_hook(self._start_session)]
        self._handles += [
            blocks[i].register_forward_hook(self._block_hook(s)) for s, i in enumerate(self.indices)
        ]

    def _start_session(self, module: nn.Module, args: tuple) -> None:
        if self._paused:
            return
        if self._record is not None:
            self._keep_session()
        self._captured = [None] * len(self.indices)
        self.sessions += 1

    def _keep_session(self) -> None:
        """Inside ``recording()``: the finished session's captures, stacked, onto the record."""
        if any(h is not None for h in self._captured):
            self._record.append(self.latents())

    def _block_hook(self, slot: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._paused:
                return
            if self._captured[slot] is not None:
                if _in_backward():  # gradient-checkpoint recomputation: keep the first capture
                    self.recompute_count[slot] += 1
                    return
                raise RuntimeError(
                    f"block {self.indices[slot]} ran twice in one capture session outside backward: the "
                    "session pre-hook is on a module that was not called; pass LatentTap the module whose "
                    "forward you call (the unwrapped model)"
                )
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(hidden, torch.Tensor):
                raise TypeError(
                    f"block {self.indices[slot]} returned {type(output).__name__}, expected a Tensor"
                )
            self._captured[slot] = hidden.detach()
            self.capture_count[slot] += 1
            if slot == self._stop_slot:
                raise _StopForward

        return hook

    def latents(self) -> torch.Tensor:
        """(L, B, T, d) stacked block outputs of the latest top-level forward (detached)."""
        missing = [self.indices[s] for s, h in enumerate(self._captured) if h is None]
        if len(missing) == len(self.indices):
            raise RuntimeError("LatentTap captured nothing: run a forward (not paused) before latents()")
        if missing:
            raise RuntimeError(
                f"LatentTap: blocks {missing} of {self.indices} were not captured in the last forward"
            )
        return torch.stack(self._captured)  # type: ignore[arg-type]

    def clear(self) -> None:
        """Drop the captured tensors and reset the counters."""
        self._captured = [None] * len(self.indices)
        self.capture_count = [0] * len(self.indices)
        self.recompute_count = [0] * len(self.indices)
        self.sessions = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Inside, every top-level forward's captures are kept: the list yielded holds, once the block is left,
        one (L, B, t, d) tensor per forward in the order they ran (``generate``: the prefill over the prompt,
        then one per decode step with t = 1). A forward that misses a hooked block raises, as ``latents()``."""
        if self._paused:
            raise RuntimeError("LatentTap.recording() inside paused(): nothing would be recorded")
        self._record, self._captured = [], [None] * len(self.indices)
        record = self._record
        try:
            yield record
            self._keep_session()
        finally:
            self._record = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[LatentTap]:
        """No session starts and nothing is captured inside (e.g. during ``generate``)."""
        previous, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = previous

    @contextlib.contextmanager
    def latents_only(self) -> Iterator[LatentTap]:
        """Forwards inside stop right after the deepest hooked block has been captured: no later block, no
        final norm, no LM head, no logits (module docstring). The forward's return value is lost (the call
        ends with an exception this context swallows), so read ``latents()`` after the ``with`` block. A
        forward that finds the tap paused runs whole. Refuses a model holding FSDP modules (RuntimeError)."""
        sharded = _fsdp_modules(self._model)
        if sharded:
            raise RuntimeError(
                f"LatentTap.latents_only: the model holds FSDP modules ({sharded[0]}, ...); an aborted forward "
                "would leave them unsharded. Run the full forward (the latents are the same)"
            )
        previous = self._stop_slot
        self._stop_slot = max(range(len(self.indices)), key=lambda s: self.indices[s])
        try:
            yield self
        except _StopForward:
            pass
        finally:
            self._stop_slot = previous

    def remove(self) -> None:
        """Remove every hook and drop the captures."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._captured = [None] * len(self.indices)

    def __enter__(self) -> LatentTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
