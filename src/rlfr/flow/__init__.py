"""Flow field, flow matching and velocity-deviation scores (RLFR_METHOD §2-§4)."""

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

__all__ = [
    "PAIRING",
    "FlowField",
    "FlowPairs",
    "TokenScores",
    "build_pairs",
    "flow_matching_loss",
    "flow_matching_loss_per_pair",
    "pair_counts",
    "per_sequence_mean",
    "sample_timesteps",
    "token_scores",
    "velocity_deviation",
]
