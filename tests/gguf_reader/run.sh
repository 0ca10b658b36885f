#!/usr/bin/env bash
# CTest driver: writes small models of every type and both architectures with `celer make-model`
# and has the independent reader check them. The npm package installs once into the build tree.
set -euo pipefail
celer=$1
data=$2
work=$3
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../npm_prepare.sh"
npm_prepare "$here" "$work" @huggingface/gguf
args=()
for arch in llama qwen2; do
  for type in f32 f16 bf16 q8_0; do
    f="$work/$arch-$type.gguf"
    "$celer" make-model --arch "$arch" --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 \
      --vocab "$data/vocab/ggml-vocab-llama-spm.gguf" --type "$type" "$f" 2>/dev/null
    args+=("$arch" "$type" "$f")
  done
done
node "$work/check.mjs" "${args[@]}"
