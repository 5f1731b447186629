"""TRL's GRPOTrainer, the RLFR bridge (``rlfr.integrations.trl``) and ``rlfr train``'s step on the same work.

Reproduce:
    .venv/bin/python benchmarks/peer_trl.py                      # SmolLM2-135M, 8 prompts x 4, 64 new tokens
    .venv/bin/python benchmarks/peer_trl.py --model runs/demo/sft/model --flow runs/demo/flow_pretrain/flow --steps 8

The same work for all three, in one process: the same start model (loaded afresh for each), the same
prompts in the same order (the embedded task's training prompts, rendered by rlfr's template; no shuffling),
``--prompts`` x ``--n`` completions per step at temperature 1, one optimizer step per generation batch in
micro-batches of ``--micro-batch`` (TRL: gradient accumulation), lr ``--lr`` constant, AdamW, clip 0.2,
gradient clipping 1, no KL, float32, no gradient checkpointing, the answer check (``rlfr``'s verifier) as
the reward. TRL uses ``loss_type="grpo"`` (mean over a sequence's tokens, then over sequences: rlfr's
``seq_mean_token_mean``). The bridge and ``rlfr train`` use the same flow (``--flow``, or a fresh one) and
flow options. The trainers run one after the other (TRL's runs a whole ``train()``), each for one warm-up
step and ``--steps`` timed ones; a step is timed wall to wall (generation, scoring, update, logging).

Prints one row per trainer: median step seconds, the ratio to TRL's, mean reward (= accuracy here) and
mean flow reward over the timed steps, and the steps' response length.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def work(args):
    """(examples, prompts, tokenizer) of the first (steps + 1) x prompts training problems."""
    from rlfr.config import load_config
    from rlfr.data.sources import render_prompts, resolve_data
    from rlfr.policy.loading import load_tokenizer
    from rlfr.schema import DataConfig

    data = load_config(DataConfig, overrides=[f"train_size={(args.steps + 1) * args.prompts}", "eval_size=1"])
    train, _ = resolve_data(data)
    tok = load_tokenizer(args.model)
    return train, render_prompts(train, data.template, tok, data.max_prompt_tokens)


def flow_overrides(args) -> list[str]:
    return [
        f"soft_flow={args.soft_flow}",
        f"init={args.flow or 'random'}",
    ]  # no --flow: a fresh flow, said so


def run_rlfr(args, examples, prompts) -> list[dict]:
    from rlfr.config import load_config
    from rlfr.recipes.train import build_components
    from rlfr.rl.step import rl_step
    from rlfr.runtime.env import make_accelerator
    from rlfr.schema import TrainConfig

    cfg = load_config(TrainConfig, overrides=[
        "method=rlfr", f"model.name_or_path={args.model}", f"data.train_size={len(examples)}", "data.eval_size=1",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.num_generations={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.batch_size={args.prompts * args.n}",
        f"policy.micro_batch_size={args.micro_batch}", f"policy.lr={args.lr}", f"steps={args.steps + 1}",
        f"out_dir={tempfile.mkdtemp(prefix='peer-rlfr-')}", f"cpu={args.cpu}",
        *(f"flow.{o}" for o in flow_overrides(args)),
    ])  # fmt: skip
    c, _ = build_components(cfg, make_accelerator(cpu=args.cpu))
    rows = []
    try:
        for step in range(args.steps + 1):
            idx = range(step * args.prompts, (step + 1) * args.prompts)
            t = time.perf_counter()
            stats = rl_step(c, step, [examples[i] for i in idx], [prompts[i] for i in idx])
            rows.append({"seconds": time.perf_counter() - t, "reward": stats["reward"],
                         "flow_reward": stats.get("flow_reward/mean"), "length": stats["response_len"]})  # fmt: skip
    finally:
        c.reward.verifier.close()
        c.flow.tap.remove()
    return rows


def run_trl(args, examples, prompts, bridge: bool) -> list[dict]:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlfr.policy.loading import load_model, load_tokenizer
    from rlfr.reward.verifier import Verifier

    verifier = Verifier(num_workers=2)

    def accuracy(completions, answer, **_):
        return [float(s >= 1.0) for s in verifier.verify_batch(completions, answer)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    n = args.prompts * args.n
    options = dict(
        output_dir=tempfile.mkdtemp(prefix="peer-trl-"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n // args.micro_batch, num_generations=args.n,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="grpo", max_steps=args.steps + 1,
        shuffle_dataset=False, gradient_checkpointing=False, bf16=False, use_cpu=args.cpu, report_to=[],
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    ds = Dataset.from_dict({"prompt": prompts, "answer": [ex.answer for ex in examples]})
    kw = dict(model=load_model(args.model), reward_funcs=[accuracy], train_dataset=ds,
              processing_class=load_tokenizer(args.model))  # fmt: skip
    clock = Clock()
    if bridge:  # the same flow options as rlfr train's (flow_overrides)
        from rlfr.integrations.trl import RLFRGRPOConfig, RLFRGRPOTrainer

        config = RLFRGRPOConfig(**options, flow_init=args.flow or "random", flow_soft_flow=args.soft_flow,
                                flow_correctness="accuracy")  # fmt: skip
        trainer = RLFRGRPOTrainer(**kw, args=config, callbacks=[clock])
    else:
        trainer = GRPOTrainer(**kw, args=GRPOConfig(**options), callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # the table below is the output
    try:
        trainer.train()
    finally:
        verifier.close()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    secs = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    return [{"seconds": s, "reward": r["reward"], "flow_reward": r.get("flow_reward/mean"),
             "length": r["completions/mean_length"]} for s, r in zip(secs, logs)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--flow", default=None, help="flow directory for the bridge and rlfr (default: a fresh flow)"
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer (after one warm-up)")
    ap.add_argument("--soft-flow", type=float, default=0.0, help="flow-loss weight of wrong completions")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()
    if (args.prompts * args.n) % args.micro_batch:
        ap.error("--micro-batch must divide --prompts x --n")
    import torch

    examples, prompts = work(args)
    results = {
        "TRL GRPOTrainer": run_trl(args, examples, prompts, bridge=False),
        "TRL + rlfr bridge": run_trl(args, examples, prompts, bridge=True),
        "rlfr train": run_rlfr(args, examples, prompts),
    }
    print(f"\nmodel {Path(args.model).name}, {args.prompts} prompts x {args.n}, {args.max_new_tokens} new tokens, "
          f"micro-batch {args.micro_batch}, flow {args.flow or 'fresh'}, soft_flow {args.soft_flow}; "
          f"{args.steps} timed steps after 1 warm-up (threads: {torch.get_num_threads()})\n")  # fmt: skip
    print("| trainer | step (s, median) | vs TRL | reward (mean) | flow reward (mean) | response len |")
    print("|---|--:|--:|--:|--:|--:|")
    base = None
    for name, rows in results.items():
        timed = rows[1:]
        step = statistics.median(r["seconds"] for r in timed)
        base = base or step
        flow = [r["flow_reward"] for r in timed if r["flow_reward"] is not None]
        print(f"| {name} | {step:.2f} | {step / base:.2f} | {statistics.mean(r['reward'] for r in timed):.3f} | "
              f"{f'{statistics.mean(flow):+.5f}' if flow else '-'} | "
              f"{statistics.mean(r['length'] for r in timed):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
