#!/usr/bin/env bash
# Stop the processes started by cluster/local/start.sh, by their process ids.
#
#   cluster/local/stop.sh RUN_DIR
set -uo pipefail
DIR="${1:-./dask-local}"
shopt -s nullglob
pids=()
for f in "$DIR"/worker-*.pid "$DIR"/scheduler.pid; do
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  fi
done
for _ in $(seq 1 100); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
rm -f "$DIR"/*.pid "$DIR/scheduler.json"
echo "stopped ${#pids[@]} processes"
