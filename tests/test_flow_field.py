"""FlowField: zero init, the authors' key names, official state-dict loading and checkpoints."""

import json

import pytest
import torch

from rlfr.flow.field import FlowField


def _expected_keys(depth: int) -> set[str]:
    keys = {"input_proj.weight", "input_proj.bias", "cond_embed.weight", "cond_embed.bias"}
    for emb in ("time_embed", "layer_embed"):
        keys |= {f"{emb}.freqs"} | {f"{emb}.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for i in range(depth):
        keys.add(f"res_blocks.{i}.in_ln.weight")
        keys |= {f"res_blocks.{i}.mlp.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
        keys |= {f"res_blocks.{i}.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
    keys |= {"final_layer.norm_final.weight"}
    keys |= {f"final_layer.{m}.{p}" for m in ("linear", "adaLN_modulation.1") for p in ("weight", "bias")}
    return keys


def _randomized(field: FlowField, seed: int = 0) -> FlowField:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in field.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return field


def _inputs(n: int, d: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen), torch.rand(n, generator=gen), torch.randn(n, d, generator=gen),
            torch.rand(n, generator=gen))  # fmt: skip


def test_zero_at_init_and_shapes():
    field = FlowField(dim=12, width=16, depth=3)
    out = field(*_inputs(5, 12))
    assert out.shape == (5, 12) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros(5, 12))
    assert field.config == {"dim": 12, "width": 16, "depth": 3, "freq_dim": 256, "eps": 1e-6}
    assert FlowField(dim=7).width == 7  # width defaults to d, as in the paper


def test_state_dict_keys_match_the_authors_layout():
    field = FlowField(dim=8, depth=4)
    sd = field.state_dict()
    assert set(sd) == _expected_keys(4)
    # freqs are persistent buffers of shape (1, 128): 256 features = 128 freqs x (cos, sin).
    assert sd["time_embed.freqs"].shape == (1, 128) and sd["layer_embed.freqs"].shape == (1, 128)
    assert sd["res_blocks.0.adaLN_modulation.1.weight"].shape == (24, 8)  # shift/scale/gate
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (16, 8)  # shift/scale
    assert sd["time_embed.mlp.0.weight"].shape == (8, 256)
    assert float(sd["time_embed.freqs"][0, 0]) == 1.0
    assert float(sd["time_embed.freqs"][0, -1]) == pytest.approx(10000 ** (-127 / 128))


def test_bf16_inputs_give_float32_output():
    field = _randomized(FlowField(dim=8, width=8, depth=1))
    x, t, c, layer = _inputs(4, 8)
    out = field(x.bfloat16(), t, c.bfloat16(), layer)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, field(x.bfloat16().float(), t, c.bfloat16().float(), layer))


def test_official_state_dict_round_trip_infers_sizes():
    field = _randomized(FlowField(dim=6, width=10, depth=3, freq_dim=32))
    rebuilt = FlowField.from_official_state_dict(field.state_dict())
    assert rebuilt.config == {"dim": 6, "width": 10, "depth": 3, "freq_dim": 32, "eps": 1e-6}
    inputs = _inputs(7, 6)
    torch.testing.assert_close(rebuilt(*inputs), field(*inputs), rtol=0, atol=0)
    assert FlowField.from_official_state_dict(FlowField(dim=4, depth=0).state_dict()).depth == 0


def test_official_state_dict_errors_list_the_keys():
    sd = FlowField(dim=6, width=10, depth=2).state_dict()
    missing = {k: v for k, v in sd.items() if k != "res_blocks.1.mlp.2.bias"}
    with pytest.raises(ValueError, match=r"missing keys: \['res_blocks.1.mlp.2.bias'\]"):
        FlowField.from_official_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys: \['extra.weight'\]"):
        FlowField.from_official_state_dict({**sd, "extra.weight": torch.zeros(1)})
    bad = dict(sd, **{"final_layer.linear.weight": torch.zeros(5, 10)})
    with pytest.raises(
        ValueError, match=r"final_layer.linear.weight: checkpoint \(5, 10\) != expected \(6, 10\)"
    ):
        FlowField.from_official_state_dict(bad)
    with pytest.raises(ValueError, match="cannot infer"):
        FlowField.from_official_state_dict({k: v for k, v in sd.items() if k != "input_proj.weight"})
    mixed = {("model." if i % 2 else "") + k: v for i, (k, v) in enumerate(sd.items())}
    with pytest.raises(ValueError):  # a prefix on some keys only is not guessed away
        FlowField.from_official_state_dict(mixed)


@pytest.mark.parametrize("prefix", ["model.", "flow.model."])
def test_the_authors_wrapper_prefixes_load(prefix):
    # their FlowReward saves its `model` attribute (keys model.*); their conversion script writes model.*
    # from flow.model.* training checkpoints
    field = _randomized(FlowField(dim=6, width=10, depth=2))
    sd = {prefix + k: v for k, v in field.state_dict().items()}
    inputs = _inputs(3, 6)
    torch.testing.assert_close(
        FlowField.from_official_state_dict(sd)(*inputs), field(*inputs), rtol=0, atol=0
    )


def test_eps_is_kept_and_changes_the_output(tmp_path):
    a = _randomized(FlowField(dim=6, width=10, depth=2, eps=1e-5))
    b = FlowField.from_official_state_dict(a.state_dict(), eps=1.0)  # a large eps to see its effect
    inputs = _inputs(3, 6)
    assert a.res_blocks[0].in_ln.eps == 1e-5 and b.final_layer.norm_final.eps == 1.0
    assert not torch.allclose(a(*inputs), b(*inputs))
    a.save(tmp_path / "f")
    assert FlowField.load(tmp_path / "f").eps == 1e-5
    with pytest.raises(ValueError, match="eps must be > 0"):
        FlowField(dim=4, eps=0.0)


def test_save_load_safetensors_round_trip(tmp_path):
    field = _randomized(FlowField(dim=6, width=10, depth=2, freq_dim=16))
    field.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["flow.safetensors", "flow_config.json"]
    loaded = FlowField.load(tmp_path / "ckpt")
    inputs = _inputs(3, 6)
    torch.testing.assert_close(loaded(*inputs), field(*inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="convert-flow"):  # a bare file carries no eps: refuse to guess it
        FlowField.load(tmp_path / "ckpt" / "flow.safetensors")
    loaded = FlowField.load(tmp_path / "ckpt" / "flow.safetensors", eps=1e-6)  # official layout, eps given
    torch.testing.assert_close(loaded(*inputs), field(*inputs), rtol=0, atol=0)
    # A config that disagrees with the weights is an error, not a silent choice of one of them.
    (tmp_path / "ckpt" / "flow_config.json").write_text(json.dumps({**field.config, "width": 11}))
    with pytest.raises(ValueError, match="weights imply"):
        FlowField.load(tmp_path / "ckpt")


def test_load_official_bin_with_weights_only(tmp_path):
    field = _randomized(FlowField(dim=6, width=8, depth=2))
    (tmp_path / "official").mkdir()
    torch.save(field.state_dict(), tmp_path / "official" / "flow_model.bin")
    inputs = _inputs(3, 6)
    for path in (tmp_path / "official", tmp_path / "official" / "flow_model.bin"):
        torch.testing.assert_close(FlowField.load(path, eps=1e-6)(*inputs), field(*inputs), rtol=0, atol=0)
    torch.save({"weights": field.state_dict(), "step": object()}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="weights_only"):  # arbitrary pickles are refused, never executed
        FlowField.load(tmp_path / "pickle.pt", eps=1e-6)
    with pytest.raises(FileNotFoundError):
        FlowField.load(tmp_path / "nowhere")
