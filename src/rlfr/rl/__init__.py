"""The RL maths (pure functions of tensors: flow-reward shaping, advantages, policy losses) and the RL step
that composes them (``rlfr.rl.step``)."""

from rlfr.rl.advantages import entropy_advantage, group_advantages, kl_rewards, reward_to_go, token_advantages
from rlfr.rl.losses import kl_penalty, policy_loss
from rlfr.rl.shaping import minmax_normalize, shape_flow_rewards

__all__ = [
    "entropy_advantage",
    "group_advantages",
    "kl_penalty",
    "kl_rewards",
    "minmax_normalize",
    "policy_loss",
    "reward_to_go",
    "shape_flow_rewards",
    "token_advantages",
]
