#!/usr/bin/env bash
# The models for the multi-step task's diagnostics (docs/results/multistep/README.md): the demo's stages with
# task=multistep (rlfr.commands.DemoConfig), each run as its own command, then held-out accuracies of the
# SFT and the RL model. Every stage is skipped when its output exists and the RL run resumes from its last
# checkpoint, so rerunning the script continues where it stopped.
#   bash scripts/multistep.sh                   # writes runs/multistep/
#   MULTISTEP_OUT=dir bash scripts/multistep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${RLFR:-}" ] || bash scripts/setup.sh
RLFR=${RLFR:-.venv/bin/rlfr}
PY=${PY:-.venv/bin/python}
OUT=${MULTISTEP_OUT:-runs/multistep}
N_EVAL=${N_EVAL:-128}  # held-out problems of the final evaluations (the first of the 200-problem split)
mkdir -p "$OUT"
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$OUT/times.log"; }

# 1. The stage configs: the demo's (task=multistep) with these changes for the diagnostics: a held-out split
# of 200 problems and a dev split of 200 (for choosing settings), both kept out of training; 32 RL steps saved
# every 8 and all kept (each checkpoint holds the policy and its online-updated flow); no held-out evaluation
# inside sft and train (data.eval='': step 5 evaluates both models alike).
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from rlfr.commands import DemoConfig
from rlfr.config import load_config, to_dict

out = Path(sys.argv[1])
data = [f"{s}.data.{k}" for s in ("sft", "flow", "train") for k in ("eval_size=200", "dev_size=200")]
cfg = load_config(DemoConfig, overrides=[f"out={out}", "task=multistep", *data, "sft.data.eval=", "train.data.eval=",
                                         "train.steps=32", "train.save_every=8", "train.keep_checkpoints=8"])
for stage in ("sft", "flow", "train"):
    (out / f"{stage}.json").write_text(json.dumps(to_dict(getattr(cfg, stage)), indent=2))
(out / "demo_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
EOF

# 2. SFT on worked solutions; 3. flow pretraining on the SFT model's latents of expert solutions.
if [ ! -f "$OUT/sft/model/config.json" ]; then
  stamp "sft start"; $RLFR sft --config "$OUT/sft.json" > "$OUT/sft.log" 2>&1; stamp "sft done"
fi
if [ ! -f "$OUT/flow_pretrain/flow/latents.json" ]; then
  stamp "flow_pretrain start"; $RLFR flow-pretrain --config "$OUT/flow.json" > "$OUT/flow_pretrain.log" 2>&1
  stamp "flow_pretrain done"
fi
# The first and last per-step training loss (metrics.jsonl) of both stages, so that a regenerated SFT model and
# flow can be checked against the ones a diagnostic measured (same config and seed on a CPU give the same losses).
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
losses = {}
for stage, key in (("sft", "sft/loss"), ("flow_pretrain", "flow_pretrain/loss")):
    rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [r[key] for r in rows if key in r]
    if not values:
        sys.exit(f"{out / stage / 'metrics.jsonl'}: no '{key}' rows; was the stage cut off? Delete {out / stage} and rerun")
    losses[f"{stage}_loss_first"], losses[f"{stage}_loss_last"] = values[0], values[-1]
(out / "stage_losses.json").write_text(json.dumps(losses, indent=2) + "\n")
print("stage losses:", json.dumps(losses))
EOF

# 4. RLFR from the SFT model with the pretrained flow and online flow updates (resumes from its checkpoints).
if [ ! -f "$OUT/rl/checkpoints/step_000032/policy/config.json" ]; then
  stamp "rl start"; $RLFR train --config "$OUT/train.json" --resume > "$OUT/rl.log" 2>&1; stamp "rl done"
fi

# 5. Held-out accuracy (greedy and 4 samples at temperature 1) and response lengths of the SFT and the RL model.
for stage in sft rl; do
  [ -f "$OUT/eval_$stage/summary.json" ] && continue
  model=$OUT/sft/model
  [ "$stage" = rl ] && model=$OUT/rl/checkpoints/step_000032/policy
  stamp "eval_$stage start"
  $PY - "$OUT" "$model" "$OUT/eval_$stage" "$N_EVAL" > "$OUT/eval_$stage.log" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

import torch

from rlfr.data.sources import load_source
from rlfr.data.templates import example_prompt
from rlfr.eval.scoring import evaluate, sampled_completions, score_completions
from rlfr.policy.loading import load_model, load_tokenizer
from rlfr.policy.sampler import SamplingParams, TransformersSampler
from rlfr.reward.verifier import Verifier

out, model_dir, dest, n = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
train = json.loads((out / "train.json").read_text())
limit, data = train["eval_max_new_tokens"], train["data"]
template = data["template"]
problems = load_source("embedded-multistep", size=data["eval_size"], task_seed=data["task_seed"])[:n]
tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
prompts = [example_prompt(template, e, tok) for e in problems]
with Verifier(num_workers=1) as v:
    greedy = evaluate(model, tok, problems, template, limit, v)
    torch.manual_seed(0)
    comps = sampled_completions(TransformersSampler(model, tok, 64), prompts,
                                SamplingParams(n=4, max_new_tokens=limit, temperature=1.0))
    sampled = score_completions(problems, prompts, comps, v)
counts = [0] * len(problems)
for r in sampled.records:
    counts[r["index"]] += int(r["correct"])
dest.mkdir(parents=True, exist_ok=True)
with open(dest / "records.jsonl", "w") as f:
    for r in greedy.records + sampled.records:
        f.write(json.dumps({"mode": "sampled" if "sample" in r else "greedy", **r}, default=str) + "\n")
summary = {"model": model_dir, "problems": len(problems), "max_new_tokens": limit,
           "greedy_accuracy": greedy.accuracy, "greedy_mean_response_tokens": greedy.mean_response_tokens,
           "sampled_accuracy": sampled.avg, "samples": 4, "sampled_mean_response_tokens": sampled.mean_response_tokens,
           "problems_with_both_correct_and_wrong_samples": sum(0 < c < 4 for c in counts),
           "sampled_truncated": sum(r["response_tokens"] >= limit for r in sampled.records)}
(dest / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
  stamp "eval_$stage done"
done
