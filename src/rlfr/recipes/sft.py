"""Cold-start supervised fine-tuning on worked solutions (``rlfr sft``).

A 135M instruct model never writes ``\\boxed{}`` on its own, so RL from it sees an all-zero reward and
learns nothing; a short SFT stage on expert solutions gives RL a policy that sometimes succeeds. The
loss is the token-mean negative log-likelihood of the response (solution + EOS) given the prompt,
rendered with the same template that RL and evaluation use.

With LoRA (``model.lora.rank`` > 0) only the adapters train; ``out_dir/adapter`` holds them (PEFT format) and
``out_dir/model`` the merged model, a plain Hugging Face model that ``rlfr flow-pretrain``, ``rlfr train`` and
``rlfr eval`` take as ``model.name_or_path`` like any other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlfr.config import to_dict
from rlfr.data.sources import render_prompts, resolve_data
from rlfr.data.templates import response_end
from rlfr.eval.scoring import evaluate
from rlfr.policy.forward import policy_forward
from rlfr.policy.loading import enable_gradient_checkpointing, load_model, load_tokenizer
from rlfr.policy.lora import apply_lora, is_lora
from rlfr.policy.rollout import Rollout, encode_solutions
from rlfr.policy.vision import freeze_vision_tower, is_vision_language
from rlfr.reward.verifier import Verifier
from rlfr.runtime import sharding
from rlfr.runtime.checkpoint import atomic_dir
from rlfr.runtime.env import make_accelerator, seed_everything
from rlfr.runtime.metrics import MetricsLogger
from rlfr.runtime.optim import build_optimizer, optimizer_step
from rlfr.runtime.stream import EpochStream, shard
from rlfr.schema import SFTConfig


def nll(model, batch: Rollout) -> torch.Tensor:
    """Token-mean NLL of the response tokens of a packed batch -> scalar."""
    mask = batch.response_mask
    logp, _ = policy_forward(
        model, batch.input_ids, batch.attention_mask, mask, need_entropy=False, vision=batch.vision
    )
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class SFTResult:
    model_dir: str
    loss_first: float
    loss_last: float
    seconds: float
    accuracy: float | None = None  # held-out greedy accuracy (None: not evaluated)


def run_sft(cfg: SFTConfig, progress: bool = True, evaluate_after: bool = True) -> SFTResult:
    """Fine-tune, save ``out_dir/model`` (HF format), return losses and held-out accuracy."""
    acc = make_accelerator(cfg.cpu)
    seed_everything(cfg.seed)
    train, evals = resolve_data(cfg.data, need_solution=True)  # data errors surface before the model loads
    tok = load_tokenizer(
        cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.data.min_pixels, cfg.data.max_pixels
    )
    prompts = render_prompts(train, cfg.data.template, tok, cfg.data.max_prompt_tokens)
    model = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code, acc.device)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.model.freeze_vision and is_vision_language(model.config):
        freeze_vision_tower(model)
    model = apply_lora(model, cfg.model.lora)  # unchanged at rank 0
    solutions = encode_solutions(tok, train, prompts, response_end(cfg.data.template))
    trainable = [q for q in model.parameters() if q.requires_grad]  # LoRA: the adapters
    opt, sched = build_optimizer(trainable, cfg.lr, (0.9, 0.999), cfg.weight_decay, cfg.steps, cfg.warmup_ratio,
                                 "cosine", 0.0, master_weights=cfg.master_weights)  # fmt: skip
    model, opt = acc.prepare(model, opt)
    sharding.finish_prepare(acc, model)
    model.train()
    out = Path(cfg.out_dir)
    logger = MetricsLogger(out, acc.is_main_process, cfg.report_to, fresh=True, config=to_dict(cfg))
    stream = EpochStream(len(train), cfg.seed, reseed_each_epoch=False)
    losses = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="sft", disable=not (progress and acc.is_main_process))
    for step in bar:
        idx = shard(
            stream.take(step * cfg.batch_size, cfg.batch_size),
            acc.process_index,
            acc.num_processes,
            "batch_size",
        )
        total = 0.0
        for c0 in range(0, len(idx), cfg.micro_batch_size):
            rows = idx[c0 : c0 + cfg.micro_batch_size]
            batch = solutions.pack(tok, rows)
            loss = nll(model, batch.to(acc.device)) * len(rows) / len(idx)
            acc.backward(loss)
            total += loss.item()
        optimizer_step(acc, model, opt, sched, cfg.max_grad_norm, "SFT", step + 1)
        losses.append(total)
        logger.log(step + 1, {"sft/loss": total, "sft/lr": sched.get_last_lr()[0]}, stage="sft")
        bar.set_postfix(loss=f"{total:.3f}")
    logger.close()
    model_dir = out / "model"
    unwrapped = acc.unwrap_model(model)
    lora = is_lora(unwrapped)
    state = sharding.full_state_dict(acc, model, trainable_only=lora)  # FSDP: gathered on the main process
    given = {} if state is None else {"state_dict": state}
    # each directory appears whole or not at all: a crash mid-save leaves no half-written one
    if acc.is_main_process:
        final, kwargs = unwrapped, given
        if lora:
            with atomic_dir(out / "adapter") as tmp:
                unwrapped.save_pretrained(tmp, safe_serialization=True, **given)
                tok.save_pretrained(tmp)
            final = load_model(str(out / "adapter"), cfg.model.dtype, cfg.model.trust_remote_code, acc.device)
            kwargs = {}
        with atomic_dir(model_dir) as tmp:
            final.save_pretrained(tmp, safe_serialization=True, **kwargs)
            tok.save_pretrained(tmp)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    acc.wait_for_everyone()
    result = SFTResult(str(model_dir), losses[0], losses[-1], time.time() - t0)
    if evaluate_after and evals:
        with Verifier(num_workers=2) as v, sharding.root_gathered(acc, model):
            res = evaluate(
                unwrapped, tok, evals, cfg.data.template, cfg.eval_max_new_tokens, v, accelerator=acc
            )
        result.accuracy = res.accuracy
    return result


def run(cfg: SFTConfig) -> int:
    print(json.dumps(vars(run_sft(cfg)), indent=2))
    return 0
