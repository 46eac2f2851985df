#!/usr/bin/env bash
# Fetches a run's log from every worker to DEST/worker-K.log (default DEST: logs/RUN), or with
# --tail=N prints the last N lines of each worker's log. Metrics, checkpoints and results.json
# are in the run's gs:// workdir (gcloud storage cp -r ILM_BUCKET/RUN .).
#   launch/logs.sh [--dry-run] [--tail=N] RUN [DEST]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage="usage: logs.sh [--dry-run] [--tail=N] RUN [DEST]"
parse_common_args "$@"
tail_n=""
rest=()
for a in "${ARGS[@]}"; do
  case "$a" in
    --tail=*) tail_n=${a#--tail=} ;;
    *) rest+=("$a") ;;
  esac
done
((${#rest[@]} >= 1 && ${#rest[@]} <= 2)) || die "$usage"
run=${rest[0]}
dest=${rest[1]:-logs/$run}
require ILM_PROJECT ILM_ZONE ILM_TPU_NAME
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN must be letters, digits, '.', '_' or '-', got '$run'"
[[ "$ILM_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "ILM_WORKERS must be a positive integer, got '$ILM_WORKERS'"
remote_log="$ILM_REMOTE_LOGS/$run.log"

if [[ -n "$tail_n" ]]; then
  [[ "$tail_n" =~ ^[1-9][0-9]*$ ]] || die "--tail needs a positive integer, got '$tail_n'"
  ssh_all "$(quote_args tail -n "$tail_n" "$remote_log")"
  exit 0
fi
tpu_flags
if ((!DRY_RUN)); then
  mkdir -p "$dest"
fi
for ((w = 0; w < ILM_WORKERS; w++)); do
  run_cmd gcloud compute tpus tpu-vm scp "$ILM_TPU_NAME:$remote_log" "$dest/worker-$w.log" \
    "${TPU_FLAGS[@]}" "--worker=$w"
done
