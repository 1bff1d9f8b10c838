#!/usr/bin/env bash
# Issue 20's regime search: at which CPU setting does Dense x8 < TopK (E=8, k=1) < Dense hold, with
# gaps above seed noise? Each setting is a set of train.py overrides; runs are seed-paired and resumable.
# Usage: REMOE_OUTPUT=/somewhere [ARMS="dense8"] bash sweeps/regime.sh SETTING [seeds...]  (records: reports/regime/)
set -u
cd "$(dirname "$0")/.."
declare -A SETTINGS=(
  [tiny1k]="size=tiny trainer.max_steps=1000 size.warmup=60"                    # ~1 epoch of stdlib
  [tiny1k_lr1]="size=tiny trainer.max_steps=1000 size.warmup=60 size.lr=1e-3 size.min_lr=1e-4"
  [tiny1k_w120]="size=tiny trainer.max_steps=1000 size.warmup=120"              # controller inside warm-up
  [tiny4l1k]="size=tiny size.arch.n_layer=4 trainer.max_steps=1000 size.warmup=120"
  [tiny1k_lr4]="size=tiny trainer.max_steps=1000 size.warmup=120 size.lr=4e-3 size.min_lr=4e-4"  # higher peak LR
  [tiny_d128]="size=tiny size.arch.d_model=128 trainer.max_steps=1000 size.warmup=120"  # width: d_model 64 -> 128
  [small1ep]="size=small trainer.max_steps=480 size.warmup=24"                 # ~1 epoch, 8,192 tok/step
  # optim.ffn_down_lr=fan_in: each FFN's W2 at lr x 4d / fan-in (Dense x8's at lr/8; Dense and TopK exactly as without)
  [tiny1k_fanin]="size=tiny trainer.max_steps=1000 size.warmup=120 optim.ffn_down_lr=fan_in"
  [tiny2k_fanin]="size=tiny trainer.max_steps=2000 size.warmup=120 optim.ffn_down_lr=fan_in"  # two epochs
  [tiny4k_fanin]="size=tiny trainer.max_steps=4000 size.warmup=120 optim.ffn_down_lr=fan_in"  # four epochs: passes (size=study4k)
  [tiny_d128_fanin]="size=tiny size.arch.d_model=128 trainer.max_steps=1000 size.warmup=120 optim.ffn_down_lr=fan_in"
)
SETTING=$1; shift
SEEDS=${*:-1}
ROOT=${REMOE_OUTPUT:-outputs}/regime/$SETTING
mkdir -p "$ROOT"
for seed in $SEEDS; do
  for arm in ${ARMS:-dense topk dense8}; do
    case $arm in dense8) m="model=dense model.ffn_mult=8";; *) m="model=$arm";; esac
    dir="$ROOT/${arm}_s${seed}"
    python src/train.py ${SETTINGS[$SETTING]} $m seed=$seed name=regime_$SETTING eval=none logger=csv \
      trainer.enable_progress_bar=false skip_completed=true resume=true "hydra.run.dir=$dir" \
      > "$dir.log" 2>&1 || echo "FAILED $arm seed $seed"
    tail -1 "$dir.log"
  done
done
