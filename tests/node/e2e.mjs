// e2e.mjs: drives a running `pdserve serve` with the official OpenAI client (and raw
// fetch where the client would refuse to send the bytes), asserting what a user of the
// OpenAI API would see. Started by tests/test_server_e2e.sh, which owns the server.
//
//   node e2e.mjs main       the API: completions, chat, streaming, usage, logprobs,
//                           stop strings, 64 concurrent streams vs one at a time,
//                           greedy output vs `pdserve generate`, tokenize round trip,
//                           client disconnect, every bad-input case; then the access cases
//   node e2e.mjs access     --api-key on every /v1 route, /tokenize and /detokenize (not
//                           /health, /metrics, /version); the body cap at its boundary
//   node e2e.mjs overload   against a server with --max-num-seqs 1
//                           --max-waiting-requests 1: 503 + Retry-After
//
// Environment: PDSERVE_URL (http://127.0.0.1:PORT), PDSERVE_MODEL (served name),
// PDSERVE_API_KEY, PDSERVE_MAX_MODEL_LEN, PDSERVE_MAX_BODY, PDSERVE_CHAT (0 when the
// model's vocabulary cannot hold its chat template's tokens), PDSERVE_GEN_CASES (a JSON
// file of {prompt, max_tokens, expected} from `pdserve generate`).
// After every case, /metrics must show zero KV blocks in use and nothing running.
import assert from "node:assert/strict";
import fs from "node:fs";
import OpenAI from "openai";

const URL_ = process.env.PDSERVE_URL;
const MODEL = process.env.PDSERVE_MODEL;
const KEY = process.env.PDSERVE_API_KEY || "none";
const MAX_LEN = Number(process.env.PDSERVE_MAX_MODEL_LEN || 512);
const MAX_BODY = Number(process.env.PDSERVE_MAX_BODY || 65536);
const CHAT = process.env.PDSERVE_CHAT !== "0";
const client = new OpenAI({ baseURL: `${URL_}/v1`, apiKey: KEY, maxRetries: 0, timeout: 120000 });

// Prompts of digits, spaces and punctuation: a few ids in any byte-level vocabulary.
const P1 = "1 2 3 4 5";
const P2 = "7, 8; 9.";

let failures = 0;
const results = [];

async function metrics() {
  const r = await fetch(`${URL_}/metrics`);
  assert.equal(r.status, 200);
  const text = await r.text();
  const get = (name, extra = "") => {
    const re = new RegExp(`^${name}\\{[^}]*${extra}[^}]*\\} ([0-9.e+-]+)$`, "m");
    const m = text.match(re);
    return m ? Number(m[1]) : NaN;
  };
  return { text, get };
}

// KV blocks must be back to zero (the engine frees them before it reports the end,
// and aborts land within a step: poll a little for disconnects).
async function expectIdle(what) {
  let m;
  for (let i = 0; i < 100; i++) {
    m = await metrics();
    if (m.get("pdserve_kv_cache_blocks_used") === 0 && m.get("pdserve_num_requests_running") === 0 &&
        m.get("pdserve_num_requests_waiting") === 0) return m;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail(`${what}: KV blocks still in use: ${m.get("pdserve_kv_cache_blocks_used")}, ` +
              `running ${m.get("pdserve_num_requests_running")}`);
}

async function test(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    await expectIdle(name);
    results.push(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failures++;
    results.push(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
  }
  console.error(results[results.length - 1]);
}

// /tokenize and /detokenize are public API: under --api-key like /v1.
const AUTH = { Authorization: `Bearer ${KEY}` };

async function tokenizeCount(body) {
  const r = await fetch(`${URL_}/tokenize`, { method: "POST", headers: AUTH, body: JSON.stringify(body) });
  assert.equal(r.status, 200);
  const j = await r.json();
  assert.equal(j.count, j.tokens.length);
  assert.equal(j.max_model_len, MAX_LEN);
  return j;
}

async function streamCompletion(params, opts) {
  const stream = await client.completions.create({ ...params, stream: true }, opts);
  let text = "", finish = null, usage = null, chunks = 0;
  for await (const ch of stream) {
    chunks++;
    if (ch.usage) usage = ch.usage;
    if (ch.choices.length) {
      text += ch.choices[0].text;
      if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
    }
  }
  return { text, finish, usage, chunks };
}

async function streamChat(params) {
  const stream = await client.chat.completions.create({ ...params, stream: true });
  let text = "", finish = null, usage = null, role = null;
  for await (const ch of stream) {
    if (ch.usage) usage = ch.usage;
    if (ch.choices.length) {
      const d = ch.choices[0].delta;
      if (d.role) role = d.role;
      if (d.content) text += d.content;
      if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
    }
  }
  return { text, finish, usage, role };
}

function checkUsage(u, prompt, completion) {
  assert.equal(u.prompt_tokens, prompt, "usage.prompt_tokens");
  assert.equal(u.completion_tokens, completion, "usage.completion_tokens");
  assert.equal(u.total_tokens, prompt + completion, "usage.total_tokens");
  assert.equal(typeof u.prompt_tokens_details.cached_tokens, "number");
}

// ---- the API ------------------------------------------------------------------------------
async function mainTests() {
  await test("health, models, version", async () => {
    assert.equal((await fetch(`${URL_}/health`)).status, 200);
    const models = await client.models.list();
    assert.equal(models.data.length, 1);
    assert.equal(models.data[0].id, MODEL);
    assert.equal(models.data[0].object, "model");
  });

  await test("completions: non-streaming and streaming agree, usage right", async () => {
    const n = (await tokenizeCount({ prompt: P1 })).count;
    const params = { model: MODEL, prompt: P1, max_tokens: 24, temperature: 0, ignore_eos: true };
    const a = await client.completions.create(params);
    assert.equal(a.object, "text_completion");
    assert.match(a.id, /^cmpl-/);
    assert.equal(a.choices.length, 1);
    assert.equal(a.choices[0].finish_reason, "length");
    checkUsage(a.usage, n, 24);
    const b = await streamCompletion({ ...params, stream_options: { include_usage: true } });
    assert.equal(b.text, a.choices[0].text);
    assert.equal(b.finish, "length");
    checkUsage(b.usage, n, 24);
    const c = await streamCompletion(params); // no usage unless asked
    assert.equal(c.usage, null);
    assert.equal(c.text, a.choices[0].text);
    // token ids, and a list holding one prompt, are the same prompt
    const ids = (await tokenizeCount({ prompt: P1 })).tokens;
    const d = await client.completions.create({ ...params, prompt: ids, add_special_tokens: false });
    assert.equal(d.choices[0].text, a.choices[0].text);
    const e = await client.completions.create({ ...params, prompt: [P1] });
    assert.equal(e.choices[0].text, a.choices[0].text);
  });

  await test("completions: max_tokens default fills the context; seeded sampling repeats", async () => {
    const params = { model: MODEL, prompt: P2, max_tokens: 20, temperature: 0.9, top_p: 0.95,
                     top_k: 50, seed: 1234, ignore_eos: true };
    const a = await client.completions.create(params);
    const b = await client.completions.create(params);
    assert.equal(a.choices[0].text, b.choices[0].text);
    const n = (await tokenizeCount({ prompt: P2 })).count;
    const c = await client.completions.create({ model: MODEL, prompt: P2, temperature: 0,
                                               ignore_eos: true });
    assert.equal(c.usage.completion_tokens, MAX_LEN - n);
    assert.equal(c.choices[0].finish_reason, "length");
  });

  await test("completions: logprobs", async () => {
    const r = await client.completions.create({ model: MODEL, prompt: P1, max_tokens: 6,
                                               temperature: 0, ignore_eos: true, logprobs: 2 });
    const lp = r.choices[0].logprobs;
    assert.equal(lp.tokens.length, 6);
    assert.equal(lp.token_logprobs.length, 6);
    assert.equal(lp.top_logprobs.length, 6);
    assert.equal(lp.text_offset.length, 6);
    for (let i = 0; i < 6; i++) {
      assert.ok(lp.token_logprobs[i] <= 0);
      const top = lp.top_logprobs[i];
      assert.ok(Object.keys(top).length >= 1 && Object.keys(top).length <= 3);
      // greedy: the chosen token is the most likely one
      const best = Math.max(...Object.values(top));
      assert.ok(Math.abs(best - lp.token_logprobs[i]) < 1e-5, "greedy picks the top token");
    }
    const s = await client.completions.create({ model: MODEL, prompt: P1, max_tokens: 6,
                                               temperature: 0, ignore_eos: true, logprobs: 0,
                                               stream: true });
    let n = 0;
    for await (const ch of s) if (ch.choices.length && ch.choices[0].logprobs)
      n += ch.choices[0].logprobs.tokens.length;
    assert.equal(n, 6);
  });

  await test("stop strings across token boundaries (streaming and not)", async () => {
    const base = { model: MODEL, prompt: P1, max_tokens: 40, temperature: 0, ignore_eos: true };
    const full = await client.completions.create({ ...base, logprobs: 0 });
    const text = full.choices[0].text;
    const toks = full.choices[0].logprobs.tokens;
    // a stop string made of the end of token i and the start of token i+1
    let stop = null, off = 0;
    for (let i = 2; i + 1 < toks.length && !stop; i++) {
      off += toks[i - 2].length;
      const a = toks[i], b = toks[i + 1];
      if (a.length >= 1 && b.length >= 1 && !/\ufffd/.test(a + b)) stop = a.slice(-1) + b.slice(0, 2);
    }
    if (!stop) stop = text.slice(5, 8);
    const cut = text.indexOf(stop);
    assert.ok(cut >= 0, `stop string ${JSON.stringify(stop)} in ${JSON.stringify(text)}`);
    const a = await client.completions.create({ ...base, stop: [stop, "zz-never-zz"] });
    assert.equal(a.choices[0].text, text.slice(0, cut));
    assert.equal(a.choices[0].finish_reason, "stop");
    assert.ok(a.usage.completion_tokens <= 40);
    const b = await streamCompletion({ ...base, stop, stream_options: { include_usage: true } });
    assert.equal(b.text, text.slice(0, cut));
    assert.equal(b.finish, "stop");
    assert.equal(b.usage.completion_tokens, a.usage.completion_tokens);
  });

  if (CHAT) {
    await test("chat: non-streaming and streaming agree, usage right, logprobs", async () => {
      const messages = [{ role: "system", content: "Answer with numbers." },
                        { role: "user", content: P1 }];
      const n = (await tokenizeCount({ messages })).count;
      const params = { model: MODEL, messages, max_tokens: 16, temperature: 0 };
      const a = await client.chat.completions.create(params);
      assert.equal(a.object, "chat.completion");
      assert.match(a.id, /^chatcmpl-/);
      assert.equal(a.choices[0].message.role, "assistant");
      const ct = a.usage.completion_tokens;
      assert.ok(ct >= 1 && ct <= 16);
      checkUsage(a.usage, n, ct);
      assert.equal(a.choices[0].finish_reason, ct === 16 ? "length" : "stop");
      const b = await streamChat({ ...params, stream_options: { include_usage: true } });
      assert.equal(b.role, "assistant");
      assert.equal(b.text, a.choices[0].message.content);
      assert.equal(b.finish, a.choices[0].finish_reason);
      checkUsage(b.usage, n, ct);
      const c = await client.chat.completions.create({ ...params, max_completion_tokens: 5,
                                                      logprobs: true, top_logprobs: 2,
                                                      ignore_eos: true });
      assert.equal(c.usage.completion_tokens, 5);
      const lp = c.choices[0].logprobs.content;
      assert.equal(lp.length, 5);
      for (const t of lp) {
        assert.equal(typeof t.token, "string");
        assert.ok(Array.isArray(t.bytes));
        assert.equal(t.top_logprobs.length, 2);
      }
    });
  }

  await test("tokenize / detokenize round trip", async () => {
    const text = "12 + 34 = 46!";
    const t = await tokenizeCount({ prompt: text, add_special_tokens: false });
    const r = await fetch(`${URL_}/detokenize`, { method: "POST", headers: AUTH,
                                                  body: JSON.stringify({ tokens: t.tokens }) });
    assert.equal(r.status, 200);
    assert.equal((await r.json()).prompt, text);
    // messages go through the chat template (with the generation prompt by default)
    const messages = [{ role: "user", content: text }];
    const m = await tokenizeCount({ messages });
    const m2 = await tokenizeCount({ messages, add_generation_prompt: false });
    // (some templates write the assistant header whatever add_generation_prompt says)
    assert.ok(m.count > t.count && m2.count <= m.count, `template tokens: ${m.count} ${m2.count}`);
    const r2 = await fetch(`${URL_}/detokenize`, { method: "POST", headers: AUTH,
                                                   body: JSON.stringify({ tokens: m.tokens }) });
    assert.ok((await r2.json()).prompt.includes(text));
  });

  const genFile = process.env.PDSERVE_GEN_CASES;
  if (genFile && fs.existsSync(genFile)) {
    await test("greedy output equals `pdserve generate --temperature 0`", async () => {
      const cases = JSON.parse(fs.readFileSync(genFile, "utf8"));
      assert.ok(cases.length > 0);
      for (const c of cases) {
        const a = await client.completions.create({ model: MODEL, prompt: c.prompt,
                                                   max_tokens: c.max_tokens, temperature: 0,
                                                   ignore_eos: true });
        assert.equal(a.choices[0].text, c.expected, `prompt ${JSON.stringify(c.prompt)}`);
        const b = await streamCompletion({ model: MODEL, prompt: c.prompt, max_tokens: c.max_tokens,
                                           temperature: 0, ignore_eos: true });
        assert.equal(b.text, c.expected);
      }
    });
  }

  await test("64 concurrent streams equal the same requests one at a time", async () => {
    const reqs = [];
    for (let i = 0; i < 64; i++) {
      const r = { model: MODEL, prompt: `${i % 10} ${(i * 7) % 10} ${Math.floor(i / 10)}`, max_tokens: 8 + (i % 5) * 6,
                  ignore_eos: true, stream_options: { include_usage: true } };
      // Seeded sampling is per request, so batching must not change it either. top_k
      // keeps the draw among a few likely tokens: over a full flat vocabulary the
      // last-bit differences of batched matmuls (M rows vs 1) move the cumulative
      // distribution enough to flip a draw now and then (about 1% of tokens here).
      if (i % 2) Object.assign(r, { temperature: 0.8, top_k: 8, seed: 1000 + i });
      else r.temperature = 0;
      if (i % 7 === 3) r.stop = [" 1"];
      reqs.push(r);
    }
    const t0 = Date.now();
    const together = await Promise.all(reqs.map((r) => streamCompletion(r)));
    const t1 = Date.now();
    const alone = [];
    for (const r of reqs) alone.push(await streamCompletion(r));
    console.error(`  64 concurrent: ${t1 - t0} ms; one at a time: ${Date.now() - t1} ms`);
    for (let i = 0; i < 64; i++) {
      assert.equal(together[i].text, alone[i].text, `request ${i}: text`);
      assert.equal(together[i].finish, alone[i].finish, `request ${i}: finish_reason`);
      assert.deepEqual(together[i].usage, alone[i].usage, `request ${i}: usage`);
      if (!reqs[i].stop) assert.equal(together[i].usage.completion_tokens, reqs[i].max_tokens);
    }
  });

  await test("client disconnect mid-stream aborts the request and frees its blocks", async () => {
    const before = (await metrics()).get("pdserve_request_success_total", 'finished_reason="abort"');
    const n = 6;
    const runs = [];
    for (let i = 0; i < n; i++) {
      runs.push((async () => {
        const ac = new AbortController();
        const stream = await client.completions.create(
          { model: MODEL, prompt: `${i % 10} 9 9`, temperature: 0, ignore_eos: true, stream: true },
          { signal: ac.signal });
        let k = 0;
        try {
          for await (const ch of stream) if (++k === 2) ac.abort();
        } catch (e) {
          if (!(e instanceof OpenAI.APIUserAbortError) && e.name !== "AbortError") throw e;
        }
      })());
    }
    await Promise.all(runs);
    await expectIdle("after disconnects");
    const after = (await metrics()).get("pdserve_request_success_total", 'finished_reason="abort"');
    assert.ok(after - before >= 1, `aborted requests counted: ${after - before}`);
  });

  await test("client disconnect while waiting for a non-streaming answer aborts it", async () => {
    const before = (await metrics()).get("pdserve_request_success_total", 'finished_reason="abort"');
    const runs = [];
    for (let i = 0; i < 6; i++) {
      const ac = new AbortController();
      setTimeout(() => ac.abort(), 5);
      runs.push(client.completions.create(
        { model: MODEL, prompt: `${i} 8 8`, temperature: 0, ignore_eos: true },
        { signal: ac.signal }).then(() => "done", () => "aborted"));
    }
    const outcomes = await Promise.all(runs);
    await expectIdle("after disconnects");
    const after = (await metrics()).get("pdserve_request_success_total", 'finished_reason="abort"');
    const n = outcomes.filter((o) => o === "aborted").length;
    // every request the client gave up on before its end was aborted by the server
    assert.ok(after - before >= Math.min(n, 1), `aborted ${after - before}, client gave up on ${n}`);
  });

  await test("bad input: status and OpenAI-style error, server unharmed", async () => {
    const auth = { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" };
    const enc = (s) => Buffer.from(s, "utf8");
    const cases = [
      ["malformed JSON", "POST", "/v1/completions", auth, enc('{"prompt": "x",'), 400, null, "JSON"],
      ["not an object", "POST", "/v1/completions", auth, enc("[1,2]"), 400, null, "object"],
      ["prompt wrong type", "POST", "/v1/completions", auth, enc('{"prompt": 5}'), 400, "prompt", "prompt"],
      ["max_tokens wrong type", "POST", "/v1/completions", auth,
       enc(`{"prompt":"${P1}","max_tokens":"7"}`), 400, "max_tokens", "integer"],
      ["temperature wrong type", "POST", "/v1/chat/completions", auth,
       enc('{"messages":[{"role":"user","content":"1"}],"temperature":"hot"}'), 400, "temperature", "number"],
      ["messages wrong type", "POST", "/v1/chat/completions", auth, enc('{"messages":"hi"}'), 400,
       "messages", "list"],
      ["unknown model", "POST", "/v1/completions", auth, enc(`{"model":"no-such-model","prompt":"${P1}"}`),
       404, "model", "does not exist"],
      ["negative max_tokens", "POST", "/v1/completions", auth, enc(`{"prompt":"${P1}","max_tokens":-1}`),
       400, "max_tokens", "at least 1"],
      ["zero max_tokens", "POST", "/v1/completions", auth, enc(`{"prompt":"${P1}","max_tokens":0}`),
       400, "max_tokens", "at least 1"],
      ["absurd max_tokens", "POST", "/v1/completions", auth,
       enc(`{"prompt":"${P1}","max_tokens":1000000000000}`), 400, "max_tokens", "too large"],
      ["prompt + max_tokens too long", "POST", "/v1/completions", auth,
       enc(`{"prompt":"${P1}","max_tokens":${MAX_LEN}}`), 400, "prompt", "maximum context length"],
      ["prompt longer than max-model-len", "POST", "/v1/completions", auth,
       enc(`{"prompt":[${Array(MAX_LEN + 5).fill(1).join(",")}]}`), 400, "prompt",
       `This model's maximum context length is ${MAX_LEN} tokens. However, you requested ${MAX_LEN + 5} tokens`],
      ["empty prompt", "POST", "/v1/completions", auth, enc('{"prompt":""}'), 400, "prompt", "empty"],
      ["empty token list", "POST", "/v1/completions", auth, enc('{"prompt":[]}'), 400, "prompt", "empty"],
      ["invalid UTF-8", "POST", "/v1/completions", auth,
       Buffer.concat([enc('{"prompt":"a'), Buffer.from([0xff, 0xc3, 0x28]), enc('"}')]), 400, null, "UTF-8"],
      ["body over the cap", "POST", "/v1/completions", auth,
       enc(`{"prompt":"${"1 ".repeat(MAX_BODY)}"}`), 413, null, "limit"],
      ["n > 1", "POST", "/v1/completions", auth, enc(`{"prompt":"${P1}","n":2}`), 400, "n", "must be 1"],
      ["echo", "POST", "/v1/completions", auth, enc(`{"prompt":"${P1}","echo":true}`), 400, "echo", "echo"],
      ["token id out of range", "POST", "/v1/completions", auth, enc('{"prompt":[99999999]}'), 400,
       "prompt", "out of range"],
      ["wrong API key", "POST", "/v1/completions", { ...auth, Authorization: "Bearer wrong" },
       enc(`{"prompt":"${P1}"}`), 401, null, "API key"],
      ["missing API key", "GET", "/v1/models", {}, undefined, 401, null, "API key"],
      ["unknown route", "POST", "/v1/nothing", auth, enc("{}"), 404, null, "no route"],
      ["unknown route GET", "GET", "/", auth, undefined, 404, null, "no route"],
      ["wrong method", "GET", "/v1/completions", auth, undefined, 405, null, "not allowed"],
      ["wrong method with body", "PUT", "/v1/chat/completions", auth, enc("{}"), 405, null, "not allowed"],
    ];
    for (const [name, method, path, headers, body, status, param, msg] of cases) {
      const r = await fetch(`${URL_}${path}`, { method, headers, body });
      const text = await r.text();
      assert.equal(r.status, status, `${name}: status (body ${text.slice(0, 300)})`);
      let j;
      assert.doesNotThrow(() => { j = JSON.parse(text); }, `${name}: JSON body`);
      assert.equal(typeof j.error, "object", `${name}: error object`);
      assert.equal(typeof j.error.message, "string");
      assert.ok(j.error.message.includes(msg), `${name}: message ${JSON.stringify(j.error.message)} lacks ${JSON.stringify(msg)}`);
      assert.equal(typeof j.error.type, "string");
      assert.ok("param" in j.error && "code" in j.error, `${name}: param and code`);
      if (param !== null) assert.equal(j.error.param, param, `${name}: param`);
      if (status === 405) assert.ok(r.headers.get("allow"), `${name}: Allow header`);
      // the server still serves
      const ok = await client.completions.create({ model: MODEL, prompt: P1, max_tokens: 2,
                                                  temperature: 0, ignore_eos: true });
      assert.equal(ok.usage.completion_tokens, 2, `${name}: a good request after it`);
    }
    // the official client surfaces them as typed errors
    await assert.rejects(client.completions.create({ model: "no-such-model", prompt: P1 }),
                         (e) => e instanceof OpenAI.NotFoundError && e.status === 404);
    await assert.rejects(client.completions.create({ model: MODEL, prompt: P1, max_tokens: -5 }),
                         (e) => e instanceof OpenAI.BadRequestError && e.param === "max_tokens");
    const bad = new OpenAI({ baseURL: `${URL_}/v1`, apiKey: "wrong", maxRetries: 0 });
    await assert.rejects(bad.models.list(), (e) => e instanceof OpenAI.AuthenticationError);
    // /health and /metrics need no key
    assert.equal((await fetch(`${URL_}/health`)).status, 200);
    assert.equal((await fetch(`${URL_}/metrics`)).status, 200);
  });
}

// ---- access ------------------------------------------------------------------------------------
async function accessTests() {
  await test("access: every /v1 route, /tokenize and /detokenize need the key; /health, /metrics don't", async () => {
    const bodies = {
      "/v1/completions": { prompt: P1, max_tokens: 1 },
      "/v1/chat/completions": { messages: [{ role: "user", content: P1 }], max_tokens: 1 },
      "/tokenize": { prompt: P1 },
      "/detokenize": { tokens: [1, 2] },
    };
    const guarded = [["GET", "/v1/models"], ...Object.keys(bodies).map((p) => ["POST", p])];
    for (const [method, path] of guarded) {
      const body = bodies[path] ? JSON.stringify(bodies[path]) : undefined;
      for (const [what, h] of [["no key", {}], ["wrong key", { Authorization: "Bearer wrong" }],
                               ["key without Bearer", { Authorization: KEY }],
                               ["key with a suffix", { Authorization: `Bearer ${KEY}x` }],
                               ["key prefix", { Authorization: `Bearer ${KEY.slice(0, -1)}` }]]) {
        const r = await fetch(`${URL_}${path}`, { method, headers: { ...h, "Content-Type": "application/json" }, body });
        const j = await r.json();
        assert.equal(r.status, 401, `${method} ${path} with ${what}`);
        assert.equal(j.error.code, "invalid_api_key", `${method} ${path} with ${what}`);
        assert.equal(r.headers.get("www-authenticate"), "Bearer");
      }
      const r = await fetch(`${URL_}${path}`, { method, headers: { ...AUTH, "Content-Type": "application/json" }, body });
      assert.equal(r.status, 200, `${method} ${path} with the key: ${await r.text()}`);
    }
    for (const path of ["/health", "/metrics", "/version"]) {
      const r = await fetch(`${URL_}${path}`);
      await r.text();
      assert.equal(r.status, 200, `${path} without a key`);
    }
  });

  await test("body cap: exactly --max-body-bytes is read, one byte more is 413", async () => {
    const head = `{"prompt":"${P1}","max_tokens":1,"temperature":0`;
    const at = (n) => Buffer.from(head + " ".repeat(n - head.length - 1) + "}", "utf8");
    const post = (buf) => fetch(`${URL_}/v1/completions`, {
      method: "POST", headers: { ...AUTH, "Content-Type": "application/json" }, body: buf });
    const a = await post(at(MAX_BODY));
    assert.equal(at(MAX_BODY).length, MAX_BODY);
    assert.equal(a.status, 200, `a body of exactly the cap: ${(await a.text()).slice(0, 200)}`);
    const b = await post(at(MAX_BODY + 1));
    const jb = await b.json();
    assert.equal(b.status, 413, "one byte over the cap");
    assert.equal(jb.error.code, "request_too_large");
    // the server still serves
    const ok = await client.completions.create({ model: MODEL, prompt: P1, max_tokens: 2 });
    assert.ok(ok.usage.completion_tokens >= 1);
  });
}

// ---- queue full --------------------------------------------------------------------------------
async function overloadTests() {
  await test("queue full: 503 with Retry-After, the others complete", async () => {
    const body = JSON.stringify({ model: MODEL, prompt: P1, max_tokens: Math.min(200, MAX_LEN - 16),
                                  temperature: 0, ignore_eos: true });
    const headers = { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" };
    const rs = await Promise.all(Array.from({ length: 24 }, () =>
      fetch(`${URL_}/v1/completions`, { method: "POST", headers, body })
        .then(async (r) => ({ status: r.status, retry: r.headers.get("retry-after"), j: await r.json() }))));
    const busy = rs.filter((r) => r.status === 503);
    const ok = rs.filter((r) => r.status === 200);
    assert.equal(busy.length + ok.length, rs.length, `statuses ${rs.map((r) => r.status)}`);
    assert.ok(busy.length >= 1, "some requests were refused");
    assert.ok(ok.length >= 1, "the admitted requests completed");
    for (const b of busy) {
      assert.ok(Number(b.retry) >= 1, "Retry-After");
      assert.equal(typeof b.j.error.message, "string");
      assert.equal(b.j.error.type, "server_error");
    }
    for (const o of ok) assert.equal(o.j.usage.completion_tokens, Math.min(200, MAX_LEN - 16));
    const after = await client.completions.create({ model: MODEL, prompt: P1, max_tokens: 2 });
    assert.equal(after.usage.completion_tokens >= 1, true);
  });
}

const mode = process.argv[2] || "main";
if (mode === "main") { await mainTests(); await accessTests(); }
else if (mode === "access") await accessTests();
else if (mode === "overload") await overloadTests();
else throw new Error(`unknown mode ${mode}`);
console.error(failures ? `${failures} case(s) failed` : `all ${results.length} case(s) passed`);
process.exit(failures ? 1 : 0);
