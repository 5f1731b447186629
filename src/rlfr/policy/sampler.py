"""The sampler interface: one contract for every engine that turns prompts into rollouts.

    sampler = build_sampler("hf", tokenizer, model=policy, device=device, batch_size=64)   # or "vllm"
    sampler.sync_weights(policy, version)                   # -> whether it pushed new weights
    ro = sampler.generate(prompts, SamplingParams(n=8, max_new_tokens=256, temperature=1.0))

Promises of ``Sampler.generate(prompts, params, images=None) -> Rollout`` (checked for every implementation
by ``tests/test_sampler_contract.py``):

- ``params.n`` completions per prompt, prompt-major: rows ``g*n .. g*n+n-1`` are prompt g's (``group``);
- the packed layout of ``rlfr.policy.rollout``: ``[left pad][prompt][response][right pad]``, prompts
  encoded without special tokens; a response ends at and includes the first EOS, or has
  ``max_new_tokens`` tokens and ``truncated`` set; ``completions`` decode the responses;
- ``engine_logp``: None when the sampler is the policy itself, else the sampler's log-prob of each response
  token (0 elsewhere);
- ``greedy``: the same completions on every call, no random number drawn;
- ``seed``: an int gives the same completions for the same call, whatever torch's RNG state, and leaves
  that state as it was; None samples with torch's global RNG (advancing it), so that a run seeded once
  with ``torch.manual_seed``, and resumed from its checkpointed RNG state, samples the same;
- ``images``: each prompt's images, exactly for a vision-language tokenizer (an engine that cannot take
  them refuses them).

``sync_weights(model, version) -> bool`` gives the sampler the policy's weights: a sampler that holds its
own copy (``holds_weights``) pushes them when ``version`` differs from the last pushed one and returns True;
one that samples the live policy (``TransformersSampler``) has nothing to do and returns False.

Implementations: ``TransformersSampler`` (Hugging Face ``generate``, ``rollout.engine=hf``) and
``rlfr.policy.vllm_engine.VLLMEngine`` (``rollout.engine=vllm``); ``build_sampler`` picks one by name.
``SamplingParams`` lives with ``Rollout`` in ``rlfr.policy.rollout`` (what goes in and what comes out of every
sampler), so that an engine needs no import of this module, which builds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from rlfr.policy.latents import LatentTap
from rlfr.policy.rollout import Rollout, SamplingParams, eos_ids, generate
from rlfr.policy.vllm_engine import VLLMEngine, VLLMSettings, model_eos

ENGINES = ("hf", "vllm")


@runtime_checkable
class Sampler(Protocol):
    """Generates rollouts and takes new policy weights; the promises are in the module docstring."""

    holds_weights: bool  # samples from its own copy of the weights (sync_weights pushes), not the live policy

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, images: Sequence[Sequence] | None = None
    ) -> Rollout: ...

    def sync_weights(self, model: nn.Module, version: int) -> bool: ...


class TransformersSampler:
    """Hugging Face ``generate`` on the policy itself (``rlfr.policy.rollout.generate``): ``batch_size``
    sequences per call, inputs on ``device`` (default: the first parameter's device; under FSDP with CPU
    offload that is the CPU, so the trainer passes the accelerator's device). ``capture``: a ``LatentTap`` on the
    model whose latents, and the log-probs, every rollout also carries (``Rollout.captured``,
    ``rlfr.policy.capture``): opt-in for scoring without a second forward; the samples are the same. ``progress``:
    the description of a progress bar over each call's sequences (None: none)."""

    holds_weights = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int = 64,
        device: torch.device | None = None,
        capture: LatentTap | None = None,
        progress: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.device = model, tokenizer, batch_size, device
        self.capture, self.progress = capture, progress

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, images: Sequence[Sequence] | None = None
    ) -> Rollout:
        p = params
        device = self.device if self.device is not None else next(self.model.parameters()).device
        with seeded(None if p.greedy else p.seed, torch.device(device)):
            return generate(self.model, self.tokenizer, prompts, p.n, p.max_new_tokens, p.temperature, p.top_p,
                            greedy=p.greedy, batch_size=self.batch_size, images=images, device=self.device,
                            capture=self.capture, progress=self.progress)  # fmt: skip

    def sync_weights(self, model: nn.Module, version: int) -> bool:
        """Nothing to push: every rollout samples the live policy."""
        return False


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside: torch's CPU RNG and that of ``device`` seeded with ``seed``; both restored on exit.
    ``seed`` None: nothing changes (sampling advances the global RNG)."""
    if seed is None:
        yield
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"seeded sampling supports cpu and cuda devices, not {device.type}; pass seed=None")
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


def build_sampler(
    engine: str,
    tokenizer,
    *,
    model: nn.Module | None = None,
    device: torch.device | None = None,
    batch_size: int = 64,
    model_path: str | None = None,
    vllm: VLLMSettings | None = None,
    capture: LatentTap | None = None,
    progress: str | None = None,
) -> Sampler:
    """The sampler that ``engine`` names (``rollout.engine``, ``rlfr eval backend=...``).

    hf: ``TransformersSampler`` on ``model`` (``batch_size``, ``device``, ``capture`` as there). vllm: a colocated
    ``VLLMEngine`` loaded from ``model_path`` with the settings ``vllm``, stopping at the EOS ids of ``model``
    (without a loaded model: of the config files in ``model_path``); it cannot capture latents. ``progress``: the
    description of a progress bar over each call's sequences (None: none; vLLM shows its own bar)."""
    if engine == "hf":
        if model is None:
            raise ValueError("engine hf samples from a loaded model: pass model=")
        return TransformersSampler(model, tokenizer, batch_size, device, capture, progress)
    if capture is not None:
        raise ValueError(f"engine {engine} cannot capture latents while it samples; use engine hf")
    if engine == "vllm":
        if model_path is None or vllm is None:
            raise ValueError(
                "engine vllm needs model_path= (the weights it loads) and vllm= (its VLLMSettings)"
            )
        eos = eos_ids(tokenizer, model) if model is not None else model_eos(model_path, tokenizer)
        return VLLMEngine(model_path, tokenizer, eos, vllm, progress=progress is not None)
    raise ValueError(f"unknown sampling engine {engine!r}: one of {', '.join(ENGINES)}")
