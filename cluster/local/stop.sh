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
# alive = signalable and not a zombie (an exited process nobody has reaped yet)
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/stat" ] || return 0
  [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != "Z" ]
}
wait_gone() {  # wait_gone TENTHS: until every pid is gone, at most TENTHS x 0.1 s
  for _ in $(seq 1 "$1"); do
    left=0
    for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  return 1
}
if ! wait_gone 100; then
  for pid in "${pids[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
  # SIGKILL is delivered asynchronously: wait until the processes are really gone
  wait_gone 100 || echo "warning: a process outlived SIGKILL" >&2
fi
rm -f "$DIR"/*.pid "$DIR/scheduler.json"
echo "stopped ${#pids[@]} processes"
