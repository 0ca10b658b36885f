#!/usr/bin/env bash
# CTest driver: the official `openai` npm client against `celer serve` with the HTTP gateway.
# The package installs once into the build tree (from the npm registry).
set -euo pipefail
celer=$1
work=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"
cp "$here/package.json" "$here/check.mjs" "$work/"
if [ ! -d "$work/node_modules/openai" ]; then
  (cd "$work" && npm install --no-audit --no-fund --silent)
fi
node "$work/check.mjs" "$celer" "$work"
