"""The RL maths (pure functions of tensors: advantages, policy losses) and the RL step that composes them
with the flow learner (``rlfr.rl.step``; the flow-reward shaping is ``rlfr.flow.shaping``)."""

from rlfr.rl.advantages import entropy_advantage, group_advantages, kl_rewards, reward_to_go, token_advantages
from rlfr.rl.losses import kl_penalty, policy_loss

__all__ = [
    "entropy_advantage",
    "group_advantages",
    "kl_penalty",
    "kl_rewards",
    "policy_loss",
    "reward_to_go",
    "token_advantages",
]
