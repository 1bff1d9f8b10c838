#!/usr/bin/env bash
# The study4k replication's two runs whose λ stuck at 2.8e-45 (ReMoE G=4 seed 2; ReMoE λ0 = 1, seed 1),
# trained again at 64fb89e (λ floored at float32's smallest normal number) to compare with the
# replication's runs at 897bd36. Run from a clean clone at 64fb89e; then, for each:
#   python reports/lambda_floor/compare.py <897bd36 run> <this run>
set -euo pipefail
export REMOE_OUTPUT="${REMOE_OUTPUT:-outputs/lambda_floor}"
python src/train.py -m report_on_multirun_end=false trainer.enable_progress_bar=false \
  +sweep=cpu/scale_granularity model=remoe granularity=4 seed=2
python src/train.py -m report_on_multirun_end=false trainer.enable_progress_bar=false \
  +sweep=cpu/lambda0 model=remoe model.lambda0=1.0
