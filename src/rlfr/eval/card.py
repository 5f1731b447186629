"""The model card of an exported policy: ``README.md`` next to its weights (``rlfr export``).

``model_card(config, checkpoint, results, lora)`` -> the card's text: Hugging Face metadata (``base_model`` when
the run started from a Hub model, ``datasets`` when it trained on a Hub dataset, ``library_name``, tags; made
with ``huggingface_hub.ModelCardData``), then what was trained (base model, method and its main settings, data),
the held-out results the run recorded (``run_results``), the resolved configuration (YAML), the rlfr version,
how to load it, and the citation of the paper (arXiv 2510.10201).

``run_results(run_dir)`` reads what the run itself measured: the held-out greedy accuracy ``rlfr train`` logs
(``eval/accuracy`` in ``metrics.jsonl``, at each step it evaluated) and ``rlfr compare``'s evaluations of the
run's final model (``eval_<set>.json``: greedy pass@1, and avg@K when it sampled).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from huggingface_hub import ModelCardData

from rlfr import __version__
from rlfr.runtime.metrics import read_metrics
from rlfr.schema import canonical

CITATION = """@article{zhang2025rlfr,
  title={RLFR: Extending Reinforcement Learning for LLMs with Flow Environment},
  author={Zhang, Jinghao and Zheng, Naishan and Li, Ruilin and Cheng, Dongzhou and Liang, Zheming and Zhao, Feng and Wang, Jiaqi},
  journal={arXiv preprint arXiv:2510.10201},
  year={2025}
}"""
EMBEDDED_MODEL = ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")  # rlfr's name, the Hub's
METHODS = {
    "rlfr": "RLFR: GRPO with a verifiable outcome reward plus token-level flow rewards from the policy's own latents",
    "rlvr": "RLVR: GRPO with the verifiable outcome reward only",
    "entropy": "GRPO with entropy-shaped advantages (Cheng et al. 2025)",
}


def hub_id(name: str) -> str | None:
    """``name`` as a Hugging Face Hub repo id (``org/name``), or None for a local path or another source."""
    if name == EMBEDDED_MODEL[0]:
        return EMBEDDED_MODEL[1]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def run_results(run_dir: Path) -> dict[str, float]:
    """{description: value} of the held-out results recorded in ``run_dir`` (module docstring)."""
    out = {}
    for row in read_metrics(run_dir):
        if "eval/accuracy" in row:  # a step evaluated again after a resume: its last row wins
            out[f"held-out greedy accuracy at step {row['step']} (rlfr train)"] = row["eval/accuracy"]
    for path in sorted(run_dir.glob("eval_*.json")):
        saved = json.loads(path.read_text())
        name = path.stem.removeprefix("eval_")
        greedy = saved.get("greedy") or []
        if greedy:
            out[f"{name}: greedy pass@1 over {len(greedy)} problems (rlfr compare)"] = sum(greedy) / len(
                greedy
            )
        samples, sampled = saved.get("config", {}).get("samples", 0), saved.get("sampled")
        if samples and sampled:
            out[f"{name}: avg@{samples} (rlfr compare)"] = sum(sampled) / (samples * len(sampled))
    return out


def _metadata(config: dict) -> str:
    base = hub_id(str(config.get("model", {}).get("name_or_path", "")))
    train = str(config.get("data", {}).get("train", ""))
    data = hub_id(train) if train and not train.startswith("embedded") else None
    tags = [
        "rlfr",
        "reinforcement-learning",
        "grpo",
        *(["flow-rewards"] if config.get("method") == "rlfr" else []),
    ]
    card = ModelCardData(
        base_model=base, datasets=[data] if data else None, library_name="transformers", tags=tags
    )
    return card.to_yaml()


def model_card(config: dict, checkpoint: Path, results: dict[str, float], lora: bool) -> str:
    """The text of ``README.md`` for the policy of ``checkpoint`` trained with ``config`` (a ``TrainConfig``
    dict, as the checkpoint saved it)."""
    model, data = config.get("model", {}), config.get("data", {})
    method = config.get("method", "rlfr")
    base = model.get("name_or_path", "?")
    lines = [f"---\n{_metadata(config)}\n---", "", f"# {Path(base).name} + {method.upper()} (rlfr)", ""]
    lines += [
        f"A causal language model trained with rlfr {__version__} (reinforcement learning with flow rewards, RLFR: "
        f"[arXiv 2510.10201](https://arxiv.org/abs/2510.10201)), exported from `{checkpoint}`"
        + (" (LoRA adapters merged into the base model)." if lora else "."),
        "",
        f"- **Base model:** `{base}`" + (f" ([{hub_id(base)}](https://huggingface.co/{hub_id(base)}))" if hub_id(base) else ""),
        f"- **Method:** {METHODS.get(method, method)}",
    ]  # fmt: skip
    if method == "rlfr":
        flow, shaping = config.get("flow", {}), config.get("flow", {}).get("reward", {})
        lines.append(
            f"  (flow reward beta {shaping.get('beta')}, eta {shaping.get('eta')}, top-k {shaping.get('top_k')}, "
            f"timesteps {shaping.get('timesteps')}; flow started from `{flow.get('init')}`, online updates "
            f"{'on' if flow.get('update', True) else 'off'})"
        )
    held = canonical(config).get("data", {}).get("eval")
    held = (
        f"{data.get('eval_size')} rows held out of it"
        if held == "auto"
        else f"`{held}` ({data.get('eval_size')} problems)"
    )
    lines += [
        f"- **Training data:** `{data.get('train')}` (template `{data.get('template')}`); held-out data: {held}",
        f"- **Steps:** {config.get('steps')} RL steps of {config.get('rollout', {}).get('prompts_per_step')} prompts "
        f"x {config.get('rollout', {}).get('num_generations')} samples; seed {config.get('seed')}",
        "",
        "## Evaluation",
        "",
    ]  # fmt: skip
    if results:
        lines += ["| result | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in results.items())]
    else:
        lines.append(
            "The run recorded no held-out evaluation; `rlfr eval model=THIS_DIR data.eval=...` measures one."
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)",
        "```",
        "",
        "## Configuration",
        "",
        "The resolved training configuration (valid input to `rlfr train --config`):",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
