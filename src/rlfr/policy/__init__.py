"""The policy: loading any Hugging Face causal LM (or the embedded default), sampling rollouts (one
``Sampler`` interface over transformers ``generate`` and the vLLM engine), the forward pass that gives
log-probs and entropies, and the ``LatentTap`` that captures its latents in the same pass."""

from rlfr.policy.forward import policy_forward, position_ids
from rlfr.policy.latents import LatentTap, block_indices, decoder_blocks
from rlfr.policy.loading import ModelLoadError, load_model, load_tokenizer, resolve_model_path
from rlfr.policy.rollout import Rollout, generate, pack
from rlfr.policy.sampler import Sampler, SamplingParams, TransformersSampler, build_sampler

__all__ = [
    "LatentTap",
    "ModelLoadError",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "TransformersSampler",
    "block_indices",
    "build_sampler",
    "decoder_blocks",
    "generate",
    "load_model",
    "load_tokenizer",
    "pack",
    "policy_forward",
    "position_ids",
    "resolve_model_path",
]
