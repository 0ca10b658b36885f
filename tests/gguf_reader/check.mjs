// Reads GGUF files written by `celer make-model` with Hugging Face's GGUF parser (an
// implementation independent of celer's) and checks what a loader relies on: the architecture
// keys, every tensor's name, type and shape, and data that lies inside the file.
// Usage: node check.mjs ARCH TYPE FILE [ARCH TYPE FILE ...]
import { gguf } from "@huggingface/gguf";
import { statSync } from "node:fs";

const ggmlType = { f32: 0, f16: 1, q8_0: 8, bf16: 30 };
const bytesPer = { 0: [1, 4], 1: [1, 2], 8: [32, 34], 30: [1, 2] };  // [block elems, block bytes]
let failures = 0;
const fail = (file, what) => { console.error(`FAIL ${file}: ${what}`); failures++; };

const args = process.argv.slice(2);
for (let i = 0; i < args.length; i += 3) {
  const [arch, type, file] = args.slice(i, i + 3);
  const { metadata, tensorInfos, tensorDataOffset } = await gguf(file, { allowLocalFile: true });
  if (metadata["general.architecture"] !== arch) fail(file, `architecture ${metadata["general.architecture"]}`);
  const dim = Number(metadata[`${arch}.embedding_length`]);
  const layers = Number(metadata[`${arch}.block_count`]);
  const ffn = Number(metadata[`${arch}.feed_forward_length`]);
  const vocab = metadata["tokenizer.ggml.tokens"].length;
  const perLayer = arch === "qwen2" ? 12 : 9;
  if (tensorInfos.length !== 3 + perLayer * layers) fail(file, `${tensorInfos.length} tensors`);
  const size = statSync(file).size;
  for (const t of tensorInfos) {
    const shape = t.shape.map(Number);
    const is1d = shape.length === 1;
    const want = is1d ? ggmlType.f32 : ggmlType[type];
    if (t.dtype !== want) fail(file, `${t.name} has type ${t.dtype}, not ${want}`);
    const [be, bb] = bytesPer[t.dtype];
    const n = shape.reduce((a, b) => a * b, 1);
    const end = Number(tensorDataOffset) + Number(t.offset) + (n / be) * bb;
    if (end > size) fail(file, `${t.name} data ends at ${end}, past the file (${size})`);
    if (t.name === "token_embd.weight" && (shape[0] !== dim || shape[1] !== vocab)) fail(file, `token_embd shape ${shape}`);
    if (t.name === "blk.0.ffn_down.weight" && (shape[0] !== ffn || shape[1] !== dim)) fail(file, `ffn_down shape ${shape}`);
  }
  console.log(`ok ${file}: ${arch} ${type}, ${tensorInfos.length} tensors, vocab ${vocab}`);
}
process.exit(failures ? 1 : 0);
