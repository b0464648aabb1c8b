#!/usr/bin/env bash
# TLS (issue 4) measurements: portcullis with [server] threads = 1 behind a fast upstream.
#   (1) full TLS 1.3 handshakes/s (a new connection per request, resumption off)
#   (2) keep-alive requests/s over TLS 1.3
#   (3) keep-alive requests/s over plain HTTP (a second portcullis, same settings, no TLS)
# Prints each loadgen report with `uptime` before and after and the portcullis process's CPU
# seconds over the run. Needs: openssl, nginx (else UPSTREAM=loadgen), the two release binaries.
#
#   PORTCULLIS=/work/wt-loadgen/target-release/release/portcullis \
#   LOADGEN=bench/loadgen/target/release/loadgen bash bench/loadgen/tls-bench.sh
#
# Cores (nproc = 2): portcullis on CPU 0, loadgen and the upstream on CPU 1 (taskset). Other
# processes on the machine are not pinned and may run on either core.
set -euo pipefail

PORTCULLIS=${PORTCULLIS:?path to the portcullis release binary}
LOADGEN=${LOADGEN:?path to the loadgen release binary}
UPSTREAM=${UPSTREAM:-nginx}          # nginx | loadgen
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
HS_CONNS=${HS_CONNS:-16}
DIR=${DIR:-/tmp/portcullis-tls-bench}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
EXTRA=${EXTRA:-}                     # extra loadgen flags for every run

mkdir -p "$DIR"
cd "$DIR"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# OpenSSL 3 marks a self-signed certificate CA:TRUE by default, and webpki refuses a CA
# certificate as the server's own (CaUsedAsEndEntity): hence basicConstraints CA:FALSE.
if [ ! -f c.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -addext basicConstraints=critical,CA:FALSE -keyout k.pem -out c.pem -days 30 2>/dev/null
fi

for mode in tls plain; do
  if [ $mode = tls ]; then listen=127.0.0.1:8443; admin=127.0.0.1:9911; else listen=127.0.0.1:8080; admin=127.0.0.1:9912; fi
  {
    echo '[server]'
    echo "listen = \"$listen\""
    echo 'threads = 1'
    if [ $mode = tls ]; then
      echo '[server.tls]'
      echo "cert = \"$DIR/c.pem\""
      echo "key = \"$DIR/k.pem\""
      echo 'min_version = "1.3"'
    fi
    echo '[upstream]'
    echo 'url = "http://127.0.0.1:8000"'
    echo '[admin]'
    echo "listen = \"$admin\""
    echo '[[routes]]'
    echo 'name = "public"'
    echo 'path_prefix = "/public"'
    echo 'methods = ["GET"]'
    echo 'require = []'
  } > portcullis-$mode.toml
done

if [ "$UPSTREAM" = nginx ]; then
  cat > nginx.conf <<NGINX
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server { listen 127.0.0.1:8000; location / { return 200 "ok\n"; } }
}
NGINX
  taskset -c "$CLIENT_CPU" nginx -c "$DIR/nginx.conf" -g 'daemon off;' &
  up_pid=$!; pids+=($up_pid)
else
  taskset -c "$CLIENT_CPU" "$LOADGEN" --serve-upstream 127.0.0.1:8000 --threads 1 &
  up_pid=$!; pids+=($up_pid)
fi

taskset -c "$SERVER_CPU" "$PORTCULLIS" proxy --config portcullis-tls.toml > portcullis-tls.log 2>&1 &
tls_pid=$!; pids+=($tls_pid)
taskset -c "$SERVER_CPU" "$PORTCULLIS" proxy --config portcullis-plain.toml > portcullis-plain.log 2>&1 &
plain_pid=$!; pids+=($plain_pid)
sleep 2

# user+sys CPU seconds of a process and its children still running (nginx's worker).
cpu_of() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    total=$(awk -v t="$total" '{ print t + ($14 + $15) / 100 }' "/proc/$p/stat")
  done
  echo "$total"
}

measure() { # name pid args...
  local name=$1 pid=$2; shift 2
  echo "=== $name"
  echo "uptime before: $(uptime)"
  local before up_before; before=$(cpu_of "$pid"); up_before=$(cpu_of "$up_pid")
  echo "+ taskset -c $CLIENT_CPU loadgen --threads 1 $* $EXTRA"
  # A snapshot of what else runs, half-way through.
  ( sleep 5; echo "--- top, 5 s in:"; top -b -n1 -w 160 | sed -n '1,4p;7,14p' ) > "$DIR/top.txt" &
  local top_pid=$!
  # shellcheck disable=SC2086
  taskset -c "$CLIENT_CPU" "$LOADGEN" --threads 1 "$@" $EXTRA --json > "$DIR/last.json"
  local after up_after; after=$(cpu_of "$pid"); up_after=$(cpu_of "$up_pid")
  wait "$top_pid"
  python3 - "$DIR/last.json" "$before" "$after" "$up_before" "$up_after" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b, a, ub, ua = map(float, sys.argv[2:6])
l = r["latency_ms"]
print(f"requests/s {r['requests_per_s']:.0f}  ({r['requests']} in {r['elapsed_s']:.2f} s; non-2xx {r['non_2xx']}, errors {r['errors']}, connections opened {r['connects']})")
if "tls" in r:
    t = r["tls"]; print(f"TLS {t['version']} {t['suite']} {t['group']} resumption={t['resumption']} verify={t['verify']}")
print(f"latency ms p50 {l['p50']:.3f} p90 {l['p90']:.3f} p99 {l['p99']:.3f} p99.9 {l['p99_9']:.3f} max {l['max']:.3f}")
n = max(r["requests"], 1); s = r["elapsed_s"]
print(f"CPU s (share of one core): portcullis {a-b:.2f} ({(a-b)/s:.0%}), upstream {ua-ub:.2f} ({(ua-ub)/s:.0%}), loadgen {r['loadgen_cpu_s']:.2f} ({r['loadgen_cpu_share']:.0%})")
print(f"portcullis CPU per request: {(a-b)/n*1e6:.1f} us -> {n/(a-b) if a > b else 0:.0f} req/s per fully used core")
PY
  cat "$DIR/top.txt"
  echo "uptime after: $(uptime)"
  echo
}

# Warm-up (not reported): fills the proxy's upstream pool, faults pages in.
taskset -c "$CLIENT_CPU" "$LOADGEN" --threads 1 --url https://localhost:8443/public --tls-ca c.pem -c 8 -d 2s > /dev/null
taskset -c "$CLIENT_CPU" "$LOADGEN" --threads 1 --url http://127.0.0.1:8080/public -c 8 -d 2s > /dev/null

measure "(1) full TLS 1.3 handshakes, new connection per request" $tls_pid \
  --url https://localhost:8443/public --tls-ca c.pem --tls-version 1.3 \
  --new-connection-per-request -c "$HS_CONNS" -d "$DURATION"
measure "(1b) same, client-side certificate and signature checks off" $tls_pid \
  --url https://localhost:8443/public --tls-insecure-no-verify --tls-version 1.3 \
  --new-connection-per-request -c "$HS_CONNS" -d "$DURATION"
measure "(1c) resumed TLS 1.3 handshakes (session tickets), new connection per request" $tls_pid \
  --url https://localhost:8443/public --tls-ca c.pem --tls-version 1.3 --tls-resume \
  --new-connection-per-request -c "$HS_CONNS" -d "$DURATION"
measure "(2) keep-alive over TLS 1.3" $tls_pid \
  --url https://localhost:8443/public --tls-ca c.pem --tls-version 1.3 -c "$CONNS" -d "$DURATION"
measure "(3) keep-alive over plain HTTP" $plain_pid \
  --url http://127.0.0.1:8080/public -c "$CONNS" -d "$DURATION"
