#!/usr/bin/env bash
# CTest driver: the official `openai` npm client against `celer serve` with the HTTP gateway.
# The package installs once into the build tree (from the npm registry).
set -euo pipefail
celer=$1
work=$2
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../npm_prepare.sh"
npm_prepare "$here" "$work" openai
node "$work/check.mjs" "$celer" "$work" "$here/../data/stories260K.gguf"
