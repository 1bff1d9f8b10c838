#!/usr/bin/env bash
# The CPU replication (issue 20), in stages that can run over several sittings: rerunning a stage skips
# its completed runs and resumes cut ones from their last.ckpt. Every run trains at size=study4k
# (conf/size/study4k.yaml: the tiny architecture, 4,000 steps = four passes over the stdlib corpus, each
# FFN's W2 at lr x 4d / its width) and is evaluated offline (eval=local); seeds are paired (the same seed
# gives every method the same batches). Run every stage from ONE commit (the records say which).
#
#   bash sweeps/replicate_cpu.sh [stage ...]      # default: every stage but restore, in this order
#   bash sweeps/replicate_cpu.sh restore methods  # on a fresh machine: the committed records first
#
#   stage        runs  what                                                          recorded*
#   restore         -  copy committed compact records (REMOE_RECORDS, default reports/runs) back into
#                      $REMOE_OUTPUT/sweeps, so that on a fresh machine the stages skip runs already done
#   methods        21  dense, Dense x8, hash, EC, TopK, aux-free, ReMoE x seeds 1-3 (E=8)    4.1 h
#   experts        18  TopK, ReMoE x E=4,16,32 x seeds 1-3                                   2.8 h
#   granularity    12  TopK, ReMoE x G=2,4 x seeds 1-3                                       2.9 h
#   lb              6  TopK without aux loss, ReMoE with plain L1 x seeds 1-3                 2.1 h
#   per_layer       3  ReMoE with one lambda controller per layer x seeds 1-3                 29 min
#   sensitivity     8  ReMoE x lambda0 = 1e-16,1e-12,1e-4,1 and alpha = 1.05,1.1,1.3,1.5      1.3 h
#   records         -  copy the compact records to reports/runs/, then the report into reports/
#   * wall_time_s summed as recorded at commit 897bd36 on 2-core CPUs (Intel Xeon, AMD EPYC), some runs beside
#     other work: 13.8 h in all (`docs/cpu-replication.md`; ~10 min per run alone on the AMD EPYC). E=8 / G=1 /
#     LB on / lambda0=1e-8 / alpha=1.2 / global lambda are the methods stage's runs, not run again. The
#     records stage refuses (exit 2) while reports/runs holds records of another setting under the same
#     names (as the size=study replication's did: they moved to reports/study1k/runs).
set -uo pipefail
cd "$(dirname "$0")/.."
export REMOE_OUTPUT="${REMOE_OUTPUT:-outputs}"
RECORDS="${REMOE_RECORDS:-reports/runs}"  # restore's source: where compact records are committed
# the committed report's command (tests/test_report.py regenerates reports/ with these arguments)
REPORT_ARGS="--runs reports/runs --notes sweeps/cpu_notes.md --bench reports/bench/bench_*.json"
status=0
run() { python src/train.py -m report_on_multirun_end=false trainer.enable_progress_bar=false "$@" || status=1; }
stage() {
  case $1 in
    methods) run +sweep=cpu/routing_methods ;;
    experts) run +sweep=cpu/scale_experts ;;
    granularity) run +sweep=cpu/scale_granularity ;;
    lb) run +sweep=cpu/lb_ablation ;;
    per_layer) run +sweep=cpu/lambda_per_layer ;;
    sensitivity) run +sweep=cpu/lambda0; run +sweep=cpu/alpha ;;
    restore) python src/report.py --keep-records "$RECORDS" "$REMOE_OUTPUT/sweeps" || status=1 ;;
    records) python src/report.py --keep-records "$REMOE_OUTPUT/sweeps" reports/runs || status=1
             python src/report.py $REPORT_ARGS --out reports || status=1 ;;
  esac
}
STAGES="methods experts granularity lb per_layer sensitivity records"
source sweeps/stages.sh
run_stages "restore $STAGES" "$STAGES" "$@"
exit $status
