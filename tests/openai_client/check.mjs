// The official `openai` npm client against celer's HTTP gateway: completions and chat, streamed
// and not, stop strings, seeds, n > 1, and every error status a client can meet (400 bad input,
// 404 unknown model, 400 context length exceeded, 429 rate limited, 503 overloaded).
// Usage: node check.mjs CELER_BINARY WORK_DIR
import OpenAI from "openai";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { createInterface } from "node:readline";

const [celer, work, modelFile] = process.argv.slice(2);

// `celer serve --config FILE` whose config has an http section, serving the bundled model;
// resolves with the HTTP port.
function serve(name, yaml) {
  const config = `${work}/${name}.yaml`;
  writeFileSync(config, `model: ${modelFile}\n${yaml}`);
  const proc = spawn(celer, ["serve", "--config", config, "--port", "0"], { stdio: ["ignore", "pipe", "inherit"] });
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: proc.stdout });
    lines.on("line", (line) => {
      const m = line.match(/http on 127\.0\.0\.1:(\d+)/);
      if (m) resolve({ proc, port: Number(m[1]) });
    });
    proc.on("exit", (code) => reject(new Error(`celer serve exited with ${code}`)));
  });
}

const clientFor = (port) => new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "x", maxRetries: 0 });

// Calls f and returns the APIError it must throw.
async function apiError(f) {
  try {
    await f();
  } catch (e) {
    assert.ok(e instanceof OpenAI.APIError, `expected an APIError, got ${e}`);
    return e;
  }
  assert.fail("the request succeeded but should have failed");
}

async function collect(stream) {
  let text = "";
  let finish = null;
  let chunks = 0;
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      text += c.text ?? c.delta?.content ?? "";
      if (c.finish_reason) finish = c.finish_reason;
    }
    chunks++;
  }
  return { text, finish, chunks, usage };
}

const servers = [];
try {
  const main = await serve("main", "http: {host: 127.0.0.1, port: 0}\n");
  servers.push(main.proc);
  const client = clientFor(main.port);
  const models = await client.models.list();
  const model = models.data[0].id;
  assert.ok(model.length > 0);

  // Completions: greedy is deterministic; streamed and not give the same text.
  const base = { model, prompt: "Once upon a time", max_tokens: 24, temperature: 0, ignore_eos: true };
  const c1 = await client.completions.create(base);
  assert.equal(c1.object, "text_completion");
  assert.equal(c1.choices.length, 1);
  assert.equal(c1.choices[0].finish_reason, "length");
  assert.equal(c1.usage.completion_tokens, 24);
  assert.equal(c1.usage.total_tokens, c1.usage.prompt_tokens + 24);
  const full = c1.choices[0].text;
  assert.ok(full.length > 10);
  assert.equal((await client.completions.create(base)).choices[0].text, full);
  const s1 = await collect(await client.completions.create({ ...base, stream: true, stream_options: { include_usage: true } }));
  assert.equal(s1.text, full);
  assert.equal(s1.finish, "length");
  assert.ok(s1.chunks >= 10, `only ${s1.chunks} chunks`);
  assert.equal(s1.usage.completion_tokens, 24);

  // Stop strings: the text ends before the first occurrence, finish_reason "stop".
  const words = full.trim().split(" ");
  const stop = " " + words[3];
  const cut = full.slice(0, full.indexOf(stop));
  const stopped = await client.completions.create({ ...base, stop: [stop, "zzzz"] });
  assert.equal(stopped.choices[0].text, cut);
  assert.equal(stopped.choices[0].finish_reason, "stop");
  const stoppedStream = await collect(await client.completions.create({ ...base, stop, stream: true }));
  assert.equal(stoppedStream.text, cut);
  assert.equal(stoppedStream.finish, "stop");

  // Seeds: the same seed gives the same text at temperature 1; n choices use seed, seed + 1, ...
  const sampled = { model, prompt: "The little dog", max_tokens: 20, temperature: 1, ignore_eos: true };
  const a = await client.completions.create({ ...sampled, seed: 42 });
  const b = await client.completions.create({ ...sampled, seed: 42 });
  assert.equal(a.choices[0].text, b.choices[0].text);
  const n3 = await client.completions.create({ ...sampled, seed: 42, n: 3 });
  assert.equal(n3.choices.length, 3);
  assert.deepEqual(n3.choices.map((c) => c.index), [0, 1, 2]);
  assert.equal(n3.choices[0].text, a.choices[0].text);
  const c43 = await client.completions.create({ ...sampled, seed: 43 });
  assert.equal(n3.choices[1].text, c43.choices[0].text);
  assert.equal(n3.usage.completion_tokens, 60);
  const n2stream = await client.completions.create({ ...sampled, seed: 42, n: 2, stream: true });
  const perChoice = ["", ""];
  for await (const chunk of n2stream) for (const c of chunk.choices) perChoice[c.index] += c.text;
  assert.equal(perChoice[0], n3.choices[0].text);
  assert.equal(perChoice[1], n3.choices[1].text);

  // Chat: streamed and not, the same greedy text; the role comes first.
  const chatReq = { model, messages: [{ role: "system", content: "Tell a story." }, { role: "user", content: "A cat" }],
                    max_tokens: 16, temperature: 0 };
  const chat = await client.chat.completions.create(chatReq);
  assert.equal(chat.object, "chat.completion");
  assert.equal(chat.choices[0].message.role, "assistant");
  assert.equal(typeof chat.choices[0].message.content, "string");
  assert.ok(["stop", "length"].includes(chat.choices[0].finish_reason));
  const chatStream = await client.chat.completions.create({ ...chatReq, stream: true });
  let role = null;
  let streamed = "";
  for await (const chunk of chatStream) {
    assert.equal(chunk.object, "chat.completion.chunk");
    const d = chunk.choices[0]?.delta;
    if (d?.role) role = d.role;
    streamed += d?.content ?? "";
  }
  assert.equal(role, "assistant");
  assert.equal(streamed, chat.choices[0].message.content);
  const chatLp = await client.chat.completions.create({ ...chatReq, logprobs: true, top_logprobs: 2 });
  assert.equal(chatLp.choices[0].logprobs.content.length, chatLp.usage.completion_tokens);
  assert.equal(chatLp.choices[0].logprobs.content[0].top_logprobs.length, 2);

  // Errors: 400 bad input (naming the field), 404 unknown model, 400 context length exceeded.
  const e400 = await apiError(() => client.completions.create({ model, prompt: "x", max_tokens: "ten" }));
  assert.equal(e400.status, 400);
  assert.equal(e400.param, "max_tokens");
  assert.equal(e400.type, "invalid_request_error");
  const e404 = await apiError(() => client.chat.completions.create({ ...chatReq, model: "gpt-nothing" }));
  assert.equal(e404.status, 404);
  assert.equal(e404.code, "model_not_found");
  const long = "Once upon a time ".repeat(700);
  const eCtx = await apiError(() => client.completions.create({ model, prompt: long }));
  assert.equal(eCtx.status, 400);
  assert.equal(eCtx.code, "context_length_exceeded");
  const eCtxStream = await apiError(() => client.completions.create({ model, prompt: long, stream: true }));
  assert.equal(eCtxStream.status, 400);  // before any token: a status, not an SSE error event

  // 429: the tenant ("user") "limited" may spend 60 tokens, then refills at 0.001 per second.
  // 503: one sequence at a time and no queue, so a second request while one streams is refused.
  const tight = await serve("tight", [
    "http: {host: 127.0.0.1, port: 0}",
    "max_batch_size: 1",
    "max_queue: 0",
    "rate_limits: {tenants: {limited: {tokens_per_second: 0.001, burst: 60}}}",
    "",
  ].join("\n"));
  servers.push(tight.proc);
  const t = clientFor(tight.port);
  const ok = await t.completions.create({ model, prompt: "Hi", max_tokens: 10, user: "limited" });
  assert.equal(ok.choices.length, 1);
  const e429 = await apiError(() => t.completions.create({ model, prompt: "Hi", max_tokens: 100, user: "limited" }));
  assert.equal(e429.status, 429);
  assert.equal(e429.code, "rate_limit_exceeded");
  const e429stream = await apiError(() => t.completions.create({ model, prompt: "Hi", max_tokens: 100, user: "limited", stream: true }));
  assert.equal(e429stream.status, 429);

  const busy = await t.completions.create({ model, prompt: "Once", max_tokens: 2000, ignore_eos: true, stream: true });
  const it = busy[Symbol.asyncIterator]();
  await it.next();  // the long request is running: the batch (of one) is full
  const e503 = await apiError(() => t.completions.create({ model, prompt: "Hi", max_tokens: 4 }));
  assert.equal(e503.status, 503);
  assert.equal(e503.code, "queue_full");
  busy.controller.abort();  // the client leaves: its request is cancelled and frees the batch
  let served = false;
  for (let i = 0; i < 50 && !served; i++) {
    try {
      await t.completions.create({ model, prompt: "Hi", max_tokens: 4 });
      served = true;
    } catch (e) {
      assert.equal(e.status, 503);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  assert.ok(served, "the server still refused requests after the streaming client left");
  console.log("openai client checks passed");
} finally {
  for (const p of servers) p.kill("SIGTERM");
}
