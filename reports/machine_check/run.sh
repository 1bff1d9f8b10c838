#!/usr/bin/env bash
# The study4k replication's TopK without load balancing, seed 1, trained again from the replication's
# commit (897bd36) on another machine, to measure how far the machine alone moves a run. Run from a clean
# clone at 897bd36; then:
#   python reports/machine_check/compare.py reports/runs/<the run> reports/machine_check/runs/<the run>
set -euo pipefail
export REMOE_OUTPUT="${REMOE_OUTPUT:-outputs/machine_check}"
python src/train.py -m report_on_multirun_end=false trainer.enable_progress_bar=false \
  +sweep=cpu/lb_ablation model=topk seed=1
