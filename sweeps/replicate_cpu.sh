#!/usr/bin/env bash
# The CPU-scale replication, end to end: routing methods (3 seeds), scaling in E and in G (with Dense
# and Dense x8), lambda0 and alpha sensitivity -- each run evaluated offline (eval=local) -- then the
# report into reports/. About an hour on 2 CPU cores. Rerunning skips completed runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export REMOE_OUTPUT="${REMOE_OUTPUT:-outputs}"
status=0
run() { python src/train.py -m report_on_multirun_end=false trainer.enable_progress_bar=false "$@" || status=1; }
run +sweep=cpu/routing_methods
run +sweep=cpu/scale_experts
run +sweep=cpu/scale_granularity
run +sweep=cpu/scale_granularity model=dense model.ffn_mult=8 granularity=1
run +sweep=cpu/lambda0
run +sweep=cpu/alpha
python src/report.py --runs "$REMOE_OUTPUT/sweeps" --out reports --notes sweeps/cpu_notes.md
exit $status
