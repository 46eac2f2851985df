#!/usr/bin/env bash
# Deletes the TPU VM (without a confirmation prompt). The gs:// workdirs are kept.
#   launch/delete.sh [--dry-run]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]}; usage: delete.sh [--dry-run]"
require ILM_PROJECT ILM_ZONE ILM_TPU_NAME

tpu_flags
run_cmd gcloud compute tpus tpu-vm delete "$ILM_TPU_NAME" "${TPU_FLAGS[@]}" --quiet
