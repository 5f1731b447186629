"""Vision-language policies on a tiny random-init Qwen2.5-VL: data with images, the embedded-vl task, image inputs
through batching and packing, the model's own 3-D positions, no flow reward on image tokens, and every command
end to end (SFT, flow pretraining, RL with exact resume, eval, inspect)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_vl_model_dir
from rlfr.config import load_config
from rlfr.data.examples import load_examples
from rlfr.data.templates import render_prompt, user_content
from rlfr.data.vl_task import QUESTION, vl_task
from rlfr.errors import DataError
from rlfr.policy.forward import policy_forward, position_ids
from rlfr.policy.vision import VisionBatch, expand_image_tokens

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return make_tiny_vl_model_dir(tmp_path_factory.mktemp("tiny_vl") / "model")


@pytest.fixture(scope="module")
def vl(vl_dir):
    from rlfr.policy.loading import load_model, load_tokenizer

    return load_tokenizer(str(vl_dir)), load_model(str(vl_dir)).eval()


def test_expand_image_tokens_by_hand():
    # placeholders I=9: the first image has 2 merged patches, the second 3
    assert expand_image_tokens([5, 9, 6, 9], 9, [2, 3]) == [5, 9, 9, 6, 9, 9, 9]
    assert expand_image_tokens([5, 6], 9, []) == [5, 6]
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        expand_image_tokens([9, 9], 9, [4])


def test_vision_batch_select_slices_patches_by_row():
    # rows 0, 1, 2 hold 1, 0, 2 images of 4, -, (4, 8) patches; each patch's value is its row * 10 + image
    grid = torch.tensor([[1, 2, 2], [1, 2, 2], [1, 2, 4]])
    pv = torch.cat([torch.full((4, 3), 0.0), torch.full((4, 3), 20.0), torch.full((8, 3), 21.0)])
    vb = VisionBatch(pv, grid, torch.tensor([1, 0, 2]), image_token_id=9, merge_size=2)
    assert vb.patches_per_row.tolist() == [4, 0, 12] and vb.tokens_per_row.tolist() == [1, 0, 3]
    sel = vb.select(torch.tensor([2, 0]))
    assert sel.images_per_row.tolist() == [2, 1]
    assert sel.image_grid_thw.tolist() == [[1, 2, 2], [1, 2, 4], [1, 2, 2]]
    assert sel.pixel_values[:, 0].tolist() == [20.0] * 4 + [21.0] * 8 + [0.0] * 4
    empty = vb.select([1])
    assert empty.pixel_values.shape == (0, 3) and empty.image_grid_thw.shape == (0, 3)
    rep = vb.select(slice(0, 1)).repeat_interleave(3)
    assert rep.images_per_row.tolist() == [1, 1, 1] and rep.pixel_values.shape == (12, 3)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_column_in_every_format(tmp_path):
    import pandas as pd

    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20), "red").save(tmp_path / "img" / "a.png")
    Image.new("RGB", (30, 20), "blue").save(tmp_path / "img" / "b.png")
    rows = [
        {"problem": "one", "answer": "1", "image": "img/a.png"},
        {"problem": "two", "answer": "2", "images": ["img/a.png", "img/b.png"]},
        {"problem": "text only", "answer": "3"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = load_examples(tmp_path / "d.jsonl")
    assert [len(e.images) for e in exs] == [1, 2, 0]
    assert exs[1].images[1].getpixel((0, 0)) == (0, 0, 255)
    # parquet: the datasets Image feature layout ({"bytes", "path"}) and raw bytes
    pd.DataFrame(
        [{"problem": "p", "answer": "1", "image": {"bytes": _png("green"), "path": None}}]
    ).to_parquet(tmp_path / "d.parquet")
    assert load_examples(tmp_path / "d.parquet")[0].images[0].getpixel((0, 0)) == (0, 128, 0)
    (tmp_path / "d.csv").write_text('problem,answer,images\np,1,"[""img/a.png"", ""img/b.png""]"\n')
    assert len(load_examples(tmp_path / "d.csv")[0].images) == 2
    (tmp_path / "d.json").write_text(json.dumps([{"problem": "p", "answer": "1", "image": "img/b.png"}]))
    assert len(load_examples(tmp_path / "d.json")[0].images) == 1
    assert load_examples(tmp_path / "d.json", image_field="none")[0].images == ()


def test_bad_image_rows_name_file_row_and_field(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [
        {"problem": "p", "answer": "1", "image": "missing.png"},
        {"problem": "q", "answer": "2", "image": "bad.png"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError, match=r"d\.jsonl, line 1: field 'image': image 'missing.png' does not exist"
    ):
        load_examples(path)
    skipped = load_examples(path, skip_bad_rows=True)
    assert (
        len(skipped) == 0
        and "line 2: field 'image': image 'bad.png' cannot be read" in skipped.report.errors[1]
    )
    with pytest.raises(DataError, match="field 'pic' .* is missing"):
        load_examples(path, image_field="pic")


def test_embedded_vl_task_is_deterministic_and_held_out():
    a, b = vl_task(train_size=20, eval_size=10, seed=3), vl_task(train_size=5, eval_size=10, seed=3)
    assert [e.answer for e in a.eval] == [
        e.answer for e in b.eval
    ]  # held-out split independent of train_size
    assert a.eval[0].images[0].tobytes() == b.eval[0].images[0].tobytes()
    assert all(
        e.problem == QUESTION and len(e.images) == 1 for e in a.train + a.eval
    )  # numbers only in images
    expr = {e.solution.split(" =")[0] for e in a.eval}
    assert not expr & {e.solution.split(" =")[0] for e in a.train}
    ex = a.train[0]
    assert ex.solution.endswith(f"\\boxed{{{ex.answer}}}")
    other = vl_task(train_size=5, eval_size=10, seed=4).eval
    assert [e.solution for e in other] != [e.solution for e in a.eval]  # task_seed picks the problems


def test_image_parts_of_a_chat_prompt(vl):
    tok, _ = vl
    assert user_content("Find x.", 1) == [{"type": "image"}, {"type": "text", "text": "Find x."}]
    assert user_content("A <image> and <image>?", 2) == [
        {"type": "text", "text": "A "},
        {"type": "image"},
        {"type": "text", "text": " and "},
        {"type": "image"},
        {"type": "text", "text": "?"},
    ]
    text = render_prompt("chat", "<image>Find x.", tok, 1, tok.image_token)
    assert text.count("<|image_pad|>") == 1 and "<image>" not in text
    with pytest.raises(ValueError, match="has no place for images"):
        render_prompt("qwen_math_box", "p", tok, 1, tok.image_token)


def _rollout(vl, n_prompts=3, n=2, tokens=6):
    from rlfr.data.sources import render_prompts
    from rlfr.policy.rollout import generate

    tok, model = vl
    exs = vl_task(train_size=n_prompts, eval_size=1, seed=0).train
    torch.manual_seed(0)
    return generate(
        model, tok, render_prompts(exs, "chat", tok, 512), n, tokens, images=[e.images for e in exs]
    )


def test_packed_vl_logprobs_equal_unpadded_single_sample_forward(vl):
    tok, model = vl
    ro = _rollout(vl)
    assert ro.vision is not None and ro.vision.images_per_row.tolist() == [1] * 6
    with torch.no_grad():
        logp, _ = policy_forward(model, ro.input_ids, ro.attention_mask, ro.response_mask, False, ro.vision)
        for i in range(len(ro.completions)):
            r = ro.select(torch.tensor([i]))
            keep = r.attention_mask[0].bool()  # drop the padding: the sample alone, as a user would run it
            ids, att, mask = r.input_ids[:, keep], r.attention_mask[:, keep], r.response_mask[:, keep]
            single, _ = policy_forward(model, ids, att, mask, False, r.vision)
            torch.testing.assert_close(logp[i][ro.response_mask[i]], single[0][mask[0]], atol=1e-5, rtol=1e-5)
        # the 3-D rotary positions are in effect: rlfr's 2-D text positions would give other log-probs
        extra = {"pixel_values": ro.vision.pixel_values, "image_grid_thw": ro.vision.image_grid_thw}
        flat = model(
            input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=position_ids(ro.attention_mask),
            use_cache=False, **extra,
        ).logits  # fmt: skip
    from rlfr.policy.forward import logprobs_from_logits

    wrong = logprobs_from_logits(flat[:, :-1], ro.input_ids[:, 1:])
    m = ro.response_mask[:, 1:]
    assert (wrong[m] - logp[:, 1:][m]).abs().max() > 1e-4


def test_image_tokens_get_no_flow_reward(vl):
    from rlfr.flow import build_pairs, token_scores
    from rlfr.flow.field import FlowField
    from rlfr.flow.shaping import shape_flow_rewards
    from rlfr.policy.latents import LatentTap

    tok, model = vl
    ro = _rollout(vl)
    image = ro.input_ids == tok.image_token_id
    assert image.sum() == ro.vision.tokens_per_row.sum() and not (image & ro.response_mask).any()
    torch.manual_seed(0)
    field = FlowField(dim=32, width=32, depth=2)
    for p in field.parameters():  # move the zero-initialised output layers so that scores vary
        torch.nn.init.normal_(p, std=0.2)
    with LatentTap(model) as tap, torch.no_grad():
        policy_forward(model, ro.input_ids, ro.attention_mask, ro.response_mask, False, ro.vision)
        lat = tap.latents()
        ctx = ro.attention_mask.bool()
        pairs = build_pairs(lat, tap.layer_values, ro.response_mask, ("token_post",), 1, context_mask=ctx)
        scores = token_scores(
            field, lat, tap.layer_values, ro.response_mask, ("token_post",), 1, (0.8,), context_mask=ctx
        )
    rewards = shape_flow_rewards(scores.scores, scores.valid, 0.01, 0.0, 0, False, 1.0)
    assert (rewards != 0).any()
    assert (rewards[image] == 0).all() and not scores.valid[image].any()
    targets = torch.zeros_like(image)
    targets[pairs.batch_index, pairs.position] = True
    assert not (targets & image).any() and (targets <= ro.response_mask).all()


def test_latents_only_with_images_equals_the_full_forward(vl):
    """The forward that stops after the deepest hooked block (flow pretraining, the TRL bridge) gives the latents of
    the full forward bit for bit, with images and the model's 3-D positions."""
    from rlfr.policy.forward import model_inputs
    from rlfr.policy.latents import LatentTap

    tok, model = vl
    ro = _rollout(vl)
    inputs = model_inputs(ro.input_ids, ro.attention_mask, ro.vision)
    with LatentTap(model) as tap, torch.no_grad():
        model(**inputs, use_cache=False)
        full = tap.latents()
        with tap.latents_only():
            model(**inputs, use_cache=False)
        assert tap.sessions == 2 and torch.equal(tap.latents(), full)


def _overrides(vl_dir, out, *extra):
    return [
        f"model.name_or_path={vl_dir}", "data.train=embedded-vl", "data.eval=embedded-vl", "data.train_size=8",
        "data.eval_size=2", f"out_dir={out}", *extra,
    ]  # fmt: skip


def test_vl_pipeline_end_to_end(vl_dir, tmp_path):
    from rlfr.cli import main
    from rlfr.recipes.flow_pretrain import run_flow_pretrain
    from rlfr.recipes.sft import run_sft
    from rlfr.recipes.train import run_train
    from rlfr.schema import FlowPretrainConfig, SFTConfig
    from tiny_run import TINY_TRAIN_OVERRIDES

    sft = run_sft(
        load_config(
            SFTConfig,
            overrides=_overrides(
                vl_dir,
                tmp_path / "sft",
                "steps=2",
                "batch_size=4",
                "micro_batch_size=2",
                "lr=1e-3",
                "eval_max_new_tokens=4",
            ),
        ),  # fmt: skip
        progress=False,
    )
    assert sft.accuracy is not None and sft.loss_last == sft.loss_last
    init = load_file(str(vl_dir / "model.safetensors"))
    tuned = load_file(str(tmp_path / "sft" / "model" / "model.safetensors"))
    vision = [k for k in init if k.startswith("visual.")]
    assert vision and all(torch.equal(init[k], tuned[k]) for k in vision)  # model.freeze_vision (default)
    assert any(not torch.equal(init[k], tuned[k]) for k in init if k not in vision)
    model_dir = sft.model_dir
    fp = run_flow_pretrain(
        load_config(
            FlowPretrainConfig,
            overrides=_overrides(
                model_dir,
                tmp_path / "flow",
                "data.eval=",
                "batch_size=4",
                "epochs=1",
                "heldout_fraction=0.25",
                "flow.depth=2",
            ),
        ),  # fmt: skip
        progress=False,
    )
    meta = json.loads((tmp_path / "flow" / "flow" / "latents.json").read_text())
    assert meta["modality"] == "vision-language" and fp.heldout_loss_last is not None

    def train_cfg(out, *extra):
        from rlfr.schema import TrainConfig

        rl = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith("data.")]
        return load_config(TrainConfig, overrides=_overrides(model_dir, out, *rl, "steps=2", "save_every=1",
                           f"flow.init={fp.flow_dir}", "flow.depth=2", *extra))  # fmt: skip

    full = run_train(train_cfg(tmp_path / "full"), progress=False)
    assert full.final_accuracy is not None and all("flow_reward/mean" in h for h in full.history)
    stopped = run_train(train_cfg(tmp_path / "part"), progress=False, stop_after=1)
    assert stopped.stopped_at == 1
    torch.manual_seed(999)
    run_train(train_cfg(tmp_path / "part"), progress=False, resume=True)
    for name in ("policy/model.safetensors", "flow/flow.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000002" / name))
        b = load_file(str(tmp_path / "part" / "checkpoints" / "step_000002" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ck = tmp_path / "full" / "checkpoints" / "step_000002"
    assert (ck / "policy" / "preprocessor_config.json").is_file()  # the checkpoint loads as a VL model again

    rc = main(["eval", f"model={ck / 'policy'}", "data.eval=embedded-vl", "data.eval_size=2", "max_new_tokens=4",
               f"out={tmp_path / 'eval'}", "cpu=true", "workers=1"])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["datasets"]["embedded-vl"]["n"] == 2
    rc = main(["inspect", f"checkpoint={ck}", "data=embedded-vl", "n_prompts=2", "num_generations=2",
               "max_new_tokens=6", f"out={tmp_path / 'insp'}", "cpu=true"])  # fmt: skip
    assert rc == 0
    stats = json.loads((tmp_path / "insp" / "stats.json").read_text())
    assert stats["rollouts"] == 4 and stats["scored_tokens"] > 0


@pytest.mark.parametrize("method", ["rlvr", "entropy"])
def test_vl_baselines_train(vl_dir, tmp_path, method):
    from rlfr.recipes.train import run_train
    from rlfr.schema import TrainConfig
    from tiny_run import TINY_TRAIN_OVERRIDES

    rl = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith("data.")]
    cfg = load_config(TrainConfig, overrides=_overrides(vl_dir, tmp_path / method, *rl, "steps=1", "data.eval=",
                      f"method={method}", "policy.minibatches=2", "policy.ppo_epochs=2",
                      "reward.funcs=[tiny_run:digit_reward]", "reward.correct_if=verifier"))  # fmt: skip
    # a dense toy reward gives non-zero advantages; 2 minibatches x 2 epochs select rows in random order, so
    # the image inputs follow their rows through Rollout.select
    res = run_train(cfg, progress=False)
    assert len(res.history) == 1
    init = load_file(str(vl_dir / "model.safetensors"))
    final = load_file(str(tmp_path / method / "checkpoints" / "step_000001" / "policy" / "model.safetensors"))
    assert any(not torch.equal(init[k], final[k]) for k in init), "the policy did not move"
    assert all(torch.equal(init[k], final[k]) for k in init if k.startswith("visual."))


def test_latents_json_records_modality_and_refuses_a_text_flow(vl):
    from pathlib import Path

    from rlfr.errors import FlowMismatchError
    from rlfr.flow.store import FlowMeta, check_meta, meta_for

    _, model = vl
    vl_meta = meta_for(model, (0.25, 0.5, 0.75), ("token_post",), 1, "none")
    assert (
        vl_meta.modality == "vision-language" and vl_meta.hidden_size == 32 and vl_meta.num_hidden_layers == 4
    )
    old = {k: v for k, v in vl_meta.to_json().items() if k != "modality"}  # a latents.json of rlfr before VL
    text_meta = FlowMeta.from_json(old, Path("old/latents.json"))
    assert text_meta.modality == "text"
    with pytest.raises(FlowMismatchError, match="modality: flow 'text' vs run 'vision-language'"):
        check_meta(text_meta, vl_meta, "old")
