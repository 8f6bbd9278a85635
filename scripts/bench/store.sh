#!/usr/bin/env bash
# `kvgate bench store`: lm:// PUT and GET MiB/s of kvgate store's memory tier
# and its sealed disk tier, side by side in one run with LMCache's own server
# and the loopback copy limit, on one connection and on 8, for the tiny test
# model's 128 KiB chunks and Llama-3-8B's 32 MiB ones; writes
# docs/benchmarks/store/{report.md,report.json,*.svg}.
#
#   scripts/bench/store.sh [extra `kvgate bench store` flags]
#
# LMCache's server comes from scripts/lmcache/install.sh (beside the vLLM
# venv; installed when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
export KVGATE_VLLM_VENV="${KVGATE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/vllm-venv}"
site="$(scripts/lmcache/install.sh | tail -n 1)"
cargo build --release -q --bin kvgate
exec target/release/kvgate bench store \
  --lmcache-cmd "env PYTHONPATH=$site LMCACHE_LOG_LEVEL=WARNING $KVGATE_VLLM_VENV/bin/python -m lmcache.v1.server 127.0.0.1 {port} cpu" \
  "$@"
