#!/usr/bin/env bash
# Starts one vLLM-CPU instance with prefix caching, KV events (+ replay) and the
# render endpoints, in the foreground. For hand use; the e2e tier starts its own.
#
#   scripts/vllm/serve.sh MODEL_DIR PORT EVENTS_PORT REPLAY_PORT [extra vllm flags...]
set -euo pipefail
VENV="${KVGATE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/vllm-venv}"
model="$1" port="$2" events="$3" replay="$4"
shift 4
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_SERVER_DEV_MODE=1
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
  --served-model-name "$(basename "$model")" --host 127.0.0.1 --port "$port" \
  --enable-prefix-caching --enforce-eager --enable-scale-out \
  --kv-events-config "{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:$events\", \"topic\": \"kv\", \"replay_endpoint\": \"tcp://*:$replay\"}" \
  "$@"
