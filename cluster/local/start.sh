#!/usr/bin/env bash
# Start a Dask scheduler and N single-threaded worker processes on this machine.
#
#   cluster/local/start.sh [N_WORKERS] [RUN_DIR]
#
# Writes RUN_DIR/scheduler.json (give it to `daskem ... --scheduler-file`), one
# RUN_DIR/*.pid file per process, and their logs; returns once all N workers are
# connected. Stop everything with cluster/local/stop.sh RUN_DIR.
#
# Environment:
#   DASKEM_THREADS        threads per worker (default 1)
#   DASKEM_MEMORY_LIMIT   memory limit per worker (default auto)
#   DASKEM_HOST           interface to listen on (default 127.0.0.1)
#   DASKEM_TLS_DIR        if set, use tls:// with ca.pem, node.pem, node-key.pem from
#                         that directory (see cluster/tls/make-certs.sh)
#   PYTHON                the Python that has daskem installed (default: `python`,
#                         i.e. the active environment's); checked before anything starts
set -euo pipefail

N="${1:-2}"
DIR="${2:-./dask-local}"
# shellcheck source=cluster/local/env.sh
. "$(dirname "$0")/env.sh"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
SF="$DIR/scheduler.json"
rm -f "$SF"

if [ -n "${DASKEM_TLS_DIR:-}" ]; then
  SCHEDULER_ADDR=(--protocol tls)
else
  SCHEDULER_ADDR=(--protocol tcp)
fi

"$PYTHON" -m distributed.cli.dask_scheduler --host "$HOST" --port 0 \
  --dashboard-address "$HOST:0" "${SCHEDULER_ADDR[@]}" "${TLS[@]}" \
  --scheduler-file "$SF" >"$DIR/scheduler.log" 2>&1 &
echo $! >"$DIR/scheduler.pid"

for _ in $(seq 1 300); do
  [ -s "$SF" ] && break
  sleep 0.1
done
if [ ! -s "$SF" ]; then
  echo "scheduler did not start; see $DIR/scheduler.log" >&2
  exit 1
fi

for i in $(seq 1 "$N"); do
  # --no-nanny: the process we record is the worker itself, so stopping (or killing)
  # it by its id leaves nothing behind.
  "$PYTHON" -m distributed.cli.dask_worker --scheduler-file "$SF" --no-nanny \
    --nthreads "$THREADS" --memory-limit "$MEMORY" --name "worker-$i" \
    --host "$HOST" --local-directory "$DIR/worker-$i" "${TLS[@]}" \
    >"$DIR/worker-$i.log" 2>&1 &
  echo $! >"$DIR/worker-$i.pid"
done

"$PYTHON" - <<PY
from distributed import Client
$SEC
with Client(scheduler_file="$SF", timeout="30s", **kw) as c:
    c.wait_for_workers($N, timeout=60)
    print(f"scheduler {c.scheduler.address} with {len(c.scheduler_info()['workers'])} workers")
PY
echo "scheduler file: $SF"
"$PYTHON" - <<PY
import json
info = json.load(open("$SF"))
port = info.get("services", {}).get("dashboard")
host = info["address"].split("://")[-1].rsplit(":", 1)[0]
if port:
    print(f"dashboard: http://{host}:{port}/status (plain HTTP: reach it through an SSH tunnel "
          "or port-forward, not over an open network)")
PY
