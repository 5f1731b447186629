"""End-to-end RL runs on a tiny offline model: exact resume, checkpoint contents, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlfr.config import ConfigError, load_config
from rlfr.recipes.train import run_train
from rlfr.schema import TrainConfig
from tiny_run import make_tiny_model_dir, tiny_train_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _cfg(model_dir, out, *extra):
    return tiny_train_config(model_dir, out, *extra)


def _final_weights(out, step):
    ck = out / "checkpoints" / f"step_{step:06d}"
    policy = load_file(str(ck / "policy" / "model.safetensors"))
    flow = load_file(str(ck / "flow" / "flow.safetensors"))
    return policy, flow


@pytest.mark.parametrize("method", ["rlfr"])
def test_killed_and_resumed_run_matches_uninterrupted(tiny_dir, tmp_path, method):
    full = tmp_path / "full"
    run_train(_cfg(tiny_dir, full, "steps=4", f"method={method}"), progress=False)
    part = tmp_path / "part"
    stopped = run_train(_cfg(tiny_dir, part, "steps=4", f"method={method}"), progress=False, stop_after=2)
    assert stopped.stopped_at == 2
    assert not (part / "checkpoints" / "step_000004").exists()
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    run_train(_cfg(tiny_dir, part, "steps=4", f"method={method}"), progress=False, resume=True)
    (pa, fa), (pb, fb) = _final_weights(full, 4), _final_weights(part, 4)
    assert pa.keys() == pb.keys() and fa.keys() == fb.keys()
    init = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(pa[k], init[k]) for k in pa), "training changed nothing"
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    full_rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    part_rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("reward") for r in full_rows] == [r.get("reward") for r in part_rows]


def test_checkpoint_contents_and_flow_changes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    res = run_train(_cfg(tiny_dir, out, "steps=2", "policy.track_kl=true"), progress=False)
    ck = out / "checkpoints" / "step_000002"
    for name in (
        "policy/model.safetensors",
        "policy/config.json",
        "flow/flow.safetensors",
        "flow/latents.json",
        "optim.pt",
        "rng_rank0.pt",
        "state.json",
    ):
        assert (ck / name).is_file(), name
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not list((out / "checkpoints").glob("*.tmp"))
    opt = torch.load(ck / "optim.pt", weights_only=True)
    assert {"policy", "policy_sched", "flow", "flow_sched"} <= set(opt)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 2
    for r in steps:
        for key in (
            "accuracy",
            "response_len",
            "flow/loss_wrong",
            "flow_reward/mean",
            "policy/kl",
            "policy/entropy",
            "time/rollout",
        ):
            assert key in r, key
    assert res.final_accuracy is not None
    assert (out / "curves.png").is_file()
    # the online flow update moved the flow away from its zero-output initialisation
    flow = load_file(str(ck / "flow" / "flow.safetensors"))
    assert flow["final_layer.linear.weight"].abs().sum() > 0


def test_resume_from_another_model_fails_clearly(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(
        _cfg(tiny_dir, out, "steps=1", "method=rlvr", "flow.init=null", "flow.reward.beta=0.05"),
        progress=False,
    )
    assert "method=rlvr trains and uses no flow field: ignoring flow.reward.beta" in capsys.readouterr().out
    other = make_tiny_model_dir(tmp_path / "other", num_layers=6)
    from rlfr.runtime.checkpoint import CheckpointError

    with pytest.raises(ConfigError, match="model.name_or_path"):  # refused as a config change first
        run_train(_cfg(other, out, "steps=2", "method=rlvr"), progress=False, resume=True)
    with pytest.raises(CheckpointError, match="different model"):  # and even when forced
        run_train(_cfg(other, out, "steps=2", "method=rlvr"), progress=False, resume=True, force_resume=True)


def test_config_typos_are_rejected_with_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key.*'policy\.lrr'.*valid keys: .*lr"):
        load_config(TrainConfig, overrides=["policy.lrr=1e-5"])
    with pytest.raises(ConfigError, match="method.*not one of"):
        load_config(TrainConfig, overrides=["method=ppo"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(TrainConfig, overrides=["policy.lr=fast"])


def test_missing_model_fails_before_work(tmp_path):
    from rlfr.policy.loading import ModelLoadError

    cfg = _cfg(tmp_path / "nope", tmp_path / "run", "steps=1")
    with pytest.raises(ModelLoadError, match="nope"):
        run_train(cfg, progress=False)


@pytest.mark.parametrize(
    "extra",
    [
        ["method=rlvr", "policy.kl_coef=0.001", "policy.kl_estimator=k1"],
        ["method=entropy"],
        ["method=rlfr", "policy.ppo_epochs=2", "policy.minibatches=2", "policy.micro_batch_size=1"],
        [
            "method=rlfr",
            "flow.entropy_quantile=0.5",
            "flow.reward.bilateral=true",
            "flow.modes=[token_post,identity]",
        ],
        ["method=rlfr", "flow.latent_norm=none", "model.gradient_checkpointing=true"],
        ["method=rlvr", "policy.kl_coef=0.001", "policy.kl_mode=reward"],
        [
            "method=rlfr",
            "policy.minibatches=2",
            "policy.micro_batch_size=1",
            "policy.betas=[0.9,0.95]",
            "policy.schedule=cosine",
            "policy.min_lr_ratio=0.1",
            "policy.warmup_ratio=0.03",
            "policy.ratio_max=3.0",
            "flow.reward.gamma=0.5",
        ],
    ],
    ids=[
        "rlvr-kl",
        "entropy",
        "ppo-epochs",
        "bilateral-quantile",
        "raw-latents-ckpt",
        "rlvr-kl-reward",
        "authors-optim",
    ],
)
def test_method_variants_train(tiny_dir, tmp_path, extra):
    out = tmp_path / "run"
    # a dense custom reward (through the module:function interface) gives non-zero advantages
    res = run_train(
        _cfg(
            tiny_dir,
            out,
            "steps=1",
            "reward.funcs=[tiny_run:digit_reward]",
            "reward.correct_if=verifier",
            *extra,
        ),
        progress=False,
    )
    row = res.history[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values() if isinstance(v, float))
    init = load_file(str(tiny_dir / "model.safetensors"))
    final = load_file(str(out / "checkpoints" / "step_000001" / "policy" / "model.safetensors"))
    assert any(not torch.equal(init[k], final[k]) for k in init), "the policy did not move"
    if "policy.kl_coef=0.001" in extra:
        assert "policy/kl" in row
    if "policy.ratio_max=3.0" in extra:  # two optimizer steps on the cosine schedule with 3 % warm-up
        opt = torch.load(out / "checkpoints" / "step_000001" / "optim.pt", weights_only=True)
        assert opt["policy_sched"]["last_epoch"] == 2
        assert opt["policy"]["param_groups"][0]["betas"] == (0.9, 0.95)
    if "method=rlfr" in extra:
        assert "flow/loss_wrong" in row and "flow_reward/mean" in row


def test_actor_warmup_holds_the_policy(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_train(_cfg(tiny_dir, out, "steps=1", "flow.actor_warmup_steps=1"), progress=False)
    init = load_file(str(tiny_dir / "model.safetensors"))
    final = load_file(str(out / "checkpoints" / "step_000001" / "policy" / "model.safetensors"))
    assert all(torch.equal(init[k], final[k]) for k in init)
    flow = load_file(str(out / "checkpoints" / "step_000001" / "flow" / "flow.safetensors"))
    assert flow["final_layer.linear.weight"].abs().sum() > 0  # the flow adapted meanwhile


def test_accuracy_filter_that_drops_every_group_leaves_the_policy(tiny_dir, tmp_path):
    # a random model never answers correctly: every group has accuracy 0 < 0.01, so nothing is trained
    out = tmp_path / "run"
    res = run_train(
        _cfg(tiny_dir, out, "steps=1", "policy.accuracy_filter=true", "policy.accuracy_lower_bound=0.01"),
        progress=False,
    )
    row = res.history[0]
    assert row["update/skipped"] == 1.0 and row["filter/kept_frac"] == 0.0
    init = load_file(str(tiny_dir / "model.safetensors"))
    final = load_file(str(out / "checkpoints" / "step_000001" / "policy" / "model.safetensors"))
    assert all(torch.equal(init[k], final[k]) for k in init)


def test_accuracy_filter_rows_by_hand():
    from rlfr.rl.step import accuracy_filter

    cfg = load_config(
        TrainConfig,
        overrides=["policy.accuracy_filter=true", "policy.accuracy_lower_bound=0.2",
                   "policy.accuracy_upper_bound=0.8", "policy.freezing_filter_steps=1"],
    )  # fmt: skip
    correct = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # groups of 4: 1.0, .25, 0
    assert accuracy_filter(correct, 4, cfg, step=0) is None  # step 1 <= freezing_filter_steps
    keep = accuracy_filter(correct, 4, cfg, step=1)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4


def test_a_converted_official_flow_trains(tiny_dir, tmp_path):
    """rlfr convert-flow output is a flow directory that rlfr train takes (raw latents, as the authors)."""
    from rlfr.flow import FlowField
    from rlfr.recipes.convert_flow import convert

    official = FlowField(dim=32, depth=2)
    torch.save({"model." + k: v for k, v in official.state_dict().items()}, tmp_path / "flow_model.bin")
    flow_dir = convert(tmp_path / "flow_model.bin", str(tiny_dir), tmp_path / "converted")
    out = tmp_path / "run"
    # a converted flow records the authors' pretraining pairing (token_pre); RL on token_post pairs, as they ran
    # it, is asked for by name (tests/test_convert_flow.py: refused without it)
    authors = ("flow.latent_norm=none", "flow.allow_mode_mismatch=true")
    run_train(_cfg(tiny_dir, out, "steps=1", f"flow.init={flow_dir}", *authors, "flow.depth=2"),
              progress=False)  # fmt: skip
    assert (out / "checkpoints" / "step_000001" / "flow" / "latents.json").is_file()
    with pytest.raises(ValueError, match="flow.depth=2"):  # the config must describe the flow it loads
        run_train(_cfg(tiny_dir, tmp_path / "r2", "steps=1", f"flow.init={flow_dir}", *authors),
                  progress=False)  # fmt: skip


def test_flows_of_the_old_pairing_or_other_latents_are_refused(tiny_dir, tmp_path):
    from rlfr.flow.store import FlowMismatchError

    out = tmp_path / "run"
    run_train(_cfg(tiny_dir, out, "steps=2", "save_every=1"), progress=False)
    flow_dir = out / "checkpoints" / "step_000002" / "flow"
    # a fresh run and a resumed run both refuse a flow trained on other latents
    with pytest.raises(FlowMismatchError, match=r"fractions: flow \[0.25, 0.5, 0.75\] vs run \[0.5\]"):
        run_train(_cfg(tiny_dir, tmp_path / "fresh", "steps=1", f"flow.init={flow_dir}", "flow.fractions=[0.5]"),
                  progress=False)  # fmt: skip
    with pytest.raises(FlowMismatchError, match="modes"):  # forced past the config check, the store refuses
        run_train(_cfg(tiny_dir, out, "steps=3", "flow.modes=[token_pre]"), progress=False, resume=True,
                  force_resume=True)  # fmt: skip
    # a flow written before the credit fix (no pairing key) names the fix and how to get a new flow
    meta = json.loads((flow_dir / "latents.json").read_text())
    del meta["pairing"]
    (flow_dir / "latents.json").write_text(json.dumps(meta))
    with pytest.raises(FlowMismatchError, match="Re-run `rlfr flow-pretrain`"):
        run_train(_cfg(tiny_dir, tmp_path / "old", "steps=1", f"flow.init={flow_dir}"), progress=False)
    from rlfr.runtime.checkpoint import write_manifest

    write_manifest(flow_dir.parent)  # the edit passes the checksums: the flow store itself must refuse it
    with pytest.raises(FlowMismatchError, match="pairing"):
        run_train(_cfg(tiny_dir, out, "steps=3"), progress=False, resume=True)


def test_config_values_are_checked_at_load():
    for bad, match in (
        ("flow.shift=0", "shift must be >= 1"),
        ("policy.max_grad_norm=-1", "max_grad_norm must be > 0"),
        ("flow.lr=-1", "lr must be > 0"),
        ("policy.ratio_max=1.1", "ratio_max"),
        ("policy.accuracy_lower_bound=0.9", "accuracy_lower_bound"),
    ):
        extra = ["policy.accuracy_upper_bound=0.5"] if "lower_bound" in bad else []
        with pytest.raises(ConfigError, match=match):
            load_config(TrainConfig, overrides=[bad, *extra])


@pytest.mark.parametrize("method", ["rlvr", "rlfr"])
def test_rl_climbs_a_dense_reward(tiny_dir, tmp_path, method):
    # The sign and the token alignment of the whole update, end to end: on a reward the policy can reach
    # (the fraction of digits in 8 characters; about 0.1 for the random-init character model), 20 steps
    # raise it well above where it started. A flipped advantage or log-probs scored one position off
    # leave it flat or push it down.
    res = run_train(
        _cfg(tiny_dir, tmp_path / "run", "steps=20", f"method={method}", "reward.funcs=[tiny_run:digit_reward]", "reward.correct_if=verifier",
             "rollout.prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=8",
             "policy.micro_batch_size=16", "policy.lr=1e-2", "save_every=0"),
        progress=False,
    )  # fmt: skip
    rewards = [row["reward"] for row in res.history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.15 and last > first + 0.15, rewards


def test_authors_outcome_pays_a_boxed_wrong_answer_but_it_trains_no_flow(tiny_dir, tmp_path, monkeypatch):
    """reward.outcome=authors gives a boxed-but-wrong rollout 0.5; only verified-correct rollouts train the flow, so
    with every rollout boxed and wrong the flow stays at its zero-output start (unless flow.soft_flow trains on wrong
    rollouts on purpose: the contrast shows the flow would have moved)."""
    import dataclasses

    from rlfr.recipes import train

    real = train.rollout_sampler

    class BoxedWrong:  # the policy's own rollouts, each completion's text replaced by a boxed wrong answer
        def __init__(self, inner):
            self.inner, self.holds_weights = inner, inner.holds_weights

        def sync_weights(self, *args, **kwargs):
            return self.inner.sync_weights(*args, **kwargs)

        def generate(self, *args, **kwargs):
            ro = self.inner.generate(*args, **kwargs)
            return dataclasses.replace(ro, completions=["so \\boxed{none}"] * len(ro.completions))

    monkeypatch.setattr(train, "rollout_sampler", lambda *a, **k: BoxedWrong(real(*a, **k)))
    flows = {}
    for soft in (0.0, 1.0):
        out = tmp_path / f"soft{soft}"
        run_train(
            _cfg(tiny_dir, out, "steps=2", "reward.outcome=authors", f"flow.soft_flow={soft}"), progress=False
        )
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
        assert [(r["reward"], r["accuracy"]) for r in rows] == [(0.5, 0.0), (0.5, 0.0)]
        flows[soft] = _final_weights(out, 2)[1]["final_layer.linear.weight"]
    assert flows[0.0].abs().sum() == 0  # no correct rollout: the online update never ran on any token
    assert flows[1.0].abs().sum() > 0


def test_a_run_on_the_users_data_evaluates_on_rows_held_out_of_it(tiny_dir, tmp_path, capsys):
    """Before, ``rlfr train data.train=mine.jsonl`` evaluated on the embedded arithmetic task; the held-out set now
    follows the data: data.eval_size rows of the user's file, which the run never trains on."""
    from rlfr.recipes.train import build_components
    from rlfr.runtime.env import make_accelerator

    mine = tmp_path / "mine.jsonl"
    mine.write_text(
        "".join(json.dumps({"problem": f"{i} + {i} = ?", "answer": str(2 * i)}) + "\n" for i in range(12))
    )
    cfg = _cfg(tiny_dir, tmp_path / "run", f"data.train={mine}", "steps=1")
    c, data = build_components(cfg, make_accelerator(cpu=True))
    c.reward.verifier.close()
    assert (
        "evaluating on 4 rows held out of" in capsys.readouterr().out
    )  # data.eval_size=4 (TINY_TRAIN_OVERRIDES)
    held = {e.problem for e in data.eval}
    assert len(held) == 4 and held <= {f"{i} + {i} = ?" for i in range(12)}
    assert len(data.train) == 8 and not held & {e.problem for e in data.train}
    res = run_train(cfg, progress=False)
    assert res.final_accuracy is not None
