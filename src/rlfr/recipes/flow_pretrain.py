"""Offline flow pretraining (``rlfr flow-pretrain``, docs/RLFR_METHOD.md §6 stage 1).

The policy is frozen (eval mode, no gradient); its latents on expert worked solutions (same template as
RL) train the flow field with the flow-matching loss on the same pairs RL builds (targets are solution
tokens, EOS included; a condition may be the last prompt token): AdamW, linear warm-up then cosine decay,
weight decay 0.01, the same optimizer step as RL (clipping, finite-gradient check). A held-out fraction of the
sequences is never trained on and its loss is reported with fixed (t, eps) draws, so first and last held-out
losses are comparable. The flow is saved with the latents it models (``latents.json``) so that RL can check it
uses the same block fractions, context modes and shift (the authors' configs silently mixed ``token_pre`` and
``token_post``, docs/RLFR_METHOD.md §8.7).

How it scales (docs/flow_pretraining.md). The flow reads only the hooked blocks' outputs, so the policy's
forward stops after the deepest hooked block (``LatentTap.latents_only``): no later block, no LM head, no
(sequences x tokens x vocabulary) logits, so memory does not depend on the vocabulary. ``batch_size``
sequences make one optimizer step (split over processes under ``accelerate launch``); each process sends
``micro_batch_size`` of its share through the policy at a time and accumulates the flow's gradients, micro-batch
i's mean loss weighted by its share n_i / N of the step's N pairs, so that the step's gradient is that of the
mean over all N pairs (the one-shot batch) whatever the micro-batch size. ``max_length`` (the authors'
``cutoff_len`` 8192) truncates or drops longer rows, and says how many.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlfr.config import to_dict
from rlfr.data.sources import render_prompts, resolve_data
from rlfr.data.templates import response_end
from rlfr.flow import build_pairs, flow_matching_loss
from rlfr.flow.matching import pair_counts
from rlfr.flow.norm import LatentNorm
from rlfr.flow.store import FlowBundle, build_flow, save_flow
from rlfr.policy.forward import model_inputs
from rlfr.policy.latents import LatentTap
from rlfr.policy.loading import load_model, load_tokenizer
from rlfr.policy.rollout import Rollout, Solutions, encode_solutions
from rlfr.runtime import sharding
from rlfr.runtime.env import flow_autocast, make_accelerator, seed_everything
from rlfr.runtime.metrics import MetricsLogger
from rlfr.runtime.optim import build_optimizer, optimizer_step
from rlfr.runtime.stream import EpochStream, shard
from rlfr.schema import FlowPretrainConfig


def _latents(policy, tap, batch: Rollout, device, norm=None):
    """Latents (L, b, T, d) of a packed batch (standardised when ``norm`` is given), its response mask (the
    flow's targets: solution tokens, never image tokens) and attention mask (allowed conditions: the prompt
    too), both (b, T) bool. The forward stops after the deepest hooked block: nothing else is needed."""
    batch = batch.to(device)
    att = batch.attention_mask
    with torch.no_grad(), tap.latents_only():
        policy(**model_inputs(batch.input_ids, att, batch.vision), use_cache=False)
    lat = tap.latents()
    return (norm(lat) if norm is not None else lat), batch.response_mask.to(device), att.bool()


def chunks(rows: list[int], size: int | None) -> list[list[int]]:
    """``rows`` in consecutive pieces of ``size`` (None: one piece)."""
    size = size or max(len(rows), 1)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def cut_to_length(solutions: Solutions, max_length: int | None, overlong: str) -> tuple[Solutions, int]:
    """Rows whose prompt + solution exceed ``max_length`` tokens: ``truncate`` keeps the prompt and the first
    ``max_length - len(prompt)`` solution tokens (at least one: ``FlowPretrainConfig.validate``), ``drop`` leaves
    the row out -> (the solutions, how many rows were cut or dropped)."""
    if max_length is None:
        return solutions, 0
    prompts, responses = solutions.prompt_ids, solutions.response_ids
    long = {i for i, (p, r) in enumerate(zip(prompts, responses)) if len(p) + len(r) > max_length}
    if not long:
        return solutions, 0
    if overlong == "truncate":
        cut = [
            r[: max_length - len(p)] if i in long else r for i, (p, r) in enumerate(zip(prompts, responses))
        ]
        return Solutions(prompts, cut, solutions.vision), len(long)
    keep = [i for i in range(len(prompts)) if i not in long]
    vision = None if solutions.vision is None else solutions.vision.select(keep)
    return Solutions([prompts[i] for i in keep], [responses[i] for i in keep], vision), len(long)


def backward_step(flow, latents_of, batches: list[Rollout], flow_cfg, layer_values, autocast_dtype, backward):
    """Back-propagate the flow-matching loss of one step's ``batches`` (this process's micro-batches) into
    ``flow`` -> the step's loss, ().

    Micro-batch i's mean loss is weighted by n_i / N (its pairs over the step's), so the accumulated gradient
    is that of the mean over all N pairs, as one batch would give; with one micro-batch the weight is exactly 1.
    ``latents_of(batch)`` -> (latents, mask, context) as ``_latents``; gradients are synchronised across
    processes once, at the last micro-batch (``no_sync`` of a DDP-wrapped flow)."""
    f = flow_cfg
    counts = [
        int(pair_counts(b.response_mask, b.attention_mask.bool(), f.modes, f.shift, len(f.fractions)).sum())
        for b in batches
    ]
    total = sum(counts)
    step_loss = torch.zeros(())
    for i, (batch, n) in enumerate(zip(batches, counts)):
        lat, mask, ctx = latents_of(batch)
        pairs = build_pairs(lat, layer_values, mask, f.modes, f.shift, context_mask=ctx)
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else getattr(flow, "no_sync", contextlib.nullcontext)():
            loss = flow_matching_loss(flow, pairs, f.batch_mul, autocast_dtype=autocast_dtype)
            loss = loss * (n / total if total else 0.0)
            backward(loss)
        step_loss = step_loss.to(loss.device) + loss.detach()
    return step_loss


@dataclass
class FlowPretrainResult:
    flow_dir: str
    steps: int
    seconds: float
    train_loss_first: float  # mean of the first few steps (single steps are noisy)
    train_loss_last: float
    heldout_loss_first: float | None  # before training, with fixed (t, eps) draws; None without held-out
    heldout_loss_last: float | None
    train_losses: list[float]
    overlong_rows: int = 0  # rows longer than max_length: truncated or dropped (cfg.overlong)


def run_flow_pretrain(cfg: FlowPretrainConfig, progress: bool = True) -> FlowPretrainResult:
    acc = make_accelerator(cfg.cpu)
    seed_everything(cfg.seed)
    # data errors surface before the model loads; flow pretraining reads no answers. Its held-out loss is on
    # heldout_fraction of data.train: data.eval=auto only keeps the rows the other stages evaluate on out of
    # training, and a named held-out set is not read
    data = cfg.data
    if data.eval not in ("auto", ""):
        if acc.is_main_process:
            print(f"flow-pretrain: data.eval={data.eval} is not read: the held-out flow loss is measured on "
                  f"heldout_fraction={cfg.heldout_fraction} of data.train")  # fmt: skip
        data = replace(data, eval="")
    train, _ = resolve_data(data, need_solution=True, need_answer=False)
    tok = load_tokenizer(
        cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.data.min_pixels, cfg.data.max_pixels
    )
    prompts = render_prompts(train, cfg.data.template, tok, cfg.data.max_prompt_tokens)
    solutions, overlong = cut_to_length(
        encode_solutions(tok, train, prompts, response_end(cfg.data.template)), cfg.max_length, cfg.overlong
    )
    n_rows = len(solutions.prompt_ids)
    if overlong and acc.is_main_process:
        done = f"truncated to {cfg.max_length} tokens" if cfg.overlong == "truncate" else "dropped"
        print(
            f"flow-pretrain: {overlong} of {len(train)} rows are longer than max_length={cfg.max_length}: {done}"
        )
    policy = load_model(
        cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code, acc.device
    ).eval()
    policy.requires_grad_(False)
    policy.to(acc.device)
    tap = LatentTap(policy, cfg.flow.fractions)
    bundle = build_flow(cfg.flow, policy)
    flow, norm = bundle.field, bundle.norm
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_held = int(round(cfg.heldout_fraction * n_rows))
    held, fit = perm[:n_held], perm[n_held:]
    if len(fit) < cfg.batch_size:
        dropped = f" ({overlong} rows over max_length dropped)" if cfg.overlong == "drop" and overlong else ""
        raise ValueError(
            f"flow-pretrain: {len(fit)} training sequences{dropped} < batch_size={cfg.batch_size}"
        )
    steps_per_epoch = len(fit) // cfg.batch_size
    total = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))

    def latents_of(batch: Rollout, norm=None):
        return _latents(policy, tap, batch, acc.device, norm)

    if cfg.flow.latent_norm == "standardize" and norm is None:
        # statistics of the training sequences only (never the held-out ones), from up to 64 of them
        norm = LatentNorm.fit_batches(
            latents_of(solutions.pack(tok, c))[:2] for c in chunks(fit[:64], cfg.micro_batch_size)
        )
    opt, sched = build_optimizer(
        flow.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, total, cfg.warmup_ratio, "cosine",
        cfg.min_lr_ratio,
    )  # fmt: skip
    flow, opt = sharding.prepare_replicated(acc, flow, opt)  # under FSDP too: the flow is small
    autocast_dtype = flow_autocast(cfg.flow.precision, acc.device)
    lt = tap.layer_values.to(acc.device)
    out = Path(cfg.out_dir)
    logger = MetricsLogger(out, acc.is_main_process, cfg.report_to, fresh=True, config=to_dict(cfg))

    def heldout_loss() -> float | None:
        if not held:
            return None
        g = torch.Generator(device=acc.device).manual_seed(cfg.seed + 1)  # same draws every time
        losses, weights = [], []
        for rows in chunks(held, cfg.micro_batch_size or cfg.batch_size):
            lat, mask, ctx = latents_of(solutions.pack(tok, rows), norm)
            pairs = build_pairs(lat, lt, mask, cfg.flow.modes, cfg.flow.shift, context_mask=ctx)
            with torch.no_grad():
                losses.append(
                    flow_matching_loss(
                        acc.unwrap_model(flow), pairs, cfg.flow.batch_mul, generator=g,
                        autocast_dtype=autocast_dtype,
                    ).item()
                )  # fmt: skip
            weights.append(len(pairs))
        return sum(v * w for v, w in zip(losses, weights)) / max(sum(weights), 1)

    stream = EpochStream(len(fit), cfg.seed, reseed_each_epoch=False)
    history = {"train": [], "heldout": [(0, heldout_loss())]}
    t0 = time.time()
    bar = tqdm(range(total), desc="flow-pretrain", disable=not (progress and acc.is_main_process))
    for step in bar:
        rows = [fit[i] for i in stream.take(step * cfg.batch_size, cfg.batch_size)]
        rows = shard(rows, acc.process_index, acc.num_processes, "batch_size")
        batches = [solutions.pack(tok, c) for c in chunks(rows, cfg.micro_batch_size)]
        loss = backward_step(
            flow, lambda b: latents_of(b, norm), batches, cfg.flow, lt, autocast_dtype, acc.backward
        ).item()
        grad_norm = optimizer_step(acc, flow, opt, sched, cfg.max_grad_norm, "flow-pretraining", step + 1)
        history["train"].append(loss)
        row = {
            "flow_pretrain/loss": loss,
            "flow_pretrain/lr": sched.get_last_lr()[0],
            "flow_pretrain/grad_norm": grad_norm,
        }
        if step + 1 == total or (step + 1) % max(1, steps_per_epoch) == 0:
            h = heldout_loss()
            history["heldout"].append((step + 1, h))
            row["flow_pretrain/heldout_loss"] = h
        logger.log(step + 1, row, stage="flow_pretrain")
        bar.set_postfix(loss=f"{loss:.4f}")
    logger.close()
    tap.remove()
    flow_dir = out / "flow"
    if acc.is_main_process:
        save_flow(flow_dir, FlowBundle(acc.unwrap_model(flow), bundle.meta, norm))
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    acc.wait_for_everyone()
    tr = history["train"]
    k = max(1, min(5, len(tr) // 5))  # smooth first/last over a few steps: single steps are noisy
    return FlowPretrainResult(
        flow_dir=str(flow_dir), steps=total, seconds=time.time() - t0, train_loss_first=sum(tr[:k]) / k,
        train_loss_last=sum(tr[-k:]) / k, heldout_loss_first=history["heldout"][0][1],
        heldout_loss_last=history["heldout"][-1][1], train_losses=tr, overlong_rows=overlong,
    )  # fmt: skip


def run(cfg: FlowPretrainConfig) -> int:
    res = run_flow_pretrain(cfg)
    print(json.dumps({k: v for k, v in vars(res).items() if k != "train_losses"}, indent=2))
    return 0
