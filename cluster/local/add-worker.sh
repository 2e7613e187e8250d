#!/usr/bin/env bash
# Add one worker process to a cluster started by cluster/local/start.sh (e.g. to replace
# a lost one); it is stopped with the others by cluster/local/stop.sh RUN_DIR.
#
#   cluster/local/add-worker.sh [RUN_DIR]
#
# Same environment variables as start.sh (DASKEM_THREADS, DASKEM_MEMORY_LIMIT,
# DASKEM_HOST, DASKEM_TLS_DIR, PYTHON). Returns once the new worker is connected.
set -euo pipefail

DIR="${1:-./dask-local}"
# shellcheck source=cluster/local/env.sh
. "$(dirname "$0")/env.sh"
DIR="$(cd "$DIR" && pwd)"
SF="$DIR/scheduler.json"
if [ ! -s "$SF" ]; then
  echo "no scheduler file $SF: start the cluster with cluster/local/start.sh first" >&2
  exit 2
fi

# the next free worker number
i=1
while [ -e "$DIR/worker-$i.pid" ]; do i=$((i + 1)); done

BEFORE="$("$PYTHON" - <<PY
from distributed import Client
$SEC
with Client(scheduler_file="$SF", timeout="30s", **kw) as c:
    print(len(c.scheduler_info()["workers"]))
PY
)"
"$PYTHON" -m distributed.cli.dask_worker --scheduler-file "$SF" --no-nanny \
  --nthreads "$THREADS" --memory-limit "$MEMORY" --name "worker-$i" \
  --host "$HOST" --local-directory "$DIR/worker-$i" "${TLS[@]}" \
  >"$DIR/worker-$i.log" 2>&1 &
echo $! >"$DIR/worker-$i.pid"

"$PYTHON" - <<PY
from distributed import Client
$SEC
with Client(scheduler_file="$SF", timeout="30s", **kw) as c:
    c.wait_for_workers($BEFORE + 1, timeout=60)
    print(f"worker-$i joined: {len(c.scheduler_info()['workers'])} workers")
PY
