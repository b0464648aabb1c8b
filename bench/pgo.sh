#!/usr/bin/env bash
# A profile-guided (PGO) release build of portcullis:
#
#   bash bench/pgo.sh            # -> target-pgo/release/portcullis (about 10 minutes on 2 cores)
#
# 1. builds the proxy with LLVM instrumentation (`-Cprofile-generate`, in target-pgo-gen/);
# 2. trains it on the proxy's own hot paths, each a few seconds under the load generator:
#    bench/compare.sh's portcullis targets, short (the public route; JWT RS256 with the cache off
#    and on; JWT + signature with memory and Redis nonces, saturated and at a fixed rate; and
#    compare.sh's curl checks, which take the rejection paths: expired, wrong issuer, wrong
#    audience, altered signature, unknown key, no token, no or a wrong signature), then
#    bench/loadgen/tls-bench.sh, short (full TLS 1.3 handshakes, keep-alive over TLS 1.3);
# 3. merges the profile with `llvm-profdata` (rustup's llvm-tools component, added when missing);
# 4. builds again with `-Cprofile-use` into target-pgo/.
#
# The code is the same as `cargo build --release` builds; the compiler only lays it out and
# inlines it by what the training ran most. Paths the training does not run (the issuer, OAuth,
# rate limits, revocation, certificate tooling) are compiled as cold code: smaller, and
# possibly a little slower than in a plain release build.
#
# Writes target-pgo/release/portcullis.pgo: the commit, the toolchain and what the training ran.
# Environment: TRAIN_DURATION [3s]; PORT_BASE [27200] for compare.sh's ports (PORT_BASE ..
# PORT_BASE+40); tls-bench.sh uses 127.0.0.1:8443 and 8080. Needs what compare.sh needs (it
# installs nginx-light, haproxy, wrk, redis-server with apt when missing).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TRAIN_DURATION=${TRAIN_DURATION:-3s}
PORT_BASE=${PORT_BASE:-27200}
GEN_DIR=$ROOT/target-pgo-gen
USE_DIR=$ROOT/target-pgo
PROFILES=$GEN_DIR/profiles
LOADGEN=${LOADGEN:-$HERE/loadgen/target/release/loadgen}

log() { echo "[$(date -u +%H:%M:%S)] pgo: $*" >&2; }

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | awk '/^host:/ { print $2 }')
profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$profdata" ]; then
  log "adding rustup's llvm-tools component (for llvm-profdata)"
  rustup component add llvm-tools
fi
[ -x "$profdata" ] || { echo "no llvm-profdata at $profdata" >&2; exit 1; }

if [ ! -x "$LOADGEN" ]; then
  log "building the load generator"
  (cd "$HERE/loadgen" && CARGO_TARGET_DIR=$PWD/target cargo build --release --locked)
fi

log "1/4 instrumented build (target-pgo-gen)"
rm -rf "$PROFILES"
mkdir -p "$PROFILES"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$PROFILES" CARGO_TARGET_DIR=$GEN_DIR \
  cargo build --release --locked)
# Build scripts ran instrumented too and wrote their own profiles: only the proxy's count.
rm -f "$PROFILES"/*.profraw
instrumented=$GEN_DIR/release/portcullis

log "2/4 training: compare.sh's portcullis targets, $TRAIN_DURATION each"
train_out=$(mktemp -d)
trap 'rm -rf "$train_out"' EXIT
PORTCULLIS=$instrumented LOADGEN=$LOADGEN DURATION=$TRAIN_DURATION ROUNDS=1 RATE_ROUNDS=1 \
  BUSY=0 MEM=0 WRK=0 TOKENS=20000 TARGETS="e f g h i" PORT_BASE=$PORT_BASE \
  DIR=/tmp/portcullis-pgo OUT=$train_out bash "$HERE/compare.sh" > "$train_out/compare.txt"
log "2/4 training: tls-bench.sh, $TRAIN_DURATION each"
PORTCULLIS=$instrumented LOADGEN=$LOADGEN DURATION=$TRAIN_DURATION \
  DIR=/tmp/portcullis-pgo-tls bash "$HERE/loadgen/tls-bench.sh" > "$train_out/tls.txt"

log "3/4 merging the profile"
# Each instrumented process writes its part of the profile as it exits, after the scripts above
# sent it SIGTERM: wait for the last one, or the merge reads a half-written file.
# pgrep takes a regular expression: the path's special characters are escaped.
running="^$(printf '%s' "$instrumented" | sed 's/[][\\.*^$+?(){}|]/\\&/g') "
for _ in $(seq 1 150); do
  pgrep -f "$running" > /dev/null || break
  sleep 0.2
done
if pgrep -f "$running" > /dev/null; then
  echo "an instrumented portcullis is still running after 30 s: $(pgrep -af "$running")" >&2
  exit 1
fi
shopt -s nullglob
raw=("$PROFILES"/*.profraw)
[ ${#raw[@]} -gt 0 ] || { echo "the training wrote no profile to $PROFILES" >&2; exit 1; }
"$profdata" merge -o "$PROFILES/merged.profdata" "${raw[@]}"

log "4/4 optimised build (target-pgo)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$PROFILES/merged.profdata" CARGO_TARGET_DIR=$USE_DIR \
  cargo build --release --locked)

{
  echo "profile-guided build (bench/pgo.sh) of $(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo '?')"
  echo "$(rustc --version); trained $(date -u +%FT%TZ) on compare.sh targets e f g h i and tls-bench.sh, $TRAIN_DURATION each"
} > "$USE_DIR/release/portcullis.pgo"
log "done: $USE_DIR/release/portcullis"
