#!/bin/bash
# Phase 1 measurements behind docs/PHASE1.md (seeds, K sweep, MiniLM vs random init), all at
# the `small` budget, run one after another (never two at once on the shared 2-core machine).
#
#   bash benchmarks/phase1_sweep.sh ROOT PART...
#
# PART: cf_generated | cf_ml1m | seeds[:S,S..] | k | k2 | init | init384 | init128 (see the case
# below; seeds alone = 0,1,2). ML1M_CF=NPZ overrides the ML1M CF tables. Each run writes
# ROOT/<name>/results.json and ROOT/<name>.log; a run whose results.json exists is skipped,
# so the script can be rerun after an interruption. Tables: benchmarks/phase1_table.py.
set -u
ROOT=${1:?usage: phase1_sweep.sh ROOT PART...}
shift
PY=${PY:-.venv/bin/python}
mkdir -p "$ROOT"

run() {  # run NAME ARGS...: one phase1 job in ROOT/NAME (skipped if it already finished)
  local name=$1
  shift
  if [[ -f $ROOT/$name/results.json ]]; then echo "skip $name (done)"; return; fi
  echo "$(date -u +%H:%M:%S) start $name (load $(cut -d' ' -f1-3 /proc/loadavg))"
  nice -n 5 "$PY" -m ilm_jax.main "$@" --workdir="$ROOT/$name" > "$ROOT/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc=$? (load $(cut -d' ' -f1-3 /proc/loadavg))"
  grep "^phase1 .* step" "$ROOT/$name.log" | tail -1
}

GEN_CF=$ROOT/cf_generated/cf/embeddings.npz
ML1M_CF=${ML1M_CF:-$ROOT/cf_ml1m/cf/embeddings.npz}
for part in "$@"; do
  seeds=0,1,2
  [[ $part == seeds:* ]] && seeds=${part#seeds:}
  case $part in
    cf_generated)  # frozen ALS tables shared by every generated-catalogue run
      [[ -f $GEN_CF ]] || nice -n 5 "$PY" -m ilm_jax.main --config=configs/cf.py:generated \
        --workdir="$ROOT/cf_generated" > "$ROOT/cf_generated.log" 2>&1 ;;
    cf_ml1m)
      [[ -f $ML1M_CF ]] || nice -n 5 "$PY" -m ilm_jax.main --config=configs/cf.py:ml1m \
        --workdir="$ROOT/cf_ml1m" > "$ROOT/cf_ml1m.log" 2>&1 ;;
    seeds | seeds:*)  # IT / IT-II / IT-UI x model+training seeds (data, held-out set, batches fixed)
      for s in ${seeds//,/ }; do
        for v in it it_ii it_ui; do
          run "gen_${v}_s$s" --config="configs/phase1.py:$v,generated,small" \
            --config.cf_path="$GEN_CF" --config.model.seed=$s --config.train.seed=$s
        done
      done ;;
    k | k2)  # IT-II with K = 1 and 8 query tokens (K = 4 is the seeds part); k: seed 0, k2: seed 1
      s=0; [[ $part == k2 ]] && s=1
      for k in 1 8; do
        run "gen_it_ii_k${k}_s$s" --config="configs/phase1.py:it_ii,generated,small" \
          --config.cf_path="$GEN_CF" --config.model.seed=$s --config.train.seed=$s \
          --config.model.num_query_tokens=$k
      done ;;
    init128)  # IT-II on ML1M, the small default: random init, 2 layers, 128 wide
      run ml1m_it_ii_random128 --config=configs/phase1.py:it_ii,ml1m,small \
        --config.cf_path="$ML1M_CF" ;;
    init)  # the same with the MiniLM text tower (its first 2 layers, 384 wide, 12 heads)
      run ml1m_it_ii_minilm --config=configs/phase1.py:it_ii,ml1m,small \
        --config.cf_path="$ML1M_CF" --config.model.init=minilm ;;
    init384)  # random init at MiniLM's shape (2 layers, 384 wide, 12 heads): init vs width
      run ml1m_it_ii_random384 --config=configs/phase1.py:it_ii,ml1m,small \
        --config.cf_path="$ML1M_CF" --config.model.hidden_size=384 \
        --config.model.num_heads=12 --config.model.intermediate_size=1536 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
