"""The TRL-shaped options of the RLFR bridge (``rlfr.integrations.trl``): ``RLFRGRPOConfig`` is TRL's
``GRPOConfig`` plus every ``flow.*`` option of ``rlfr train`` as a field ``flow_<key>`` (the reward shaping's
``flow.reward.*`` too: ``flow_beta`` is ``flow.reward.beta``), each with its default and help text taken from
``rlfr.schema``, so ``TrlParser`` / ``HfArgumentParser`` read them from the command line or a YAML file like
any other TRL option; ``flow_correctness`` says which completions pass the check (a reward function's name and
``flow_correct_threshold``, or ``NAME OP NUMBER`` as ``rlfr train``'s ``reward.correct_if``). Also here: the TRL
releases the bridge is tested with (importing this under another one fails), the losses it refuses, and the
deprecated keywords (``flow=``, ``correctness=``, ``correct_threshold=``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from packaging.specifiers import SpecifierSet

# Keep in step with pyproject.toml's `trl` extra and docs/trl.md. Not 1.15: its GRPOTrainer computes log-probs
# with a Triton kernel and no fallback, so it cannot train on CPU-only PyTorch, where the tests run.
TRL_VERSIONS = ">=1.14,<1.17,!=1.15.*"


def check_trl_version(version: str) -> None:
    """ImportError unless ``version`` is one of ``TRL_VERSIONS``."""
    if not SpecifierSet(TRL_VERSIONS).contains(version, prereleases=True):
        raise ImportError(
            f"rlfr.integrations.trl is tested with trl{TRL_VERSIONS} and overrides private GRPOTrainer methods "
            f"whose contract changes between releases; found trl {version}. Install a tested version with: "
            f"pip install 'trl{TRL_VERSIONS}'"
        )


try:
    import trl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"rlfr.integrations.trl needs TRL: pip install 'trl{TRL_VERSIONS}'") from e
check_trl_version(trl.__version__)

from trl import GRPOConfig  # noqa: E402

from rlfr.config import from_dict, validate_config  # noqa: E402
from rlfr.errors import ConfigError  # noqa: E402
from rlfr.schema import FlowConfig, RewardShapingConfig, Threshold, parse_threshold  # noqa: E402

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
_REWARD_KEYS = {f.name for f in fields(RewardShapingConfig)}


def _flow_option(key: str):
    """A config field mirroring ``rlfr train``'s ``flow.<key>`` (``flow.reward.<key>`` for the shaping keys):
    its default (lists for tuples, as argument parsers want them) and its help text."""
    cls = RewardShapingConfig if key in _REWARD_KEYS else FlowConfig
    src = next(f for f in fields(cls) if f.name == key)
    default = src.default if src.default is not MISSING else src.default_factory()
    where = f"flow.reward.{key}" if cls is RewardShapingConfig else f"flow.{key}"
    meta = {"help": f"{src.metadata['help']} (rlfr train: {where})"}
    if isinstance(default, tuple):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RLFRGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the flow: each ``flow_<key>`` is ``rlfr train``'s ``flow.<key>`` (the shaping keys
    ``flow_beta``, ``flow_eta``, ``flow_top_k``, ``flow_bilateral``, ``flow_gamma``, ``flow_timesteps`` are its
    ``flow.reward.*``), checked when the config is made; ``flow_correctness`` names the reward function that
    decides which completions pass the check."""

    flow_init: str | None = _flow_option("init")
    flow_beta: float = _flow_option("beta")
    flow_eta: float = _flow_option("eta")
    flow_top_k: int = _flow_option("top_k")
    flow_bilateral: bool = _flow_option("bilateral")
    flow_gamma: float = _flow_option("gamma")
    flow_timesteps: list[float] = _flow_option("timesteps")
    flow_fractions: list[float] = _flow_option("fractions")
    flow_modes: list[str] = _flow_option("modes")
    flow_shift: int = _flow_option("shift")
    flow_width: int | None = _flow_option("width")
    flow_depth: int = _flow_option("depth")
    flow_eps: float | None = _flow_option("eps")
    flow_latent_norm: Literal["standardize", "none"] = _flow_option("latent_norm")
    flow_batch_mul: int = _flow_option("batch_mul")
    flow_precision: Literal["auto", "float32", "bfloat16"] = _flow_option("precision")
    flow_update: bool = _flow_option("update")
    flow_lr: float = _flow_option("lr")
    flow_betas: list[float] = _flow_option("betas")
    flow_weight_decay: float = _flow_option("weight_decay")
    flow_warmup_ratio: float = _flow_option("warmup_ratio")
    flow_min_lr_ratio: float = _flow_option("min_lr_ratio")
    flow_soft_flow: float = _flow_option("soft_flow")
    flow_entropy_quantile: float | None = _flow_option("entropy_quantile")
    flow_allow_mode_mismatch: bool = _flow_option("allow_mode_mismatch")
    flow_correctness: str | None = field(
        default=None,
        metadata={"help": "which completions are correct (those train the flow): the name of a reward function, "
                  "correct when its score >= flow_correct_threshold, or NAME OP NUMBER (accuracy>=1; OP one of >=, "
                  ">, ==, <=, <) as rlfr train's reward.correct_if; required"},
    )  # fmt: skip
    flow_correct_threshold: float = field(
        default=1.0,
        metadata={"help": "score of the flow_correctness reward from which a completion is correct"},
    )

    def __post_init__(self):
        super().__post_init__()
        self.flow_config()  # a bad flow option fails here, not after the model has loaded

    def flow_config(self) -> FlowConfig:
        """The flow options as ``rlfr train``'s ``FlowConfig``, type-checked and validated."""
        data: dict = {"reward": {}}
        for f in fields(FlowConfig) + fields(RewardShapingConfig):
            if hasattr(self, f"flow_{f.name}"):
                value = getattr(self, f"flow_{f.name}")
                (data["reward"] if f.name in _REWARD_KEYS else data)[f.name] = value
        try:
            return from_dict(FlowConfig, data)
        except ConfigError as e:
            raise ConfigError(
                f"RLFRGRPOConfig: {e} (the field flow_<key> sets flow.<key> / flow.reward.<key>)"
            ) from e


def correctness_rule(correctness: str, threshold: float) -> Threshold:
    """``flow_correctness`` as a ``Threshold`` (``rlfr.schema``, what ``rlfr train``'s ``reward.correct_if`` takes):
    ``"accuracy"`` is ``accuracy >= flow_correct_threshold``; ``"accuracy>=1"`` says it in one string."""
    rule = parse_threshold(correctness)
    if rule is None:
        return Threshold(correctness, ">=", float(threshold))
    if threshold != 1.0:
        raise ValueError(
            f"flow_correctness={correctness!r} holds its threshold; flow_correct_threshold={threshold} would be a second"
        )
    return rule


def check_loss(loss_type: str, importance_sampling_level: str) -> None:
    """ValueError for a TRL loss where per-token advantages are not meaningful (module docstring)."""
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"RLFRGRPOTrainer: loss_type={loss_type!r} is not supported: its weight is one per sequence, chosen "
            f"by the sign of the sequence's advantage, so token-level flow advantages do not fit it. Supported: "
            f"{', '.join(SUPPORTED_LOSS_TYPES)}"
        )
    if importance_sampling_level != "token":
        raise ValueError(
            f"RLFRGRPOTrainer: importance_sampling_level={importance_sampling_level!r} gives one ratio per sequence, "
            "so the gradient sees only the sum of a sequence's token advantages and the flow's per-token credit is "
            "lost; use importance_sampling_level='token'"
        )


def as_flow_config(flow: FlowConfig | str | os.PathLike | None) -> FlowConfig:
    """The deprecated ``flow=`` keyword: a ``FlowConfig``, a flow directory or None (a fresh flow, as
    ``init='random'``)."""
    if flow is None:
        cfg = FlowConfig(init="random")
    elif isinstance(flow, FlowConfig):
        cfg = flow
    elif isinstance(flow, (str, os.PathLike)):
        cfg = FlowConfig(init=str(flow))
    else:
        raise TypeError(f"flow must be a FlowConfig, a flow directory or None, got {type(flow).__name__}")
    validate_config(cfg, "flow")  # types, ranges (no NaN), and the checks between keys
    if cfg.actor_warmup_steps:
        raise ConfigError(
            "flow.actor_warmup_steps is not supported with TRL (TRL owns the policy's optimizer)"
        )
    return require_flow(cfg, "flow=FlowConfig(init=...)")


def require_flow(cfg: FlowConfig, where: str) -> FlowConfig:
    """``cfg`` when its flow is chosen: a flow directory or ``random``; as ``rlfr train`` (``require_flow_init``),
    the bridge never starts from a random flow it was not asked for."""
    if cfg.init is None:
        raise ConfigError(
            f"RLFRGRPOTrainer: {where} is not set: give a flow directory that models expert latents (make one with "
            "`rlfr flow-pretrain`, or `rlfr convert-flow` for the authors' released flows), or 'random' for a flow "
            "trained from scratch during RL (an ablation: its rewards are noise until it has learned)"
        )
    return cfg


UNSET = object()  # a keyword not given (None is a value: a fresh flow, flow_init='random')


def trainer_settings(args, flow, correctness, correct_threshold) -> tuple[FlowConfig, str, float]:
    """(flow options, correctness reward's name, its threshold) from an ``RLFRGRPOConfig`` or, deprecated, from
    the ``flow=`` / ``correctness=`` / ``correct_threshold=`` keywords with a plain ``GRPOConfig``."""
    legacy = any(v is not UNSET for v in (flow, correctness, correct_threshold))
    if isinstance(args, RLFRGRPOConfig):
        if legacy:
            raise TypeError(
                "RLFRGRPOTrainer: give the flow options in RLFRGRPOConfig (flow_init, flow_correctness, ...), not "
                "also as the keywords flow= / correctness= / correct_threshold="
            )
        if args.flow_correctness is None:
            raise ValueError(
                "RLFRGRPOConfig.flow_correctness must name the reward function whose score says a completion is "
                "correct (those completions train the flow)"
            )
        return (
            require_flow(args.flow_config(), "flow_init"),
            args.flow_correctness,
            args.flow_correct_threshold,
        )
    if correctness is UNSET:
        raise TypeError(
            "RLFRGRPOTrainer needs args=RLFRGRPOConfig(..., flow_correctness=<reward function name>) "
            f"(got {type(args).__name__}); the flow options are its flow_* fields"
        )
    warnings.warn(
        "RLFRGRPOTrainer(flow=..., correctness=..., correct_threshold=...) is deprecated: use "
        "args=RLFRGRPOConfig(..., flow_init=..., flow_correctness=..., flow_correct_threshold=...)",
        DeprecationWarning,
        stacklevel=3,  # the caller of RLFRGRPOTrainer(...)
    )
    threshold = 1.0 if correct_threshold is UNSET else float(correct_threshold)
    if flow is UNSET:
        raise ConfigError(
            "RLFRGRPOTrainer(flow=...) is not set: give a flow directory (`rlfr flow-pretrain` makes one), or "
            "flow=None for a flow trained from scratch (an ablation); better: args=RLFRGRPOConfig(flow_init=...)"
        )
    return as_flow_config(flow), correctness, threshold
