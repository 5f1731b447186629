"""Typed configs: YAML + overrides, unknown keys and wrong types rejected, presets load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlfr.commands import (
    CompareConfig,
    ConvertFlowConfig,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    InspectConfig,
    SelectConfig,
)
from rlfr.config import ConfigError, Range, describe, from_dict, load_config, parse_overrides, to_dict
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


def test_a_run_saved_under_the_old_defaults_resumes_under_the_auto_ones():
    """``data.eval`` and ``model.dtype`` default to ``auto`` now; a checkpoint saved with what they mean on this
    machine (``embedded`` for the embedded task, ``float32`` on a CPU) is the same run, not a change."""
    from rlfr.schema import canonical, resume_changes

    new = to_dict(load_config(TrainConfig, overrides=["cpu=true"]))
    saved = to_dict(
        load_config(TrainConfig, overrides=["cpu=true", "data.eval=embedded", "model.dtype=float32"])
    )
    assert resume_changes(saved, new) == ({}, {})
    assert canonical(new)["data"]["eval"] == "embedded" and canonical(new)["model"]["dtype"] == "float32"
    bf16 = to_dict(load_config(TrainConfig, overrides=["cpu=true", "model.dtype=bfloat16"]))
    assert resume_changes(bf16, new) == ({}, {"model.dtype": ("bfloat16", "float32")})
    mine = to_dict(load_config(TrainConfig, overrides=["data.train=mine.jsonl"]))
    assert canonical(mine)["data"]["eval"] == "auto"  # rows held out of the user's file: no other spelling


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


def _numeric_fields(cls, prefix: str = ""):
    """(dotted key, number type, items, field) of every numeric setting of ``cls``: ints, floats, their Optionals
    and tuples of them (items: None for a scalar, else how many a list must hold), in nested sections too."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, key + ".")
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        items = None
        if typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            items, tp = (1 if args[-1] is Ellipsis else len(args)), args[0]
        if tp in (int, float):
            yield key, tp, items, f


def _outside(rng, tp) -> list[float]:
    """Values just outside a range (none for an unbounded one)."""
    step = 1 if tp is int else 0.5
    out = []
    if math.isfinite(rng.low):
        out.append(rng.low - step if rng.low_closed else rng.low)
    if math.isfinite(rng.high):
        out.append(rng.high + step if rng.high_closed else rng.high)
    return out


@pytest.mark.parametrize(
    "cls", [TrainConfig, SFTConfig, FlowPretrainConfig, DemoConfig, SelectConfig], ids=lambda c: c.__name__
)
def test_every_numeric_setting_has_a_range_that_refuses_nan_inf_and_outside_values(cls):
    """Every int / float setting of every command declares its range next to its help text; NaN, +-inf and a
    value just outside the range are refused at load, naming the key and the range (before, NaN or inf passed
    for kl_coef, beta, temperature, reward.weights, ..., and inf for lr or the verifier timeout)."""
    fields = list(_numeric_fields(cls))
    assert len(fields) >= 8
    for key, tp, items, f in fields:
        rng = f.metadata.get("range")
        assert isinstance(rng, Range), f"{cls.__name__}.{key} has no range"
        assert rng.low < rng.high
        literal = {math.inf: ".inf", -math.inf: "-.inf"}
        for bad in (math.nan, math.inf, -math.inf, *_outside(rng, tp)):
            text = ".nan" if bad != bad else literal.get(bad, repr(bad))
            value = text if items is None else "[" + ", ".join([text] * items) + "]"
            with pytest.raises(ConfigError) as err:
                load_config(cls, overrides=[f"{key}={value}"])
            msg = str(err.value)
            assert key in msg and str(rng) in msg and "\n" not in msg, (key, value, msg)
    # the cases, by hand
    with pytest.raises(ConfigError, match=r"^reward\.timeout must be > 0 and finite, got inf$"):
        load_config(TrainConfig, overrides=["reward.timeout=.inf"])  # before: checks ran with no time limit
    with pytest.raises(ConfigError, match=r"^reward\.weights\[0\] must be a finite number, got nan$"):
        load_config(TrainConfig, overrides=["reward.weights=[.nan]"])


def test_configs_built_in_python_are_checked_the_same_way():
    from rlfr.config import validate_config
    from rlfr.schema import FlowConfig, RewardShapingConfig

    validate_config(FlowConfig(), "flow")
    with pytest.raises(ConfigError, match=r"^flow\.lr must be > 0 and finite, got inf$"):
        validate_config(FlowConfig(lr=math.inf), "flow")
    with pytest.raises(ConfigError, match=r"^flow\.reward\.eta must be in \[0, 1\), got 1\.5$"):
        validate_config(FlowConfig(reward=RewardShapingConfig(eta=1.5)), "flow")


# ------------------------------------------------------- issue 28: defaults merged key by key, one CLI
COMMAND_CONFIGS = [TrainConfig, SFTConfig, FlowPretrainConfig, DemoConfig, EvalConfig, InspectConfig, CompareConfig,
                   ConvertFlowConfig, ExportConfig, SelectConfig]  # fmt: skip


def test_a_nested_key_keeps_the_commands_other_defaults(tmp_path):
    """Before, a section given in part (``data.train=... data.eval=...``) was built from the section class's
    defaults, dropping the command's own: SFT and flow pretraining lost ``data.solution_field=solution`` (and
    then failed on a file with a solution column: "field None")."""
    for cls in (SFTConfig, FlowPretrainConfig):
        cfg = load_config(cls, overrides=["data.train=mine.jsonl", "data.eval=mine_eval.jsonl"])
        assert (cfg.data.train, cfg.data.eval, cfg.data.solution_field) == (
            "mine.jsonl",
            "mine_eval.jsonl",
            "solution",
        )
        f = tmp_path / "sft.yaml"
        f.write_text("data:\n  train: mine.jsonl\n")
        assert load_config(cls, f).data.solution_field == "solution"  # from a file, too
    # the demo's stage defaults survive a partial stage section as well
    demo = load_config(DemoConfig, overrides=["sft.data.train_size=32", "train.rollout.max_new_tokens=20"])
    assert (demo.sft.data.train_size, demo.sft.data.eval_size, demo.sft.lr) == (32, 128, 7e-5)
    assert (demo.train.rollout.max_new_tokens, demo.train.rollout.prompts_per_step) == (20, 8)


def test_config_files_then_overrides_merge_key_by_key(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("method: rlvr\npolicy:\n  lr: 2.0e-6\n  betas: [0.9, 0.95]\nmodel:\n  name_or_path: m1\n")
    b.write_text("policy:\n  lr: 3.0e-6\nflow:\n  reward:\n    beta: 0.02\n")
    cfg = load_config(TrainConfig, [a, b], ["policy.micro_batch_size=4", "flow.reward.eta=0.5"])
    assert (cfg.method, cfg.model.name_or_path, cfg.policy.lr, cfg.policy.betas) == (
        "rlvr",
        "m1",
        3e-6,
        (0.9, 0.95),
    )
    assert (cfg.policy.micro_batch_size, cfg.flow.reward.beta, cfg.flow.reward.eta) == (4, 0.02, 0.5)
    assert cfg.flow.reward.top_k == 15 and cfg.policy.clip_high == 0.2  # untouched defaults stay
    with pytest.raises(
        ConfigError, match=r"^.*b\.yaml: unknown key\(s\) 'polcy'"
    ):  # names the file it came from
        b.write_text("polcy:\n  lr: 1\n")
        load_config(TrainConfig, [a, b])
    b.write_text("policy:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: policy\.lr: expected a number"):
        load_config(TrainConfig, [a, b])


def test_scalars_are_accepted_where_lists_are_expected():
    """Before, ``report_to=wandb`` was refused ("expected a list"); a scalar is now a list of one. A list of a
    fixed length (``policy.betas``) still needs its items."""
    assert load_config(TrainConfig, overrides=["report_to=tensorboard"]).report_to == ("tensorboard",)
    assert load_config(TrainConfig, overrides=["flow.modes=token_pre"]).flow.modes == ("token_pre",)
    assert load_config(TrainConfig, overrides=["flow.reward.timesteps=0.6"]).flow.reward.timesteps == (0.6,)
    cmp = load_config(CompareConfig, overrides=["seeds=3", "methods=rlfr", "eval_sets=math500"])
    assert (cmp.seeds, cmp.methods, cmp.eval_sets) == ((3,), ("rlfr",), ("math500",))
    with pytest.raises(ConfigError, match=r"policy\.betas: expected a list"):
        load_config(TrainConfig, overrides=["policy.betas=0.9"])
    with pytest.raises(ConfigError, match=r"report_to\[0\].*not one of"):
        load_config(TrainConfig, overrides=["report_to=tensorbored"])


def test_misspelt_keys_get_a_did_you_mean():
    with pytest.raises(
        ConfigError, match=r"'rollout\.num_generation' \(did you mean 'rollout\.num_generations'\?\)"
    ):
        load_config(TrainConfig, overrides=["rollout.num_generation=4"])
    with pytest.raises(ConfigError, match=r"'lr' \(did you mean 'policy\.lr' or 'flow\.lr'\?\)"):
        load_config(TrainConfig, overrides=["lr=1e-5"])  # the key in its section
    with pytest.raises(
        ConfigError, match=r"'train\.flow\.reward\.bta' \(did you mean 'train\.flow\.reward\.beta'"
    ):
        load_config(CompareConfig, overrides=["train.flow.reward.bta=0.1"])
    with pytest.raises(ConfigError, match=r"'data\.evl' \(did you mean 'data\.eval'"):
        load_config(EvalConfig, overrides=["data.evl=math500"])


@pytest.mark.parametrize("cls", COMMAND_CONFIGS, ids=lambda c: c.__name__)
def test_every_command_config_has_help_and_its_yaml_loads_back(cls, tmp_path):
    from rlfr.config import to_yaml

    assert all(help_text for _, _, help_text in describe(cls))
    cfg = load_config(cls)
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(cls, f) == cfg


def test_model_dtype_auto_is_bfloat16_on_a_gpu_that_supports_it_float32_on_cpu(monkeypatch):
    """``model.dtype=auto`` (the default) is resolved in one place, ``resolve_dtype``, with the device the model
    runs on: bfloat16 on a CUDA device with bf16 support, float32 on an older GPU and on CPU."""
    import torch

    from rlfr.policy.loading import resolve_dtype

    assert TrainConfig().model.dtype == "auto" and EvalConfig().dtype == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert (
        resolve_dtype("auto", "cuda") == "bfloat16"
        and resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"
    )
    assert resolve_dtype("auto", "cpu") == "float32"  # cpu=true on a GPU machine
    assert resolve_dtype("float16", "cuda") == "float16" and resolve_dtype("float32", "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert resolve_dtype("auto", "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "cuda") == "float32"


def test_rlfr_needs_an_explicit_flow():
    """Before, ``method=rlfr`` without ``flow.init`` trained a randomly initialised flow and said nothing; the
    run is now refused, naming flow.init and the command that makes a flow; ``flow.init=random`` is explicit."""
    from rlfr.schema import require_flow_init

    with pytest.raises(
        ConfigError, match=r"method=rlfr needs flow\.init.*`rlfr flow-pretrain`.*flow\.init=random"
    ):
        require_flow_init(load_config(TrainConfig))
    for ok in (["flow.init=random"], ["flow.init=runs/flow"], ["method=rlvr"], ["method=entropy"]):
        require_flow_init(load_config(TrainConfig, overrides=ok))
