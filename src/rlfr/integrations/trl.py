"""RLFR inside TRL's ``GRPOTrainer``: flow rewards as token-level advantages (docs/RLFR_METHOD.md §4-6).

For a TRL user, the flow is configured like any other GRPOTrainer option::

    from rlfr.integrations.trl import RLFRGRPOConfig, RLFRGRPOTrainer
    args = RLFRGRPOConfig(output_dir="runs/trl", flow_init="runs/demo/flow_pretrain/flow", flow_beta=0.01,
                          flow_correctness="accuracy")
    trainer = RLFRGRPOTrainer(model, reward_funcs=[accuracy, fmt], args=args, train_dataset=ds)
    trainer.train()

``RLFRGRPOConfig`` (``rlfr.integrations.trl_config``) is ``GRPOConfig`` plus every ``flow.*`` option of
``rlfr train`` as a field ``flow_<key>`` (the reward shaping's ``flow.reward.*`` too: ``flow_beta`` is
``flow.reward.beta``), so ``TrlParser`` / ``HfArgumentParser`` read them from the command line
(``--flow_init DIR --flow_beta 0.02``). ``flow_init`` names a flow directory (``rlfr flow-pretrain``, ``rlfr
convert-flow``, a checkpoint's ``flow/``; ``'random'`` = a fresh flow; required, as ``rlfr train``'s
``flow.init``: unset, the trainer stops); ``flow_correctness`` names the reward function whose score >=
``flow_correct_threshold`` means "passes the answer check" (or says it in one string, ``accuracy>=1``, the syntax
of ``rlfr train``'s ``reward.correct_if``): those completions train the flow.
The keywords ``flow=`` (a ``FlowConfig`` or a directory) and ``correctness=`` / ``correct_threshold=`` with a
plain ``GRPOConfig`` still work, deprecated.

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

import contextlib
import math
import pickle
import time
from functools import partial
from pathlib import Path

import torch

# first: refuses a missing or untested TRL, saying how to install a tested one
from rlfr.integrations.trl_config import (
    TRL_VERSIONS,
    UNSET,
    RLFRGRPOConfig,
    check_loss,
    check_trl_version,
    correctness_rule,
    trainer_settings,
)

# isort: split
from accelerate.utils import DistributedType, gather_object
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from rlfr.errors import CheckpointError, NonFiniteError, PickleRefusedError
from rlfr.flow.learner import FlowLearner
from rlfr.flow.store import build_flow, pairing_note, save_flow
from rlfr.policy.forward import policy_forward, position_ids
from rlfr.policy.latents import block_indices, decoder_blocks
from rlfr.rl.advantages import reward_to_go, token_advantages
from rlfr.runtime.checkpoint import flow_dir
from rlfr.runtime.env import flow_autocast
from rlfr.runtime.metrics import Accum, reduce_stats
from rlfr.runtime.optim import build_optimizer, optimizer_step
from rlfr.schema import OPS

FLOW_OPTIM = "flow_optim.pt"  # in a TRL checkpoint, next to its optimizer.pt
__all__ = ["TRL_VERSIONS", "RLFRGRPOConfig", "RLFRGRPOTrainer", "check_trl_version"]


class _TorchClip:
    """``optimizer_step``'s accelerator for the flow: plain torch clipping. The policy's accelerator would unscale
    the policy's fp16 gradients, or defer to DeepSpeed, neither of which concerns the flow."""

    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)


class RLFRGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` plus flow rewards and online flow updates (module docstring); ``args`` is an
    ``RLFRGRPOConfig``. ``self.flow`` is the ``FlowLearner``."""

    def __init__(self, model, reward_funcs=None, args=None, *, flow=UNSET, correctness=UNSET,
                 correct_threshold=UNSET, **kwargs):  # fmt: skip
        flow_cfg, correctness, threshold = trainer_settings(args, flow, correctness, correct_threshold)
        if args is not None:  # before the model loads
            check_loss(args.loss_type, args.importance_sampling_level)
        super().__init__(model, reward_funcs, args, **kwargs)
        check_loss(self.args.loss_type, self.args.importance_sampling_level)
        rule = correctness_rule(correctness, threshold)
        if rule.name not in self.reward_func_names:
            raise ValueError(
                f"flow_correctness={correctness!r} names no reward function; the names are {self.reward_func_names}"
            )
        self.correct_index, self.correct_rule = self.reward_func_names.index(rule.name), rule
        policy, acc = self.accelerator.unwrap_model(self.model), self.accelerator
        # hooked blocks checked now, not at the first batch (fractions that collide on a shallow model)
        block_indices(len(decoder_blocks(policy)), flow_cfg.fractions)
        with torch.random.fork_rng(devices=[]):  # the same fresh flow on every process; TRL's RNG untouched
            torch.manual_seed(self.args.seed)
            bundle = build_flow(flow_cfg, policy)
        if acc.is_main_process and (note := pairing_note(bundle.meta, flow_cfg.modes, flow_cfg.shift)):
            print(note)
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
        correct = OPS[self.correct_rule.op](mine, self.correct_rule.value)  # a NaN score (no reward) never is
        # TRL's sampler repeats each prompt num_generations times in a row and a process takes a contiguous slice
        # of the batch, so a row's prompt is its global index // num_generations (a group cut between processes
        # counts on each)
        group = (rank * b + torch.arange(b, device=correct.device)) // self.num_generations
        out["advantages"] = self.flow_advantages(out, correct, train=self.model.training, group=group)
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
            except pickle.UnpicklingError:
                raise PickleRefusedError(path) from None
            except Exception as e:  # noqa: BLE001 - missing, truncated, refused: name the file
                raise CheckpointError(f"{path} cannot be read ({e}): the flow optimizer cannot resume") from e
        self.flow.load(flow_dir(Path(checkpoint)), state)  # checks it models this run's latents

    # ------------------------------------------------------------------ the flow

    def flow_advantages(
        self, batch: dict, correct: torch.Tensor, train: bool, group: torch.Tensor | None = None
    ) -> torch.Tensor:
        """TRL's (B,) sequence advantages plus the flow rewards' reward-to-go -> (B, C) token advantages; with
        ``train``, one online flow update on the batch. ``correct``: (B,) bool; ``group``: (B,) the prompt of each
        row (for the flow score's AUROC within prompts), or None."""
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
                r = flow.score(
                    resp[rows], ctx[rows], correct[rows], log, group=None if group is None else group[rows]
                )
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
        -> (b, T) entropies when the flow's update needs them, else None. Without entropies the forward stops
        after the deepest hooked block (``LatentTap.latents_only``: no later block, no logits), except under
        DeepSpeed or FSDP, whose sharded modules must finish their forward (there only one logit is computed)."""
        model = self.model
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            if self.flow.needs_entropy:
                return policy_forward(model, ids, attn, resp, need_entropy=True)[1]
            sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
            with contextlib.nullcontext() if sharded else self.flow.tap.latents_only():
                model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False,
                      logits_to_keep=1)  # fmt: skip
        return None
