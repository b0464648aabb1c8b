#!/usr/bin/env bash
# User-space instructions of a proxy under a fixed, light load (callgrind counts do not depend
# on what else the machine is doing). Starts the command under valgrind, waits for PORT, warms
# up (2 s at 200/s), sends SECONDS at RATE requests/s with the load generator, stops the
# process with SIGTERM and prints the request count and callgrind's total.
#
#   bench/callgrind.sh NAME PORT PATH RATE SECONDS -- command...
#   LGARGS="--tokens tokens.txt" bench/callgrind.sh jwt 28011 /api/jwt 300 14 -- portcullis proxy --config jwt.toml
#
# Instructions per request: run it twice (e.g. 4 s and 14 s) and divide the difference of the
# totals by the difference of the request counts; start-up and idle costs cancel out.
# Output in $OUT (default /tmp): cg.NAME.out (callgrind_annotate it), cg.NAME.json, cg.NAME.log.
set -uo pipefail
NAME=$1; PORT=$2; P=$3; RATE=$4; SECS=$5; shift 6
OUT=${OUT:-/tmp}
LOADGEN=${LOADGEN:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/loadgen/target/release/loadgen}
valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$NAME.out" "$@" > "$OUT/cg.$NAME.log" 2>&1 &
VPID=$!
for _ in $(seq 100); do ss -Hltn "sport = :$PORT" | grep -q . && break; sleep 0.2; done
sleep 1
# shellcheck disable=SC2086 # LGARGS is a list of arguments
"$LOADGEN" --threads 1 -c 8 -d 2s -R 200 --url "http://127.0.0.1:$PORT$P" ${LGARGS:-} > /dev/null 2>&1
# shellcheck disable=SC2086
"$LOADGEN" --threads 1 -c 8 -d "${SECS}s" -R "$RATE" --url "http://127.0.0.1:$PORT$P" ${LGARGS:-} --json > "$OUT/cg.$NAME.json" 2>/dev/null
kill -TERM $VPID
for _ in $(seq 50); do kill -0 $VPID 2>/dev/null || break; sleep 0.2; done
kill -9 $VPID 2>/dev/null; wait $VPID 2>/dev/null
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('requests', d['requests'], 'non-2xx', d['non_2xx'], 'errors', d['errors'])" "$OUT/cg.$NAME.json"
grep -E "^totals" "$OUT/cg.$NAME.out"
