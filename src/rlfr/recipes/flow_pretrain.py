"""Offline flow pretraining (``rlfr flow-pretrain``, RLFR_METHOD §6 stage 1).

The policy is frozen (eval mode, no gradient); its latents on expert worked solutions (same template as
RL) train the flow field with the flow-matching loss on the same pairs RL builds (targets are solution
tokens, EOS included; a condition may be the last prompt token): AdamW, linear warm-up then cosine decay,
weight decay 0.01, the same optimizer step as RL (clipping, finite-gradient check). A held-out fraction of the sequences is never trained on and its loss
is reported with fixed (t, eps) draws, so first and last held-out losses are comparable. The flow is
saved with the latents it models (``latents.json``) so that RL can check it uses the same block
fractions, context modes and shift (the authors' configs silently mixed ``token_pre`` and
``token_post``, RLFR_METHOD §8.7).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlfr.config import to_dict
from rlfr.data.sources import render_prompts, resolve_data
from rlfr.data.templates import response_end
from rlfr.flow import build_pairs, flow_matching_loss
from rlfr.flow.norm import LatentNorm
from rlfr.flow.store import FlowBundle, build_flow, save_flow
from rlfr.policy.forward import model_inputs
from rlfr.policy.latents import LatentTap
from rlfr.policy.loading import load_model, load_tokenizer
from rlfr.policy.rollout import Solutions, encode_solutions
from rlfr.runtime import sharding
from rlfr.runtime.env import flow_autocast, make_accelerator, seed_everything
from rlfr.runtime.metrics import MetricsLogger
from rlfr.runtime.optim import build_optimizer, optimizer_step
from rlfr.runtime.stream import EpochStream, shard
from rlfr.schema import FlowPretrainConfig


def _latents(policy, tap, tok, solutions: Solutions, rows, device, norm=None):
    """Latents (L, b, T, d) of sequences ``rows`` (standardised when ``norm`` is given), their response mask
    (the flow's targets: solution tokens, never image tokens) and attention mask (allowed conditions: the
    prompt too), both (b, T) bool."""
    batch = solutions.pack(tok, rows).to(device)
    att = batch.attention_mask
    with torch.no_grad():
        policy(**model_inputs(batch.input_ids, att, batch.vision), use_cache=False)
    lat = tap.latents()
    return (norm(lat) if norm is not None else lat), batch.response_mask.to(device), att.bool()


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


def run_flow_pretrain(cfg: FlowPretrainConfig, progress: bool = True) -> FlowPretrainResult:
    acc = make_accelerator(cfg.cpu)
    seed_everything(cfg.seed)
    # data errors surface before the model loads; flow pretraining reads no answers
    train, _ = resolve_data(cfg.data, need_solution=True, need_answer=False)
    tok = load_tokenizer(
        cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.data.min_pixels, cfg.data.max_pixels
    )
    prompts = render_prompts(train, cfg.data.template, tok, cfg.data.max_prompt_tokens)
    policy = load_model(
        cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code, acc.device
    ).eval()
    policy.requires_grad_(False)
    policy.to(acc.device)
    tap = LatentTap(policy, cfg.flow.fractions)
    bundle = build_flow(cfg.flow, policy)
    flow, norm = bundle.field, bundle.norm
    solutions = encode_solutions(tok, train, prompts, response_end(cfg.data.template))
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_held = int(round(cfg.heldout_fraction * len(train)))
    held, fit = perm[:n_held], perm[n_held:]
    if len(fit) < cfg.batch_size:
        raise ValueError(f"flow-pretrain: {len(fit)} training sequences < batch_size={cfg.batch_size}")
    steps_per_epoch = len(fit) // cfg.batch_size
    total = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    if cfg.flow.latent_norm == "standardize" and norm is None:
        # statistics of the training sequences only (never the held-out ones), from up to 64 of them
        lat, mask, _ = _latents(policy, tap, tok, solutions, fit[:64], acc.device)
        norm = LatentNorm.fit(lat, mask)
    opt, sched = build_optimizer(
        flow.parameters(),
        cfg.lr,
        cfg.betas,
        cfg.weight_decay,
        total,
        cfg.warmup_ratio,
        "cosine",
        cfg.min_lr_ratio,
    )
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
        for c0 in range(0, len(held), cfg.batch_size):
            lat, mask, ctx = _latents(
                policy, tap, tok, solutions, held[c0 : c0 + cfg.batch_size], acc.device, norm
            )
            pairs = build_pairs(lat, lt, mask, cfg.flow.modes, cfg.flow.shift, context_mask=ctx)
            with torch.no_grad():
                losses.append(
                    flow_matching_loss(
                        acc.unwrap_model(flow),
                        pairs,
                        cfg.flow.batch_mul,
                        generator=g,
                        autocast_dtype=autocast_dtype,
                    ).item()
                )
            weights.append(len(pairs))
        return sum(v * w for v, w in zip(losses, weights)) / max(sum(weights), 1)

    stream = EpochStream(len(fit), cfg.seed, reseed_each_epoch=False)
    history = {"train": [], "heldout": [(0, heldout_loss())]}
    t0 = time.time()
    bar = tqdm(range(total), desc="flow-pretrain", disable=not (progress and acc.is_main_process))
    for step in bar:
        rows = [fit[i] for i in stream.take(step * cfg.batch_size, cfg.batch_size)]
        rows = shard(rows, acc.process_index, acc.num_processes, "batch_size")
        lat, mask, ctx = _latents(policy, tap, tok, solutions, rows, acc.device, norm)
        pairs = build_pairs(lat, lt, mask, cfg.flow.modes, cfg.flow.shift, context_mask=ctx)
        loss = flow_matching_loss(flow, pairs, cfg.flow.batch_mul, autocast_dtype=autocast_dtype)
        acc.backward(loss)
        grad_norm = optimizer_step(acc, flow, opt, sched, cfg.max_grad_norm, "flow-pretraining", step + 1)
        history["train"].append(loss.item())
        row = {
            "flow_pretrain/loss": loss.item(),
            "flow_pretrain/lr": sched.get_last_lr()[0],
            "flow_pretrain/grad_norm": grad_norm,
        }
        if step + 1 == total or (step + 1) % max(1, steps_per_epoch) == 0:
            h = heldout_loss()
            history["heldout"].append((step + 1, h))
            row["flow_pretrain/heldout_loss"] = h
        logger.log(step + 1, row, stage="flow_pretrain")
        bar.set_postfix(loss=f"{loss.item():.4f}")
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
        heldout_loss_last=history["heldout"][-1][1], train_losses=tr,
    )  # fmt: skip


def run(cfg: FlowPretrainConfig) -> int:
    res = run_flow_pretrain(cfg)
    print(json.dumps({k: v for k, v in vars(res).items() if k != "train_losses"}, indent=2))
    return 0
