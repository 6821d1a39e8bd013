#!/usr/bin/env bash
# Local S3-compatible object store on 127.0.0.1 for tests and development.
#
#   infra/object_store.sh start    start it (moto's standalone server, or MinIO with DVT_S3_BACKEND=minio)
#   infra/object_store.sh stop     stop it
#   infra/object_store.sh status   exit 0 when it answers
#   eval "$(infra/object_store.sh env)"   point AWS tools, s3fs and the pipeline at it
#
# Settings (environment): DVT_S3_PORT (default 9555), DVT_S3_BACKEND (moto | minio, default moto),
# DVT_S3_DIR (pid, log and MinIO data; default .local/object_store). Credentials are the test pair below
# unless AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are already set.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
port=${DVT_S3_PORT:-9555}
backend=${DVT_S3_BACKEND:-moto}
dir=${DVT_S3_DIR:-$here/.local/object_store}
endpoint="http://127.0.0.1:$port"
key=${AWS_ACCESS_KEY_ID:-dvt-test-key}
secret=${AWS_SECRET_ACCESS_KEY:-dvt-test-secret}
python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3

# Starting moto and asking whether a server answers live in one place, shared with the tests and benchmarks.
helper=$here/pipeline/testing/object_store.py
answers() { "$python" "$helper" answers "$endpoint"; }

case "${1:-}" in
  start)
    if answers; then echo "object store already answers at $endpoint"; exit 0; fi
    mkdir -p "$dir"
    case "$backend" in
      moto)
        : >"$dir/server.log"
        pid=$("$python" "$helper" start-moto "$port" "$dir/server.log") || exit 1
        echo "$pid" >"$dir/server.pid"
        echo "object store ($backend) at $endpoint"; exit 0
        ;;
      minio)
        command -v minio >/dev/null || { echo "DVT_S3_BACKEND=minio but no 'minio' on PATH; install MinIO or use moto." >&2; exit 1; }
        MINIO_ROOT_USER=$key MINIO_ROOT_PASSWORD=$secret nohup minio server "$dir/data" --address "127.0.0.1:$port" \
          >"$dir/server.log" 2>&1 &
        echo $! >"$dir/server.pid"
        ;;
      *) echo "Unknown DVT_S3_BACKEND '$backend': use moto or minio." >&2; exit 1 ;;
    esac
    for _ in $(seq 1 100); do answers && { echo "object store ($backend) at $endpoint"; exit 0; }; sleep 0.2; done
    echo "object store did not start; see $dir/server.log" >&2; exit 1
    ;;
  stop)
    if [ -f "$dir/server.pid" ]; then kill "$(cat "$dir/server.pid")" 2>/dev/null || true; rm -f "$dir/server.pid"; fi
    ;;
  status)
    answers && echo "answers at $endpoint" || { echo "not running at $endpoint"; exit 1; }
    ;;
  env)
    cat <<ENV
export AWS_ENDPOINT_URL_S3=$endpoint
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_DEFAULT_REGION=\${AWS_DEFAULT_REGION:-us-east-1}
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required
export AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
ENV
    ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
