"""Typed configs: YAML + overrides, unknown keys and wrong types rejected, presets load."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfr.config import ConfigError, describe, from_dict, load_config, parse_overrides, to_dict
from rlfr.schema import FlowPretrainConfig, SFTConfig, TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "c=[x, y]", "d=1e-6", "e=true", "f="]) == {
        "a": {"b": 1},
        "c": ["x", "y"],
        "d": "1e-6",
        "e": True,
        "f": "",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_yaml_plus_overrides_and_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: rlvr\npolicy:\n  lr: 1e-5\nflow:\n  modes: [token_pre, identity]\n")
    cfg = load_config(TrainConfig, f, ["policy.lr=2e-5", "flow.reward.top_k=7"])
    assert cfg.method == "rlvr" and cfg.policy.lr == 2e-5 and cfg.flow.reward.top_k == 7
    assert cfg.flow.modes == ("token_pre", "identity")
    assert cfg.policy.micro_batch_size == TrainConfig().policy.micro_batch_size  # untouched defaults stay
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout:\n  num_generation: 8\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml.*'rollout\.num_generation'.*valid keys:.*num_generations"
    ):
        load_config(TrainConfig, f)
    with pytest.raises(ConfigError, match=r"flow\.modes\[1\].*not one of"):
        load_config(TrainConfig, overrides=["flow.modes=[token_post,token_middle]"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(TrainConfig, overrides=["model.gradient_checkpointing=maybe"])
    with pytest.raises(ConfigError, match="timesteps"):
        load_config(TrainConfig, overrides=["flow.reward.timesteps=[1.0]"])
    with pytest.raises(ConfigError, match="use method=rlvr"):
        load_config(TrainConfig, overrides=["flow.reward.beta=0"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_every_field_has_help():
    for cls in (TrainConfig, SFTConfig, FlowPretrainConfig):
        rows = describe(cls)
        assert rows and all(help_text for _, _, help_text in rows), cls


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_presets_load(path):
    cls = FlowPretrainConfig if path.name.startswith("flow-pretrain") else TrainConfig
    cfg = load_config(cls, path)
    assert cfg.flow.modes == ("token_post",)  # one context mode for both stages (RLFR_METHOD §8.7)
    if (
        "standardized" not in path.name and getattr(cfg, "method", "rlfr") == "rlfr"
    ):  # the paper's raw latents
        assert cfg.flow.latent_norm == "none"
    if cls is TrainConfig:  # the authors' optimisation (configs/README.md)
        p = cfg.policy
        assert (p.minibatches, p.betas, p.ratio_max, p.schedule, p.min_lr_ratio) == (
            8,
            (0.9, 0.95),
            3.0,
            "cosine",
            0.1,
        )
        assert p.warmup_ratio == 0.03 and p.lr == 1e-6
        if cfg.method == "rlvr":
            assert (p.kl_coef, p.kl_mode) == (0.001, "reward")


def test_each_command_accepts_only_its_keys():
    # flow pretraining has its own optimiser keys at the top level; the RL-only flow keys are refused there
    for key in ("flow.lr=1e-3", "flow.reward.beta=0.02", "flow.soft_flow=1", "flow.update=false"):
        with pytest.raises(ConfigError, match=r"unknown key.*valid keys: .*batch_mul"):
            load_config(FlowPretrainConfig, overrides=[key])
    cfg = load_config(
        FlowPretrainConfig, overrides=["betas=[0.9,0.95]", "flow.eps=1e-5", "max_grad_norm=0.5"]
    )
    assert cfg.betas == (0.9, 0.95) and cfg.flow.eps == 1e-5 and cfg.max_grad_norm == 0.5
    with pytest.raises(ConfigError, match="shift must be >= 1"):
        load_config(FlowPretrainConfig, overrides=["flow.shift=0"])
    # the RL flow section holds the shared keys plus the RL ones
    rl = load_config(TrainConfig, overrides=["flow.eps=1e-5", "flow.lr=3e-4"])
    assert rl.flow.eps == 1e-5 and rl.flow.lr == 3e-4


def test_a_saved_config_without_later_fields_is_not_a_change():
    from rlfr.schema import resume_changes

    new = to_dict(load_config(TrainConfig, overrides=["steps=5"]))
    saved = to_dict(load_config(TrainConfig, overrides=["steps=4"]))
    del saved["policy"]["skip_nonfinite_batches"]  # a checkpoint of a version without this field
    allowed, refused = resume_changes(saved, new)
    assert allowed == {"steps": (4, 5)} and refused == {}


def test_flow_settings_under_a_method_without_a_flow_are_named():
    """``flow.*`` keys mean nothing to rlvr and entropy runs; the ones changed from their defaults are named at
    the start (train prints them) instead of being dropped silently."""
    from rlfr.recipes.train import ignored_flow_keys

    given = ["flow.init=runs/flow", "flow.reward.beta=0.05", "flow.warmup_ratio=0.0"]
    for method in ("rlvr", "entropy"):
        cfg = load_config(TrainConfig, overrides=[f"method={method}", *given])
        assert ignored_flow_keys(cfg) == ["flow.init", "flow.reward.beta", "flow.warmup_ratio"]
    assert ignored_flow_keys(load_config(TrainConfig, overrides=["method=rlvr"])) == []
    assert ignored_flow_keys(load_config(TrainConfig, overrides=["method=rlfr", *given])) == []
