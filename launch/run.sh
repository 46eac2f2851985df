#!/usr/bin/env bash
# Runs one job on every worker: mounts ILM_BUCKET's bucket with gcsfuse at ILM_MOUNT (unless
# already mounted), then python -m ilm_jax.main --config=CONFIG --workdir=ILM_MOUNT/PREFIX/RUN,
# which is gs://BUCKET/PREFIX/RUN (main refuses gs:// workdirs: the jobs write with local file
# APIs). On a TPU VM every worker runs the same command; jax.distributed.initialize() finds its
# peers by itself. Output goes to the terminal and to ~/ilm_logs/RUN.log on each worker (see
# logs.sh).
#   launch/run.sh [--dry-run] [--detach] CONFIG RUN [MAIN_FLAG ...]
#     CONFIG     e.g. configs/phase1.py:tiny (a path inside the checkout)
#     RUN        run name: letters, digits, '.', '_', '-' (the job writes gs://BUCKET/PREFIX/RUN)
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
bucket_parts
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN must be letters, digits, '.', '_' or '-', got '$run'; $usage"
[[ "$config" != -* ]] || die "CONFIG must come first, got '$config'; $usage"

mount_dir=$ILM_MOUNT
while [[ "$mount_dir" == */ ]]; do mount_dir=${mount_dir%/}; done
[[ -n "$mount_dir" && "$mount_dir" != . ]] || die "ILM_MOUNT must name a folder, got '$ILM_MOUNT'"
# The mount point as a word for the worker's shell: the same absolute path on every worker
# (multi-host needs one workdir path), so a relative ILM_MOUNT is taken from the worker's $HOME.
if [[ "$mount_dir" == /* ]]; then
  mnt=$(quote "$mount_dir")
else
  mnt="\"\$HOME\"/$(quote "$mount_dir")"
fi
workdir="$mnt/$(quote "${BUCKET_PREFIX:+$BUCKET_PREFIX/}$run")"
log="../$ILM_REMOTE_LOGS/$run.log"
gcsfuse="gcsfuse --implicit-dirs $(quote "$BUCKET_NAME") $mnt"
mount="{ mountpoint -q $mnt || { mkdir -p $mnt && $gcsfuse; }; }"
job="$(quote_args .venv/bin/python -m ilm_jax.main "--config=$config") --workdir=$workdir"
if ((${#flags[@]})); then
  job+=" $(quote_args "${flags[@]}")"
fi
prefix="$mount && $(quote_args cd "$ILM_REMOTE_DIR")"
prefix+=" && $(quote_args mkdir -p "../$ILM_REMOTE_LOGS")"
if ((detach)); then
  remote="$prefix && { nohup $job > $(quote "$log") 2>&1 < /dev/null & }"
else
  remote="set -o pipefail; $prefix && $job 2>&1 | tee $(quote "$log")"
fi
ssh_all "$remote"
