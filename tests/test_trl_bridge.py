"""RLFR inside TRL's GRPOTrainer (``rlfr.integrations.trl``), on the tiny offline model and CPU.

What must hold: the flow is configured as TRL options (``RLFRGRPOConfig``, also from the command line);
training moves both the flow and the policy (also with a PEFT adapter); with flow beta 0 the advantages are
plain GRPOTrainer's; the token rewards TRL receives are the ones ``rlfr train`` computes from the same latents;
a run resumed from a checkpoint ends where the uninterrupted run ends; losses where token advantages mean
nothing, and untested TRL versions, are refused with a clear error. (The flow's own behaviour, e.g. when its
latent statistics are fitted, is ``tests/test_flow_learner.py``'s.)"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from safetensors.torch import load_file  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlfr.errors import ConfigError  # noqa: E402
from rlfr.integrations.trl import RLFRGRPOConfig, RLFRGRPOTrainer, check_trl_version  # noqa: E402
from rlfr.integrations.trl_config import correctness_rule  # noqa: E402
from rlfr.schema import OPS, FlowConfig, Threshold  # noqa: E402
from tiny_run import make_tiny_model_dir  # noqa: E402

GEN = 2  # completions per prompt
BATCH = 4  # completions per device batch = 2 prompts


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def has_digit(completions, **_):
    """The 'answer check' of these tests: a random-init character model writes a digit in about half of its
    6-character completions, so groups have both outcomes."""
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]


def length(completions, **_):
    return [len(c[0]["content"]) / 6 for c in completions]


def dataset():
    rows = [[{"role": "user", "content": f"what is {i} + {i}?"}] for i in range(8)]
    return datasets.Dataset.from_dict({"prompt": rows})


BASE = dict(
    per_device_train_batch_size=BATCH, num_generations=GEN, max_completion_length=6, max_steps=2, use_cpu=True,
    report_to=[], logging_steps=1, save_strategy="no", learning_rate=1e-3, bf16=False, seed=0, disable_tqdm=True,
)  # fmt: skip


def grpo_args(out: Path, cls=RLFRGRPOConfig, **kw) -> GRPOConfig:
    """The tests' TRL options; ``RLFRGRPOConfig`` (flow_* options, flow_correctness='has_digit' by default)."""
    if cls is RLFRGRPOConfig:  # a fresh flow, chosen explicitly (a random-init model has no expert latents)
        kw = {"flow_correctness": "has_digit", "flow_init": "random"} | kw
    return cls(output_dir=str(out), **(BASE | kw))


def trainer(tiny_dir, out, cls=RLFRGRPOTrainer, peft_config=None, **args):
    """A trainer on the tiny model; ``args``: GRPOConfig options and (RLFRGRPOTrainer) the flow_* options."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = grpo_args(out, **args) if cls is RLFRGRPOTrainer else grpo_args(out, GRPOConfig, **args)
    return cls(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir), reward_funcs=[has_digit, length], args=config,
        train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_dir), peft_config=peft_config,
    )  # fmt: skip


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------------ training


@pytest.mark.parametrize(
    "peft,flow",
    [(False, {}), (True, {}), (False, dict(flow_entropy_quantile=0.5, flow_latent_norm="none"))],
    ids=["full", "lora", "entropy-quantile-raw-latents"],
)
def test_two_steps_change_the_flow_and_the_policy(tiny_dir, tmp_path, peft, flow):
    lora = None
    if peft:
        from peft import LoraConfig

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    t = trainer(tiny_dir, tmp_path, peft_config=lora, **flow)
    policy = {k: v for k, v in weights(t.model).items() if not peft or "lora_" in k}
    assert policy, "no trainable weights found"
    before = weights(t.flow.module)
    t.train()
    assert changed(before, weights(t.flow.module)), "the flow did not change"
    after = weights(t.model)
    assert changed(policy, {k: after[k] for k in policy}), "the policy did not change"
    logs = [r for r in t.state.log_history if "flow_reward/mean" in r]
    assert len(logs) == 2 and all(r["flow_reward/mean"] < 0 for r in logs)  # r = -beta x with x >= 0
    for r in logs:  # rejection sampling: the flow steps only on batches where a completion passes the check
        assert ("flow/grad_norm" in r) == (r["rewards/has_digit/mean"] > 0) == ("flow/loss_correct" in r), r
    assert any("flow/grad_norm" in r for r in logs)
    assert len(t._logs["extra"]["flow_reward"]) == len(t._logs["prompt"])  # the completions table's column
    for r in logs:  # beside the pooled flow AUROC, how many prompts held both outcomes (and their AUROC)
        assert ("flow_score/auroc" in r) == ("flow_score/auroc_within_groups" in r)


# ------------------------------------------------------------------ advantages


def _batch(t, seed: int = 0) -> dict:
    """One generation batch of ``t`` (train mode, as inside ``train``) from the first 2 prompts x GEN."""
    inputs = [row for row in dataset().select(range(BATCH // GEN)) for _ in range(GEN)]
    t.model.train()
    torch.manual_seed(seed)
    return t._generate_and_score_completions(inputs)


def test_the_completions_of_one_prompt_form_a_group(tiny_dir, tmp_path):
    t = trainer(tiny_dir, tmp_path, flow_update=False)
    seen, score = [], t.flow.score

    def spy(*args, group=None, **kw):
        seen.append(group.tolist())
        return score(*args, group=group, **kw)

    t.flow.score = spy
    _batch(t)
    assert seen == [[0, 0, 1, 1]]  # 2 prompts x GEN completions, in TRL's order


def test_completions_masked_by_trl_get_no_flow_reward(tiny_dir, tmp_path):
    # TRL's mask_truncated_completions empties the masks of completions without EOS: they are neither scored
    # nor trained on (when a fresh flow fits its statistics then: tests/test_flow_learner.py)
    t = trainer(tiny_dir, tmp_path, flow_soft_flow=1.0)
    out = _batch(trainer(tiny_dir, tmp_path / "p", cls=GRPOTrainer))
    masked = out | {"completion_mask": torch.zeros_like(out["completion_mask"])}
    adv = t.flow_advantages(masked, torch.ones(BATCH, dtype=torch.bool), train=False)
    assert not adv.any()
    adv = t.flow_advantages(out, torch.ones(BATCH, dtype=torch.bool), train=False)
    assert adv[out["completion_mask"].bool()].ne(out["advantages"][:, None]).any()
    t = trainer(tiny_dir, tmp_path / "t", flow_soft_flow=1.0, mask_truncated_completions=True)
    t.train()  # trains whatever the masks leave
    assert len([r for r in t.state.log_history if "flow_reward/mean" in r]) == 2


def test_beta_zero_gives_plain_grpo_advantages(tiny_dir, tmp_path):
    plain = _batch(trainer(tiny_dir, tmp_path / "p", cls=GRPOTrainer))
    zero = _batch(trainer(tiny_dir, tmp_path / "z", flow_beta=0.0, flow_update=False))
    flow = _batch(trainer(tiny_dir, tmp_path / "f", flow_update=False))
    assert torch.equal(plain["completion_ids"], zero["completion_ids"])  # the same batch
    mask = plain["completion_mask"].bool()
    expanded = plain["advantages"][:, None].expand(mask.shape)
    assert zero["advantages"].shape == mask.shape  # (B, C): token advantages
    assert torch.equal(zero["advantages"][mask], expanded[mask])
    assert plain["advantages"].abs().sum() > 0  # both outcomes occur: a non-trivial comparison
    assert not torch.allclose(flow["advantages"][mask], expanded[mask])  # beta > 0 does change them


def test_token_rewards_equal_rlfr_trainers_for_the_same_latents(tiny_dir, tmp_path):
    from accelerate import Accelerator

    from rlfr.flow.learner import FlowLearner
    from rlfr.policy.latents import LatentTap
    from rlfr.policy.rollout import Rollout
    from rlfr.rl import step
    from rlfr.rl.advantages import token_advantages
    from rlfr.runtime.metrics import Accum
    from rlfr.schema import PolicyConfig, TrainConfig

    t = trainer(tiny_dir, tmp_path, flow_update=False, flow_beta=0.05, flow_eta=0.3, flow_top_k=3)
    f = t.flow.cfg
    out = _batch(trainer(tiny_dir, tmp_path / "p", cls=GRPOTrainer))  # TRL's batch with (B,) advantages
    correct = torch.tensor([True, False, False, True])
    torch.manual_seed(7)  # the flow scores draw noise
    bridge = t.flow_advantages(out, correct, train=False)
    # rlfr's own trainer on the same sequences, laid out as its Rollout: [pad][prompt][completion][pad]
    p_len = out["prompt_ids"].shape[1]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    resp = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1).bool()
    ro = Rollout(
        ids, attn, resp, torch.arange(BATCH) // GEN, [""] * BATCH, torch.zeros(BATCH, dtype=torch.bool)
    )
    tap = LatentTap(t.model, f.fractions)
    cfg = TrainConfig(flow=f, policy=PolicyConfig(micro_batch_size=BATCH))
    c = step.Components(
        cfg=cfg, acc=Accelerator(cpu=True), policy=t.model, tokenizer=None, policy_opt=None, policy_sched=None,
        reward=None, flow=FlowLearner(f, t.flow.bundle(), tap),  # the same field and latent statistics
    )  # fmt: skip
    batch = step.Batch(ro, torch.zeros(BATCH), correct, out["advantages"])
    with torch.no_grad():
        step.forward(c.policy, ro, need_entropy=True)
    torch.manual_seed(7)
    rewards = step.flow_rewards(c, batch, torch.arange(BATCH), ro, Accum())
    tap.remove()
    assert (rewards != 0).sum() >= BATCH  # top-k tokens of every sequence carry a reward
    expected = token_advantages(out["advantages"], rewards, resp)[:, p_len:]
    torch.testing.assert_close(bridge, expected, rtol=0, atol=0)


# ------------------------------------------------------------------ checkpoints


def _flow_and_policy(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors")) | {
        "flow." + k: v for k, v in load_file(str(ckpt / "flow" / "flow.safetensors")).items()
    }


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tiny_dir, tmp_path):
    save = dict(save_strategy="steps", save_steps=1, flow_soft_flow=1.0)  # a flow step every step
    full = trainer(tiny_dir, tmp_path / "full", **save)
    full.train()
    first, last = tmp_path / "full" / "checkpoint-1", tmp_path / "full" / "checkpoint-2"
    assert (first / "flow" / "latents.json").is_file() and (first / "flow_optim.pt").is_file()
    resumed = trainer(tiny_dir, tmp_path / "resumed", **save)
    resumed.train(resume_from_checkpoint=str(first))
    assert resumed.flow.sched.last_epoch == 2  # one flow step restored, one taken
    assert resumed.flow.opt.state_dict()["state"][0]["step"] == 2
    a, b = _flow_and_policy(last), _flow_and_policy(tmp_path / "resumed" / "checkpoint-2")
    assert a.keys() == b.keys() and not changed(a, b)
    assert changed(_flow_and_policy(first), a)  # step 2 did move them

    (first / "flow_optim.pt").unlink()
    broken = trainer(tiny_dir, tmp_path / "broken", **save)
    with pytest.raises(RuntimeError, match="flow_optim.pt cannot be read"):
        broken.train(resume_from_checkpoint=str(first))


def test_a_trained_flow_directory_loads_as_flow_init(tiny_dir, tmp_path):
    t = trainer(tiny_dir, tmp_path / "a", flow_update=False, max_steps=1)
    t.train()
    t.save_model(str(tmp_path / "final"))
    again = trainer(tiny_dir, tmp_path / "b", flow_init=str(tmp_path / "final" / "flow"))
    assert not changed(weights(t.flow.module), weights(again.flow.module))
    with pytest.raises(ValueError, match="trained on other latents"):
        trainer(tiny_dir, tmp_path / "c", flow_init=str(tmp_path / "final" / "flow"), flow_shift=2)


def test_a_flow_of_another_pairing_needs_flow_allow_mode_mismatch(tiny_dir, tmp_path, capsys):
    pre = trainer(
        tiny_dir, tmp_path / "a", flow_modes=["token_pre"], flow_latent_norm="none"
    )  # as the authors'
    pre.save_model(str(tmp_path / "pre"))
    flow = dict(
        flow_init=str(tmp_path / "pre" / "flow"), flow_latent_norm="none"
    )  # TRL's default: token_post
    with pytest.raises(ValueError, match=r"modes=\['token_pre'\] shift=1, this run pairs latents with modes="
                       r"\['token_post'\] shift=1.*flow_allow_mode_mismatch=True"):  # fmt: skip
        trainer(tiny_dir, tmp_path / "b", **flow)
    t = trainer(tiny_dir, tmp_path / "c", flow_allow_mode_mismatch=True, **flow)
    assert t.flow.meta.modes == ("token_pre",) and t.flow.cfg.modes == ("token_post",)  # it keeps its record
    assert not changed(weights(pre.flow.module), weights(t.flow.module))
    assert (
        "flow.allow_mode_mismatch=true: the flow was trained with modes=['token_pre']"
        in capsys.readouterr().out
    )


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(loss_type="vespo"), "loss_type='vespo' is not supported"),
        (
            dict(loss_type="grpo", importance_sampling_level="sequence"),
            "importance_sampling_level='sequence'",
        ),
    ],
)
def test_losses_without_token_credit_are_refused_before_the_model_loads(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        RLFRGRPOTrainer(model=str(tmp_path / "not-loaded"), reward_funcs=[has_digit], args=grpo_args(tmp_path, **args),
                        train_dataset=dataset())  # fmt: skip


def test_other_settings_are_refused_with_the_fix(tiny_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"names no reward function; the names are \['has_digit', 'length'\]"
    ):
        trainer(tiny_dir, tmp_path, flow_correctness="accuracy")
    with pytest.raises(ValueError, match="flow_correctness must name the reward function"):
        trainer(tiny_dir, tmp_path, flow_correctness=None)
    # 4 blocks: fractions 0.25 and 0.3 both round to block 1, refused when the trainer is built
    with pytest.raises(ValueError, match=r"duplicate block indices \[1, 1\] for 4 blocks"):
        trainer(tiny_dir, tmp_path, flow_fractions=[0.25, 0.3])
    # a bad flow option fails when the config is made, naming the key
    with pytest.raises(ConfigError, match=r"RLFRGRPOConfig: modes\[0\]: 'token_after' is not one of"):
        grpo_args(tmp_path, flow_modes=["token_after"])
    with pytest.raises(
        ConfigError, match=r"RLFRGRPOConfig: reward.beta must be >= 0, got -1.0 \(the field flow_"
    ):
        grpo_args(tmp_path, flow_beta=-1.0)
    with pytest.raises(ConfigError, match=r"RLFRGRPOConfig: lr must be > 0 and finite, got nan"):
        grpo_args(tmp_path, flow_lr=float("nan"))


def test_flow_correctness_takes_rlfr_trains_rule(tiny_dir, tmp_path):
    """flow_correctness is a reward name with flow_correct_threshold, or the rule in one string as rlfr train's
    reward.correct_if; a NaN score (a reward function's None) never passes."""
    assert correctness_rule("accuracy", 1.0) == Threshold("accuracy", ">=", 1.0)
    assert correctness_rule("accuracy>0.5", 1.0) == Threshold("accuracy", ">", 0.5)
    with pytest.raises(ValueError, match="holds its threshold; flow_correct_threshold=0.5 would be a second"):
        correctness_rule("accuracy>=1", 0.5)
    t = trainer(tiny_dir, tmp_path, flow_correctness="length<0.2")
    assert (t.correct_index, t.correct_rule) == (1, Threshold("length", "<", 0.2))
    scores = torch.tensor([0.1, 0.2, float("nan"), 0.3])
    assert OPS[t.correct_rule.op](scores, t.correct_rule.value).tolist() == [True, False, False, False]


def test_flow_options_parse_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(RLFRGRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--flow_beta", "0.02", "--flow_init", "DIR", "--flow_correctness",
         "accuracy", "--flow_timesteps", "0.6", "0.8", "--no_flow_update", "--flow_latent_norm", "none"]
    )  # fmt: skip
    f = args.flow_config()
    assert (args.flow_beta, f.reward.beta, f.init, args.flow_correctness) == (0.02, 0.02, "DIR", "accuracy")
    assert f.reward.timesteps == (0.6, 0.8) and f.update is False and f.latent_norm == "none"
    assert f.fractions == FlowConfig().fractions and f.reward.eta == FlowConfig().reward.eta  # the defaults
    helps = {f.name: f.metadata.get("help", "") for f in fields(RLFRGRPOConfig)}
    assert (
        helps["flow_beta"].endswith("(rlfr train: flow.reward.beta)") and "r_k = -beta" in helps["flow_beta"]
    )


def test_the_deprecated_keywords_still_work(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.warns(DeprecationWarning, match="use args=RLFRGRPOConfig"):
        t = RLFRGRPOTrainer(model, [has_digit, length], grpo_args(tmp_path, GRPOConfig), train_dataset=dataset(),
                            flow=FlowConfig(init="random", soft_flow=0.5), correctness="length",
                            correct_threshold=0.5)  # fmt: skip
    assert (t.flow.cfg.soft_flow, t.correct_index, t.correct_rule) == (0.5, 1, Threshold("length", ">=", 0.5))
    with pytest.raises(ValueError, match="actor_warmup_steps"), pytest.warns(DeprecationWarning):
        RLFRGRPOTrainer(model, [has_digit], grpo_args(tmp_path, GRPOConfig), train_dataset=dataset(),
                        flow=FlowConfig(actor_warmup_steps=2), correctness="has_digit")  # fmt: skip
    with pytest.raises(TypeError, match="not also as the keywords"):
        RLFRGRPOTrainer(
            model, [has_digit], grpo_args(tmp_path), train_dataset=dataset(), correctness="has_digit"
        )
    with pytest.raises(TypeError, match="needs args=RLFRGRPOConfig"):
        RLFRGRPOTrainer(model, [has_digit], grpo_args(tmp_path, GRPOConfig), train_dataset=dataset())
    with pytest.warns(DeprecationWarning):  # flow=None is the old spelling of a fresh flow: explicit
        t = RLFRGRPOTrainer(model, [has_digit], grpo_args(tmp_path, GRPOConfig), train_dataset=dataset(), flow=None,
                            correctness="has_digit")  # fmt: skip
    assert t.flow.cfg.init == "random"


def test_the_bridge_needs_an_explicit_flow(tiny_dir, tmp_path):
    """As ``rlfr train``: a flow the user did not choose is never started from random weights; flow_init='random'
    (or a flow directory) is the choice; before, flow_init=None meant a fresh flow, silently."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ConfigError, match=r"flow_init is not set.*`rlfr flow-pretrain`.*'random'"):
        RLFRGRPOTrainer(model, [has_digit], grpo_args(tmp_path, flow_init=None), train_dataset=dataset())
    with (
        pytest.raises(ConfigError, match=r"flow=FlowConfig\(init=...\) is not set"),
        pytest.warns(DeprecationWarning),
    ):
        RLFRGRPOTrainer(model, [has_digit], grpo_args(tmp_path, GRPOConfig), train_dataset=dataset(),
                        flow=FlowConfig(), correctness="has_digit")  # fmt: skip
    with pytest.raises(ConfigError, match=r"RLFRGRPOTrainer\(flow=\.\.\.\) is not set"):
        RLFRGRPOTrainer(model, [has_digit], grpo_args(tmp_path, GRPOConfig), train_dataset=dataset(),
                        correctness="has_digit")  # fmt: skip


def test_only_the_tested_trl_versions_import():
    for version in ("1.14.0", "1.14.2", "1.16.0", "1.16.9"):
        check_trl_version(version)
    for version in ("1.13.2", "1.15.0", "1.15.1", "1.17.0", "2.0.0"):
        with pytest.raises(
            ImportError,
            match=r"tested with trl>=1.14,<1.17,!=1.15.\* .* pip install 'trl>=1.14,<1.17,!=1.15.\*'",
        ):
            check_trl_version(version)


# ------------------------------------------------------------------ the example


@pytest.mark.slow  # about 35 s on 2 shared cores: a fresh interpreter importing TRL, one step
def test_the_example_script_trains_one_step_on_the_tiny_model(tiny_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "examples" / "trl_grpo_rlfr.py"), "--model", str(tiny_dir),
           "--output_dir", str(tmp_path), "--max_steps", "1", "--use_cpu", "--bf16", "false",
           "--max_completion_length", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
           "--num_generations", "2", "--num_problems", "8", "--report_to", "none", "--save_strategy", "no",
           "--log_completions", "false", "--flow_soft_flow", "1.0", "--flow_init", "random"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert (
        len(rows) == 8
        and rows[0]["prompt"][1]["role"] == "user"
        and rows[0]["solution"].lstrip("-").isdigit()
    )
    flow = FlowConfig()  # the flow it saved is the one its RLFRGRPOConfig defaults describe
    meta = json.loads((tmp_path / "flow" / "latents.json").read_text())
    assert meta["fractions"] == list(flow.fractions) and meta["latent_norm"] == "standardize"
    assert (tmp_path / "flow" / "flow.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()
