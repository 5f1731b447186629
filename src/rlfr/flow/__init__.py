"""The flow field and everything around it (docs/RLFR_METHOD.md §2-§4, §6): the velocity network, flow-matching
pairs and loss, velocity-deviation scores, their shaping into token rewards, latent standardisation, online
updates, the flow directory on disk (``store``: the only reader and writer), and the learner that wires them
during RL (``learner.FlowLearner``: ``rlfr train`` and the TRL bridge both use it)."""

from rlfr.flow.deviation import TokenScores, sequence_scores, token_scores, velocity_deviation
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
from rlfr.flow.shaping import minmax_normalize, shape_flow_rewards
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
    "minmax_normalize",
    "pair_counts",
    "per_sequence_mean",
    "sample_timesteps",
    "save_flow",
    "sequence_scores",
    "shape_flow_rewards",
    "token_scores",
    "velocity_deviation",
]
