#!/usr/bin/env bash
# Creates the TPU VM (all its workers). Settings: launch/common.sh.
#   launch/create.sh [--dry-run]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]}; usage: create.sh [--dry-run]"
require ILM_PROJECT ILM_ZONE ILM_TPU_NAME

tpu_flags
extra=()
if [[ "$ILM_SPOT" == 1 ]]; then
  extra+=(--spot)
fi
run_cmd gcloud compute tpus tpu-vm create "$ILM_TPU_NAME" "${TPU_FLAGS[@]}" \
  "--accelerator-type=$ILM_ACCELERATOR" "--version=$ILM_RUNTIME" "${extra[@]}"
