#!/usr/bin/env bash
# Phase 2 training + OpenP5 evaluation of the result rows for one dataset, stage by stage,
# inside a wall-clock budget (what docs/RESULTS.md's GPU rows were produced with).
#
#   scripts/phase2_results.sh DATASET WORKDIR STAGE...
#
# STAGE is one of:
#   train:VARIANT[:PHASE1_DIR]   python -m ilm_jax.main --config=configs/phase2.py:VARIANT,DATASET
#                                (VARIANT ilm needs the Phase 1 folder of IT / IT-II / IT-UI)
#   eval:METHOD[,METHOD...][:KEY=VALUE]
#                                python -m ilm_jax.main --config=configs/eval.py:DATASET,nolanguage
#                                restricted to those methods, plus --config.KEY=VALUE if given
#                                (e.g. tasks=sequential); results merge into WORKDIR/results.json
# in the order given. A stage whose estimated time (the last stage of the same kind, plus 20%)
# no longer fits BUDGET_S is skipped and named; a failed stage is named and the rest still run.
#
# Environment (all optional):
#   PY            python to run (default .venv/bin/python, else python3)
#   BUDGET_S      wall-clock budget in seconds (default: none)
#   CF_PATH       CF embeddings npz shared by every stage (the one Phase 1 used)
#   TRAIN_FLAGS   extra --config.* flags for every train stage (e.g. steps, batch size, LLM path)
#   EVAL_FLAGS    extra --config.* flags for every eval stage (e.g. --config.max_users=1000)
#   ON_STAGE      a command run after every stage (e.g. to copy results somewhere)
set -uo pipefail

if [[ $# -lt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
dataset=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
py=${PY:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
budget=${BUDGET_S:-0}
cf_flag=()
[[ -n "${CF_PATH:-}" ]] && cf_flag=("--config.cf_path=${CF_PATH}")
read -r -a train_flags <<< "${TRAIN_FLAGS:-}"
read -r -a eval_flags <<< "${EVAL_FLAGS:-}"
start=$SECONDS
declare -A last=()   # seconds the last stage of each kind took
status=0

for stage in "$@"; do
  IFS=: read -r kind what p1 <<< "$stage"
  case "$kind" in
    train) cmd=("$py" -m ilm_jax.main "--config=configs/phase2.py:${what},${dataset}"
                "--workdir=${workdir}" "${cf_flag[@]}" "${train_flags[@]}")
           [[ -n "${p1:-}" ]] && cmd+=("--config.phase1_dir=${p1}") ;;
    eval)  cmd=("$py" -m ilm_jax.main "--config=configs/eval.py:${dataset},nolanguage"
                "--workdir=${workdir}" "--config.methods=${what}" "${eval_flags[@]}")
           [[ -n "${p1:-}" ]] && cmd+=("--config.${p1}") ;;
    *) echo "phase2_results: unknown stage '${stage}' (train:VARIANT[:PHASE1_DIR] | eval:METHODS)" >&2
       exit 2 ;;
  esac
  elapsed=$((SECONDS - start))
  est=$(( ${last[$kind]:-0} * 12 / 10 ))
  if (( budget > 0 && elapsed + est > budget )); then
    echo "=== SKIP ${stage}: ${elapsed}s used, ~${est}s needed, budget ${budget}s"
    continue
  fi
  echo "=== ${stage} at ${elapsed}s: ${cmd[*]}"
  t0=$SECONDS
  if [[ $budget -gt 0 ]]; then
    timeout --signal=TERM --kill-after=30 $((budget - elapsed)) "${cmd[@]}"
  else
    "${cmd[@]}"
  fi
  rc=$?
  last[$kind]=$((SECONDS - t0))
  echo "=== ${stage} rc=${rc} in ${last[$kind]}s"
  (( rc != 0 )) && status=1
  [[ -n "${ON_STAGE:-}" ]] && bash -c "${ON_STAGE}"
done
echo "=== done in $((SECONDS - start))s"
exit $status
