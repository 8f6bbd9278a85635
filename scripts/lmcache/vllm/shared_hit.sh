#!/usr/bin/env bash
# Two real vLLM-CPU instances behind `kvgate gateway` share KV through one
# `kvgate store`: LMCache's own LMCacheConnectorV1 in each (remote tier
# `lm://` to the store, no local tier), our CPU connector shim
# (sitecustomize.py here) on PYTHONPATH. The gateway and the store hold the
# same two contracts (acme, globex) and master key: the gateway tags every
# forwarded request with its contract's salt (`lmcache.tag.cachesalt`), the
# store maps each tag back to its contract and seals each chunk to disk.
#
# Instance A is served as `qwen-a`, B as `qwen-b` (the same weights, so the
# same LMCache keys): a request names the instance it must reach, which
# KV-aware routing would otherwise, by design, keep away from the one that
# has to load from the store. shared_hit.py drives the phases:
#   shared    a prompt computed on A is loaded by B, identical greedy logprobs;
#   contracts the same prompt under globex on B loads nothing, under acme it does;
#   restart   A computes a prompt, the store and B restart, B loads it from disk
#             (LMCache's lm:// client never reconnects, so B restarts too).
# Prints shared_hit.py's JSON; exits non-zero if a check fails.
#
#   scripts/lmcache/vllm/shared_hit.sh            # KVGATE_BIN (default target/debug/kvgate)
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

pids=()
cleanup() {  # each process runs in its own session: a vLLM's group takes the engine core along
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
stop() {  # PID: the process group, and wait until it is gone
  kill -TERM -- "-$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "-$1" 2>/dev/null || true
}
sha256() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

# 1. The contracts, as both the gateway and the store hold them.
printf 'shared-hit key material' >"$work/master.key"
key_acme="acme-$RANDOM$RANDOM" key_globex="globex-$RANDOM$RANDOM"
contracts="
  master_key: {file: $work/master.key}
  contracts: [{id: acme}, {id: globex}]"

# 2. The store: contracts by tag (an untagged key is refused), every chunk sealed to disk.
sport="$(free_port)" admin="$(free_port)"
cat >"$work/store.yaml" <<YAML
listen: 127.0.0.1:$sport
admin_listen: 127.0.0.1:$admin
memory_bytes: 268435456
disk: {dir: $work/disk, max_bytes: 1073741824, write: through}
contracts:$contracts
  audit: {path: $work/store-audit.jsonl}
YAML
start_store() {
  setsid "$KVGATE_BIN" store --config "$work/store.yaml" >>"$work/kvgate-store.log" 2>&1 &
  store_pid=$!
  pids+=("$store_pid")
  wait_port "$sport"; wait_port "$admin"
}
start_store
sed "s|@REMOTE_URL@|lm://127.0.0.1:$sport|" "$here/lmcache.yaml.in" >"$work/lmcache.yaml"

# 3. Two vLLM-CPU instances, one core each, LMCache + the shim on PYTHONPATH.
#    PYTHONHASHSEED: LMCache's default chunk hash is Python's hash(), the same in
#    every process or nothing ever hits. VLLM_RPC_BASE_PATH: LMCache's lookup
#    sockets, one directory per instance.
start_vllm() {  # NAME PORT CPU SHIM_DIR LOG
  mkdir -p "$work/rpc-$1"
  env PYTHONPATH="$4:$site" PYTHONHASHSEED=0 LMCACHE_CONFIG_FILE="$work/lmcache.yaml" \
    LMCACHE_LOG_LEVEL=INFO KVGATE_LMCACHE_SHIM_DEBUG=1 VLLM_RPC_BASE_PATH="$work/rpc-$1" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    VLLM_CPU_OMP_THREADS_BIND="$3" \
    setsid nice -n 10 "$py" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name "qwen-$1" --host 127.0.0.1 --port "$2" \
    --block-size 64 --max-model-len 4096 --max-num-seqs 4 --enable-prefix-caching --enforce-eager \
    --kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}' \
    >"$5" 2>&1 &
  pids+=($!)
}
wait_health() {  # NAME PORT PID LOG: seconds until /health answers
  local t0=$SECONDS
  while ! curl -sf "http://127.0.0.1:$2/health" >/dev/null 2>&1; do
    if ! kill -0 "$3" 2>/dev/null; then
      echo "vLLM $1 exited during start-up; its log's tail:" >&2; tail -n 40 "$4" >&2; return 1
    fi
    if (( SECONDS - t0 > ${ENGINE_START_S:-600} )); then echo "vLLM $1 not healthy in time" >&2; return 1; fi
    sleep 2
  done
  echo $((SECONDS - t0))
}
pa="$(free_port)" pb="$(free_port)"
shim_b="$(cd "${SHIM_B:-$here}" && pwd)"
t0=$SECONDS
start_vllm a "$pa" 0 "$here" "$work/vllm-a.log"; pid_a=${pids[-1]}
start_vllm b "$pb" 1 "$shim_b" "$work/vllm-b.log"; pid_b=${pids[-1]}
wait_health a "$pa" "$pid_a" "$work/vllm-a.log" >/dev/null
ready_a=$((SECONDS - t0))
wait_health b "$pb" "$pid_b" "$work/vllm-b.log" >/dev/null
ready_b=$((SECONDS - t0))
echo "vLLM ready: A ${ready_a}s, B ${ready_b}s after start" >&2

# 4. The gateway in front of both, with the contracts and API keys.
gport="$(free_port)"
cat >"$work/gateway.yaml" <<YAML
listen: 127.0.0.1:$gport
debug_headers: true
health_interval_ms: 500
endpoints:
  - {url: "http://127.0.0.1:$pa", models: [qwen-a], block_size: 64}
  - {url: "http://127.0.0.1:$pb", models: [qwen-b], block_size: 64}
tokenizers: {qwen-a: "$MODEL_DIR", qwen-b: "$MODEL_DIR"}
embedded_tokenizer_fallback: false
contracts:$contracts
  api_keys:
    - {sha256: $(sha256 "$key_acme"), contract: acme}
    - {sha256: $(sha256 "$key_globex"), contract: globex}
  audit: {path: $work/gateway-audit.jsonl}
YAML
setsid "$KVGATE_BIN" gateway --config "$work/gateway.yaml" >"$work/kvgate-gateway.log" 2>&1 &
pids+=($!)
wait_port "$gport"
both_ready() {  # until the gateway sees both instances available (60 s)
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$gport/ready" | grep -q '"available":2' && return 0
    sleep 0.2
  done
  echo "the gateway does not see both instances: $(curl -s "http://127.0.0.1:$gport/ready")" >&2; return 1
}
both_ready

drive() {  # PHASE [extra args]: shared_hit.py against the running processes
  local phase="$1"; shift
  "$py" "$here/shared_hit.py" "$phase" --gateway "http://127.0.0.1:$gport" \
    --tokenize "http://127.0.0.1:$pa" --endpoint-b "http://127.0.0.1:$pb" --store-admin "http://127.0.0.1:$admin" \
    --key-acme "$key_acme" --key-globex "$key_globex" --tokens "${TOKENS:-1400}" \
    --state "$work/state.json" "$@"
}
rc=0
drive before-restart --log-a "$work/vllm-a.log" --log-b "$work/vllm-b.log" \
  --startup-json "{\"vllm_a_ready_s\": $ready_a, \"vllm_b_ready_s\": $ready_b}" || rc=$?

# 5. The store restarts (its memory tier lost, its disk kept), and so does B.
if [[ "$rc" == 0 ]]; then
  stop "$store_pid"; stop "$pid_b"
  start_store
  t0=$SECONDS
  start_vllm b "$pb" 1 "$shim_b" "$work/vllm-b2.log"; pid_b=${pids[-1]}
  wait_health b "$pb" "$pid_b" "$work/vllm-b2.log" >/dev/null
  echo "store and vLLM B restarted: B ready $((SECONDS - t0))s after start" >&2
  both_ready
  drive after-restart --log-b "$work/vllm-b2.log" || rc=$?
else
  cat "$work/state.json" 2>/dev/null || true
fi
grep -h "kvgate-lmcache-shim" "$work"/vllm-*.log | sort -u >&2 || true
echo "logs: $work" >&2
exit "$rc"
