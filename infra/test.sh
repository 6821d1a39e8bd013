#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs the package with its test extras into .venv,
# starts the local S3 server on 127.0.0.1, runs pytest, and stops the server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
start=$(date +%s)
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "install: $(( $(date +%s) - start )) s, venv $(du -sh .venv | cut -f1)"

export DVT_S3_PORT=${DVT_S3_PORT:-9555}
export DVT_S3_DIR=${DVT_S3_DIR:-$PWD/.local/object_store}
bash infra/object_store.sh start
trap 'bash infra/object_store.sh stop' EXIT
eval "$(bash infra/object_store.sh env)"

# Keep everything on loopback and off the network.
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 GLOO_SOCKET_IFNAME=lo

.venv/bin/python -m pytest --durations=15 "$@"
