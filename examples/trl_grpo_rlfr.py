"""GRPO with flow rewards inside TRL: short arithmetic problems, trained by TRL's GRPOTrainer plus a flow.

    pip install 'rlfr[trl]'
    rlfr demo quick=true         # an SFT model (runs/demo/sft/model) and its pretrained flow (runs/demo/flow_pretrain/flow)
    python examples/trl_grpo_rlfr.py --model runs/demo/sft/model --flow_init runs/demo/flow_pretrain/flow \\
        --output_dir runs/trl --use_cpu --bf16 false
    python examples/trl_grpo_rlfr.py --config recipe.yaml         # TrlParser: any option from a YAML file too

A TRL script like any other: a dataset loaded with ``datasets`` (written here to a small JSONL file), reward
functions, and ``TrlParser`` for the options. The RLFR part is the config and trainer class: every option of
``RLFRGRPOConfig`` (GRPOConfig's, plus ``--flow_init``, ``--flow_beta``, ``--flow_soft_flow``, ...; see
``--help``) and ``--flow_correctness``, the reward that says "correct" (those completions keep training the
flow). ``--flow_init random`` trains a fresh flow online from the first step instead (an ablation: its rewards
are noise until it has learned); without ``--flow_init`` the trainer stops and asks for one. The problems are the demo's
kind (reasoning-gym ``basic_arithmetic`` and ``chain_sum``) with the demo's system prompt, so the demo's SFT
model answers them in the format the answer check reads (``\\boxed{...}``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import reasoning_gym
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser
from trl.rewards import accuracy_reward

from rlfr.integrations.trl import RLFRGRPOConfig, RLFRGRPOTrainer

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TASKS = {  # as the demo's embedded task
    "basic_arithmetic": dict(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=2,
        operators=("+", "-", "*"),
        allow_parentheses=False,
        allow_negation=False,
    ),  # fmt: skip
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
}


@dataclass
class ExampleArguments:
    model: str = field(
        default="runs/demo/sft/model", metadata={"help": "policy: a model directory or hub name"}
    )
    num_problems: int = field(default=256, metadata={"help": "training problems (half from each task)"})
    task_seed: int = field(default=0, metadata={"help": "seed of the problems"})


def write_problems(path: Path, n: int, seed: int) -> Path:
    """A JSONL file of conversational prompts with their answers (TRL passes ``solution`` to the rewards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for (name, cfg), size in zip(TASKS.items(), (n - n // 2, n // 2)):
            for item in reasoning_gym.create_dataset(name, size=size, seed=seed, **cfg):
                prompt = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": item["question"]},
                ]
                f.write(json.dumps({"prompt": prompt, "solution": str(item["answer"])}) + "\n")
    return path


def boxed(completions, **_):
    """1 for a completion with a ``\\boxed{...}`` answer, the format the answer check reads (weighted 0.1)."""
    return [float(bool(re.search(r"\\boxed\{[^}]*\}", c[0]["content"]))) for c in completions]


def main() -> None:
    parser = TrlParser((ExampleArguments, RLFRGRPOConfig))
    parser.set_defaults(  # one optimizer step per generation batch of 8 prompts x 4 completions
        output_dir="runs/trl", max_steps=16, num_generations=4, per_device_train_batch_size=16,
        gradient_accumulation_steps=2, max_completion_length=256, learning_rate=1e-6, lr_scheduler_type="constant",
        loss_type="grpo", reward_weights=[1.0, 0.1], logging_steps=1, save_steps=8, log_completions=True,
        flow_correctness="accuracy_reward",  # completions whose accuracy_reward is >= 1 train the flow
    )  # fmt: skip
    example, args = parser.parse_args_and_config()
    problems = write_problems(
        Path(args.output_dir) / "problems.jsonl", example.num_problems, example.task_seed
    )
    trainer = RLFRGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(example.model),
        reward_funcs=[accuracy_reward, boxed],
        args=args,
        train_dataset=datasets.load_dataset("json", data_files=str(problems), split="train"),
        processing_class=AutoTokenizer.from_pretrained(example.model),
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # the policy, and the flow in <output_dir>/flow
    print(f"saved the policy to {args.output_dir} and the flow to {args.output_dir}/flow")


if __name__ == "__main__":
    main()
