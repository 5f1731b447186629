"""Verifiable rewards: the answer check (math-verify behind a hard timeout, never evaluating model output),
reward functions in TRL's shape and their weighted sum, and which rollouts count as correct."""

from rlfr.reward.functions import CombinedReward, MathReward, build_reward, load_reward_fn
from rlfr.reward.outcome import OutcomeReward, Scored, reward_columns
from rlfr.reward.verifier import Verifier, extract_answer, verify, verify_batch

__all__ = [
    "CombinedReward",
    "MathReward",
    "OutcomeReward",
    "Scored",
    "Verifier",
    "build_reward",
    "extract_answer",
    "load_reward_fn",
    "reward_columns",
    "verify",
    "verify_batch",
]
