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
