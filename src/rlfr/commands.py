"""The config schema of the commands that are not a single training stage: eval, inspect, select, compare,
demo, convert-flow and export (frozen dataclasses like ``rlfr.schema``'s, loaded by ``rlfr.config.load_config``).

Every setting of every command is a ``key=value`` word (``rlfr compare methods=[rlvr,rlfr] seeds=[0,1,2]``,
``rlfr demo quick=true``) or a key of a ``--config`` YAML file; ``rlfr <cmd> --help`` lists them with their
defaults, ranges and help texts, ``rlfr <cmd> --show-config`` prints the resolved configuration. A setting a
command cannot run without defaults to None (``null``) and is asked for when the command runs.

``DemoConfig`` computes its stage defaults from what the user asked (``resolve_dict``): the demo's budgets,
shrunk by ``quick``, set for the ``task`` (its data, generation limits and SFT steps), the stage directories
under ``out`` and the stage seeds from ``seed``; the user's own keys win over them; then the stages are
chained (the RL stage and the flow start from the SFT model, RL from the pretrained flow, with its latent
settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlfr.config import ConfigError, field_, from_dict, merge_dicts, to_dict
from rlfr.config_files import leaves
from rlfr.schema import BenchmarkName, Dtype, FlowPretrainConfig, Mode, SFTConfig, Template, TrainConfig

Method = Literal["rlvr", "rlfr", "entropy"]
SEED_RANGE = "[0, 4294967295]"


@dataclass(frozen=True)
class EvalDataConfig:
    eval: tuple[str, ...] = field_(
        (),
        "the sets to evaluate (required): 'embedded' (held-out split), 'embedded-dev', 'embedded-transfer', "
        "'embedded-vl', benchmark:NAME (rlfr data download NAME), a data file, a dataset directory or a Hub "
        "dataset id; a list for several",
    )
    subset: str | None = field_(None, "dataset directories and Hub ids: the subset (configuration) to load")
    split: str = field_("train", "dataset directories and Hub ids: the split to evaluate on")
    template: Template = field_("chat", "prompt template")
    system_prompt: str | None = field_(
        None, "the system turn (a chat row's own wins): null = the template's default, '' = no system turn"
    )
    prompt_field: str = field_(
        "problem", "data files and datasets: column holding the prompt (text or a chat)"
    )
    answer_field: str = field_("answer", "data files and datasets: column holding the answer")
    image_field: str = field_("auto", "data files: image column (auto: images or image; none)")
    eval_size: int = field_(
        64,
        "embedded held-out problems: the model's training run's data.eval_size (its training split left out exactly "
        "these problems; a larger set would hold problems it trained on)",
        range="[1, inf)",
    )
    dev_size: int = field_(0, "embedded-dev: the dev split's size (data.dev_size)", range="[0, inf)")
    task_seed: int = field_(
        0,
        "embedded sets: seed of the problem split, the training run's data.task_seed (kept apart from seed, which "
        "only draws the samples)",
        range="[0, inf)",
    )
    min_pixels: int | None = field_(None, "vision-language models: data.min_pixels", range="[1, inf)")
    max_pixels: int | None = field_(None, "vision-language models: data.max_pixels", range="[1, inf)")


@dataclass(frozen=True)
class EvalConfig:
    model: str | None = field_(
        None, "the model (required): HF hub name, local model dir, or 'smollm2-135m-instruct'"
    )
    data: EvalDataConfig = field_(EvalDataConfig(), "what to evaluate on")
    out: str = field_("runs/eval", "output directory")
    max_new_tokens: int = field_(1024, "generation limit per response", range="[1, inf)")
    samples: int = field_(1, "K samples per problem: avg@K and pass@k (k <= K)", range="[1, inf)")
    temperature: float | None = field_(
        None, "sampling temperature (default: greedy for samples=1, else 1.0)", range="(0, inf)"
    )
    top_p: float = field_(1.0, "nucleus sampling threshold", range="(0, 1]")
    limit: int = field_(0, "evaluate only the first N problems of each set (0 = all)", range="[0, inf)")
    seed: int = field_(0, "seed of the sampling (the embedded split: data.task_seed)", range=SEED_RANGE)
    backend: Literal["hf", "vllm"] = field_(
        "hf",
        "generation backend: hf (transformers generate) or vllm (the trainer's vLLM engine; CPU or GPU, "
        "pip install 'vllm>=0.29,<0.32', see docs/vllm.md)",
    )
    vllm_memory_fraction: float = field_(
        0.3, "vllm: fraction of the GPU's memory vLLM may use (on CPU: of the RAM)", range="(0, 1]"
    )
    batch_size: int = field_(64, "sequences per generate() call (hf)", range="[1, inf)")
    dtype: Dtype = field_("auto", "model dtype: auto = bfloat16 on a GPU that supports it, float32 on CPU")
    workers: int = field_(2, "verifier worker processes", range="[1, inf)")
    cpu: bool = field_(False, "force CPU")
    progress: bool = field_(True, "progress bars")


@dataclass(frozen=True)
class InspectConfig:
    checkpoint: str | None = field_(None, "RL checkpoint dir (policy/ + flow/) or a run dir")
    model: str | None = field_(None, "policy (with flow, instead of checkpoint)")
    flow: str | None = field_(
        None, "flow directory: flow-pretrain or convert-flow output, or a checkpoint's flow/ (with model)"
    )
    data: str = field_("embedded", "'embedded' (held-out split), 'embedded-vl', a benchmark or a data file")
    n_prompts: int = field_(8, "problems to sample", range="[1, inf)")
    num_generations: int = field_(4, "responses per problem", range="[1, inf)")
    temperature: float = field_(1.0, "sampling temperature", range="(0, inf)")
    max_new_tokens: int = field_(256, "generation limit", range="[1, inf)")
    template: Template | None = field_(None, "prompt template (default: the run's, else chat)")
    reward: Literal["dense", "shaped"] = field_("dense", "token reward shown (see rlfr.recipes.inspect_flow)")
    min_count: int = field_(3, "tokens seen fewer times are left out of the rankings", range="[1, inf)")
    seed: int = field_(0, "seed (sampling, flow noise; the embedded split is the run's data.task_seed)",
                       range=SEED_RANGE)  # fmt: skip
    out: str = field_("runs/inspect", "output directory")
    cpu: bool = field_(False, "force CPU")
    progress: bool = field_(True, "progress bars")


@dataclass(frozen=True)
class SelectConfig:
    """``rlfr select``: N samples per problem, scored, and one chosen by each rule (``rlfr.recipes.select``). The
    policy and its flow (checkpoint=, or model= with flow=) are asked for when the command runs."""

    checkpoint: str | None = field_(
        None,
        "RL checkpoint of method rlfr (policy/ + flow/) or its run directory (the newest), e.g. runs/demo/rl",
    )
    model: str | None = field_(None, "policy to sample, with flow= (instead of checkpoint=)")
    flow: str | None = field_(
        None, "flow directory (flow-pretrain or convert-flow output, or a checkpoint's flow/), with model="
    )
    data: str = field_(
        "embedded",
        "problems: 'embedded' (held-out split), 'embedded-dev', 'embedded-transfer', a benchmark or a data file",
    )
    problems: int = field_(
        0,
        "problems: the first N of a benchmark or file, the size of an embedded set (at most the run's data.eval_size "
        "for its held-out split); 0 = all of a file, the run's held-out split (data.eval_size, 64 without a run)",
        range="[0, inf)",
    )
    dev_problems: int = field_(
        0,
        "problems (a random subset, seeded by seed) in the development split, on which the best flow-including "
        "rule is chosen; the rest are the test split where it is compared (0 = no split: all are test)",
        range="[0, inf)",
    )
    n: int = field_(
        8, "samples per problem (N_max; accuracy is reported for N = 1, 2, 4, ... <= n)", range="[2, inf)"
    )
    temperature: float = field_(1.0, "sampling temperature", range="(0, inf)")
    top_p: float = field_(1.0, "nucleus sampling threshold", range="(0, 1]")
    max_new_tokens: int = field_(256, "generation limit per response", range="[1, inf)")
    template: Template | None = field_(None, "prompt template (default: the run's, else chat)")
    task_seed: int | None = field_(
        None, "embedded task seed (default: the run's data.task_seed: its held-out split)", range="[0, inf)"
    )
    timesteps: tuple[float, ...] | None = field_(
        None,
        "rewarding timesteps of the flow score (default: the run's flow.reward.timesteps, else 0.8)",
        range="(0, 1)",
    )
    flow_quantile: float = field_(
        0.9, "the quantile of a response's token deviations that is the score flow_q", range="[0, 1]"
    )
    combine_with: Literal["flow_mean", "flow_q"] = field_(
        "flow_mean", "the flow score that the combined score adds to the log-prob"
    )
    combine_weight: float = field_(
        1.0,
        "combined = z(mean log-prob) + weight * z(flow score), both standardised within a problem's samples",
        range="[0, inf)",
    )
    subset_draws: int = field_(
        32,
        "N-subsets of each problem's samples averaged for the accuracy at N < n: all of them when there are at most "
        "this many, else this many random ones",
        range="[1, inf)",
    )
    bootstrap: int = field_(
        10000, "bootstrap resamples of problems for the paired intervals", range="[100, inf)"
    )
    scoring: Literal["captured", "forward"] = field_(
        "captured",
        "captured: latents and log-probs recorded while sampling (no second policy forward); forward: a second "
        "forward over the samples (the reference)",
    )
    batch_size: int = field_(64, "sequences per generate call", range="[1, inf)")
    dtype: Dtype = field_(
        "auto", "parameter dtype of the policy: auto = bfloat16 on a GPU that supports it, float32 on CPU"
    )
    seed: int = field_(0, "seed (sampling, flow noise, subsets, dev split)", range=SEED_RANGE)
    out: str = field_("runs/select", "output directory")
    cpu: bool = field_(False, "force CPU")
    progress: bool = field_(True, "progress bars")

    def validate(self) -> None:
        if self.checkpoint is not None and (self.model is not None or self.flow is not None):
            raise ConfigError("give either checkpoint= or model= with flow=, not both")
        if self.problems and self.dev_problems >= self.problems:
            raise ConfigError(
                f"dev_problems={self.dev_problems} leaves no test problem of problems={self.problems}"
            )


@dataclass(frozen=True)
class ConvertFlowConfig:
    src: str | None = field_(
        None, "the authors' flow weights (required): a .bin/.safetensors file or a directory holding one"
    )
    model: str | None = field_(None, "the policy the flow was trained on (required; hub name or local dir)")
    out: str | None = field_(None, "output flow directory (required)")
    flow_config: str | None = field_(
        None,
        "their flow-pretraining YAML (LLaMA-Factory/examples/train_flow/*.yaml: fractions, modes, shift, depth) or "
        "RL flow config JSON (config/flow_config_*.json: fractions and depth; its mode is the one their RL used)",
    )
    fractions: tuple[float, ...] = field_((0.25, 0.5, 0.75), "hooked block fractions", range="[0, 1]")
    modes: tuple[Mode, ...] = field_(
        ("token_pre",), "context modes the weights were trained with (the authors' flows: token_pre)"
    )
    shift: int = field_(1, "context shift the weights were trained with", range="[1, inf)")
    trust_remote_code: bool = field_(False, "allow model code from the hub")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str | None = field_(None, "checkpoint directory, or a run directory (its newest) (required)")
    merged: str | None = field_(None, "output directory of the merged Hugging Face model (required)")
    dtype: Dtype | None = field_(
        None, "default: the run's model.dtype (auto: bfloat16 on a GPU that supports it)"
    )


@dataclass(frozen=True)
class CompareConfig:
    start: str | None = field_(None, "start model of every run (required; e.g. the demo's SFT model)")
    flow: str | None = field_(
        None, "pretrained flow directory of the rlfr runs (their flow.init; or set train.flow.init)"
    )
    methods: tuple[Method, ...] = field_(("rlvr", "rlfr", "entropy"), "RL methods to run")
    seeds: tuple[int, ...] = field_((0, 1, 2), "seeds (one run per method and seed)", range=SEED_RANGE)
    eval_sets: tuple[str, ...] = field_(
        ("auto",),
        "held-out sets, each NAME or NAME:N: auto (the runs' data.eval: the embedded split when they train on "
        "the embedded task, else the rows held out of their data.train), embedded, embedded-dev, "
        "embedded-transfer, a benchmark, a file",
    )
    eval_samples: int = field_(0, "K samples per problem for avg@K (0 = greedy only)", range="[0, inf)")
    ablations: tuple[str, ...] = field_(
        (),
        "extra arms, each 'NAME METHOD [key=value ...]' (train.* keys without the prefix), e.g. "
        "'ablations=[frozen rlfr flow.update=false, beta0.05 rlfr flow.reward.beta=0.05]'",
    )
    ablation_seeds: tuple[int, ...] = field_((0,), "seeds of the ablation arms", range=SEED_RANGE)
    out: str = field_("runs/compare", "output directory")
    progress: bool = field_(True, "progress bars")
    train: TrainConfig = field_(
        TrainConfig(),
        "the RL settings of every run (method, seed and out_dir are set per run, model.name_or_path = start)",
    )


_DATA = {"train": "embedded", "eval": "embedded", "train_size": 1024, "eval_size": 128}
_FULL = {
    "sft": {
        "data": {**_DATA, "solution_field": "solution"},
        "lr": 7e-5, "steps": 16, "batch_size": 16, "micro_batch_size": 16, "warmup_ratio": 0.1,
        "eval_max_new_tokens": 48,
    },
    "flow": {
        "data": {**_DATA, "train_size": 192, "solution_field": "solution"},
        "lr": 1e-3, "epochs": 2.0, "batch_size": 16, "heldout_fraction": 0.125, "flow": {"batch_mul": 4},
    },
    "train": {
        "method": "rlfr", "data": _DATA, "steps": 16, "save_every": 0, "eval_max_new_tokens": 48,
        "rollout": {"prompts_per_step": 8, "num_generations": 4, "max_new_tokens": 40, "batch_size": 32},
        "policy": {"lr": 5e-6, "micro_batch_size": 32},
        "flow": {"lr": 1e-4, "batch_mul": 4, "warmup_ratio": 0.0},
    },
}  # fmt: skip
_QUICK = {
    "sft": {"data": {**_DATA, "eval_size": 16, "train_size": 64}, "steps": 4, "batch_size": 8, "micro_batch_size": 8},
    "flow": {"data": {**_DATA, "eval_size": 16, "train_size": 32}, "epochs": 1.0, "batch_size": 8},
    "train": {
        "data": {**_DATA, "eval_size": 16, "train_size": 64}, "steps": 2, "eval_max_new_tokens": 32,
        "rollout": {"prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 24},
    },
    "eval_samples": 2,
}  # fmt: skip
_MULTISTEP_DATA = {"train": "embedded-multistep", "eval": "embedded-multistep"}
# DemoConfig.task -> (settings over _FULL, then over _QUICK when quick). The multi-step task: its data in every
# stage; generation limits above its longest worked solution (180 tokens with EOS in 2,000 training problems);
# 24 SFT steps for the longer format; smaller micro-batches, as sequences are 3x longer (same updates, less memory)
_TASKS: dict[str, tuple[dict, dict]] = {
    "arithmetic": ({}, {}),
    "multistep": (
        {
            "sft": {"data": _MULTISTEP_DATA, "steps": 24, "micro_batch_size": 8, "eval_max_new_tokens": 192},
            "flow": {"data": _MULTISTEP_DATA},
            "train": {
                "data": _MULTISTEP_DATA, "eval_max_new_tokens": 192, "rollout": {"max_new_tokens": 192},
                "policy": {"micro_batch_size": 16},
            },
        },
        {"sft": {"steps": 4}, "train": {"eval_max_new_tokens": 32, "rollout": {"max_new_tokens": 24}}},
    ),
}  # fmt: skip
_SHARED_FLOW_KEYS = ("fractions", "modes", "shift", "width", "depth", "eps", "latent_norm")


@dataclass(frozen=True)
class DemoConfig:
    quick: bool = field_(False, "a ~2-minute run with tiny budgets (used by the tests)")
    out: str = field_(
        "runs/demo", "output directory (the stages write to out/sft, out/flow_pretrain, out/rl)"
    )
    seed: int | None = field_(
        None,
        "seed of every stage (SFT, flow pretraining, RL); the held-out problems stay the same",
        range=SEED_RANGE,
    )
    pool: tuple[str, ...] = field_(
        (), "run nothing: pool these finished demo runs (e.g. seed repeats) into out/pooled.{json,md,png}"
    )
    progress: bool = field_(True, "progress bars")
    task: Literal["arithmetic", "multistep"] = field_(
        "arithmetic",
        "arithmetic: the embedded one-line task (data 'embedded'); multistep: the multi-step task "
        "('embedded-multistep', worked solutions of 4-5 steps, 100+ tokens) with generation limits to match",
    )
    sft: SFTConfig = field_(SFTConfig(), "cold-start SFT stage")
    flow: FlowPretrainConfig = field_(FlowPretrainConfig(), "flow pretraining stage")
    train: TrainConfig = field_(TrainConfig(), "RL stage")
    eval_samples: int = field_(
        4, "samples per held-out problem for the sampled (temperature 1) accuracy", range="[0, inf)"
    )

    @classmethod
    def resolve_dict(cls, user: dict[str, Any]) -> dict[str, Any]:
        """The demo's defaults for what ``user`` asked (its ``quick``, ``out`` and ``seed``), the user's keys
        over them, then the stages chained: the flow models the SFT model, RL starts from it with the
        pretrained flow and its latent settings. A chained key the user set otherwise is refused."""
        quick, out, seed = user.get("quick", False), user.get("out", cls.out), user.get("seed")
        if not isinstance(quick, bool) or not isinstance(out, str):
            raise ConfigError(f"quick must be true/false and out a path, got quick={quick!r}, out={out!r}")
        data = merge_dicts(to_dict(cls()), merge_dicts(_FULL, _QUICK) if quick else _FULL)
        # the task's settings over the budgets (an unknown task is left to from_dict, which names the choices)
        task = user.get("task", cls.task)
        full, small = _TASKS.get(task, ({}, {})) if isinstance(task, str) else ({}, {})
        data = merge_dicts(merge_dicts(data, full), small if quick else {})
        stages = {"sft": "sft", "flow": "flow_pretrain", "train": "rl"}
        data = merge_dicts(data, {s: {"out_dir": str(Path(out) / d)} for s, d in stages.items()})
        if seed is not None:
            data = merge_dicts(data, {s: {"seed": seed} for s in stages})
        data = merge_dicts(data, user)
        from_dict(cls, data)  # the user's values checked (types, ranges) before the stages are chained
        model = {**data["flow"]["model"], "name_or_path": str(Path(data["sft"]["out_dir"]) / "model")}
        chained = {
            "flow.model": model,
            "train.model": model,
            "train.flow": {k: data["flow"]["flow"][k] for k in _SHARED_FLOW_KEYS}
            | {"init": str(Path(data["flow"]["out_dir"]) / "flow")},
        }
        for key, values in chained.items():
            section, _, name = key.partition(".")
            given = user.get(section, {}).get(name, {}) if isinstance(user.get(section), dict) else {}
            want = leaves(to_dict(values))
            for k, v in leaves(given if isinstance(given, dict) else {}).items():
                if k in want and v != want[k]:
                    raise ConfigError(
                        f"{key}.{k}={v!r}: the demo chains its stages, so {key}.{k} is {want[k]!r} (the SFT model, "
                        "the pretrained flow and its latent settings); change it on the stage it comes from "
                        "(sft.out_dir, flow.model.*, flow.flow.*, flow.out_dir)"
                    )
            data[section][name] = merge_dicts(data[section][name], values)
        return data


@dataclass(frozen=True)
class DownloadConfig:
    """``rlfr data download``: benchmarks into the ``datasets`` cache (``rlfr.data.benchmarks``)."""

    benchmarks: tuple[BenchmarkName, ...] = field_(
        ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"),
        "benchmarks to fetch (also given as plain words: rlfr data download math500 aime24)",
    )

    def validate(self) -> None:
        if not self.benchmarks:
            raise ConfigError("name at least one benchmark")


@dataclass(frozen=True)
class TokenizerConfig:
    name_or_path: str = field_(
        "smollm2-135m-instruct",
        "the model whose tokenizer measures the sequences (the policy of flow pretraining)",
    )
    trust_remote_code: bool = field_(False, "allow tokenizer code from the hub (off: never run unknown code)")


@dataclass(frozen=True)
class PrepareDataConfig:
    """The input of ``rlfr data prepare``: the ``data.*`` keys of the other commands that it reads."""

    train: str | None = field_(
        None, "expert solutions (required): a data file, a dataset directory or a Hub dataset id"
    )
    subset: str | None = field_(None, "dataset directories and Hub ids: the subset (configuration) to load")
    split: str = field_("train", "dataset directories and Hub ids: the split to load")
    prompt_field: str = field_(
        "problem", "column holding the prompt: text, or a chat (the user turn is the prompt)"
    )
    solution_field: str = field_(
        "solution", "column holding the expert solution (a chat's last assistant turn is used instead)"
    )
    system_prompt: str | None = field_(
        None, "the system turn (a chat row's own wins): null = the template's default, '' = no system turn"
    )
    template: Template = field_("chat", "prompt template, as data.template of rlfr flow-pretrain")
    skip_bad_rows: bool = field_(False, "skip malformed rows (and report how many) instead of failing")


@dataclass(frozen=True)
class PrepareConfig:
    """``rlfr data prepare``: expert solutions -> flow-pretraining input (``rlfr.data.prepare``)."""

    model: TokenizerConfig = field_(TokenizerConfig(), "tokenizer")
    data: PrepareDataConfig = field_(PrepareDataConfig(), "the expert solutions")
    max_length: int = field_(
        8192, "cutoff in tokens of a whole sequence, prompt + solution + end of turn (the authors: 8192)",
        range="[2, inf)",
    )  # fmt: skip
    overlong: Literal["truncate", "drop"] = field_(
        "truncate", "longer sequences: truncate the solution (as LLaMA-Factory's cutoff_len) or drop the row"
    )
    heldout_fraction: float = field_(
        0.0, "fraction of the rows written to a held-out split (the authors: none)", range="[0, 1)"
    )
    seed: int = field_(0, "seed of the held-out draw", range=SEED_RANGE)
    out_dir: str = field_("data/flow", "where train.jsonl (and heldout.jsonl) or the saved dataset go")
    format: Literal["jsonl", "dataset"] = field_(
        "jsonl", "jsonl files, or a DatasetDict written with save_to_disk"
    )
