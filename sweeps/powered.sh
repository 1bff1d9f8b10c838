#!/usr/bin/env bash
# The powered study (issue 40; README "The powered study"), in stages that can run over several sittings:
# rerunning a stage skips its completed runs and resumes cut ones from their last.ckpt. Every run trains at
# size=study4k on data=packages (one pass over ~50M+ unique tokens: no sequence seen twice), eval=none,
# seeds paired (the same seed gives every method the same batches). Run every stage from ONE commit, on
# one CPU model (the records say which).
#
#   bash sweeps/powered.sh [stage ...]      # default: every stage, in this order
#
#   stage     runs  what                                                   predicted (2-core AMD EPYC, alone)
#   corpus       -  download + check the pinned packages, train the tokenizer, pack (once)        ~5 min
#   regime       9  Dense, Dense x8, TopK E=8 x seeds 1-3: Dense x8 < TopK < Dense?               ~2.0 h
#   e128        14  TopK, ReMoE x E=128 x seeds 1-7                                                ~4.2 h
#   e64         14  TopK, ReMoE x E=64 x seeds 1-7                                                 ~3.0 h
#   e32         10  TopK, ReMoE x E=32 x seeds 1-5                                                 ~1.8 h
#   records      -  copy the compact records to reports/powered/runs/, then the report into reports/powered/
#                   (run this stage from a checkout of the current code: the report is the current report.py's)
# If the regime check fails, stop after `regime` and record it (reports/powered/notes.md).
set -uo pipefail
cd "$(dirname "$0")/.."
export REMOE_OUTPUT="${REMOE_OUTPUT:-outputs}"
status=0
REPORT_ARGS="--runs reports/powered/runs --notes reports/powered/notes.md"  # the committed page (a test rebuilds it)
run() { python src/train.py -m report_on_multirun_end=false trainer.enable_progress_bar=false "$@" || status=1; }
stage() {
  case $1 in
    corpus) python -c "from remoe.data import LMDataModule as M; d = M(source='packages', seq_len=128); d.prepare_data(); d.setup('fit'); print(d.corpus_fingerprint, len(d.train_ds), 'training sequences of 128 tokens')" || status=1 ;;
    regime) run +sweep=powered/regime ;;
    e128) run +sweep=powered/experts experts=128 seed=1,2,3,4,5,6,7 ;;
    e64) run +sweep=powered/experts experts=64 seed=1,2,3,4,5,6,7 ;;
    e32) run +sweep=powered/experts experts=32 seed=1,2,3,4,5 ;;
    records) python src/report.py --keep-records "$REMOE_OUTPUT/sweeps" reports/powered/runs || status=1
             python src/report.py $REPORT_ARGS --out reports/powered || status=1 ;;
  esac
}
STAGES="corpus regime e128 e64 e32 records"
source sweeps/stages.sh
run_stages "$STAGES" "$STAGES" "$@"
exit $status
