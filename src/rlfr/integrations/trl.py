"""RLFR inside TRL's ``GRPOTrainer``: flow rewards as token-level advantages (RLFR_METHOD §4-6).

For a TRL user, the flow is configured like any other GRPOTrainer option::

    from rlfr.integrations.trl import RLFRGRPOConfig, RLFRGRPOTrainer
    args = RLFRGRPOConfig(output_dir="runs/trl", flow_init="runs/demo/flow_pretrain/flow", flow_beta=0.01,
                          flow_correctness="accuracy")
    trainer = RLFRGRPOTrainer(model, reward_funcs=[accuracy, fmt], args=args, train_dataset=ds)
    trainer.train()

``RLFRGRPOConfig`` is ``GRPOConfig`` plus every ``flow.*`` option of ``rlfr train`` as a field ``flow_<key>``
(the reward shaping's ``flow.reward.*`` too: ``flow_beta`` is ``flow.reward.beta``), so ``TrlParser`` /
``HfArgumentParser`` read them from the command line (``--flow_init DIR --flow_beta 0.02``). ``flow_init``
names a flow directory (``rlfr flow-pretrain``, ``rlfr convert-flow``, a checkpoint's ``flow/``; None = a
fresh flow); ``flow_correctness`` names the reward function whose score >= ``flow_correct_threshold`` means
"passes the answer check": those completions train the flow. The keywords ``flow=`` (a ``FlowConfig`` or a
directory) and ``correctness=`` / ``correct_threshold=`` with a plain ``GRPOConfig`` still work, deprecated.

What is added to GRPOTrainer. After TRL has generated and scored a batch (``_generate_and_score_completions``),
per micro-batch of ``per_device_train_batch_size`` completions: a no-grad forward of the Hugging Face policy
(also when vLLM generates; with PEFT, adapters on) fills the flow's tap -> the ``rlfr.flow.learner.FlowLearner``
(the one ``rlfr train`` runs) scores the latents into token rewards r and back-propagates its online loss;
then one flow optimizer step per generation batch. TRL's sequence advantages A_o become (B, C) token
advantages A_k = A_o + sum_{s >= k} r_s on the completion tokens, which TRL's loss accepts as they are.

Loss types. Token advantages are meaningful where each token's term is weighted by its own advantage:
``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo`` (PPO clip per token), ``cispo`` (clipped-ratio
REINFORCE) and ``sapo`` (a soft gate per token), with ``importance_sampling_level="token"``. Refused:
``importance_sampling_level="sequence"`` (GSPO; LUSPO's recommended setting), whose ratio is one number per
sequence, so the gradient only sees the sum of a sequence's token advantages and the flow's credit
assignment is lost; and ``vespo``, whose gamma weight is one per sequence, picked by the sign of the
sequence's advantage.

Checkpoints. ``save_model(dir)`` also writes ``dir/flow/`` (a flow directory: ``rlfr inspect``, ``flow_init``
read it); a checkpoint adds ``flow_optim.pt`` (flow optimizer and schedule, tensors only, read with
``weights_only=True``); ``resume_from_checkpoint`` restores both.

Departures from ``rlfr train`` (here only): the outcome advantage is TRL's (``scale_rewards``, std + 1e-4,
``multi_objective_aggregation``); the flow's gradient is clipped at TRL's ``max_grad_norm`` (none if 0);
``flow.actor_warmup_steps`` does not exist here (TRL owns the policy's optimizer); the flow is not prepared
by accelerate (DeepSpeed would make it part of the policy's engine): its gradients are averaged over
processes by the learner, and every process builds the same fresh flow from ``args.seed``. Vision-language
batches are refused.

TRL versions: this overrides private methods (``GRPOTrainer._generate_and_score_completions`` and
``_calculate_rewards``; ``Trainer._save_optimizer_and_scheduler`` and ``_load_optimizer_and_scheduler``,
docs/trl.md says why), so it refuses to import under a TRL release outside the tested ones (``TRL_VERSIONS``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Literal

import torch
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
            "pip install 'rlfr[trl]'"
        )


try:
    import trl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("rlfr.integrations.trl needs TRL: pip install 'rlfr[trl]'") from e
check_trl_version(trl.__version__)

from accelerate.utils import gather_object  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

from rlfr.config import from_dict  # noqa: E402
from rlfr.errors import CheckpointError, ConfigError, NonFiniteError  # noqa: E402
from rlfr.flow.learner import FlowLearner  # noqa: E402
from rlfr.flow.store import build_flow, save_flow  # noqa: E402
from rlfr.policy.forward import policy_forward, position_ids  # noqa: E402
from rlfr.policy.latents import block_indices, decoder_blocks  # noqa: E402
from rlfr.rl.advantages import reward_to_go, token_advantages  # noqa: E402
from rlfr.runtime.checkpoint import flow_dir  # noqa: E402
from rlfr.runtime.env import flow_autocast  # noqa: E402
from rlfr.runtime.metrics import Accum, reduce_stats  # noqa: E402
from rlfr.runtime.optim import build_optimizer, optimizer_step  # noqa: E402
from rlfr.schema import FlowConfig, RewardShapingConfig  # noqa: E402

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
FLOW_OPTIM = "flow_optim.pt"  # in a TRL checkpoint, next to its optimizer.pt
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
    flow_correctness: str | None = field(
        default=None,
        metadata={"help": "name of the reward function whose score >= flow_correct_threshold means the completion "
                  "passes the answer check (those train the flow); required"},
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
    """The deprecated ``flow=`` keyword: a ``FlowConfig``, a flow directory or None (a fresh flow)."""
    if flow is None:
        cfg = FlowConfig()
    elif isinstance(flow, FlowConfig):
        cfg = flow
    elif isinstance(flow, (str, os.PathLike)):
        cfg = FlowConfig(init=str(flow))
    else:
        raise TypeError(f"flow must be a FlowConfig, a flow directory or None, got {type(flow).__name__}")
    cfg.validate()
    if cfg.actor_warmup_steps:
        raise ConfigError(
            "flow.actor_warmup_steps is not supported with TRL (TRL owns the policy's optimizer)"
        )
    return cfg


_UNSET = object()


def _settings(args, flow, correctness, correct_threshold) -> tuple[FlowConfig, str, float]:
    """(flow options, correctness reward's name, its threshold) from an ``RLFRGRPOConfig`` or, deprecated, from
    the ``flow=`` / ``correctness=`` / ``correct_threshold=`` keywords with a plain ``GRPOConfig``."""
    legacy = any(v is not _UNSET for v in (flow, correctness, correct_threshold))
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
        return args.flow_config(), args.flow_correctness, args.flow_correct_threshold
    if correctness is _UNSET:
        raise TypeError(
            "RLFRGRPOTrainer needs args=RLFRGRPOConfig(..., flow_correctness=<reward function name>) "
            f"(got {type(args).__name__}); the flow options are its flow_* fields"
        )
    warnings.warn(
        "RLFRGRPOTrainer(flow=..., correctness=..., correct_threshold=...) is deprecated: use "
        "args=RLFRGRPOConfig(..., flow_init=..., flow_correctness=..., flow_correct_threshold=...)",
        DeprecationWarning,
        stacklevel=3,
    )
    threshold = 1.0 if correct_threshold is _UNSET else float(correct_threshold)
    return as_flow_config(None if flow is _UNSET else flow), correctness, threshold


class _TorchClip:
    """``optimizer_step``'s accelerator for the flow: plain torch clipping. The policy's accelerator would unscale
    the policy's fp16 gradients, or defer to DeepSpeed, neither of which concerns the flow."""

    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)


class RLFRGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` plus flow rewards and online flow updates (module docstring); ``args`` is an
    ``RLFRGRPOConfig``. ``self.flow`` is the ``FlowLearner``."""

    def __init__(self, model, reward_funcs=None, args=None, *, flow=_UNSET, correctness=_UNSET,
                 correct_threshold=_UNSET, **kwargs):  # fmt: skip
        flow_cfg, correctness, threshold = _settings(args, flow, correctness, correct_threshold)
        if args is not None:  # before the model loads
            check_loss(args.loss_type, args.importance_sampling_level)
        super().__init__(model, reward_funcs, args, **kwargs)
        check_loss(self.args.loss_type, self.args.importance_sampling_level)
        if correctness not in self.reward_func_names:
            raise ValueError(
                f"flow_correctness={correctness!r} names no reward function; the names are {self.reward_func_names}"
            )
        self.correct_index, self.correct_threshold = self.reward_func_names.index(correctness), threshold
        policy, acc = self.accelerator.unwrap_model(self.model), self.accelerator
        # hooked blocks checked now, not at the first batch (fractions that collide on a shallow model)
        block_indices(len(decoder_blocks(policy)), flow_cfg.fractions)
        with torch.random.fork_rng(devices=[]):  # the same fresh flow on every process; TRL's RNG untouched
            torch.manual_seed(self.args.seed)
            bundle = build_flow(flow_cfg, policy)
        bundle.field.to(acc.device).requires_grad_(flow_cfg.update)
        self.flow = FlowLearner(
            flow_cfg, bundle, reduce=acc.reduce, optimizer_step=partial(optimizer_step, _TorchClip),
            average_gradients=acc.num_processes > 1, autocast_dtype=flow_autocast(flow_cfg.precision, acc.device),
        )  # fmt: skip
        self._rewards_per_func = None  # handed from _calculate_rewards to _generate_and_score_completions

    # ------------------------------------------------------------------ TRL hooks

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        sched = super().create_scheduler(num_training_steps, optimizer)
        if self.flow.cfg.update and self.flow.opt is None:
            f, a = self.flow.cfg, self.args  # one flow step per generation batch
            rounds = math.ceil(num_training_steps * a.gradient_accumulation_steps / (a.steps_per_generation * a.num_iterations))  # fmt: skip
            self.flow.attach_optimizer(*build_optimizer(
                self.flow.module.parameters(), f.lr, f.betas, f.weight_decay, rounds, f.warmup_ratio, "cosine",
                f.min_lr_ratio,
            ))  # fmt: skip
        return sched

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards  # (B of all processes, reward functions)
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        rewards, self._rewards_per_func = self._rewards_per_func, None
        if rewards is None:
            raise RuntimeError(
                "GRPOTrainer did not call _calculate_rewards: this TRL version is not supported"
            )
        b, rank = out["completion_ids"].shape[0], self.accelerator.process_index
        mine = rewards[rank * b : (rank + 1) * b, self.correct_index]
        correct = mine >= self.correct_threshold  # a NaN score (no reward) is not correct
        out["advantages"] = self.flow_advantages(out, correct, train=self.model.training)
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_flow(flow_dir(Path(output_dir or self.args.output_dir)), self.flow.bundle())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.flow.opt is not None:
            torch.save(self.flow.optimizer_state(), Path(output_dir) / FLOW_OPTIM)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        state = None
        if self.flow.opt is not None:
            path = Path(checkpoint) / FLOW_OPTIM
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
            except Exception as e:  # noqa: BLE001 - missing, truncated, refused: name the file
                raise CheckpointError(f"{path} cannot be read ({e}): the flow optimizer cannot resume") from e
        self.flow.load(flow_dir(Path(checkpoint)), state)  # checks it models this run's latents

    # ------------------------------------------------------------------ the flow

    def flow_advantages(self, batch: dict, correct: torch.Tensor, train: bool) -> torch.Tensor:
        """TRL's (B,) sequence advantages plus the flow rewards' reward-to-go -> (B, C) token advantages; with
        ``train``, one online flow update on the batch. ``correct``: (B,) bool."""
        if "pixel_values" in batch:
            raise NotImplementedError(
                "RLFRGRPOTrainer scores text-only batches; vision inputs are not supported"
            )
        flow, t0 = self.flow, time.time()
        update = train and flow.cfg.update
        if update and flow.opt is None:
            raise RuntimeError(
                "the flow optimizer is built when training starts (create_scheduler); call train()"
            )
        p_len = batch["prompt_ids"].shape[1]
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        trained = batch["completion_mask"] * batch.get("tool_mask", 1)  # tool output is context, not trained
        resp = torch.cat([torch.zeros_like(batch["prompt_mask"]), trained], 1).bool()
        ctx = attn.bool()
        total = flow.total_weight(correct, resp, ctx)
        log, parts, mbs = Accum(), [], self.args.per_device_train_batch_size
        with flow.reading(self.model):
            for s in range(0, len(ids), mbs):
                rows = slice(s, s + mbs)
                ent = self.latent_forward(ids[rows], attn[rows], resp[rows])
                # with TRL's mask_truncated_completions a micro-batch can hold no completion token: a fresh flow
                # gets its latent statistics from the first one with tokens on every process; none before
                if not flow.fit_norm(resp[rows]):
                    parts.append(torch.zeros(resp[rows].shape, device=resp.device))
                    continue
                r = flow.score(resp[rows], ctx[rows], correct[rows], log)
                n_tok = resp[rows].sum().clamp(min=1)  # the flow's part of the token advantages
                log.add("adv/flow_abs", reward_to_go(r, resp[rows]).abs().sum() / n_tok, weight=n_tok)
                parts.append(r)
                if update:
                    flow.backward(resp[rows], ctx[rows], correct[rows], total, log, entropy=ent)
        if (bad := log.first_nonfinite()) is not None:
            raise NonFiniteError(bad, self.state.global_step + 1, "in the flow rewards")
        if update:
            max_norm = self.args.max_grad_norm
            clip = max_norm if max_norm and max_norm > 0 else math.inf  # TRL: 0 = no clipping
            if flow.step(total, clip, self.state.global_step + 1, log) is not None:
                log.add("flow/lr", flow.sched.get_last_lr()[0])
        rewards = torch.cat(parts)
        log.total("time/rlfr", time.time() - t0)
        mode = "train" if train else "eval"
        for k, v in reduce_stats(self.accelerator, log.means()).items():
            self._metrics[mode][k].append(v)
        self._logs["extra"]["flow_reward"].extend(gather_object(rewards.sum(1).tolist()))
        return token_advantages(batch["advantages"], rewards, resp)[:, p_len:]

    def latent_forward(self, ids, attn, resp) -> torch.Tensor | None:
        """The policy's no-grad forward that fills the tap (positions skip left padding, as in ``rlfr train``);
        -> (b, T) entropies when the flow's update needs them, else None (and only one logit is computed)."""
        model = self.model
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            if self.flow.needs_entropy:
                return policy_forward(model, ids, attn, resp, need_entropy=True)[1]
            model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False,
                  logits_to_keep=1)  # fmt: skip
        return None
