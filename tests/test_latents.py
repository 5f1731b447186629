"""rlfr.policy.latents: block lookup, block indices, and one detached capture per block per top-level forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from helpers import TINY_ARCHS, enable_checkpointing, tiny_batch, tiny_model
from rlfr.policy.latents import LatentTap, block_indices, decoder_blocks

# ---------------------------------------------------------------- block_indices


@pytest.mark.parametrize(
    "num_blocks, expected",
    [
        (28, [7, 14, 21]),  # Qwen2.5-Math-1.5B / 7B
        (32, [8, 16, 24]),  # Llama3.1-8B
        (36, [9, 18, 27]),  # Qwen2.5-3B
        (30, [8, 15, 22]),  # SmolLM2-135M: Python round(7.5) = 8, round(22.5) = 22 (half to even)
        (4, [1, 2, 3]),  # round(0.75 * 4) = 3 = L - 1
    ],
)
def test_block_indices_published_examples(num_blocks, expected):
    assert block_indices(num_blocks, (0.25, 0.5, 0.75)) == expected


def test_block_indices_edges():
    assert block_indices(8, [1.0]) == [7]  # round(8) = L is moved to L - 1
    assert block_indices(8, [0.0, 1.0]) == [0, 7]
    with pytest.raises(ValueError, match="duplicate"):
        block_indices(2, (0.25, 0.5, 0.75))  # 0.5 -> 1, 1.5 -> 2 -> 1
    with pytest.raises(ValueError, match="duplicate"):
        block_indices(8, (0.9, 1.0))  # 7 and 8 -> 7
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        block_indices(8, (0.5, 1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        block_indices(8, (-0.1,))
    with pytest.raises(ValueError):
        block_indices(8, ())
    with pytest.raises(ValueError):
        block_indices(0, (0.5,))


# ---------------------------------------------------------------- decoder_blocks


class _DDPLike(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _PeftLike(nn.Module):
    """PeftModel.base_model (a LoraModel-like tuner) .model (the HF model)."""

    def __init__(self, model):
        super().__init__()
        self.peft_config = {"default": None}
        self.base_model = nn.Module()
        self.base_model.model = model

    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)


@pytest.mark.parametrize("arch", [*TINY_ARCHS, "qwen3", "mistral", "qwen2_5_vl"])
def test_decoder_blocks_all_archs(arch):
    model = tiny_model(arch, num_layers=4)
    blocks = decoder_blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 4
    if arch == "qwen2_5_vl":  # transformers 5: text stack under model.language_model, not the vision tower
        assert blocks is model.model.language_model.layers
    else:
        assert blocks is model.model.layers
    for wrapped in (_DDPLike(model), _PeftLike(model), _DDPLike(_PeftLike(model)), model.model):
        assert decoder_blocks(wrapped) is blocks


def test_decoder_blocks_search_and_error():
    model = tiny_model("llama", num_layers=4)

    class Renamed(nn.Module):  # unknown attribute path: found by the ModuleList-of-length-L search
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.backbone = nn.Module()
            self.backbone.stack = model.model.layers

    assert decoder_blocks(Renamed()) is model.model.layers

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.proj = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="NoBlocks"):
        decoder_blocks(NoBlocks())


# ---------------------------------------------------------------- LatentTap on tiny models


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("num_layers", [4, 8])
def test_tap_indices(arch, num_layers):
    model = tiny_model(arch, num_layers=num_layers)
    with LatentTap(model) as tap:
        assert tap.num_blocks == num_layers
        assert tap.indices == block_indices(num_layers, (0.25, 0.5, 0.75))
        assert tap.layer_values.dtype == torch.float32
        assert torch.equal(tap.layer_values, torch.tensor(tap.indices, dtype=torch.float32) / num_layers)
    assert LatentTap(model, fractions=(0.5,)).indices == [num_layers // 2]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_latents_match_hidden_states(arch):
    model = tiny_model(arch, num_layers=4)
    batch = tiny_batch(batch=2, seq=12)
    tap = LatentTap(model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    latents = tap.latents()
    assert latents.shape == (3, 2, 12, 32)
    assert not latents.requires_grad
    hidden = out.hidden_states  # (embeddings, block 0, ..., block L-1), the last one after the final norm
    for slot, i in enumerate(tap.indices):
        if i < tap.num_blocks - 1:
            assert torch.equal(latents[slot], hidden[i + 1])
        else:  # hidden_states[L] is norm(output of block L-1) in transformers 5 (all three archs)
            assert torch.equal(model.model.norm(latents[slot]), hidden[i + 1])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logits_bit_identical_with_and_without_tap(arch):
    tapped, plain = tiny_model(arch), tiny_model(arch)
    batch = tiny_batch()
    with torch.no_grad():
        reference = plain(**batch).logits
        tap = LatentTap(tapped)
        assert torch.equal(tapped(**batch).logits, reference)
        tap.remove()
        assert torch.equal(tapped(**batch).logits, reference)
    assert not tapped._forward_pre_hooks
    assert all(not block._forward_hooks for block in decoder_blocks(tapped))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("mode", ["eval_no_grad", "train", "gc_reentrant", "gc_non_reentrant"])
def test_one_capture_per_block_per_forward(arch, mode):
    model = tiny_model(arch)
    if mode.startswith("gc"):
        enable_checkpointing(model, reentrant=mode == "gc_reentrant")
    batch = tiny_batch()
    tap = LatentTap(model)
    first = None
    for k in range(1, 3):
        if mode == "eval_no_grad":
            with torch.no_grad():
                model(**batch)
        else:
            model.train()
            out = model(**batch, labels=batch["input_ids"])
            before = tap.latents()
            out.loss.backward()  # checkpointed blocks re-run here
            assert torch.equal(tap.latents(), before)
            assert all(p.grad is not None for p in decoder_blocks(model).parameters())
        assert tap.capture_count == [k] * 3
        assert tap.sessions == k
        latents = tap.latents()
        assert not latents.requires_grad
        first = latents if first is None else first
        assert torch.equal(latents, first)  # same input, same weights (no optimizer step)


class _CheckpointedStack(nn.Module):
    """Checkpoints each block's ``__call__`` (the pre-transformers-5 / FSDP-wrapper setup), so the forward
    hook fires again when backward recomputes the block; returns a tuple like transformers 4 blocks."""

    def __init__(self, reentrant: bool, num_layers: int = 4, d: int = 16):
        super().__init__()
        self.reentrant = reentrant
        self.layers = nn.ModuleList(_TupleBlock(d) for _ in range(num_layers))

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=self.reentrant)[0]
        return x


class _TupleBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return (torch.tanh(self.lin(x)), None)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recomputation_is_not_recaptured(reentrant):
    torch.manual_seed(0)
    model = _CheckpointedStack(reentrant)
    tap = LatentTap(model)
    x = torch.randn(2, 5, 16, requires_grad=True)
    # Non-reentrant recomputation stops early (before the block returns, so before its forward hook) once
    # the saved tensors are rebuilt; turn that off so the hook does fire again in backward.
    for k in range(1, 3):
        with set_checkpoint_early_stop(False):
            out = model(x)
            before = tap.latents()
            out.square().sum().backward()
        assert tap.capture_count == [k] * 3
        assert tap.recompute_count == [k] * 3  # the re-runs happened and were ignored
        assert torch.equal(tap.latents(), before)
    assert tap.latents().shape == (3, 2, 5, 16)


def test_paused_captures_nothing_and_generate():
    model = tiny_model("qwen2")
    batch = tiny_batch(batch=1, seq=6)
    tap = LatentTap(model)
    with torch.no_grad():
        with tap.paused():
            model(**batch)
            model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert tap.capture_count == [0, 0, 0] and tap.sessions == 0
        with pytest.raises(RuntimeError, match="captured nothing"):
            tap.latents()
        model(**batch)
        captured = tap.latents()
        with tap.paused():
            model(**tiny_batch(batch=1, seq=6, seed=1))
        assert torch.equal(tap.latents(), captured)  # a paused forward leaves the last capture alone
    assert tap.capture_count == [1, 1, 1]


def test_errors_partial_capture_and_double_run():
    model = tiny_model("llama")
    tap = LatentTap(model)
    blocks = decoder_blocks(model)
    with torch.no_grad():
        model(**tiny_batch())
        hidden = torch.randn(1, 4, 32)
        pos = torch.arange(4)[None]
        kwargs = {"position_embeddings": model.model.rotary_emb(hidden, pos)}
        tap.clear()
        blocks[tap.indices[0]](hidden, **kwargs)  # one hooked block, outside a top-level forward
        with pytest.raises(RuntimeError, match=r"blocks \[2, 3\]"):
            tap.latents()
        with pytest.raises(RuntimeError, match="twice"):
            blocks[tap.indices[0]](hidden, **kwargs)


def test_context_manager_and_wrapped_model():
    model = tiny_model("qwen2")
    batch = tiny_batch()
    wrapped = _DDPLike(model)
    with torch.no_grad():
        with LatentTap(model) as tap:  # the unwrapped model: fires whichever of the two is called
            wrapped(**batch)
            via_wrapper = tap.latents()
            model(**batch)
            assert torch.equal(tap.latents(), via_wrapper)
            assert tap.sessions == 2
        assert not model._forward_pre_hooks
        with LatentTap(wrapped) as tap:
            wrapped(**batch)
            assert torch.equal(tap.latents(), via_wrapper)


# ---------------------------------------------------------------- latents_only: stop after the deepest block


def _text_stack(model: nn.Module) -> nn.Module:
    """The decoder (blocks + final norm) of a tiny model: ``model.model``, or its language model for a VL model."""
    return getattr(model.model, "language_model", model.model)


@pytest.mark.parametrize("arch", [*TINY_ARCHS, "qwen2_5_vl"])
@pytest.mark.parametrize("fractions", [(0.25, 0.5, 0.75), (0.5, 0.25), (1.0,)])
def test_latents_only_equals_the_full_forward_and_runs_nothing_after_the_deepest_block(arch, fractions):
    model = tiny_model(arch, num_layers=4)
    batch = tiny_batch(batch=3, seq=10, seed=1)
    batch["attention_mask"][0, :4] = 0  # a left-padded row, as packed prompts are
    tap = LatentTap(model, fractions)
    with torch.no_grad():
        logits = model(**batch).logits
    full = tap.latents()
    deepest = max(tap.indices)
    later = {f"block {i}": b for i, b in enumerate(decoder_blocks(model)) if i > deepest}
    later |= {"final norm": _text_stack(model).norm, "lm head": model.get_output_embeddings()}
    ran: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: ran.append(n)) for n, m in later.items()]
    reached_the_end = False
    with torch.no_grad(), tap.latents_only():
        model(**batch)
        reached_the_end = True  # never: the forward stops inside the deepest block's hook
    assert not reached_the_end and ran == []
    assert torch.equal(tap.latents(), full)  # bit for bit: the same modules ran on the same inputs
    assert tap.capture_count == [2] * len(tap.indices) and tap.sessions == 2
    for h in handles:
        h.remove()
    with torch.no_grad():  # nothing is left half-done: a later full forward is unchanged
        assert torch.equal(model(**batch).logits, logits)
    assert torch.equal(tap.latents(), full) and tap.sessions == 3


def test_latents_only_is_scoped_and_a_paused_tap_runs_the_whole_forward():
    model = tiny_model("llama")
    batch = tiny_batch()
    tap = LatentTap(model, (0.25, 0.5))
    with torch.no_grad():
        reference = model(**batch).logits
        with tap.latents_only(), tap.paused():
            out = model(**batch)  # paused: nothing captured, so nothing stops the forward
        assert torch.equal(out.logits, reference) and tap.sessions == 1
        with tap.latents_only():
            model(**batch)
        assert tap.sessions == 2
        assert torch.equal(model(**batch).logits, reference)  # outside the context: whole forwards again


def test_latents_only_lets_other_errors_through_and_refuses_fsdp_modules():
    from torch.distributed.fsdp import FSDPModule

    model = tiny_model("llama")
    tap = LatentTap(model)
    with pytest.raises(IndexError), torch.no_grad(), tap.latents_only():
        model(
            input_ids=torch.tensor([[10_000]])
        )  # out of the vocabulary: the embedding fails before any block
    block = decoder_blocks(model)[0]  # what fully_shard does to a module's class
    block.__class__ = type(f"FSDP{type(block).__name__}", (FSDPModule, type(block)), {})
    with pytest.raises(RuntimeError, match="FSDP modules"), tap.latents_only():
        pass
