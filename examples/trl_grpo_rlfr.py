"""GRPO with flow rewards inside TRL: the demo's SmolLM2 arithmetic task, trained by TRL's GRPOTrainer.

    pip install 'rlfr[trl]'
    rlfr demo --quick                                   # or your own `rlfr sft` + `rlfr flow-pretrain` runs
    python examples/trl_grpo_rlfr.py --model runs/demo/sft/model --flow runs/demo/flow/flow --out runs/trl
    python examples/trl_grpo_rlfr.py --report-to wandb  # any tracker TRL's report_to knows

Everything TRL-specific is as in any GRPOTrainer script (GRPOConfig, a dataset with a "prompt" column, reward
functions, vLLM / PEFT / DeepSpeed options); the RLFR part is the trainer class, the flow and the name of
the reward that says "correct" (those completions keep training the flow). ``--flow`` is a flow directory
from ``rlfr flow-pretrain`` / ``rlfr convert-flow``; without it a fresh flow is trained online from the
first step. Prompts and the answer check are rlfr's, so the run is comparable with ``rlfr train``.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig

from rlfr.config import load_config
from rlfr.data.sources import render_prompts, resolve_data
from rlfr.integrations.trl import RLFRGRPOTrainer
from rlfr.policy.loading import load_model, load_tokenizer
from rlfr.reward.verifier import Verifier, format_reward
from rlfr.schema import DataConfig, FlowConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="smollm2-135m-instruct", help="hub name, local directory or rlfr's default"
    )
    ap.add_argument("--flow", default=None, help="flow directory (default: a fresh flow)")
    ap.add_argument("--out", default="runs/trl")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--n", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.01, help="flow reward coefficient (flow.reward.beta)")
    ap.add_argument("--report-to", nargs="*", default=["tensorboard"], help="TRL trackers: wandb trackio ...")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()

    # the data: the embedded arithmetic task, rendered with the model's chat template as `rlfr train` does
    data = load_config(DataConfig, overrides=[f"train_size={args.steps * args.prompts}"])
    examples, _ = resolve_data(data)
    tokenizer = load_tokenizer(args.model)
    prompts = render_prompts(examples, data.template, tokenizer, data.max_prompt_tokens)
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [ex.answer for ex in examples]})

    # rewards: TRL passes the dataset's columns (here `answer`) as keyword arguments
    verifier = Verifier(num_workers=2, timeout=5.0)

    def accuracy(completions, answer, **_):
        return [float(s >= 1.0) for s in verifier.verify_batch(completions, answer)]

    def boxed(completions, **_):
        return [format_reward(c) for c in completions]

    config = GRPOConfig(
        output_dir=args.out,
        max_steps=args.steps,
        num_generations=args.n,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts
        * args.n
        // args.micro_batch,  # one step per generation batch
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        loss_type="grpo",
        reward_weights=[1.0, 0.1],
        logging_steps=1,
        save_steps=8,
        report_to=args.report_to,
        log_completions=True,  # the completions table gets a flow_reward column
        use_cpu=args.cpu,
        bf16=not args.cpu,
    )
    # the flow: every `rlfr train` flow.* option (FlowConfig), e.g. reward.beta, soft_flow, latent_norm
    flow = load_config(
        FlowConfig, overrides=[f"reward.beta={args.beta}"] + ([f"init={args.flow}"] if args.flow else [])
    )
    trainer = RLFRGRPOTrainer(
        model=load_model(args.model),
        reward_funcs=[accuracy, boxed],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        flow=flow,
        correctness="accuracy",  # completions whose `accuracy` is >= 1 train the flow
    )
    try:
        trainer.train()
    finally:
        verifier.close()
    trainer.save_model(args.out)  # the policy, and the flow in <out>/flow
    print(f"saved the policy to {args.out} and the flow to {args.out}/flow")


if __name__ == "__main__":
    main()
