#!/usr/bin/env bash
# Two real vLLM-CPU instances share KV through one `kvgate store`: LMCache's
# own LMCacheConnectorV1 in each (remote tier `lm://` to the store, no local
# tier), our CPU connector shim (sitecustomize.py here) on PYTHONPATH. A long
# prompt goes to instance A (it computes and stores the chunks), then the same
# prompt to B, which must load them from the store and answer with A's greedy
# tokens and logprobs exactly. Prints shared_hit.py's JSON; exits non-zero if
# B did not load from the store or the logprobs differ.
#
#   scripts/lmcache/vllm/shared_hit.sh            # KVGATE_BIN (default target/debug/kvgate)
#   TAGS=1 scripts/lmcache/vllm/shared_hit.sh     # also: different cachesalt tags never share
#
# Env: KVGATE_BIN, MODEL_DIR (a tiny model; else target/e2e-vllm/models/qwen
# or one built by scripts/vllm/build_model.py), TOKENS (prompt length, 1400),
# WORK (logs; target/lmcache-vllm), ENGINE_START_S (per instance, 600),
# SHIM_B (B's sitecustomize dir; SHIM_B=scripts/lmcache/vllm/fault is the
# negative control: B loads damaged KV, so the run must fail on logprobs).
# vLLM start-up takes 1-6 min on a 2-core box; both start in parallel.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../../.."
export KVGATE_VLLM_VENV="${KVGATE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/vllm-venv}"
py="$KVGATE_VLLM_VENV/bin/python"
site="${KVGATE_LMCACHE_SITE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/lmcache-site}"
if ! PYTHONPATH="$site" "$py" -c 'import lmcache.v1.cache_engine' 2>/dev/null; then
  site="$(scripts/lmcache/install.sh | tail -n 1)"
fi
KVGATE_BIN="${KVGATE_BIN:-target/debug/kvgate}"
[[ -x "$KVGATE_BIN" ]] || { echo "no kvgate binary at $KVGATE_BIN (set KVGATE_BIN)" >&2; exit 1; }
work="${WORK:-$PWD/target/lmcache-vllm}"
rm -rf "$work" && mkdir -p "$work"
if [[ -z "${MODEL_DIR:-}" ]]; then
  MODEL_DIR="$PWD/target/e2e-vllm/models/qwen"
  if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    MODEL_DIR="$PWD/target/lmcache-vllm-model/qwen"
    [[ -f "$MODEL_DIR/config.json" ]] || nice -n 10 "$py" scripts/vllm/build_model.py qwen "$MODEL_DIR" >&2
  fi
fi
served=qwen

pids=()
cleanup() {  # each vLLM runs in its own session: its group takes the engine core along
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true; done
  sleep 2
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1" >&2; return 1
}

# 1. The store: no config, one shared namespace.
sport="$(free_port)" admin="$(free_port)"
KVGATE_ADMIN_LISTEN="127.0.0.1:$admin" setsid "$KVGATE_BIN" store --listen "127.0.0.1:$sport" \
  >"$work/kvgate.log" 2>&1 &
pids+=($!)
wait_port "$sport"; wait_port "$admin"
sed "s|@REMOTE_URL@|lm://127.0.0.1:$sport|" "$here/lmcache.yaml.in" >"$work/lmcache.yaml"

# 2. Two vLLM-CPU instances, one core each, LMCache + the shim on PYTHONPATH.
#    PYTHONHASHSEED: LMCache's default chunk hash is Python's hash(), the same in
#    every process or nothing ever hits. VLLM_RPC_BASE_PATH: LMCache's lookup
#    sockets, one directory per instance.
start_vllm() {  # NAME PORT CPU SHIM_DIR
  mkdir -p "$work/rpc-$1"
  env PYTHONPATH="$4:$site" PYTHONHASHSEED=0 LMCACHE_CONFIG_FILE="$work/lmcache.yaml" \
    LMCACHE_LOG_LEVEL=INFO KVGATE_LMCACHE_SHIM_DEBUG=1 VLLM_RPC_BASE_PATH="$work/rpc-$1" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    VLLM_SERVER_DEV_MODE=1 VLLM_CPU_OMP_THREADS_BIND="$3" \
    setsid nice -n 10 "$py" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name "$served" --host 127.0.0.1 --port "$2" \
    --block-size 64 --max-model-len 4096 --max-num-seqs 4 --enable-prefix-caching --enforce-eager \
    --kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}' \
    >"$work/vllm-$1.log" 2>&1 &
  pids+=($!)
}
wait_health() {  # NAME PORT PID: seconds until /health answers
  local t0=$SECONDS
  while ! curl -sf "http://127.0.0.1:$2/health" >/dev/null 2>&1; do
    if ! kill -0 "$3" 2>/dev/null; then
      echo "vLLM $1 exited during start-up; its log's tail:" >&2; tail -n 40 "$work/vllm-$1.log" >&2; return 1
    fi
    if (( SECONDS - t0 > ${ENGINE_START_S:-600} )); then echo "vLLM $1 not healthy in time" >&2; return 1; fi
    sleep 2
  done
  echo $((SECONDS - t0))
}
pa="$(free_port)" pb="$(free_port)"
t0=$SECONDS
start_vllm a "$pa" 0 "$here"; pid_a=${pids[-1]}
start_vllm b "$pb" 1 "$(cd "${SHIM_B:-$here}" && pwd)"; pid_b=${pids[-1]}
wait_health a "$pa" "$pid_a" >/dev/null
ready_a=$((SECONDS - t0))
wait_health b "$pb" "$pid_b" >/dev/null
ready_b=$((SECONDS - t0))
echo "vLLM ready: A ${ready_a}s, B ${ready_b}s after start" >&2

tags=()
[[ "${TAGS:-0}" == 1 ]] && tags=(--tags)
rc=0
"$py" "$here/shared_hit.py" --a "http://127.0.0.1:$pa" --b "http://127.0.0.1:$pb" \
  --store-admin "http://127.0.0.1:$admin" --log-a "$work/vllm-a.log" --log-b "$work/vllm-b.log" \
  --model "$served" --tokens "${TOKENS:-1400}" "${tags[@]}" \
  --startup-json "{\"vllm_a_ready_s\": $ready_a, \"vllm_b_ready_s\": $ready_b}" || rc=$?
grep -h "kvgate-lmcache-shim" "$work/vllm-a.log" "$work/vllm-b.log" | sort -u >&2 || true
echo "logs: $work" >&2
exit "$rc"
