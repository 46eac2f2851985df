#!/usr/bin/env bash
# Runs one job on every worker: python -m ilm_jax.main --config=CONFIG --workdir=ILM_BUCKET/RUN.
# On a TPU VM every worker runs the same command; jax.distributed.initialize() finds its peers
# by itself. Output goes to the terminal and to ~/ilm_logs/RUN.log on each worker (see logs.sh).
#   launch/run.sh [--dry-run] [--detach] CONFIG RUN [MAIN_FLAG ...]
#     CONFIG     e.g. configs/phase1.py:tiny (a path inside the checkout)
#     RUN        run name: letters, digits, '.', '_', '-'; the workdir is ILM_BUCKET/RUN
#     MAIN_FLAG  more flags for ilm_jax.main, e.g. --config.steps=1000
#     --detach   start the job under nohup and return (it survives a dropped SSH session)
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage="usage: run.sh [--dry-run] [--detach] CONFIG RUN [MAIN_FLAG ...]"
parse_common_args "$@"
detach=0
rest=()
for a in "${ARGS[@]}"; do
  if [[ "$a" == --detach ]]; then
    detach=1
  else
    rest+=("$a")
  fi
done
((${#rest[@]} >= 2)) || die "expected CONFIG and RUN; $usage"
config=${rest[0]}
run=${rest[1]}
flags=("${rest[@]:2}")
require ILM_PROJECT ILM_ZONE ILM_TPU_NAME ILM_BUCKET
[[ "$ILM_BUCKET" == gs://?* ]] || die "ILM_BUCKET must be a gs:// path, got '$ILM_BUCKET'"
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN must be letters, digits, '.', '_' or '-', got '$run'; $usage"
[[ "$config" != -* ]] || die "CONFIG must come first, got '$config'; $usage"

workdir="${ILM_BUCKET%/}/$run"
log="../$ILM_REMOTE_LOGS/$run.log"
job=(.venv/bin/python -m ilm_jax.main "--config=$config" "--workdir=$workdir" "${flags[@]}")
prefix="$(quote_args cd "$ILM_REMOTE_DIR") && $(quote_args mkdir -p "../$ILM_REMOTE_LOGS")"
if ((detach)); then
  remote="$prefix && { nohup $(quote_args "${job[@]}") > $(quote "$log") 2>&1 < /dev/null & }"
else
  remote="set -o pipefail; $prefix && $(quote_args "${job[@]}") 2>&1 | tee $(quote "$log")"
fi
ssh_all "$remote"
