"""LoRA policies (``model.lora``): parameter counts, the adapter-disabled reference, latent capture, gradient
checkpointing, exact resume, export of a merged model, the merged weights for an inference engine, SFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import enable_checkpointing, tiny_batch, tiny_model
from rlfr.cli import main
from rlfr.config import ConfigError, load_config
from rlfr.policy.forward import policy_forward
from rlfr.policy.latents import LatentTap, decoder_blocks
from rlfr.policy.loading import load_model
from rlfr.policy.lora import AdapterDisabled, apply_lora, merged_state_dict, merged_weights, parameter_counts
from rlfr.recipes.train import build_components, run_train
from rlfr.rl.step import rl_step
from rlfr.runtime.env import make_accelerator
from rlfr.schema import FlowPretrainConfig, LoraConfig, SFTConfig, TrainConfig
from tiny_run import make_tiny_model_dir, tiny_train_config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _lora(model, rank=4, **kw):
    """Fresh adapters with B perturbed (PEFT starts B at 0, which would hide every adapter effect)."""
    torch.manual_seed(1)
    peft = apply_lora(model, LoraConfig(rank=rank, **kw))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft


def _logp(model, batch):
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    mask[:, 6:] = True
    return policy_forward(model, batch["input_ids"], batch["attention_mask"], mask, need_entropy=False)[0]


def test_trainable_parameter_count_by_hand():
    # tiny qwen2: hidden 32, 4 heads of 8, 2 kv heads, MLP 64. LoRA adds r * (in + out) per adapted Linear:
    # q 32->32: 64r, k 32->16: 48r, v 32->16: 48r, o 32->32: 64r, gate/up 32->64: 96r each, down 64->32: 96r
    # = 512r per block; 4 blocks, r = 4: 8192.
    base = tiny_model("qwen2")
    _, total_before = parameter_counts(base)
    peft = apply_lora(base, LoraConfig(rank=4, target_modules=TARGETS))
    trainable, total = parameter_counts(peft)
    assert trainable == 4 * 512 * 4 == 8192
    assert total == total_before + 8192
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in peft.named_parameters())
    # at the start B = 0: the adapted model computes exactly what the base did
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(peft(**batch).logits, tiny_model("qwen2")(**batch).logits)


def test_lora_config_is_checked():
    with pytest.raises(ConfigError, match="model.lora.rank must be >= 0"):
        load_config(TrainConfig, overrides=["model.lora.rank=-1"])
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(TrainConfig, overrides=["model.lora.rank=4", "model.lora.target_modules=[]"])
    with pytest.raises(ConfigError, match="flow-pretrain keeps the policy frozen"):
        load_config(FlowPretrainConfig, overrides=["model.lora.rank=4"])
    with pytest.raises(ValueError, match="Linear layers of this model: .*q_proj"):
        apply_lora(tiny_model("qwen2"), LoraConfig(rank=4, target_modules=("no_such_proj",)))
    assert load_config(SFTConfig, overrides=["model.lora.rank=8"]).model.lora.rank == 8


def test_reference_with_adapters_off_is_the_base_model():
    batch = tiny_batch(seq=12)
    base_logp = _logp(tiny_model("llama"), batch)
    peft = _lora(tiny_model("llama"), dropout=0.1)
    peft.train()
    ref = AdapterDisabled(peft, peft)
    with torch.no_grad():
        assert torch.equal(_logp(ref, batch), base_logp)  # bit for bit: the base weights are untouched
        assert not torch.allclose(_logp(peft.eval(), batch), base_logp)  # the adapters do change the policy
    peft.train()
    with torch.no_grad():
        _logp(ref, batch)
    assert peft.training  # the reference runs in eval mode and gives the training mode back
    assert not list(ref.parameters())  # it owns no weights: no second copy of the model


def test_the_tap_finds_the_blocks_and_sees_only_policy_forwards():
    peft = _lora(tiny_model("qwen2"))
    tap = LatentTap(peft, (0.25, 0.5, 0.75))
    assert decoder_blocks(peft) is peft.get_base_model().model.layers
    ref = AdapterDisabled(peft, peft)
    batch = tiny_batch()
    with torch.no_grad():
        peft(**batch)
        captured = tap.latents()
        with tap.paused():
            ref(**tiny_batch(seed=1))
    assert torch.equal(tap.latents(), captured)  # the reference's forward leaves the capture alone
    assert tap.sessions == 1 and tap.capture_count == [1, 1, 1]


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_the_adapters(reentrant):
    model = tiny_model("qwen2")
    enable_checkpointing(model, reentrant)
    peft = _lora(model)
    peft.train()
    tap = LatentTap(peft)
    batch = tiny_batch()
    out = peft(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n: p.grad for n, p in peft.named_parameters()}
    # reentrant checkpointing with frozen embeddings gives the adapters gradient only because apply_lora
    # made the embedding output require grad (enable_input_require_grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert tap.capture_count == [1, 1, 1]


def test_one_capture_per_policy_forward_in_an_rl_step(tiny_dir, tmp_path):
    cfg = tiny_train_config(
        tiny_dir,
        tmp_path / "run",
        "model.lora.rank=4",
        "policy.track_kl=true",
        "model.gradient_checkpointing=true",
    )
    c, data = build_components(cfg, make_accelerator(cpu=True))
    calls = {"policy": 0, "ref": 0}
    peft = c.acc.unwrap_model(c.policy)
    peft.register_forward_pre_hook(lambda m, a: calls.__setitem__("policy", calls["policy"] + 1))
    ref_forward = c.ref.forward
    c.ref.forward = lambda *a, **kw: (calls.__setitem__("ref", calls["ref"] + 1), ref_forward(*a, **kw))[1]
    try:
        stats = rl_step(c, 0, data.train[:2], data.prompts[:2])
    finally:
        c.reward.verifier.close()
        c.flow.tap.remove()
    # 2 prompts x 2 samples in micro-batches of 2: a latent-statistics forward + 2 update forwards, and a
    # reference forward per micro-batch (generate runs the base model's own forward, paused)
    assert calls["ref"] == 2
    policy_forwards = calls["policy"] - calls["ref"]  # the reference runs through the PEFT model too
    assert policy_forwards == 3
    assert c.flow.tap.sessions == policy_forwards
    assert c.flow.tap.capture_count == [policy_forwards] * 3
    assert "policy/kl" in stats


@pytest.fixture(scope="module")
def lora_runs(tiny_dir, tmp_path_factory):
    """A 4-step LoRA run, and the same run stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("lora")
    extra = ("steps=4", "model.lora.rank=4", "model.lora.alpha=8", "policy.track_kl=true",
             "reward.funcs=[tiny_run:digit_reward]", "reward.correct_if=verifier", "policy.lr=5e-3")  # fmt: skip
    full = root / "full"
    run_train(tiny_train_config(tiny_dir, full, *extra), progress=False, final_eval=False)
    part = root / "part"
    run_train(tiny_train_config(tiny_dir, part, *extra), progress=False, stop_after=2, final_eval=False)
    torch.manual_seed(999)  # the resumed run must not depend on the process's RNG state
    with pytest.raises(ConfigError, match="model.lora.rank"):
        run_train(tiny_train_config(tiny_dir, part, *extra, "model.lora.rank=8"), progress=False, resume=True)
    run_train(tiny_train_config(tiny_dir, part, *extra), progress=False, resume=True, final_eval=False)
    return full, part


def test_lora_run_resumes_bit_exact(lora_runs, tiny_dir):
    full, part = lora_runs
    ck_full, ck_part = (d / "checkpoints" / "step_000004" for d in (full, part))
    assert not (ck_full / "policy" / "model.safetensors").exists()  # the adapter only, in PEFT's format
    config = json.loads((ck_full / "policy" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    a = load_file(str(ck_full / "policy" / "adapter_model.safetensors"))
    b = load_file(str(ck_part / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * len(TARGETS) * 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k), "the adapters did not train"
    fa, fb = (load_file(str(ck / "flow" / "flow.safetensors")) for ck in (ck_full, ck_part))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    optim = torch.load(ck_full / "optim.pt", weights_only=True)["policy"]
    assert len(optim["param_groups"][0]["params"]) == len(optim["state"]) == len(a)  # adapter state only
    rows = [
        [json.loads(x).get("reward") for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in lora_runs
    ]
    assert rows[0] == rows[1]


def test_export_merged_equals_the_adapter_model(lora_runs, tiny_dir, tmp_path, capsys):
    ck = lora_runs[0] / "checkpoints" / "step_000004"
    out = tmp_path / "merged"
    assert main(["export", f"checkpoint={lora_runs[0]}", f"merged={out}"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert main(["export", f"checkpoint={ck}", f"merged={out}"]) == 2  # exists: refused
    from peft import PeftModel

    adapter_model = PeftModel.from_pretrained(load_model(str(tiny_dir)), str(ck / "policy")).eval()
    merged = load_model(str(out)).eval()
    batch = tiny_batch(seq=10)
    batch["input_ids"] = batch["input_ids"] % merged.config.vocab_size
    with torch.no_grad():
        want = adapter_model(**batch).logits
        assert torch.allclose(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)
        # the checkpoint's policy/ loads directly too (merged on load), as `rlfr eval --model` does
        assert torch.equal(load_model(str(ck / "policy"))(**batch).logits, merged(**batch).logits)
        assert not torch.allclose(load_model(str(tiny_dir))(**batch).logits, want)  # training changed it
    vllm = ["eval", f"model={ck / 'policy'}", "data.eval=embedded", "backend=vllm"]
    capsys.readouterr()
    assert main(vllm) == 2  # vLLM loads whole models: the error says to export first
    assert "rlfr export checkpoint=" in capsys.readouterr().err
    evals = tmp_path / "eval"
    args = ["eval", f"model={out}", "data.eval=embedded", "limit=2", "data.eval_size=2", "max_new_tokens=4",
            "workers=1", "cpu=true", f"out={evals}"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((evals / "results.json").read_text())["datasets"]["embedded"]["n"] == 2


def test_merged_weights_are_merge_and_unload_without_peft_prefixes():
    peft = _lora(tiny_model("qwen2"), rank=4, alpha=16)
    want = copy.deepcopy(peft).merge_and_unload().state_dict()
    got = merged_state_dict(peft)
    assert got.keys() == want.keys() == tiny_model("qwen2").state_dict().keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same sum W + (alpha / r) B A
    assert not any("lora_" in k or "base_layer" in k or k.startswith("base_model") for k in got)
    fresh = tiny_model("qwen2")
    fresh.load_state_dict(dict(merged_weights(peft)))
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, peft(**batch).logits, atol=1e-5, rtol=1e-5)
    assert peft.peft_config  # the model itself is left unmerged


def test_sft_with_lora_writes_the_adapter_and_a_merged_model(tiny_dir, tmp_path):
    from rlfr.recipes.sft import run_sft

    cfg = load_config(
        SFTConfig,
        overrides=[f"model.name_or_path={tiny_dir}", "model.lora.rank=4", "data.train_size=16", "data.eval_size=2",
                   "batch_size=4", "micro_batch_size=4", "steps=2", "lr=1e-2", f"out_dir={tmp_path / 'sft'}",
                   "eval_max_new_tokens=2"],
    )  # fmt: skip
    res = run_sft(cfg, progress=False, evaluate_after=False)
    out = tmp_path / "sft"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert res.model_dir == str(out / "model") and (out / "model" / "config.json").is_file()
    merged, base = load_model(res.model_dir), load_file(str(tiny_dir / "model.safetensors"))
    weights = merged.state_dict()
    changed = [k for k in base if not torch.equal(base[k], weights[k])]
    assert changed and all(any(t in k for t in TARGETS) for k in changed)  # only adapted layers moved
