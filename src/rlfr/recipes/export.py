"""``rlfr export``: a checkpoint's policy as a plain Hugging Face model directory.

    rlfr export --checkpoint runs/qwen7b-lora/checkpoints/step_000312 --merged runs/qwen7b-lora/merged
    rlfr export --checkpoint runs/qwen7b-lora --merged OUT        # a run directory: its newest intact checkpoint

For a LoRA run (``policy/`` holds a PEFT adapter) the adapter is merged into its base model
(``W + (alpha / r) B A``, PEFT's ``merge_and_unload``); for a full fine-tuning run the policy is copied as it is.
The result (weights in the run's ``model.dtype`` unless ``--dtype``, config, tokenizer) is what ``rlfr eval``,
``rlfr flow-pretrain`` and vLLM load. It is written to a temporary folder and renamed, so an interrupted export
leaves nothing that looks like a model; an existing ``--merged`` directory is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlfr.errors import CheckpointError
from rlfr.policy.loading import is_adapter_dir, load_model, load_tokenizer
from rlfr.runtime import checkpoint as ckpt_io


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory, or a run directory (its newest)"
    )
    p.add_argument("--merged", required=True, help="output directory of the merged Hugging Face model")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="default: the run's model.dtype",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --merged directory")


def export_merged(
    checkpoint: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write the checkpoint's policy, adapters merged, to ``out``; -> ``out``."""
    ck = ckpt_io.resolve_checkpoint(checkpoint)
    problems = ckpt_io.verify_checkpoint(ck)
    if problems:
        raise CheckpointError(f"{ck} is damaged: {'; '.join(problems[:3])}")
    model_cfg = ckpt_io.load_state(ck).get("config", {}).get("model", {})
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    source = ckpt_io.policy_dir(ck)
    model = load_model(
        str(source), dtype or model_cfg.get("dtype", "float32"), model_cfg.get("trust_remote_code", False)
    )
    ckpt_io.check_identity(ck, model)
    tok = load_tokenizer(str(source), model_cfg.get("trust_remote_code", False))
    with ckpt_io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def run(args) -> int:
    ck = ckpt_io.resolve_checkpoint(args.checkpoint)
    out = export_merged(ck, args.merged, args.dtype, args.overwrite)
    lora = is_adapter_dir(ckpt_io.policy_dir(ck))
    print(json.dumps({"merged": str(out), "checkpoint": str(ck), "lora_merged": lora}, indent=2))
    return 0
