#!/usr/bin/env bash
# CI smoke of `kvgate bench compare` (well under a minute): kvgate's gateway with
# precise_prefix and round_robin in front of a small, fast simulated fleet, and
# the overhead runs; fails on any failed request, a router that does not
# start, or precise routing not beating round robin's hit rate. Peers join when
# KVGATE_PEERS_BIN names a directory with sglang-router, vllm-router and envoy.
set -euo pipefail
cd "$(dirname "$0")/../.."

routers=kvgate:precise_prefix,kvgate:round_robin
peers=()
if [ -n "${KVGATE_PEERS_BIN:-}" ]; then
    routers=$routers,sglang-router:cache_aware,vllm-router:cache_aware,envoy
    peers=(--peers-bin "$KVGATE_PEERS_BIN")
fi
out=${KVGATE_SMOKE_OUT:-target/bench-smoke}

cargo build --release -p kvgate
target/release/kvgate bench compare "${peers[@]}" \
    --routers "$routers" --engines 4 --time-scale 10 \
    --rates 20,40 --stage-seconds 2 --groups 8 --warmup-seconds 1 --warmup-rate 20 \
    --num-blocks 512 --prompt-scale 0.25 --output-tokens 8 \
    --no-reuse-rates 20 --overhead-seconds 1 --overhead-concurrency 8 \
    --title "kvgate bench compare: CI smoke" --check --out "$out"
test -s "$out/report.md" && test -s "$out/report.json" && test -s "$out/ttft_p90.svg"
