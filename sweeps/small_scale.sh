#!/usr/bin/env bash
# Issue 12's runs: tiny preset, 2,000 steps (8.2M tokens), LR warm-up 120 steps, seeds paired (the same
# seed gives every arm the same batches). Resumable: rerunning skips completed runs and resumes cut ones.
# Usage: REMOE_OUTPUT=/somewhere [ARMS_ORDER="remoe topk ..."] bash sweeps/small_scale.sh [seeds...]  (pages: reports/remoe_small_scale.md)
set -u
cd "$(dirname "$0")/.."
ROOT=${REMOE_OUTPUT:-outputs}/remoe_small_scale
SEEDS=${*:-1 2 3}
mkdir -p "$ROOT"
declare -A ARMS=(
  [remoe]="model=remoe"
  [topk]="model=topk"
  [dense]="model=dense"
  [remoe_per_layer]="model=remoe model.lambda_per_layer=true"
  [hash]="model=hash"
  [ec]="model=ec"
  [auxfree]="model=auxfree"
  [remoe_l4]="model=remoe size.arch.n_layer=4"   # one-factor arm: depth 4 (tiny has 2 layers)
  [topk_l4]="model=topk size.arch.n_layer=4"
  [dense_l4]="model=dense size.arch.n_layer=4"
  [remoe_rlr01]="model=remoe optim.router_lr_scale=0.1"   # one factor: the routers' LR at 1/10 of the rest
  [remoe_l0_1e-4]="model=remoe model.lambda0=1e-4"       # one factor: no dense Stage I (sparsity stays >= ~0.5)
  [remoe_b64]="model=remoe size.global_batch_size=64 trainer.max_steps=1000"  # 2x tokens/step, same tokens
  [topk_b64]="model=topk size.global_batch_size=64 trainer.max_steps=1000"
)
ORDER=${ARMS_ORDER:-"remoe topk dense remoe_per_layer"}
for seed in $SEEDS; do
  for arm in $ORDER; do
    dir="$ROOT/${arm}_s${seed}"
    python src/train.py seed=$seed name=remoe_small_scale trainer.max_steps=2000 size.warmup=120 ${ARMS[$arm]} \
      eval=none logger=csv routing_log_interval=10 trainer.enable_progress_bar=false skip_completed=true \
      resume=true "hydra.run.dir=$dir" > "$ROOT.${arm}_s${seed}.log" 2>&1 || echo "FAILED $arm seed $seed"
    tail -1 "$ROOT.${arm}_s${seed}.log"
  done
done
