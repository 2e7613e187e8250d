#!/usr/bin/env bash
# Make a throw-away certificate authority and one certificate for trying TLS with Dask.
#
#   cluster/tls/make-certs.sh OUT_DIR [HOSTNAME]
#
# Writes ca.pem, ca-key.pem, node.pem, node-key.pem. The node certificate is valid for
# HOSTNAME (default localhost), 127.0.0.1 and ::1, and is used by the scheduler, the
# workers and the client alike (Dask checks that peers present a certificate signed by
# the CA). For real deployments use your site's CA.
set -euo pipefail
OUT="${1:?usage: make-certs.sh OUT_DIR [HOSTNAME]}"
NAME="${2:-localhost}"
mkdir -p "$OUT"
cd "$OUT"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=daskem-test-ca" \
  -keyout ca-key.pem -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$NAME" \
  -keyout node-key.pem -out node.csr 2>/dev/null
printf "subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth,clientAuth\n" "$NAME" >node.ext
openssl x509 -req -in node.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
  -days 30 -extfile node.ext -out node.pem 2>/dev/null
rm -f node.csr node.ext ca.srl
chmod 600 ca-key.pem node-key.pem
echo "wrote $(pwd)/{ca.pem,ca-key.pem,node.pem,node-key.pem}"
