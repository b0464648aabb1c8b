#!/usr/bin/env bash
# Side by side (issue 6): portcullis against nginx proxy_pass and HAProxy 2.6 (plain, plain with
# the forwarding headers portcullis sends, and jwt_verify RS256 + exp/iss/aud), one worker thread
# each, in one run with alternating rounds.
#
#   bash bench/compare.sh                          # full run: DURATION=10s ROUNDS=3
#   DURATION=2s ROUNDS=1 nice -n 10 bash bench/compare.sh   # a smoke test
#
# Environment (defaults in brackets):
#   PORTCULLIS [target-release/release/portcullis of this worktree]   the proxy's release binary
#   LOADGEN [bench/loadgen/target/release/loadgen] (built when missing)
#   DURATION [10s] ROUNDS [3] CONNS [64] TOKENS [200000] TARGETS ["a b c d e f g h i j k"]
#   RATE [5000] RATE_ROUNDS [ROUNDS]   fixed-rate p99 measurement (direct vs (i), with HAProxy plain and
#                jwt_verify, (f), (h) and (k) in the same rounds); RATE=0 skips it
#   BUSY [1]     the fixed-rate rounds once more with busy polling: HAProxy jwt_verify with
#                `busy-polling` and (i) with `busy_poll = true`, each alone on the proxies' core
#   MEM [1]      RSS with 1,000 idle keep-alive connections and a full verified cache
#   WRK [1]      one wrk reference round of the plain targets (a, b, c, j, e)
#   PORT_BASE [27100]  ports PORT_BASE .. PORT_BASE+40 on 127.0.0.1 must be free
#   DIR [/tmp/portcullis-compare]  work files; OUT [bench/results] report and raw JSON
#
# Each table also gives the share of each core's time that the hypervisor reports as stolen
# (/proc/stat "steal") during the run: on a virtual machine, time the proxy could not run.
#
# Cores (nproc = 2): every proxy on CPU 0, the upstream nginx, the load generator and Redis on
# CPU 1 (taskset). Installs nginx-light, haproxy, wrk, redis-server with apt when missing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TPL=$HERE/compare
PORTCULLIS=${PORTCULLIS:-$ROOT/target-release/release/portcullis}
LOADGEN=${LOADGEN:-$HERE/loadgen/target/release/loadgen}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
TOKENS=${TOKENS:-200000}
TARGETS=${TARGETS:-"a b c d e f g h i j k"}
RATE=${RATE:-5000}
RATE_ROUNDS=${RATE_ROUNDS:-$ROUNDS}
BUSY=${BUSY:-1}
MEM=${MEM:-1}
WRK=${WRK:-1}
PORT_BASE=${PORT_BASE:-27100}
DIR=${DIR:-/tmp/portcullis-compare}
OUT=${OUT:-$HERE/results}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
ISS=https://auth.bench.example
AUD=api_clients
KID=bench-rsa-1
export COMPARE_SIG_SECRET=compare-bench-secret-0123456789abcdef

STAMP=$(date -u +%Y-%m-%d-%H%M)
REPORT=$OUT/compare-$STAMP.md
RAW=$OUT/compare-$STAMP-raw
mkdir -p "$DIR" "$DIR/nginx-tmp" "$RAW"

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# ---- what is missing -------------------------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  log "installing: ${need[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
[ -x "$PORTCULLIS" ] || { echo "no portcullis binary at $PORTCULLIS (build it with cargo build --release)" >&2; exit 1; }
if [ ! -x "$LOADGEN" ]; then
  log "building the load generator"
  (cd "$HERE/loadgen" && CARGO_TARGET_DIR=$PWD/target cargo build --release)
fi

# ---- ports -----------------------------------------------------------------------------------
UP_PORT=$((PORT_BASE + 0))
NGINX_PORT=$((PORT_BASE + 1))
HA_PLAIN_PORT=$((PORT_BASE + 2))
HA_JWT_PORT=$((PORT_BASE + 3))
REDIS_PORT=$((PORT_BASE + 4))
HA_SAME_PORT=$((PORT_BASE + 7))    # (j); PORT_BASE+5, +6 and +8: the busy-polling HAProxy's
# portcullis: e f g h i mem -> listen PORT_BASE+10.., admin PORT_BASE+30..
for p in $(seq "$PORT_BASE" $((PORT_BASE + 40))); do
  if ss -Hltn "sport = :$p" | grep -q .; then echo "port $p is in use; set PORT_BASE" >&2; exit 1; fi
done

# ---- processes -------------------------------------------------------------------------------
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fill() { # template -> stdout, with @KEY@ replaced by the KEY=value arguments
  local tpl=$1; shift
  local args=(-e "s|@DIR@|$DIR|g" -e "s|@UP_PORT@|$UP_PORT|g" -e "s|@ISS@|$ISS|g" -e "s|@AUD@|$AUD|g")
  local kv
  for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${args[@]}" "$tpl"
}

# user+sys CPU seconds of a process and its children (nginx master + worker).
cpu_of() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/stat" ] || continue
    total=$(awk -v t="$total" '{ sub(/^.*\) /, ""); print t + ($12 + $13) / 100 }' "/proc/$p/stat")
  done
  echo "$total"
}
# jiffies "busy0 total0 busy1 total1 steal0 steal1" of CPU 0 and CPU 1 from /proc/stat (busy = all
# but idle, iowait; steal = time the hypervisor ran something else while this virtual CPU wanted to run)
cpustat() {
  awk -v a="cpu$SERVER_CPU" -v b="cpu$CLIENT_CPU" '$1 == a || $1 == b {
    t = 0; for (i = 2; i <= NF; i++) t += $i; busy[$1] = t - $5 - $6; tot[$1] = t; st[$1] = $9 }
    END { print busy[a], tot[a], busy[b], tot[b], st[a], st[b] }' /proc/stat
}
# "busy0 busy1 steal0 steal1" shares of the two cores between two cpustat snapshots
cpushare() { # before after
  echo "$1 $2" | awk '{ d0 = $8 - $2; d1 = $10 - $4
    printf "%.3f %.3f %.4f %.4f", ($7 - $1) / d0, ($9 - $3) / d1, ($11 - $5) / d0, ($12 - $6) / d1 }'
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

wait_port() { # port
  local i
  for i in $(seq 100); do
    if ss -Hltn "sport = :$1" | grep -q .; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; exit 1
}

# ---- keys and tokens -------------------------------------------------------------------------
cd "$DIR"
if [ ! -f key.pem ]; then
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out key.pem 2>/dev/null   # PKCS#8
fi
openssl pkey -in key.pem -pubout -out pub.pem
modulus=$(openssl rsa -pubin -in pub.pem -noout -modulus | cut -d= -f2)
exponent=$(openssl rsa -pubin -in pub.pem -noout -text | awk '/^Exponent/ { print $2 }')
python3 - "$modulus" "$exponent" "$KID" > jwks.json <<'PY'
import base64, json, sys
n = bytes.fromhex(sys.argv[1])
e = int(sys.argv[2]); e = e.to_bytes((e.bit_length() + 7) // 8, "big")
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
print(json.dumps({"keys": [{"kty": "RSA", "kid": sys.argv[3], "alg": "RS256", "use": "sig", "n": b64(n), "e": b64(e)}]}))
PY

# Minted tokens are reused while they have more than 40 minutes left (minting 200,000 RS256
# tokens takes a few minutes of one core).
if [ ! -f tokens.txt ] || [ "$(wc -l < tokens.txt)" -lt "$TOKENS" ] || [ -n "$(find tokens.txt -mmin +20)" ]; then
  log "minting $TOKENS RS256 tokens (exp 1 h ahead), half on each core"
  half=$(( (TOKENS + 1) / 2 ))
  mint_pids=()
  for k in 0 1; do
    taskset -c "$k" "$LOADGEN" --mint-tokens "$half" --rs256-key key.pem --iss "$ISS" \
      --aud "$AUD" --kid "$KID" --sub-prefix "bench-$k-" --permissions read:data,write:data \
      --ttl 1h --out "tokens-part$k.txt" > /dev/null &
    mint_pids+=($!); pids+=($!)
  done
  for p in "${mint_pids[@]}"; do wait "$p"; done
  cat tokens-part0.txt tokens-part1.txt > tokens.txt
  rm -f tokens-part0.txt tokens-part1.txt
fi
head -n 100 tokens.txt > tokens-100.txt
head -n 10000 tokens.txt > tokens-10k.txt

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
[ -f key-other.pem ] || openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out key-other.pem 2>/dev/null
mint_openssl() { # iss aud iat exp [key] -> an RS256 token signed with key.pem (or key)
  local h p s
  h=$(printf '{"alg":"RS256","typ":"JWT","kid":"%s"}' "$KID" | b64url)
  p=$(printf '{"iss":"%s","aud":"%s","sub":"bench-x","iat":%d,"exp":%d,"jti":"x-%s","permissions":["read:data"]}' \
    "$1" "$2" "$3" "$4" "$RANDOM" | b64url)
  s=$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -sign "${5:-key.pem}" -binary | b64url)
  echo "$h.$p.$s"
}
now=$(date +%s)
GOOD=$(head -n 1 tokens.txt)
GOOD_OSSL=$(mint_openssl "$ISS" "$AUD" "$now" $((now + 3600)))
EXPIRED=$(mint_openssl "$ISS" "$AUD" $((now - 7200)) $((now - 3600)))
WRONG_ISS=$(mint_openssl "https://evil.example" "$AUD" "$now" $((now + 3600)))
WRONG_AUD=$(mint_openssl "$ISS" "other_clients" "$now" $((now + 3600)))
OTHER_KEY=$(mint_openssl "$ISS" "$AUD" "$now" $((now + 3600)) key-other.pem)
sig=${GOOD##*.}
c=${sig:40:1}; if [ "$c" = A ]; then r=B; else r=A; fi
BAD_SIG=${GOOD%.*}.${sig:0:40}$r${sig:41}

# ---- servers ---------------------------------------------------------------------------------
fill "$TPL/nginx-upstream.conf" > nginx-upstream.conf
taskset -c "$CLIENT_CPU" nginx -c "$DIR/nginx-upstream.conf" -g 'daemon off;' &
UP_PID=$!; pids+=($UP_PID)

fill "$TPL/nginx-proxy.conf" PORT=$NGINX_PORT > nginx-proxy.conf
taskset -c "$SERVER_CPU" nginx -c "$DIR/nginx-proxy.conf" -g 'daemon off;' &
NGINX_PID=$!; pids+=($NGINX_PID)

fill "$TPL/haproxy.cfg" PLAIN_PORT=$HA_PLAIN_PORT JWT_PORT=$HA_JWT_PORT SAME_PORT=$HA_SAME_PORT > haproxy.cfg
haproxy -c -q -f haproxy.cfg
taskset -c "$SERVER_CPU" haproxy -db -f haproxy.cfg > haproxy.log 2>&1 &
HA_PID=$!; pids+=($HA_PID)

taskset -c "$CLIENT_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
  --appendonly no --daemonize no --logfile "$DIR/redis.log" &
REDIS_PID=$!; pids+=($REDIS_PID)
wait_port "$REDIS_PORT"

declare -A PC_PORT PC_PID PC_ADMIN
start_portcullis() { # name index cache store [busy]
  local name=$1 i=$2 cache=$3 store=$4 url_line=""
  [ "$store" = redis ] && url_line="url = \"redis://127.0.0.1:$REDIS_PORT/0\""
  PC_PORT[$name]=$((PORT_BASE + 10 + i)); PC_ADMIN[$name]=$((PORT_BASE + 30 + i))
  fill "$TPL/portcullis.toml" PORT=${PC_PORT[$name]} ADMIN_PORT=${PC_ADMIN[$name]} \
    CACHE="$cache" STORE="$store" STORE_URL="$url_line" > "portcullis-$name.toml"
  if [ "${5:-}" = busy ]; then
    sed -i 's/^threads = 1$/threads = 1\nbusy_poll = true/' "portcullis-$name.toml"
    grep -q '^busy_poll = true' "portcullis-$name.toml" || { echo "portcullis-$name.toml: no busy_poll line" >&2; exit 1; }
  fi
  "$PORTCULLIS" check-config "portcullis-$name.toml" > /dev/null
  taskset -c "$SERVER_CPU" "$PORTCULLIS" proxy --config "portcullis-$name.toml" > "portcullis-$name.log" 2>&1 &
  PC_PID[$name]=$!; pids+=(${PC_PID[$name]})
}
start_portcullis e 0 0 memory       # (e) public route
start_portcullis f 1 0 memory       # (f) JWT, cache off
start_portcullis g 2 10000 memory   # (g) JWT, cache on, repeated tokens
start_portcullis h 3 0 memory       # (h) JWT + signature, memory nonces
start_portcullis i 4 0 redis        # (i) JWT + signature, Redis nonces
start_portcullis k 7 10000 redis    # (k) the same as deployed: the verified cache on, a token per client
for p in $UP_PORT $NGINX_PORT $HA_PLAIN_PORT $HA_JWT_PORT ${PC_PORT[e]} ${PC_PORT[f]} ${PC_PORT[g]} ${PC_PORT[h]} ${PC_PORT[i]} ${PC_PORT[k]}; do
  wait_port "$p"
done
wait_ready() { # name: /readyz 200 within 20 s (the Redis revocation mirror syncs first)
  local i
  for i in $(seq 200); do
    curl -fsS -o /dev/null "http://127.0.0.1:${PC_ADMIN[$1]}/readyz" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "portcullis ($1) not ready" >&2; cat "portcullis-$1.log" >&2; exit 1
}
for n in e f g h i k; do wait_ready "$n"; done

# ---- targets ---------------------------------------------------------------------------------
declare -A NAME URL ARGS PID FORWARDED
NAME[a]="direct upstream (nginx return 200)";    URL[a]=http://127.0.0.1:$UP_PORT/public;        ARGS[a]="";  PID[a]=$UP_PID
NAME[b]="nginx proxy_pass";                      URL[b]=http://127.0.0.1:$NGINX_PORT/public;     ARGS[b]="";  PID[b]=$NGINX_PID
NAME[c]="HAProxy plain";                         URL[c]=http://127.0.0.1:$HA_PLAIN_PORT/public;  ARGS[c]="";  PID[c]=$HA_PID
NAME[j]="HAProxy plain + portcullis's forwarding headers and request id"; URL[j]=http://127.0.0.1:$HA_SAME_PORT/public; ARGS[j]=""; PID[j]=$HA_PID
NAME[d]="HAProxy jwt_verify RS256 + exp/iss/aud"; URL[d]=http://127.0.0.1:$HA_JWT_PORT/api/jwt;  ARGS[d]="--tokens $DIR/tokens.txt"; PID[d]=$HA_PID
NAME[e]="portcullis public route";               URL[e]=http://127.0.0.1:${PC_PORT[e]}/public;   ARGS[e]="";  PID[e]=${PC_PID[e]}
NAME[f]="portcullis JWT RS256, unique tokens, verified_cache = 0"; URL[f]=http://127.0.0.1:${PC_PORT[f]}/api/jwt; ARGS[f]="--tokens $DIR/tokens.txt"; PID[f]=${PC_PID[f]}
NAME[g]="portcullis JWT RS256, cache on, 100 repeated tokens";    URL[g]=http://127.0.0.1:${PC_PORT[g]}/api/jwt; ARGS[g]="--tokens $DIR/tokens-100.txt"; PID[g]=${PC_PID[g]}
SIGN="--sign-key-id bench-1 --sign-secret-env COMPARE_SIG_SECRET"
NAME[h]="portcullis JWT (unique, cache 0) + signature, memory nonces"; URL[h]=http://127.0.0.1:${PC_PORT[h]}/api/jwtsig; ARGS[h]="--tokens $DIR/tokens.txt $SIGN"; PID[h]=${PC_PID[h]}
NAME[i]="portcullis JWT (unique, cache 0) + signature, Redis nonces";  URL[i]=http://127.0.0.1:${PC_PORT[i]}/api/jwtsig; ARGS[i]="--tokens $DIR/tokens.txt $SIGN"; PID[i]=${PC_PID[i]}
# (k) is (i) as a deployment runs it: the default verified cache (10,000 tokens) and 10,000 API
# clients, each reusing its token for the token's lifetime (DESIGN.md's seeds: 10,000 clients,
# 15-minute tokens), so the RSA check runs once a token, not once a request.
NAME[k]="portcullis JWT (cache on, 10,000 client tokens) + signature, Redis nonces"; URL[k]=http://127.0.0.1:${PC_PORT[k]}/api/jwtsig; ARGS[k]="--tokens $DIR/tokens-10k.txt $SIGN"; PID[k]=${PC_PID[k]}

# ---- correctness before speed ----------------------------------------------------------------
check() { # label expected-codes url [curl args...]
  local label=$1 want=$2 url=$3; shift 3
  local got; got=$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url")
  if [[ " $want " != *" $got "* ]]; then echo "CHECK FAILED: $url $* -> $got (want $want)" >&2; exit 1; fi
  echo "  $got  $url  $label" >&2
}
log "checks (curl): good token 200; expired, wrong iss, wrong aud, bad signature, none 401/403"
for t in d f g; do
  check "($t) loadgen token" 200 "${URL[$t]}" -H "Authorization: Bearer $GOOD"
  check "($t) openssl token" 200 "${URL[$t]}" -H "Authorization: Bearer $GOOD_OSSL"
  check "($t) expired" "401 403" "${URL[$t]}" -H "Authorization: Bearer $EXPIRED"
  check "($t) wrong iss" "401 403" "${URL[$t]}" -H "Authorization: Bearer $WRONG_ISS"
  check "($t) wrong aud" "401 403" "${URL[$t]}" -H "Authorization: Bearer $WRONG_AUD"
  check "($t) bad signature" "401 403" "${URL[$t]}" -H "Authorization: Bearer $BAD_SIG"
  check "($t) signed by another key" "401 403" "${URL[$t]}" -H "Authorization: Bearer $OTHER_KEY"
  check "($t) no token" "401 403" "${URL[$t]}"
done
for t in h i k; do
  check "($t) token, no signature" "401 403" "${URL[$t]}" -H "Authorization: Bearer $GOOD"
  check "($t) token, wrong signature" "401 403" "${URL[$t]}" -H "Authorization: Bearer $GOOD" \
    -H 'X-Signature: Signature v1, keyId="bench-1", ts="'"$now"'", nonce="abcdefghijklmnopqrst", signature="'"$(printf '0%.0s' $(seq 64))"'"'
done
for t in a b c e j; do check "($t) plain" 200 "${URL[$t]}"; done
# (j) is a fair yardstick for (e) only if both send the upstream the same headers and return
# the request id: the upstream's /public/forwarded echoes what it received.
for t in e j; do
  seen=$(curl -s "${URL[$t]%/public}/public/forwarded")
  case "$seen" in
    *"xff= "*|*"xfp= "*|*"xfh= "*|*"rid=") echo "CHECK FAILED: ($t) upstream saw: $seen" >&2; exit 1 ;;
  esac
  curl -s -o /dev/null -D - "${URL[$t]}" | grep -qi '^x-request-id: .' \
    || { echo "CHECK FAILED: ($t) returns no x-request-id" >&2; exit 1; }
  echo "  ($t) upstream saw: $seen; x-request-id returned" >&2
  FORWARDED[$t]=$seen
done
{
  echo "curl checks passed at $(date -u +%FT%TZ): (d) (f) (g): loadgen token 200, openssl-made token 200;"
  echo "expired, wrong iss, wrong aud, altered signature, signed by another RSA key, no token: 401/403. (h) (i) (k): token without or with a wrong signature: 401/403."
  echo "(e) and (j) return x-request-id; the upstream saw from (e): ${FORWARDED[e]}; from (j): ${FORWARDED[j]}"
} > "$RAW/checks.txt"

# ---- measurement -----------------------------------------------------------------------------
lg() { # target extra-args... -> loadgen JSON on stdout
  local t=$1; shift
  # shellcheck disable=SC2086
  taskset -c "$CLIENT_CPU" "$LOADGEN" --threads 1 --url "${URL[$t]}" ${ARGS[$t]} "$@" --json
}

# The machine's own speed, before the rounds and after the run: on a shared VM it can move by
# more than the gaps measured here (bench/README.md, fifteenth pass), and runs made at different
# speeds are not comparable.
rsa_verify_rate() { # RSA-2048 verifications a second on the proxies' core (openssl speed)
  taskset -c "$SERVER_CPU" openssl speed -seconds 2 rsa2048 2>/dev/null \
    | awk '/^rsa 2048 bits/ { printf "%.0f", $NF }'
}
RSA_BEFORE=$(rsa_verify_rate)

log "warm-up (2 s each, not reported)"
for t in $TARGETS; do lg "$t" -c "$CONNS" -d 2s > "$DIR/warm-$t.json"; done

# Each target runs right beside the HAProxy it is compared with ((c) beside (e), (d) beside
# (f); (j), the same-headers HAProxy, next to (c)), and every second round runs in the reverse order (ABBA): a machine that speeds up or
# slows down during the run then favours neither side of a ratio.
ORDER=""
for t in a b j c e d f g h i k; do case " $TARGETS " in *" $t "*) ORDER="$ORDER $t" ;; esac; done
REVERSED=$(echo "$ORDER" | tr ' ' '\n' | tac | tr '\n' ' ')

TSV=$RAW/runs.tsv; : > "$TSV"
for r in $(seq "$ROUNDS"); do
  log "round $r of $ROUNDS, load average $(loadavg)"
  if [ $((r % 2)) -eq 1 ]; then order=$ORDER; else order=$REVERSED; fi
  for t in $order; do
    load=$(loadavg)
    before=$(cpu_of "${PID[$t]}"); up_before=$(cpu_of "$UP_PID"); st_before=$(cpustat)
    f=$RAW/r$r-$t.json
    lg "$t" -c "$CONNS" -d "$DURATION" > "$f"
    after=$(cpu_of "${PID[$t]}"); up_after=$(cpu_of "$UP_PID"); st_after=$(cpustat)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$f" "$load" \
      "$(awk -v a="$after" -v b="$before" 'BEGIN { print a - b }')" \
      "$(awk -v a="$up_after" -v b="$up_before" 'BEGIN { print a - b }')" \
      "$(cpushare "$st_before" "$st_after")" >> "$TSV"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); l=r["latency_ms"]; print("  (%s) %.0f req/s  p50 %.3f  p99 %.3f ms  non-2xx %d errors %d" % (sys.argv[2], r["requests_per_s"], l["p50"], l["p99"], r["non_2xx"], r["errors"]))' "$f" "$t" >&2
  done
done

REDIS_KEYS=$(redis-cli -p "$REDIS_PORT" dbsize 2>/dev/null || echo '?')

cache_lookups() { # portcullis target -> "hits misses" of its verified-token cache so far
  curl -fsS "http://127.0.0.1:${PC_ADMIN[$1]}/metrics" | awk '
    /^portcullis_jwt_verified_cache_lookups_total\{result="hit"\} / { h = $2 }
    /^portcullis_jwt_verified_cache_lookups_total\{result="miss"\} / { m = $2 }
    END { print h + 0, m + 0 }'
}
# The cache's hit rate of (g) and (k) over the throughput rounds, their warm-up and checks
# included (a binary without the metric reads 0 0).
CACHE_NOTE=""
for t in g k; do
  [ -n "${PC_ADMIN[$t]:-}" ] || continue
  read -r hits misses < <(cache_lookups "$t" || true)
  CACHE_NOTE+=" ($t) ${hits:-0} hits, ${misses:-0} misses, $(awk -v h="${hits:-0}" -v m="${misses:-0}" \
    'BEGIN { if (h + m > 0) printf "%.1f%% hits", 100 * h / (h + m); else printf "no lookups counted" }');"
done
names=(); for t in $TARGETS; do names+=("$t=${NAME[$t]}"); done
TABLE=$(python3 "$TPL/report.py" "$TSV" "${names[@]}")

slow_counts() { # portcullis target -> "count le_1ms le_5ms" of its request-duration histogram
  curl -fsS "http://127.0.0.1:${PC_ADMIN[$1]}/metrics" | awk '
    /^portcullis_request_duration_seconds_count / { c = $2 }
    /^portcullis_request_duration_seconds_bucket\{le="0.001"\} / { a = $2 }
    /^portcullis_request_duration_seconds_bucket\{le="0.005"\} / { b = $2 }
    END { print c, a, b }'
}

# ---- (1) p99 added at a fixed rate -----------------------------------------------------------
# (i) against the direct upstream, with HAProxy plain (c) and jwt_verify (d) at the same rate as
# yardsticks: what the machine itself adds to any proxy's tail (scheduling across the two cores)
# shows in theirs.
RATE_MD=""
if [ "$RATE" != 0 ]; then
  # The throughput rounds leave (i)'s nonces in Redis (TTL 2 x max_skew = 600 s). In the middle of
  # the fixed-rate rounds they would start to expire at the rate they were written, 15,000-20,000
  # a second, three to four times what 5,000/s leaves behind, and Redis's expiry cycles (25 ms and
  # more each here: LATENCY LATEST "expire-cycle") would show in (i)'s tail. They go first.
  log "removing the throughput rounds' $REDIS_KEYS nonces from Redis"
  redis-cli -p "$REDIS_PORT" --scan --pattern 'portcullis:nonce:*' \
    | xargs -r -n 5000 redis-cli -p "$REDIS_PORT" unlink > /dev/null
  NONCES_LEFT=$(redis-cli -p "$REDIS_PORT" --scan --pattern 'portcullis:nonce:*' | wc -l)
  [ "$NONCES_LEFT" = 0 ] || { echo "$NONCES_LEFT nonces left in Redis after removing them" >&2; exit 1; }
  REDIS_NOTE="; removed before the fixed-rate rounds, which start from a Redis without them"
  log "fixed rate $RATE/s: direct upstream, HAProxy plain, HAProxy jwt_verify, (f), (h), (i) and (k), $RATE_ROUNDS rounds"
  RATE_MD="| round | load before | direct p50 / p99 / p99.9 ms | (c) HAProxy plain p50 / p99 / p99.9 | (d) HAProxy jwt_verify p50 / p99 / p99.9 | (i) portcullis p50 / p99 / p99.9 | p99 added: (c) / (d) / **(i)** ms | due not sent (direct / c / d / i) | non-2xx (direct / c / d / i) | steal CPU 0 / CPU 1 (direct; c; d; i) |"$'\n'"| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  RATE_SPLIT_MD="| round | (f) JWT only: p99 added; in the proxy over 1 ms / 5 ms | (h) JWT + signature, memory nonces | (i) JWT + signature, Redis nonces | (k) the same, verified cache on, 10,000 client tokens |"$'\n'"| --- | --- | --- | --- | --- |"
  added=(); added_c=(); added_d=()
  for r in $(seq "$RATE_ROUNDS"); do
    load=$(loadavg)
    for t in a c d f h i k; do
      st_before=$(cpustat)
      [ -n "${PC_ADMIN[$t]:-}" ] && slow_counts "$t" > "$RAW/rate-r$r-$t.hist0"
      lg "$t" -c "$CONNS" -d "$DURATION" -R "$RATE" > "$RAW/rate-r$r-$t.json"
      cpushare "$st_before" "$(cpustat)" > "$RAW/rate-r$r-$t.cpu"
      [ -n "${PC_ADMIN[$t]:-}" ] && slow_counts "$t" > "$RAW/rate-r$r-$t.hist1"
    done
    split=$(python3 - "$RAW/rate-r$r" "$r" <<'PY'
import json, sys
prefix = sys.argv[1]
base = json.load(open(f"{prefix}-a.json"))["latency_ms"]["p99"]
cells = []
for t in "fhik":
    p99 = json.load(open(f"{prefix}-{t}.json"))["latency_ms"]["p99"]
    before, after = ([float(x) for x in open(f"{prefix}-{t}.hist{k}").read().split()] for k in "01")
    count = after[0] - before[0]
    over = [count - (a - b) for a, b in zip(after[1:], before[1:])]
    cells.append(f"{p99 - base:.3f} ms; {over[0]:.0f} / {over[1]:.0f} of {count:.0f}")
print(f"| {sys.argv[2]} | " + " | ".join(cells) + " |")
PY
)
    RATE_SPLIT_MD+=$'\n'"$split"
    line=$(python3 - "$RAW/rate-r$r" "$r" "$load" <<'PY'
import json, sys
prefix = sys.argv[1]
runs = [json.load(open(f"{prefix}-{t}.json")) for t in "acdi"]
steal = [[float(x) for x in open(f"{prefix}-{t}.cpu").read().split()[2:4]] for t in "acdi"]
lat = [d["latency_ms"] for d in runs]
base = lat[0]["p99"]
added = [l["p99"] - base for l in lat[1:]]
cells = " | ".join(f"{l['p50']:.3f} / {l['p99']:.3f} / {l['p99_9']:.3f}" for l in lat)
print(f"{added[2]:.3f}\t{added[0]:.3f}\t{added[1]:.3f}\t| {sys.argv[2]} | {sys.argv[3]} | {cells} | "
      f"{added[0]:.3f} / {added[1]:.3f} / **{added[2]:.3f}** | "
      + " / ".join(str(d["due_not_sent"]) for d in runs) + " | "
      + " / ".join(str(d["non_2xx"] + d["errors"]) for d in runs) + " | "
      + "; ".join(f"{s0:.1%} / {s1:.1%}" for s0, s1 in steal) + " |")
PY
)
    IFS=$'\t' read -r a_i a_c a_d row <<< "$line"
    added+=("$a_i"); added_c+=("$a_c"); added_d+=("$a_d")
    RATE_MD+=$'\n'"$row"
    log "  rate round $r: p99 added (c) $a_c / (d) $a_d / (i) $a_i ms"
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
  med=$(median "${added[@]}")
  RATE_MD+=$'\n\n'"Median p99 added by portcullis (i) at $RATE req/s: **$med ms** (acceptance: below 1 ms). "
  RATE_MD+="The same figure for the yardsticks on this machine in the same rounds: HAProxy plain $(median "${added_c[@]}") ms, HAProxy jwt_verify $(median "${added_d[@]}") ms."
fi

# ---- (1b) the same with busy polling -----------------------------------------------------------
# A busy poller never leaves its core, so each runs alone on the proxies' core, started for its
# rounds and stopped after; the other proxies are idle meanwhile.
BUSY_MD=""
if [ "$RATE" != 0 ] && [ "$BUSY" = 1 ]; then
  log "fixed rate $RATE/s with busy polling: HAProxy jwt_verify (busy-polling), (i) (busy_poll), $RATE_ROUNDS rounds"
  sed -e 's/^  nbthread 1$/  nbthread 1\n  busy-polling/' -e "s/:$HA_PLAIN_PORT\$/:$((PORT_BASE + 5))/" \
      -e "s/:$HA_JWT_PORT\$/:$((PORT_BASE + 6))/" -e "s/:$HA_SAME_PORT\$/:$((PORT_BASE + 8))/" haproxy.cfg > haproxy-busy.cfg
  grep -q busy-polling haproxy-busy.cfg || { echo "haproxy-busy.cfg: no busy-polling line" >&2; exit 1; }
  haproxy -c -q -f haproxy-busy.cfg
  URL[dbusy]=http://127.0.0.1:$((PORT_BASE + 6))/api/jwt; ARGS[dbusy]=${ARGS[d]}
  BUSY_MD="| round | direct p50 / p99 / p99.9 ms | (d) HAProxy jwt_verify, busy-polling | (i) portcullis, busy_poll | p99 added: (d) / **(i)** ms | p50 added: (d) / **(i)** ms | non-2xx (direct / d / i) | steal CPU 0 / CPU 1 (direct; d; i) |"$'\n'"| --- | --- | --- | --- | --- | --- | --- | --- |"
  busy_added=(); busy_added_d=()
  for r in $(seq "$RATE_ROUNDS"); do
    st_before=$(cpustat)
    lg a -c "$CONNS" -d "$DURATION" -R "$RATE" > "$RAW/busy-r$r-a.json"
    cpushare "$st_before" "$(cpustat)" > "$RAW/busy-r$r-a.cpu"
    taskset -c "$SERVER_CPU" haproxy -db -f haproxy-busy.cfg > haproxy-busy.log 2>&1 &
    hb=$!
    wait_port $((PORT_BASE + 6))
    st_before=$(cpustat)
    lg dbusy -c "$CONNS" -d "$DURATION" -R "$RATE" > "$RAW/busy-r$r-d.json"
    cpushare "$st_before" "$(cpustat)" > "$RAW/busy-r$r-d.cpu"
    kill "$hb"; wait "$hb" 2>/dev/null || true
    start_portcullis ibusy 6 0 redis busy
    wait_port "${PC_PORT[ibusy]}"; wait_ready ibusy
    URL[ibusy]=http://127.0.0.1:${PC_PORT[ibusy]}/api/jwtsig; ARGS[ibusy]=${ARGS[i]}
    lg ibusy -c "$CONNS" -d 1s > /dev/null
    st_before=$(cpustat)
    lg ibusy -c "$CONNS" -d "$DURATION" -R "$RATE" > "$RAW/busy-r$r-i.json"
    cpushare "$st_before" "$(cpustat)" > "$RAW/busy-r$r-i.cpu"
    kill "${PC_PID[ibusy]}"; wait "${PC_PID[ibusy]}" 2>/dev/null || true
    line=$(python3 - "$RAW/busy-r$r" "$r" <<'PY'
import json, sys
prefix = sys.argv[1]
runs = [json.load(open(f"{prefix}-{t}.json")) for t in "adi"]
steal = [[float(x) for x in open(f"{prefix}-{t}.cpu").read().split()[2:4]] for t in "adi"]
lat = [d["latency_ms"] for d in runs]
p99 = [l["p99"] - lat[0]["p99"] for l in lat[1:]]
p50 = [l["p50"] - lat[0]["p50"] for l in lat[1:]]
cells = " | ".join(f"{l['p50']:.3f} / {l['p99']:.3f} / {l['p99_9']:.3f}" for l in lat)
print(f"{p99[1]:.3f}\t{p99[0]:.3f}\t| {sys.argv[2]} | {cells} | {p99[0]:.3f} / **{p99[1]:.3f}** | {p50[0]:.3f} / **{p50[1]:.3f}** | "
      + " / ".join(str(d["non_2xx"] + d["errors"]) for d in runs) + " | "
      + "; ".join(f"{s0:.1%} / {s1:.1%}" for s0, s1 in steal) + " |")
PY
)
    IFS=$'\t' read -r b_i b_d row <<< "$line"
    busy_added+=("$b_i"); busy_added_d+=("$b_d")
    BUSY_MD+=$'\n'"$row"
    log "  busy round $r: p99 added (d) $b_d / (i) $b_i ms"
  done
  BUSY_MD+=$'\n\n'"Median p99 added with busy polling at $RATE req/s: (i) **$(median "${busy_added[@]}") ms**, HAProxy jwt_verify $(median "${busy_added_d[@]}") ms."
fi

# ---- (2) memory ------------------------------------------------------------------------------
MEM_MD=""
if [ "$MEM" = 1 ]; then
  log "memory: fresh portcullis, verified_cache = 10000, 10,000 distinct tokens, 1,000 idle connections"
  start_portcullis mem 5 10000 memory
  wait_port "${PC_PORT[mem]}"; wait_ready mem
  mp=${PC_PID[mem]}
  URL[mem]=http://127.0.0.1:${PC_PORT[mem]}/api/jwt; ARGS[mem]="--tokens $DIR/tokens-10k.txt"
  sleep 1
  rss0=$(rss_kib "$mp")
  # Round-robin over the 10,000 tokens: one run sends each at least once when it has >= 10,000 requests.
  lg mem -c "$CONNS" -d 3s > "$RAW/mem-tokens.json"
  sent=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["requests"], r["non_2xx"] + r["errors"])' "$RAW/mem-tokens.json")
  rss1=$(rss_kib "$mp")
  rm -f "$DIR/hold.ready"
  ( ulimit -n 4096; exec taskset -c "$CLIENT_CPU" python3 "$TPL/hold_conns.py" 127.0.0.1 "${PC_PORT[mem]}" /public 1000 "$DIR/hold.ready" ) &
  HOLD_PID=$!; pids+=($HOLD_PID)
  for _ in $(seq 300); do [ -s "$DIR/hold.ready" ] && break; sleep 0.1; done
  sleep 1
  est=$(ss -Htn state established "( sport = :${PC_PORT[mem]} )" | wc -l)
  rss2=$(rss_kib "$mp")
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$mp/status")
  held=$(cat "$DIR/hold.ready" 2>/dev/null || echo "not ready")
  kill "$HOLD_PID" 2>/dev/null || true
  MEM_MD="| state | VmRSS |"$'\n'"| --- | ---: |"
  MEM_MD+=$'\n'"| fresh, after start | $((rss0 / 1024)) MiB ($rss0 KiB) |"
  MEM_MD+=$'\n'"| after 10,000 distinct tokens (requests sent, non-2xx+errors: $sent) | $((rss1 / 1024)) MiB ($rss1 KiB) |"
  MEM_MD+=$'\n'"| + 1,000 idle keep-alive connections (answers 200 / other: $held; established at the proxy's port when measured: $est) | **$((rss2 / 1024)) MiB** ($rss2 KiB) |"
  MEM_MD+=$'\n\n'"VmHWM (peak RSS) of that process: $((hwm / 1024)) MiB. Acceptance: below 100 MiB."
  MEM_MD+=$'\n\n'"VmRSS of the benchmark's portcullis processes at the end of the run:"
  for n in e f g h i; do MEM_MD+=" ($n) $(( $(rss_kib "${PC_PID[$n]}") / 1024 )) MiB;"; done
fi

# ---- wrk reference ---------------------------------------------------------------------------
WRK_MD=""
if [ "$WRK" = 1 ]; then
  log "wrk reference (one round, plain targets)"
  WRK_MD="| target | wrk req/s | p50 | p99 | non-2xx / socket errors |"$'\n'"| --- | ---: | --- | --- | --- |"
  for t in a b c j e; do
    out=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${URL[$t]}")
    echo "$out" > "$RAW/wrk-$t.txt"
    rps=$(awk '/^Requests\/sec/ { print $2 }' <<< "$out")
    p50=$(awk '$1 == "50%" { print $2 }' <<< "$out")
    p99=$(awk '$1 == "99%" { print $2 }' <<< "$out")
    errs=$( (grep -E 'Non-2xx|Socket errors' <<< "$out" || echo 0) | tr '\n' ' ')
    WRK_MD+=$'\n'"| ($t) ${NAME[$t]} | $rps | $p50 | $p99 | $errs |"
  done
fi

# ---- report ----------------------------------------------------------------------------------
RSA_AFTER=$(rsa_verify_rate)
{
  echo "# Side by side (issue 6): $STAMP"
  echo
  echo "- machine: nproc $(nproc), $(lscpu | grep 'Model name' | sed 's/  */ /g'); kernel $(uname -r)"
  echo "- machine speed: \`openssl speed -seconds 2 rsa2048\` on CPU $SERVER_CPU verifies ${RSA_BEFORE:-?}/s before the rounds and ${RSA_AFTER:-?}/s after the run (a drift between the two is the machine's, not the targets')"
  echo "- portcullis: $PORTCULLIS ($(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo '?'))"
  if [ -f "$PORTCULLIS.pgo" ]; then
    echo "- build: $(tr '\n' ' ' < "$PORTCULLIS.pgo")"
  else
    echo "- build: cargo build --release (no profile-guided optimisation)"
  fi
  echo "- $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); $(redis-server --version | cut -d' ' -f1-3)"
  echo "- command: \`DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS TOKENS=$TOKENS RATE=$RATE bash bench/compare.sh\`"
  echo "- every run: \`taskset -c $CLIENT_CPU loadgen --threads 1 -c $CONNS -d $DURATION --url ...\` (closed loop, keep-alive), after a 2 s warm-up of each target;"
  echo "  proxies on CPU $SERVER_CPU with one worker thread, upstream nginx + loadgen + redis on CPU $CLIENT_CPU; odd rounds run the targets in the order$ORDER, even rounds in the reverse order (each portcullis target beside the HAProxy it is compared with)."
  echo "- CPU columns (medians over the rounds, share of one core over the run): 'proxy' = user+sys of the process under test from /proc/PID/stat (for (a) the upstream nginx itself),"
  echo "  'upstream' = the upstream nginx, 'loadgen' = its own report; 'CPU 0 / CPU 1 busy' = all processes on each core from /proc/stat"
  echo "  (CPU 0 busy minus proxy = other processes on the proxy's core; CPU 1 near 100% = the client side limits the figure);"
  echo "  'proxy CPU per request' = that process's CPU time over the requests it answered, which does not depend on what limited the rate."
  echo
  echo "$TABLE"
  echo
  echo "Keys in the benchmark's Redis after the rounds (nonces of (i) and (k), TTL 2 x max_skew): $REDIS_KEYS${REDIS_NOTE:-}."
  [ -z "$CACHE_NOTE" ] || { echo; echo "Verified-token cache lookups over the throughput rounds (warm-up and checks included; \`portcullis_jwt_verified_cache_lookups_total\` from /metrics):$CACHE_NOTE"; }
  echo
  if [ -n "$RATE_MD" ]; then
    echo "## p99 added at $RATE req/s (JWT + signature + Redis nonces)"; echo; echo "$RATE_MD"; echo
    echo "Where (i)'s tail comes from, in the same rounds: the p99 added over the direct upstream by the JWT check alone (f), with the"
    echo "signature and memory nonces (h), with Redis nonces (i), and (i) as deployed with the verified cache on and a token per client (k);"
    echo "and how many requests the proxy itself took over 1 ms and over 5 ms"
    echo 'from request head to response head (its `portcullis_request_duration_seconds` histogram, read from /metrics before and after).'
    echo "Requests slow in the client's figures but not in the proxy's waited outside it (in the sockets, or for a core)."
    echo; echo "$RATE_SPLIT_MD"; echo
  fi
  if [ -n "$BUSY_MD" ]; then echo "## The same with busy polling (each busy poller alone on CPU $SERVER_CPU)"; echo; echo "$BUSY_MD"; echo; fi
  if [ -n "$MEM_MD" ]; then echo "## Memory"; echo; echo "$MEM_MD"; echo; fi
  if [ -n "$WRK_MD" ]; then echo "## wrk reference (one round, \`wrk -t1 -c$CONNS -d$DURATION --latency\`, CPU $CLIENT_CPU)"; echo; echo "$WRK_MD"; echo; fi
  echo "Raw loadgen JSON per run: \`$(realpath --relative-to="$ROOT" "$RAW")/\`."
} > "$REPORT"
cat "$REPORT"
log "wrote $REPORT"
