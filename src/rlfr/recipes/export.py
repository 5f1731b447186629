"""``rlfr export``: a checkpoint's policy as a plain Hugging Face model directory with a model card.

    rlfr export checkpoint=runs/qwen7b-lora/checkpoints/step_000312 merged=runs/qwen7b-lora/merged
    rlfr export checkpoint=runs/qwen7b-lora merged=OUT       # a run directory: its newest intact checkpoint
    rlfr export checkpoint=runs/qwen7b-lora merged=OUT --push-to-hub me/qwen7b-rlfr

For a LoRA run (``policy/`` holds a PEFT adapter) the adapter is merged into its base model
(``W + (alpha / r) B A``, PEFT's ``merge_and_unload``); for a full fine-tuning run the policy is copied as it is.
The result (weights in the run's ``model.dtype`` unless ``dtype``; ``auto`` is resolved on this machine: bfloat16
on a GPU that supports it, float32 on CPU; config, tokenizer) is what ``rlfr eval``, ``rlfr flow-pretrain`` and
vLLM load. ``README.md`` beside the weights is its model card (``rlfr.eval.card``: base model, method, data,
the held-out results the run recorded, the resolved config, the rlfr version, the paper's citation). It is
written to a temporary folder and renamed, so an interrupted export leaves nothing that looks like a model; an
existing ``merged`` directory is refused unless ``--overwrite``. ``--push-to-hub REPO`` then uploads the folder
with ``huggingface_hub`` (``create_repo(exist_ok=True)``, then ``upload_folder``; your ``HF_TOKEN`` or
``huggingface-cli login``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import HfApi

from rlfr.commands import ExportConfig
from rlfr.errors import CheckpointError, ConfigError
from rlfr.eval.card import model_card, run_results
from rlfr.policy.loading import is_adapter_dir, load_model, load_tokenizer
from rlfr.runtime import checkpoint as ckpt_io


def export_merged(
    checkpoint: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write the checkpoint's policy, adapters merged, and its model card to ``out``; -> ``out``."""
    ck = ckpt_io.resolve_checkpoint(checkpoint)
    problems = ckpt_io.verify_checkpoint(ck)
    if problems:
        raise CheckpointError(f"{ck} is damaged: {'; '.join(problems[:3])}")
    config = ckpt_io.load_state(ck).get("config", {})
    model_cfg = config.get("model", {})
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    source = ckpt_io.policy_dir(ck)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what `auto` means on this machine
    trust = model_cfg.get("trust_remote_code", False)
    model = load_model(str(source), dtype or model_cfg.get("dtype", "float32"), trust, device)
    ckpt_io.check_identity(ck, model)
    tok = load_tokenizer(str(source), trust)
    card = model_card(config, ck, run_results(ck.parent.parent), is_adapter_dir(source))
    with ckpt_io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (Path(tmp) / "README.md").write_text(card)
    return out


def upload_to_hub(folder: Path, repo: str) -> str:
    """Upload ``folder`` (weights, tokenizer, model card) to the Hub model repo ``repo`` (made if missing);
    -> the commit's URL."""
    api = HfApi()
    api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo,
        folder_path=str(folder),
        repo_type="model",
        commit_message=f"rlfr export of {folder.name}",
    )
    return str(getattr(commit, "commit_url", commit))


def run(cfg: ExportConfig, overwrite: bool = False, push_to_hub: str | None = None) -> int:
    """``rlfr export`` (its flags: ``--overwrite``, ``--push-to-hub REPO``)."""
    if not (cfg.checkpoint and cfg.merged):
        raise ConfigError("rlfr export needs checkpoint=DIR (a checkpoint or a run directory) and merged=OUT")
    ck = ckpt_io.resolve_checkpoint(cfg.checkpoint)
    out = export_merged(ck, cfg.merged, cfg.dtype, overwrite)
    report = {
        "merged": str(out),
        "checkpoint": str(ck),
        "lora_merged": is_adapter_dir(ckpt_io.policy_dir(ck)),
    }
    if push_to_hub:
        report["pushed"] = upload_to_hub(out, push_to_hub)
    print(json.dumps(report, indent=2))
    return 0
