#!/usr/bin/env bash
# The local development stack on 127.0.0.1: the S3-compatible object store and a Ray head with its dashboard,
# so `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.<name> ...` works
# exactly as on a cluster.
#
#   bash infra/dev_stack.sh start    # then: eval "$(bash infra/dev_stack.sh env)"
#   bash infra/dev_stack.sh stop
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
[ -x "$bin/ray" ] || { echo "no $bin/ray: install first (python3 -m venv .venv && .venv/bin/pip install -e .)" >&2; exit 1; }
export PATH="$bin:$PATH" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
dashboard=${DVT_RAY_DASHBOARD_PORT:-8265}

case "${1:-}" in
  start)
    bash "$here/infra/object_store.sh" start
    eval "$(bash "$here/infra/object_store.sh" env)"  # the Ray head and its workers inherit the endpoint
    ray start --head --node-ip-address 127.0.0.1 --port "${DVT_RAY_PORT:-6379}" --dashboard-host 127.0.0.1 \
      --dashboard-port "$dashboard" --disable-usage-stats
    echo "Ray dashboard and job server at http://127.0.0.1:$dashboard"
    ;;
  stop)
    ray stop --force || true
    bash "$here/infra/object_store.sh" stop
    ;;
  env)
    bash "$here/infra/object_store.sh" env
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard  # for ray job submit/status/logs"
    ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
