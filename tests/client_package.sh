#!/usr/bin/env bash
# The installed client package works for another project: install celer's build tree into a
# fresh prefix, build tests/client_package against it with find_package(celer), then run it
# against a port nobody listens on (an error value) and against a real `celer serve`.
# Usage: client_package.sh BUILD_DIR CELER_BIN WORK_DIR
set -euo pipefail
build=$1 celer=$2 work=$3
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work" && mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$here/client_package" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/build" >/dev/null
set +e
"$work/build/consumer" 127.0.0.1 1
rc=$?
set -e
[ "$rc" -eq 3 ] || { echo "expected an error value (exit 3) from a closed port, got exit $rc"; exit 1; }

: >"$work/serve.log"  # before the server starts: the loop below reads it at once
"$celer" serve --port 0 --model "$(dirname "$0")/data/stories260K.gguf" >"$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\):.*/\1/p' "$work/serve.log")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "celer serve did not start"; cat "$work/serve.log"; exit 1; }
out=$("$work/build/consumer" 127.0.0.1 "$port")
echo "$out"
grep -q "^tokens: 8$" <<<"$out"
