#!/usr/bin/env bash
# Two portcullis builds side by side (A = before, B = after a change), with HAProxy as the
# yardstick, on the public route and on JWT RS256 with unique tokens and the cache off.
# Reuses the work folder of a `bench/compare.sh` run (keys, tokens less than an hour old,
# configurations, the nginx upstream and HAProxy configurations):
#
#   bash bench/compare.sh                      # once, for $DIR
#   A=/path/to/old/portcullis B=target-release/release/portcullis bash bench/ab.sh
#
# Alternating rounds: HAProxy plain, A public, B public, HAProxy jwt_verify, A jwt, B jwt.
# JWT=0 measures the public route only (and needs no fresh tokens).
# Prints per run req/s and the process's CPU time per request (user+sys, /proc/PID/stat).
# Same cores as compare.sh: proxies on CPU 0; nginx upstream and the load generator on CPU 1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${DIR:-/tmp/portcullis-compare}
A=${A:?set A to the portcullis binary before the change}
B=${B:?set B to the portcullis binary after the change}
LOADGEN=${LOADGEN:-$HERE/loadgen/target/release/loadgen}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
JWT=${JWT:-1}
CONNS=${CONNS:-64}
PORT_BASE=${PORT_BASE:-27100}
UP_PORT=$PORT_BASE
HA_PLAIN=$((PORT_BASE + 2))
HA_JWT=$((PORT_BASE + 3))

[ -f "$DIR/tokens.txt" ] && [ -f "$DIR/portcullis-f.toml" ] || {
  echo "no compare.sh work folder at $DIR: run bench/compare.sh first" >&2; exit 1; }
[ "$JWT" = 0 ] || [ -z "$(find "$DIR/tokens.txt" -mmin +40)" ] || {
  echo "$DIR/tokens.txt is over 40 minutes old (tokens live 1 h): run bench/compare.sh again" >&2; exit 1; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

export COMPARE_SIG_SECRET=${COMPARE_SIG_SECRET:-compare-bench-secret-0123456789abcdef}   # the configurations name it
cd "$DIR"
taskset -c 1 nginx -c "$DIR/nginx-upstream.conf" -p "$DIR" -g 'daemon off;' & pids+=($!)
taskset -c 0 haproxy -f "$DIR/haproxy.cfg" & pids+=($!)
HA_PID=$!
declare -A PID PORT
start() { # name binary port admin_port
  sed -e "s|^listen = \"127.0.0.1:[0-9]*\"|listen = \"127.0.0.1:$3\"|" \
      -e "/^\[admin\]/,/^listen/ s|^listen = .*|listen = \"127.0.0.1:$4\"|" \
      "$DIR/portcullis-f.toml" > "$DIR/ab-$1.toml"
  taskset -c 0 "$2" proxy --config "$DIR/ab-$1.toml" > "$DIR/ab-$1.log" 2>&1 & pids+=($!)
  PID[$1]=$!; PORT[$1]=$3
}
start A "$A" $((PORT_BASE + 20)) $((PORT_BASE + 21))
start B "$B" $((PORT_BASE + 22)) $((PORT_BASE + 23))
sleep 2

cpu() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
run() { # label pid url [loadgen args]
  local label=$1 pid=$2 url=$3; shift 3
  local before after json
  before=$(cpu "$pid")
  json=$(taskset -c 1 "$LOADGEN" --threads 1 -c "$CONNS" -d "$DURATION" --url "$url" --json "$@")
  after=$(cpu "$pid")
  python3 - "$label" "$before" "$after" "$json" <<'PY'
import json, sys
label, before, after, raw = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
d = json.loads(raw)
n = d["requests"]
bad = d["non_2xx"] + d["errors"]
print(f"{label:28s} {d['requests_per_s']:>10,.0f} req/s  {(after - before) / 100 / n * 1e6:6.1f} us CPU/request  non-2xx+errors {bad}")
PY
}

for round in $(seq "$ROUNDS"); do
  echo "round $round ($(cut -d' ' -f1-3 /proc/loadavg))"
  run "HAProxy plain" "$HA_PID" "http://127.0.0.1:$HA_PLAIN/public"
  run "A public" "${PID[A]}" "http://127.0.0.1:${PORT[A]}/public"
  run "B public" "${PID[B]}" "http://127.0.0.1:${PORT[B]}/public"
  [ "$JWT" = 0 ] && continue
  run "HAProxy jwt_verify" "$HA_PID" "http://127.0.0.1:$HA_JWT/api/jwt" --tokens "$DIR/tokens.txt"
  run "A jwt (cache 0)" "${PID[A]}" "http://127.0.0.1:${PORT[A]}/api/jwt" --tokens "$DIR/tokens.txt"
  run "B jwt (cache 0)" "${PID[B]}" "http://127.0.0.1:${PORT[B]}/api/jwt" --tokens "$DIR/tokens.txt"
done
