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
HOST="${DASKEM_HOST:-127.0.0.1}"
THREADS="${DASKEM_THREADS:-1}"
MEMORY="${DASKEM_MEMORY_LIMIT:-auto}"
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import daskem, distributed" 2>/dev/null; then
  echo "PYTHON=$PYTHON cannot import daskem and distributed: activate the environment" \
    "where daskem is installed, or set PYTHON=/path/to/that/python" >&2
  exit 2
fi
DIR="$(cd "$DIR" && pwd)"
SF="$DIR/scheduler.json"
if [ ! -s "$SF" ]; then
  echo "no scheduler file $SF: start the cluster with cluster/local/start.sh first" >&2
  exit 2
fi

TLS=()
SEC="kw = {}"
if [ -n "${DASKEM_TLS_DIR:-}" ]; then
  T="$(cd "$DASKEM_TLS_DIR" && pwd)"
  TLS=(--tls-ca-file "$T/ca.pem" --tls-cert "$T/node.pem" --tls-key "$T/node-key.pem")
  SEC="from distributed import Security; kw = dict(security=Security(tls_ca_file='$T/ca.pem', tls_client_cert='$T/node.pem', tls_client_key='$T/node-key.pem', require_encryption=True))"
fi

# the next free worker number
i=1
while [ -e "$DIR/worker-$i.pid" ]; do i=$((i + 1)); done

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456

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
