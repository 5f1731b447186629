#!/usr/bin/env bash
# The RLFR vs RLVR study of docs/results/study/PROTOCOL.md, as one command. Every step is skipped when its
# output exists and an interrupted RL run resumes from its last checkpoint, so rerunning continues the study.
#   bash scripts/study.sh                  # writes runs/study/ (report: runs/study/main/report.md)
#   STUDY_OUT=dir DEMO_DIR=dir bash scripts/study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RLFR=${RLFR:-.venv/bin/rlfr}
PY=${PY:-.venv/bin/python}
OUT=${STUDY_OUT:-runs/study}
DEMO=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"

# 1. The start model and flow: the demo's SFT model and its pretrained flow.
[ -f "$DEMO/summary.json" ] || $RLFR demo "out=$DEMO" progress=false
START=$DEMO/sft/model
FLOW=$DEMO/flow_pretrain/flow

COMMON=(train.data.train_size=1024 train.data.dev_size=200 train.data.eval_size=500 train.rollout.prompts_per_step=8
  train.rollout.num_generations=4 train.rollout.max_new_tokens=40 train.rollout.batch_size=32
  train.policy.micro_batch_size=32 train.flow.warmup_ratio=0 train.eval_max_new_tokens=48 train.save_every=8
  train.policy.track_kl=true train.steps=48 progress=false)

# 2. The token_pre flow of the context-mode ablation: the demo's flow stage with token_pre.
if [ ! -f "$OUT/flow_token_pre/flow/latents.json" ]; then
  $PY -c "import json,sys; json.dump(json.load(open('$DEMO/demo_config.json'))['flow'], sys.stdout)" \
    > "$OUT/flow_pretrain_demo.json"
  $RLFR flow-pretrain --config "$OUT/flow_pretrain_demo.json" "flow.modes=[token_pre]" \
    "out_dir=$OUT/flow_token_pre"
fi

# 3. The learning rate, chosen once for RLVR on the dev split (seed 0).
LRS=(5e-6 1e-5 2e-5)
for lr in "${LRS[@]}"; do
  [ -f "$OUT/lr_$lr/results.json" ] && continue  # done
  $RLFR compare "start=$START" methods=rlvr seeds=0 eval_sets=embedded-dev "out=$OUT/lr_$lr" "${COMMON[@]}" \
    "train.policy.lr=$lr" > "$OUT/lr_$lr.log" 2>&1
done
LR=$($PY - "$OUT" "${LRS[@]}" <<'EOF'
import json, sys
out, lrs = sys.argv[1], sys.argv[2:]
acc = {lr: json.load(open(f"{out}/lr_{lr}/results.json"))["arms"]["rlvr"]["eval"]["embedded-dev"]["greedy_mean"]
       for lr in lrs}
best = max(sorted(lrs, key=float), key=lambda lr: acc[lr])  # ties: the smaller lr (max keeps the first)
json.dump({"dev_greedy_accuracy": acc, "chosen": best}, open(f"{out}/chosen_lr.json", "w"), indent=2)
print(best)
EOF
)
echo "learning rate chosen on the dev split: $LR (runs/study/chosen_lr.json)"

# 4. The main comparison and the ablations: RLVR and RLFR seed by seed first (the primary comparison gets its
# pairs first), then the full set, which reuses those runs and adds the entropy arm and the ablations.
EVAL=("eval_sets=[embedded,embedded-transfer:100]" eval_samples=4)
$RLFR compare "start=$START" "flow=$FLOW" "methods=[rlvr,rlfr]" "seeds=[0,1,2]" "${EVAL[@]}" "out=$OUT/main" \
  "${COMMON[@]}" "train.policy.lr=$LR"
# each ablation: NAME METHOD key=value ... (a scalar is a list of one: flow.modes=token_pre)
$RLFR compare "start=$START" "flow=$FLOW" "methods=[rlvr,rlfr,entropy]" "seeds=[0,1,2]" "${EVAL[@]}" \
  "ablations=[beta0.005 rlfr flow.reward.beta=0.005, beta0.05 rlfr flow.reward.beta=0.05,
    token_pre rlfr flow.modes=token_pre flow.init=$OUT/flow_token_pre/flow, frozen rlfr flow.update=false]" \
  ablation_seeds=0 "out=$OUT/main" "${COMMON[@]}" "train.policy.lr=$LR"
