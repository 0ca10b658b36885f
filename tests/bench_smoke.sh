#!/usr/bin/env bash
# celer bench against a live `celer serve` on the bundled model (512-token vocabulary, context
# 2048): each dataset runs to completion with no failed request, and the shared-prefix one hits
# the prefix cache. Usage: bench_smoke.sh path/to/celer
set -euo pipefail

CELER=${1:?usage: bench_smoke.sh path/to/celer}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/celer-bench-smoke-XXXXXX")
SERVER_PID=
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  echo "bench_smoke: FAIL: $*" >&2
  exit 1
}

: >"$WORK/server.log"  # before the server starts: the loop below reads it at once
"$CELER" serve --port 0 --http-port 0 --model "$(dirname "$0")/data/stories260K.gguf" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

PORT=
HTTP_PORT=
for _ in $(seq 1 600); do
  PORT=$(sed -n 's/^celer: serving .* on 127\.0\.0\.1:\([0-9][0-9]*\): .*/\1/p' "$WORK/server.log" | head -n 1)
  HTTP_PORT=$(sed -n 's/^celer: http on 127\.0\.0\.1:\([0-9][0-9]*\) .*/\1/p' "$WORK/server.log" | head -n 1)
  [[ -n "$PORT" && -n "$HTTP_PORT" ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; fail "celer serve exited before listening"; }
  sleep 0.1
done
[[ -n "$PORT" ]] || { cat "$WORK/server.log" >&2; fail "celer serve did not report its port within 60 s"; }
echo "bench_smoke: celer serve on 127.0.0.1:$PORT"

# check FILE EXPECTED_COMPLETED [min hit rate, exclusive]
check() {
  python3 - "$@" <<'EOF'
import json, sys
path, expected = sys.argv[1], int(sys.argv[2])
r = json.load(open(path))
errors = []
if r["completed"] != expected: errors.append(f"completed {r['completed']}, expected {expected}")
if r["failed"] != 0: errors.append(f"failed {r['failed']}: {r['failures']}")
if len(sys.argv) > 3 and not r["prefix_cache_hit_rate"] > float(sys.argv[3]):
    errors.append(f"prefix cache hit rate {r['prefix_cache_hit_rate']} is not above {sys.argv[3]}")
if r["completed"] and not r["mean_ttft_ms"] > 0: errors.append("no TTFT measured")
if r["total_output_tokens"] <= 0: errors.append("no output tokens")
stages = r.get("stages", {})
if r["completed"] and not (stages.get("mean_server_ms", 0) > 0 and stages.get("mean_decode_ms", -1) >= 0):
    errors.append(f"no latency breakdown by stage: {stages}")
if errors:
    print(f"{path}: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
EOF
}

run() {
  local name=$1
  shift
  echo "bench_smoke: $name"
  "$CELER" bench --connect "127.0.0.1:$PORT" --vocab-size 512 --max-concurrency 4 --json "$WORK/$name.json" \
    --label "smoke-$name" "$@" || fail "celer bench ($name) exited with $?"
}

run random --num-prompts 8 --dataset random --random-input-len 16 --random-output-len 8
check "$WORK/random.json" 8 || fail "random dataset"

run shared-prefix --num-prompts 8 --dataset shared-prefix --prefix-groups 2 --prefix-len 48 --suffix-len 8 \
  --output-len 8
check "$WORK/shared-prefix.json" 8 0 || fail "shared-prefix dataset"

run multi-turn --dataset multi-turn --sessions 2 --turns 3 --turn-input-len 16 --output-len 8
check "$WORK/multi-turn.json" 6 || fail "multi-turn dataset"
python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
turns = r.get("mean_ttft_ms_by_turn", [])
sys.exit(0 if len(turns) == 3 else 1)' "$WORK/multi-turn.json" || fail "multi-turn: no mean TTFT for each of 3 turns"

# The same through the HTTP API: token-exact multi-turn turns hit the prefix cache.
"$CELER" bench --url "http://127.0.0.1:$HTTP_PORT" --vocab-size 512 --max-concurrency 2 --json "$WORK/http.json" \
  --dataset multi-turn --sessions 2 --turns 3 --turn-input-len 16 --output-len 8 >/dev/null 2>&1 ||
  fail "celer bench --url exited with $?"
check "$WORK/http.json" 6 0 || fail "multi-turn dataset over HTTP"
# Requests the server refuses (token ids outside the vocabulary) count as failed, by reason.
"$CELER" bench --url "http://127.0.0.1:$HTTP_PORT" --vocab-size 100000 --json "$WORK/http-bad.json" \
  --dataset random --num-prompts 3 --random-input-len 8 --random-output-len 4 >/dev/null 2>&1 ||
  fail "celer bench --url (refused requests) exited with $?"
python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
sys.exit(0 if r["failed"] == 3 and r["failures"] == {"invalid_request": 3} else 1)' "$WORK/http-bad.json" ||
  fail "refused HTTP requests are not reported as 3 invalid_request failures: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["failures"])' "$WORK/http-bad.json")"

# Bad options fail with a clear message, before connecting.
if "$CELER" bench --connect "127.0.0.1:$PORT" --dataset sharegpt >"$WORK/bad.log" 2>&1; then
  fail "an unknown dataset was accepted"
fi
grep -q -- "--dataset" "$WORK/bad.log" || fail "the unknown-dataset error does not name --dataset"

echo "bench_smoke: OK"
