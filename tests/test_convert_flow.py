"""``rlfr convert-flow``: the authors' saved flow (their key names, shapes and ``model.`` prefix) becomes an
rlfr flow directory whose forward pass and scores equal a reference written here from their code's maths."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rlfr.cli import main
from rlfr.flow import velocity_deviation
from rlfr.flow.store import FlowMismatchError, load_flow
from tiny_run import make_tiny_model_dir

D, W, DEPTH, EPS = 32, 24, 2, 1e-5  # the tiny model: hidden 32; its config gets rms_norm_eps 1e-5


def _authors_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of their SimpleMLPAdaLNTimePos, as their FlowReward saves
    it (``save_pretrained`` writes ``self.model.state_dict()`` under ``model.``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)[None]
    sd = {
        "input_proj.weight": r(W, D),
        "input_proj.bias": r(W),
        "cond_embed.weight": r(W, D),
        "cond_embed.bias": r(W),
    }
    for emb in ("time_embed", "layer_embed"):
        sd |= {f"{emb}.freqs": freqs.clone(), f"{emb}.mlp.0.weight": r(W, 256), f"{emb}.mlp.0.bias": r(W),
               f"{emb}.mlp.2.weight": r(W, W), f"{emb}.mlp.2.bias": r(W)}  # fmt: skip
    for i in range(DEPTH):
        b = f"res_blocks.{i}."
        sd |= {b + "in_ln.weight": 1 + r(W), b + "mlp.0.weight": r(W, W), b + "mlp.0.bias": r(W),
               b + "mlp.2.weight": r(W, W), b + "mlp.2.bias": r(W),
               b + "adaLN_modulation.1.weight": r(3 * W, W), b + "adaLN_modulation.1.bias": r(3 * W)}  # fmt: skip
    sd |= {"final_layer.norm_final.weight": 1 + r(W), "final_layer.linear.weight": r(D, W),
           "final_layer.linear.bias": r(D), "final_layer.adaLN_modulation.1.weight": r(2 * W, W),
           "final_layer.adaLN_modulation.1.bias": r(2 * W)}  # fmt: skip
    return {"model." + k: v for k, v in sd.items()}


def _reference_velocity(sd, x, t, c, layer, eps):
    """Their forward, written out with tensor operations: y = l + c + t embeddings; AdaLN residual MLP
    blocks with RMSNorm (computed in float32, eps); final RMSNorm -> modulate -> linear."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}

    def lin(name, h):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def rms(name, h):
        return sd[name + ".weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    def emb(name, v):
        args = v[:, None] * sd[name + ".freqs"]
        return lin(
            name + ".mlp.2", F.silu(lin(name + ".mlp.0", torch.cat([torch.cos(args), torch.sin(args)], -1)))
        )

    h = lin("input_proj", x)
    y = emb("layer_embed", layer) + lin("cond_embed", c) + emb("time_embed", t)
    for i in range(DEPTH):
        shift, scale, gate = lin(f"res_blocks.{i}.adaLN_modulation.1", F.silu(y)).chunk(3, -1)
        m = rms(f"res_blocks.{i}.in_ln", h) * (1 + scale) + shift
        h = h + gate * lin(f"res_blocks.{i}.mlp.2", F.silu(lin(f"res_blocks.{i}.mlp.0", m)))
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(y)).chunk(2, -1)
    return lin("final_layer.linear", rms("final_layer.norm_final", h) * (1 + scale) + shift)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": EPS}))
    return path


def test_convert_and_match_the_reference(model_dir, tmp_path):
    sd = _authors_state_dict()
    (tmp_path / "ckpt").mkdir()
    torch.save(sd, tmp_path / "ckpt" / "flow_model.bin")
    their_cfg = {"num_layers_flow": DEPTH, "hook_layers_percentile": "0.25+0.5+0.75",
                 "flow_context_mode": "token_post", "flow_shift": "1"}  # fmt: skip
    (tmp_path / "flow_config_3B.json").write_text(json.dumps(their_cfg))
    out = tmp_path / "converted"
    rc = main(["convert-flow", f"src={tmp_path / 'ckpt'}", f"model={model_dir}", f"out={out}",
               f"flow_config={tmp_path / 'flow_config_3B.json'}"])  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "latents.json").read_text())
    # their RL config's flow_context_mode token_post is how their RL *used* the flow; the weights were trained
    # with token_pre (their LLaMA-Factory/examples/train_flow/*.yaml), and that is what the directory records
    assert meta == {"fractions": [0.25, 0.5, 0.75], "modes": ["token_pre"], "shift": 1, "latent_norm": "none",
                    "hidden_size": D, "num_hidden_layers": 4, "pairing": "target", "modality": "text"}  # fmt: skip
    bundle = load_flow(out)
    field = bundle.field
    assert field.eps == EPS and field.depth == DEPTH and field.width == W and bundle.norm is None

    g = torch.Generator().manual_seed(1)
    n = 6
    x, c = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    t, layer = torch.rand(n, generator=g), torch.full((n,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(field(x, t, c, layer), _reference_velocity(sd, x, t, c, layer, EPS))
        # the score: FlowReward.forward at their rewarding timestep 0.8 with the debias weight t / (1 - t)
        noise = torch.randn(1, n, D, generator=g)
        ts = torch.full((n,), 0.8)
        xt = 0.8 * x + 0.2 * noise[0]
        ref = ((_reference_velocity(sd, xt, ts, c, layer, EPS) - (x - noise[0])) ** 2).mean(-1) * 4.0
        torch.testing.assert_close(velocity_deviation(field, x, c, layer, (0.8,), noise=noise), ref)


def test_flow_prefix_and_mixed_checkpoints(model_dir, tmp_path):
    # their hook model's checkpoint: LLM weights next to flow.model.* (their convert_state_dict.py keeps flow.*)
    sd = {"flow." + k: v for k, v in _authors_state_dict().items()}
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"))
    out = tmp_path / "c"
    assert (
        main(["convert-flow", f"src={tmp_path / 'model.safetensors'}", f"model={model_dir}", f"out={out}"])
        == 0
    )
    assert load_flow(out).field.depth == DEPTH


def test_bad_sources_fail_clearly(model_dir, tmp_path, capsys):
    torch.save({"w": object()}, tmp_path / "evil.bin")
    assert (
        main(["convert-flow", f"src={tmp_path / 'evil.bin'}", f"model={model_dir}", f"out={tmp_path / 'o'}"])
        == 2
    )
    assert "weights_only" in capsys.readouterr().err
    wrong = {k: v for k, v in _authors_state_dict().items()}
    wrong["model.input_proj.weight"] = torch.zeros(W, D + 1)
    torch.save(wrong, tmp_path / "wrong.bin")
    assert (
        main(["convert-flow", f"src={tmp_path / 'wrong.bin'}", f"model={model_dir}", f"out={tmp_path / 'o'}"])
        == 2
    )
    assert "mis-shaped" in capsys.readouterr().err
    # an rlfr directory without latents.json (e.g. written by hand) is refused by every reader
    (tmp_path / "bare").mkdir()
    with pytest.raises(FlowMismatchError, match="convert-flow"):
        load_flow(tmp_path / "bare")


# their LLaMA-Factory/examples/train_flow/qwen2_5_1.5b_flow.yaml, abridged (depth 2 for the tiny flow)
AUTHORS_PRETRAIN_YAML = """\
### model
model_name_or_path: Qwen/Qwen2.5-Math-1.5B
### flow config
add_flowhook: true
num_layers_flow: 2
hook_layers_percentile: "0.25+0.5+0.75"
flow_context_mode: token_pre
flow_batch_mul: 4
### method
stage: sft
freeze_llm: true
### dataset
template: qwen
cutoff_len: 8192
"""


def test_an_authors_flow_is_refused_by_token_post_rl_unless_the_mismatch_is_allowed(
    model_dir, tmp_path, capsys, monkeypatch
):
    from rlfr.recipes.train import run_train
    from tiny_run import tiny_train_config

    torch.save(_authors_state_dict(), tmp_path / "flow_model.bin")
    (tmp_path / "flow.yaml").write_text(AUTHORS_PRETRAIN_YAML)
    out = tmp_path / "authors"
    assert main(["convert-flow", f"src={tmp_path / 'flow_model.bin'}", f"model={model_dir}", f"out={out}",
                 f"flow_config={tmp_path / 'flow.yaml'}"]) == 0  # fmt: skip
    assert "a flow trained with modes=['token_pre'] shift=1" in capsys.readouterr().out
    meta = json.loads((out / "latents.json").read_text())
    assert (meta["modes"], meta["shift"], meta["fractions"]) == (["token_pre"], 1, [0.25, 0.5, 0.75])

    def cfg(run, *extra):  # rlfr train's default pairing: token_post, shift 1
        return tiny_train_config(model_dir, tmp_path / run, "steps=2", "save_every=1", f"flow.init={out}",
                                 "flow.latent_norm=none", f"flow.depth={DEPTH}", *extra)  # fmt: skip

    with pytest.raises(FlowMismatchError) as refused:
        run_train(cfg("refused"), progress=False)
    msg = str(refused.value)
    assert "modes: flow ['token_pre'] vs run ['token_post']" in msg
    assert (
        "trained with modes=['token_pre'] shift=1, this run pairs latents with modes=['token_post'] shift=1"
        in msg
    )
    assert "flow.allow_mode_mismatch=true" in msg
    # the option reproduces the authors' setup on purpose, says so, and the flow keeps its record
    run_train(cfg("allowed", "flow.allow_mode_mismatch=true"), progress=False, stop_after=1)
    assert "the flow was trained with modes=['token_pre'] shift=1; this run scores and trains it on " in (
        capsys.readouterr().out
    )
    res = run_train(cfg("allowed", "flow.allow_mode_mismatch=true"), progress=False, resume=True)
    assert res.history and all("flow_reward/mean" in h for h in res.history)
    saved = json.loads(
        (tmp_path / "allowed" / "checkpoints" / "step_000002" / "flow" / "latents.json").read_text()
    )
    assert saved["modes"] == ["token_pre"]
    # rlfr inspect on that checkpoint scores the pairs the run scored, not the flow's record
    from rlfr.recipes import inspect_flow

    used, real = [], inspect_flow.token_scores
    monkeypatch.setattr(inspect_flow, "token_scores", lambda *a, **k: used.append(a[4:6]) or real(*a, **k))
    assert main(["inspect", f"checkpoint={tmp_path / 'allowed'}", "n_prompts=1", "num_generations=2",
                 "max_new_tokens=4", f"out={tmp_path / 'inspect'}"]) == 0  # fmt: skip
    assert used == [(["token_post"], 1)] * (
        1 + inspect_flow.NOISE_DRAWS
    )  # the scoring and the repeatability draws
    # any other difference is still refused, option or not
    with pytest.raises(FlowMismatchError, match=r"fractions: flow \[0.25, 0.5, 0.75\] vs run \[0.5\]"):
        run_train(cfg("fractions", "flow.allow_mode_mismatch=true", "flow.fractions=[0.5]"), progress=False)
