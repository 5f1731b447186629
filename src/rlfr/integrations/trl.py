"""RLFR inside TRL's ``GRPOTrainer``: flow rewards as token-level advantages (RLFR_METHOD §4-6).

For a TRL user, three lines::

    from rlfr.integrations.trl import RLFRGRPOTrainer
    trainer = RLFRGRPOTrainer(model, reward_funcs=[accuracy, fmt], args=GRPOConfig(...), train_dataset=ds,
                              flow="runs/flow/flow", correctness="accuracy")
    trainer.train()

``flow`` is a flow directory (``rlfr flow-pretrain``, ``rlfr convert-flow``, a checkpoint's ``flow/``), a
``rlfr.schema.FlowConfig`` (its ``init`` names the directory, None = a fresh flow; every flow option of
``rlfr train``), or None (a fresh flow, default options). ``correctness`` names the reward function whose
score >= ``correct_threshold`` means "passes the answer check": those completions train the flow.

What is added to GRPOTrainer. After TRL has generated and scored a batch (``_generate_and_score_completions``),
per micro-batch of ``per_device_train_batch_size`` completions: a no-grad forward of the Hugging Face policy
(also when vLLM generates; with PEFT, adapters on) fills a ``LatentTap`` -> flow scores -> shaped token rewards
r (``rlfr.rl.step.shaped_flow_rewards``, the code ``rlfr train`` runs) -> the online flow loss is
back-propagated (``online_flow_backward``); then one flow optimizer step per generation batch. TRL's
sequence advantages A_o become (B, C) token advantages A_k = A_o + sum_{s >= k} r_s on the completion
tokens, which TRL's loss accepts as they are.

Loss types. Token advantages are meaningful where each token's term is weighted by its own advantage:
``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo`` (PPO clip per token), ``cispo`` (clipped-ratio
REINFORCE) and ``sapo`` (a soft gate per token), with ``importance_sampling_level="token"``. Refused:
``importance_sampling_level="sequence"`` (GSPO; LUSPO's recommended setting), whose ratio is one number per
sequence, so the gradient only sees the sum of a sequence's token advantages and the flow's credit
assignment is lost; and ``vespo``, whose gamma weight is one per sequence, picked by the sign of the
sequence's advantage.

Checkpoints. ``save_model(dir)`` also writes ``dir/flow/`` (a flow directory: ``rlfr inspect``, ``flow.init``
read it); a checkpoint adds ``flow_optim.pt`` (flow optimizer and schedule, tensors only, read with
``weights_only=True``); ``resume_from_checkpoint`` restores both.

Departures from ``rlfr train`` (here only): the outcome advantage is TRL's (``scale_rewards``, std + 1e-4,
``multi_objective_aggregation``); the flow's gradient is clipped at TRL's ``max_grad_norm`` (none if 0);
``flow.actor_warmup_steps`` is refused (TRL owns the policy's optimizer); the flow is not prepared by
accelerate (DeepSpeed would make it part of the policy's engine): its gradients are averaged over processes
here, and every process builds the same fresh flow from ``args.seed``. Vision-language batches are refused.

TRL versions: this overrides private ``GRPOTrainer`` methods (``_generate_and_score_completions``,
``_calculate_rewards``, ``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``), so it is
pinned to the release it is tested with (``TRL_VERSIONS``) and refuses to import under any other.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from pathlib import Path

import torch
from packaging.version import Version

TRL_VERSIONS = (">=1.16", "<1.17")  # keep in step with pyproject.toml's `trl` extra


def check_trl_version(version: str) -> None:
    """ImportError unless ``version`` is inside ``TRL_VERSIONS``."""
    low, high = (Version(v.lstrip("<>=")) for v in TRL_VERSIONS)
    if not low <= Version(version) < high:
        raise ImportError(
            f"rlfr.integrations.trl is tested with trl{','.join(TRL_VERSIONS)} and overrides private "
            f"GRPOTrainer methods whose contract changes between releases; found trl {version}. Install the "
            "tested version with: pip install 'rlfr[trl]'"
        )


try:
    import trl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("rlfr.integrations.trl needs TRL: pip install 'rlfr[trl]'") from e
check_trl_version(trl.__version__)

from accelerate.utils import gather_object  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

from rlfr.config import validate_config  # noqa: E402
from rlfr.errors import CheckpointError, ConfigError, NonFiniteError, PickleRefusedError  # noqa: E402
from rlfr.flow import LatentNorm  # noqa: E402
from rlfr.flow.store import FlowBundle, build_flow, load_flow, save_flow  # noqa: E402
from rlfr.policy.forward import policy_forward, position_ids  # noqa: E402
from rlfr.policy.latents import LatentTap, block_indices, decoder_blocks  # noqa: E402
from rlfr.rl.advantages import token_advantages  # noqa: E402
from rlfr.rl.step import flow_weight, online_flow_backward, shaped_flow_rewards  # noqa: E402
from rlfr.runtime.checkpoint import flow_dir  # noqa: E402
from rlfr.runtime.env import flow_autocast  # noqa: E402
from rlfr.runtime.metrics import Accum, reduce_stats  # noqa: E402
from rlfr.runtime.optim import build_optimizer, optimizer_step  # noqa: E402
from rlfr.schema import FlowConfig  # noqa: E402

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
FLOW_OPTIM = "flow_optim.pt"  # in a TRL checkpoint, next to its optimizer.pt


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
    """The flow options: a ``FlowConfig``, a flow directory (``FlowConfig(init=...)``) or None (fresh flow)."""
    if flow is None:
        cfg = FlowConfig()
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
    return cfg


class _TorchClip:
    """``optimizer_step``'s accelerator for the flow: plain torch clipping. The policy's accelerator would unscale
    the policy's fp16 gradients, or defer to DeepSpeed, neither of which concerns the flow."""

    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)


class RLFRGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` plus flow rewards and online flow updates (module docstring). Keyword arguments beyond
    GRPOTrainer's: ``flow``, ``correctness`` (a reward function's name) and ``correct_threshold``."""

    def __init__(
        self,
        model,
        reward_funcs=None,
        args=None,
        *,
        flow: FlowConfig | str | os.PathLike | None = None,
        correctness: str,
        correct_threshold: float = 1.0,
        **kwargs,
    ):
        if args is not None:  # before the model loads
            check_loss(args.loss_type, args.importance_sampling_level)
        self.flow_config = as_flow_config(flow)
        super().__init__(model, reward_funcs, args, **kwargs)
        check_loss(self.args.loss_type, self.args.importance_sampling_level)
        if correctness not in self.reward_func_names:
            raise ValueError(
                f"correctness={correctness!r} names no reward function; the names are {self.reward_func_names}"
            )
        self.correct_index = self.reward_func_names.index(correctness)
        self.correct_threshold = correct_threshold
        # hooked blocks checked now, not at the first batch (fractions that collide on a shallow model)
        block_indices(
            len(decoder_blocks(self.accelerator.unwrap_model(self.model))), self.flow_config.fractions
        )
        with torch.random.fork_rng(devices=[]):  # the same fresh flow on every process; TRL's RNG untouched
            torch.manual_seed(self.args.seed)
            bundle = build_flow(self.flow_config, self.accelerator.unwrap_model(self.model))
        self.flow_field = bundle.field.to(self.accelerator.device).requires_grad_(self.flow_config.update)
        self.flow_meta, self.flow_norm = bundle.meta, bundle.norm
        self.flow_opt = self.flow_sched = None  # built with the policy's schedule (create_scheduler)
        self._rewards_per_func = None  # handed from _calculate_rewards to _generate_and_score_completions

    # ------------------------------------------------------------------ TRL hooks

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        sched = super().create_scheduler(num_training_steps, optimizer)
        if self.flow_config.update and self.flow_opt is None:
            f, a = self.flow_config, self.args  # one flow step per generation batch
            rounds = math.ceil(num_training_steps * a.gradient_accumulation_steps / (a.steps_per_generation * a.num_iterations))  # fmt: skip
            self.flow_opt, self.flow_sched = build_optimizer(
                self.flow_field.parameters(), f.lr, f.betas, f.weight_decay, rounds, f.warmup_ratio, "cosine",
                f.min_lr_ratio,
            )  # fmt: skip
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
            save_flow(flow_dir(Path(output_dir or self.args.output_dir)), self.flow_bundle())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.flow_opt is not None:
            state = {"flow": self.flow_opt.state_dict(), "flow_sched": self.flow_sched.state_dict()}
            torch.save(state, Path(output_dir) / FLOW_OPTIM)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        bundle = load_flow(flow_dir(Path(checkpoint)), self.flow_meta)  # checks it models this run's latents
        self.flow_field.load_state_dict(bundle.field.state_dict())
        self.flow_norm = bundle.norm
        if self.flow_opt is not None:
            path = Path(checkpoint) / FLOW_OPTIM
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
            except pickle.UnpicklingError:
                raise PickleRefusedError(path) from None
            except Exception as e:  # noqa: BLE001 - missing, truncated, refused: name the file
                raise CheckpointError(f"{path} cannot be read ({e}): the flow optimizer cannot resume") from e
            self.flow_opt.load_state_dict(state["flow"])
            self.flow_sched.load_state_dict(state["flow_sched"])

    # ------------------------------------------------------------------ the flow

    def flow_bundle(self) -> FlowBundle:
        if self.flow_config.latent_norm == "standardize" and self.flow_norm is None:
            raise RuntimeError(
                "the flow's latent statistics are fitted at the first batch; nothing to save before"
            )
        return FlowBundle(self.flow_field, self.flow_meta, self.flow_norm)

    def flow_advantages(self, batch: dict, correct: torch.Tensor, train: bool) -> torch.Tensor:
        """TRL's (B,) sequence advantages plus the flow rewards' reward-to-go -> (B, C) token advantages; with
        ``train``, one online flow update on the batch. ``correct``: (B,) bool."""
        if "pixel_values" in batch:
            raise NotImplementedError(
                "RLFRGRPOTrainer scores text-only batches; vision inputs are not supported"
            )
        f, acc, t0 = self.flow_config, self.accelerator, time.time()
        if train and f.update and self.flow_opt is None:
            raise RuntimeError(
                "the flow optimizer is built when training starts (create_scheduler); call train()"
            )
        p_len = batch["prompt_ids"].shape[1]
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        trained = batch["completion_mask"] * batch.get("tool_mask", 1)  # tool output is context, not trained
        resp = torch.cat([torch.zeros_like(batch["prompt_mask"]), trained], 1).bool()
        ctx, update = attn.bool(), train and f.update
        total = flow_weight(correct, resp, ctx, f)
        log, parts, mbs = Accum(), [], self.args.per_device_train_batch_size
        autocast = flow_autocast(f.precision, acc.device)
        with LatentTap(self.model, f.fractions) as tap:
            for s in range(0, len(ids), mbs):
                rows = slice(s, s + mbs)
                ent = self.latent_forward(ids[rows], attn[rows], resp[rows])
                lat = self.standardised(tap.latents(), resp[rows])
                if lat is None:  # no latent statistics yet (see ``standardised``): no flow reward, no update
                    parts.append(torch.zeros(resp[rows].shape, device=resp.device))
                    continue
                r = shaped_flow_rewards(
                    self.flow_field, lat, tap.layer_values, resp[rows], ctx[rows], correct=correct[rows], f=f,
                    log=log, autocast_dtype=autocast,
                )  # fmt: skip
                parts.append(r)
                if update:
                    online_flow_backward(
                        self.flow_field, lat, tap.layer_values, resp[rows], ctx[rows], entropy=ent,
                        correct=correct[rows], total=total, f=f, log=log, backward=torch.Tensor.backward,
                        autocast_dtype=autocast,
                    )  # fmt: skip
        if (bad := log.first_nonfinite()) is not None:
            raise NonFiniteError(bad, self.state.global_step + 1, "in the flow rewards")
        if update:
            self.flow_step(total, log)
        rewards = torch.cat(parts)
        log.total("time/rlfr", time.time() - t0)
        mode = "train" if train else "eval"
        for k, v in reduce_stats(acc, log.means()).items():
            self._metrics[mode][k].append(v)
        self._logs["extra"]["flow_reward"].extend(gather_object(rewards.sum(1).tolist()))
        return token_advantages(batch["advantages"], rewards, resp)[:, p_len:]

    def latent_forward(self, ids, attn, resp) -> torch.Tensor | None:
        """The policy's no-grad forward that fills the tap (positions skip left padding, as in ``rlfr train``);
        -> (b, T) entropies when ``entropy_quantile`` needs them, else None (and only one logit is computed)."""
        model = self.model
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            if self.flow_config.entropy_quantile is not None and self.flow_config.update:
                return policy_forward(model, ids, attn, resp, need_entropy=True)[1]
            model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False,
                  logits_to_keep=1)  # fmt: skip
        return None

    def standardised(self, lat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """(L, b, T, d) latents as the flow sees them. A fresh flow's statistics come from the first micro-batch,
        averaged over processes (as ``rlfr.rl.step.fit_norm``); with TRL's ``mask_truncated_completions`` a
        micro-batch can hold no completion token, and until one has some on every process this returns None."""
        if self.flow_config.latent_norm == "none":
            return lat
        if self.flow_norm is None:
            acc = self.accelerator
            if float(acc.reduce(mask.any().float().to(acc.device), "min")) == 0:
                return None
            fitted = LatentNorm.fit(lat, mask)
            self.flow_norm = LatentNorm(acc.reduce(fitted.mean, "mean"), acc.reduce(fitted.std, "mean"))
        return self.flow_norm(lat)

    def flow_step(self, total: torch.Tensor, log: Accum) -> None:
        """One flow optimizer step on the gradients averaged over processes; none when nothing anywhere passed
        the check (an AdamW step on zero gradients would still move the flow)."""
        acc = self.accelerator
        if float(acc.reduce(total.to(acc.device), "sum")) == 0:
            self.flow_opt.zero_grad(set_to_none=True)
            return
        if acc.num_processes > 1:
            for p in self.flow_field.parameters():
                p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
        max_norm = self.args.max_grad_norm
        clip = max_norm if max_norm and max_norm > 0 else math.inf  # TRL: 0 = no clipping
        norm = optimizer_step(_TorchClip, self.flow_field, self.flow_opt, self.flow_sched, clip, "flow",
                              self.state.global_step + 1)  # fmt: skip
        log.add("flow/grad_norm", norm)
        log.add("flow/lr", self.flow_sched.get_last_lr()[0])
