# Shared by the stage scripts (replicate_cpu.sh, powered.sh), sourced after they define stage():
#   run_stages "<stages a user may name>" "<the default, in order>" "$@"
# Every name is checked before anything runs (exit 2 on an unknown one); then the stages run in order.
run_stages() {
  local allowed=$1 default=$2
  shift 2
  for s in "$@"; do
    [[ " $allowed " == *" $s "* ]] || { echo "$(basename "$0"): no stage '$s' ($allowed)" >&2; exit 2; }
  done
  for s in ${@:-$default}; do stage "$s"; done
}
