"""The flow field and everything around it (RLFR_METHOD §2-§4, §6): the velocity network, flow-matching
pairs and loss, velocity-deviation scores, latent standardisation, online updates, and the flow directory
on disk (``store``: the only reader and writer)."""

from rlfr.flow.deviation import TokenScores, token_scores, velocity_deviation
from rlfr.flow.field import FlowField
from rlfr.flow.matching import (
    PAIRING,
    FlowPairs,
    build_pairs,
    flow_matching_loss,
    flow_matching_loss_per_pair,
    pair_counts,
    per_sequence_mean,
    sample_timesteps,
)
from rlfr.flow.norm import LatentNorm
from rlfr.flow.store import FlowBundle, FlowMeta, FlowMismatchError, build_flow, load_flow, save_flow

__all__ = [
    "PAIRING",
    "FlowBundle",
    "FlowField",
    "FlowMeta",
    "FlowMismatchError",
    "FlowPairs",
    "LatentNorm",
    "TokenScores",
    "build_flow",
    "build_pairs",
    "flow_matching_loss",
    "flow_matching_loss_per_pair",
    "load_flow",
    "pair_counts",
    "per_sequence_mean",
    "sample_timesteps",
    "save_flow",
    "token_scores",
    "velocity_deviation",
]
