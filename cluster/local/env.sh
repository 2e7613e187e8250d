# Shared by start.sh and add-worker.sh (sourced, not run): the settings from the
# environment, the check that PYTHON has daskem, TLS options, and the workers' settings.
HOST="${DASKEM_HOST:-127.0.0.1}"
THREADS="${DASKEM_THREADS:-1}"
MEMORY="${DASKEM_MEMORY_LIMIT:-auto}"
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import daskem, distributed" 2>/dev/null; then
  echo "PYTHON=$PYTHON cannot import daskem and distributed: activate the environment" \
    "where daskem is installed, or set PYTHON=/path/to/that/python" >&2
  exit 2
fi

TLS=()
SEC="kw = {}"
if [ -n "${DASKEM_TLS_DIR:-}" ]; then
  T="$(cd "$DASKEM_TLS_DIR" && pwd)"
  TLS=(--tls-ca-file "$T/ca.pem" --tls-cert "$T/node.pem" --tls-key "$T/node-key.pem")
  SEC="from distributed import Security; kw = dict(security=Security(tls_ca_file='$T/ca.pem', tls_client_cert='$T/node.pem', tls_client_key='$T/node-key.pem', require_encryption=True))"
fi

# BLAS threads inside tasks only slow things down: parallelism comes from processes.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
# reuse freed chunk buffers instead of fresh mmaps (docs/performance.md trap 3)
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456
