"""Verifiable rewards: the answer check (math-verify behind a hard timeout, never evaluating model output)
and the reward functions built on it."""

from rlfr.reward.functions import CombinedReward, OutcomeReward, build_reward, load_reward_fn
from rlfr.reward.verifier import Verifier, extract_answer, verify, verify_batch

__all__ = [
    "CombinedReward",
    "OutcomeReward",
    "Verifier",
    "build_reward",
    "extract_answer",
    "load_reward_fn",
    "verify",
    "verify_batch",
]
