// disagg.mjs: drives a deployment's router with the official OpenAI client and checks
// what a user would see against a plain colocated instance. Started by
// tests/test_router_e2e.sh, tests/test_disagg_e2e.sh and tests/test_disagg_faults.sh,
// which own the processes.
//
//   node disagg.mjs reference OUT.json   runs the workload on PDSERVE_URL (a colocated
//                                        instance) one request at a time: the references
//   node disagg.mjs compare REF.json     runs it on PDSERVE_URL (a router), 32 requests at
//                                        once, and requires every output to equal its
//                                        reference (greedy: text, token logprobs' ids,
//                                        finish reason, usage); then the router's error
//                                        relay; then every PDSERVE_INSTANCES pool is empty
//   node disagg.mjs faults CASE          fault cases (see the test scripts): prints one
//                                        JSON line {ok, failed, errors} for the script
//
// Environment: PDSERVE_URL, PDSERVE_MODEL, PDSERVE_INSTANCES (comma-separated instance
// URLs whose /load must show kv_blocks_used 0 at the end), PDSERVE_N (requests, 32).
import assert from "node:assert/strict";
import fs from "node:fs";
import OpenAI from "openai";

const URL_ = process.env.PDSERVE_URL;
const MODEL = process.env.PDSERVE_MODEL || "model";
const N = Number(process.env.PDSERVE_N || 32);
const INSTANCES = (process.env.PDSERVE_INSTANCES || "").split(",").filter((s) => s);
const client = new OpenAI({ baseURL: `${URL_}/v1`, apiKey: "none", maxRetries: 0, timeout: 120000 });

// The workload: prompts of many lengths (one to ~20 KV blocks), every API shape.
function workload() {
  const words = ["alpha", "beta", "7", "gamma", "delta", "42", "epsilon", "zeta", ",", "eta", "theta"];
  const cases = [];
  for (let i = 0; i < N; i++) {
    const len = 1 + ((i * 37) % 23) * (i % 3 === 0 ? 6 : 2);
    const prompt = Array.from({ length: len }, (_, k) => words[(i + k * 7) % words.length]).join(" ");
    const kind = ["complete", "stream", "chat", "logprobs"][i % 4];
    cases.push({ i, kind, prompt, max_tokens: 8 + (i % 5) * 6 });
  }
  return cases;
}

async function runCase(c) {
  const base = { model: MODEL, temperature: 0, max_tokens: c.max_tokens, ignore_eos: true };
  if (c.kind === "complete") {
    const r = await client.completions.create({ ...base, prompt: c.prompt });
    return { text: r.choices[0].text, finish: r.choices[0].finish_reason, usage: r.usage };
  }
  if (c.kind === "logprobs") {
    const r = await client.completions.create({ ...base, prompt: c.prompt, logprobs: 2 });
    const lp = r.choices[0].logprobs;
    return { text: r.choices[0].text, finish: r.choices[0].finish_reason, usage: r.usage,
             tokens: lp.tokens, top: lp.top_logprobs.map((t) => Object.keys(t)) };
  }
  if (c.kind === "stream") {
    const s = await client.completions.create({ ...base, prompt: c.prompt, stream: true,
                                                stream_options: { include_usage: true } });
    let text = "", finish = null, usage = null;
    for await (const ch of s) {
      if (ch.choices.length) {
        text += ch.choices[0].text;
        if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
      }
      if (ch.usage) usage = ch.usage;
    }
    return { text, finish, usage };
  }
  const r = await client.chat.completions.create({ ...base, messages: [{ role: "user", content: c.prompt }] });
  return { text: r.choices[0].message.content, finish: r.choices[0].finish_reason, usage: r.usage };
}

function strip(u) {
  return u ? { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens } : null;
}

async function load(url) {
  const r = await fetch(`${url}/load`);
  assert.equal(r.status, 200, `${url}/load`);
  return r.json();
}

// Every instance's pool must drain to zero blocks (reservations included).
async function expectPoolsEmpty(what, timeoutMs = 8000) {
  for (const url of INSTANCES) {
    let j;
    const end = Date.now() + timeoutMs;
    for (;;) {
      try {
        j = await load(url);
        if (j.kv_blocks_used === 0 && j.running === 0 && j.waiting === 0 && j.kv_active === 0) break;
      } catch (e) {
        j = { error: String(e) };
      }
      if (Date.now() > end) assert.fail(`${what}: ${url} pool not empty: ${JSON.stringify(j)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

async function reference(out) {
  const res = [];
  for (const c of workload()) {
    const r = await runCase(c);
    res.push({ ...r, usage: undefined, u: strip(r.usage) });
  }
  fs.writeFileSync(out, JSON.stringify(res));
  console.error(`reference: ${res.length} outputs`);
}

async function compare(refFile) {
  const ref = JSON.parse(fs.readFileSync(refFile, "utf8"));
  const cases = workload();
  const t0 = Date.now();
  const got = await Promise.all(cases.map((c) => runCase(c)));
  let bad = 0;
  for (const c of cases) {
    const g = got[c.i], r = ref[c.i];
    const same = g.text === r.text && g.finish === r.finish &&
                 JSON.stringify(strip(g.usage)) === JSON.stringify(r.u) &&
                 JSON.stringify(g.tokens) === JSON.stringify(r.tokens) &&
                 JSON.stringify(g.top) === JSON.stringify(r.top);
    if (!same) {
      bad++;
      console.error(`FAIL case ${c.i} (${c.kind}, ${c.prompt.split(" ").length} words): got ` +
                    `${JSON.stringify({ ...g, usage: strip(g.usage) })} want ${JSON.stringify(r)}`);
    }
  }
  assert.equal(bad, 0, `${bad} of ${cases.length} outputs differ from the colocated reference`);
  console.error(`ok   ${cases.length} concurrent requests identical to colocated (${Date.now() - t0} ms)`);

  // errors come back as the OpenAI client expects them
  await assert.rejects(client.completions.create({ model: MODEL, prompt: "x", temperature: -1 }),
                       (e) => e.status === 400);
  await assert.rejects(client.completions.create({ model: "no-such-model", prompt: "x" }),
                       (e) => e.status === 404);
  await assert.rejects(client.completions.create({ model: MODEL, prompt: "x ".repeat(3000), max_tokens: 4 }),
                       (e) => e.status === 400 && /maximum context length/.test(e.message));
  const models = await client.models.list();
  assert.equal(models.data[0].id, MODEL);
  console.error("ok   errors relayed: 400 bad parameter, 404 model, 400 context length; /v1/models");
  await expectPoolsEmpty("after the workload");
  console.error(`ok   ${INSTANCES.length} instance pool(s) empty`);
  // who computed what: prompts only on prefill instances, tokens only on decode ones
  for (const url of INSTANCES) {
    const role = (await load(url)).role;
    const text = await (await fetch(`${url}/metrics`)).text();
    const get = (n) => Number((text.match(new RegExp(`^${n}\\{[^}]*\\} ([0-9.e+-]+)$`, "m")) || [])[1]);
    const prompt = get("pdserve_prompt_tokens_total"), gen = get("pdserve_generation_tokens_total");
    if (role === "decode") assert.ok(prompt === 0 && gen > 0, `${url} (decode): prompt ${prompt}, generated ${gen}`);
    if (role === "prefill") assert.ok(prompt > 0, `${url} (prefill): prompt ${prompt}`);
    if (role === "colocated") assert.ok(prompt > 0 && gen > 0, `${url} (colocated): no work`);
  }
  console.error("ok   prompts computed on prefill instances only, tokens on decode ones (or both on colocated)");
}

// ---- fault cases -----------------------------------------------------------------------
// Runs n requests at once (long ones, streamed), optionally calling hook() once every
// stream has its first bytes or after delayMs; counts successes and OpenAI errors.
async function burst(n, { maxTokens = 200, stream = true, hookAfterFirst = null, delayMs = null, hook = null }) {
  let started = 0, hooked = false;
  const fire = async () => {
    if (!hooked && hook) {
      hooked = true;
      await hook();
    }
  };
  if (delayMs !== null) setTimeout(fire, delayMs);
  const one = async (i) => {
    const t0 = Date.now();
    try {
      if (!stream) {
        const r = await client.completions.create({ model: MODEL, prompt: `${i} alpha beta ${i}`, temperature: 0,
                                                   max_tokens: maxTokens, ignore_eos: true });
        return { ok: r.choices[0].text.length >= 0, ms: Date.now() - t0 };
      }
      const s = await client.completions.create({ model: MODEL, prompt: `${i} alpha beta ${i}`, temperature: 0,
                                                 max_tokens: maxTokens, ignore_eos: true, stream: true });
      let first = true, text = "", finish = null;
      for await (const ch of s) {
        if (first) {
          first = false;
          if (++started === hookAfterFirst) fire();
        }
        if (ch.choices.length) {
          text += ch.choices[0].text;
          finish = ch.choices[0].finish_reason || finish;
        }
      }
      if (finish !== "length") return { ok: false, error: `stream ended without finish (${finish})`, ms: Date.now() - t0 };
      return { ok: true, ms: Date.now() - t0 };
    } catch (e) {
      return { ok: false, status: e.status, error: String(e.message || e).slice(0, 200), ms: Date.now() - t0 };
    }
  };
  return Promise.all(Array.from({ length: n }, (_, i) => one(i)));
}

async function faults(name) {
  const pid = Number(process.env.PDSERVE_KILL_PID || 0);
  const kill = async () => {
    if (pid) {
      console.error(`faults: kill -9 ${pid}`);
      process.kill(pid, "SIGKILL");
    }
  };
  let res;
  if (name === "kill-prefill") {
    // one of two prefill instances stalls every transfer; kill it while requests wait on it
    res = await burst(N, { maxTokens: 16, delayMs: Number(process.env.PDSERVE_KILL_AFTER_MS || 800), hook: kill });
  } else if (name === "kill-decode") {
    res = await burst(N, { maxTokens: 900, hookAfterFirst: N, hook: kill });
  } else if (name === "plain") {
    res = await burst(N, { maxTokens: Number(process.env.PDSERVE_MAX_TOKENS || 16), stream: process.env.PDSERVE_STREAM !== "0" });
  } else {
    throw new Error(`unknown fault case ${name}`);
  }
  const ok = res.filter((r) => r.ok).length;
  const errors = res.filter((r) => !r.ok);
  const maxMs = Math.max(...res.map((r) => r.ms));
  console.log(JSON.stringify({ ok, failed: errors.length, maxMs, errors: errors.slice(0, 4) }));
  await expectPoolsEmpty(`after ${name}`, Number(process.env.PDSERVE_DRAIN_MS || 8000));
  console.error(`ok   ${name}: ${ok} succeeded, ${errors.length} failed, pools empty`);
}

const [mode, arg] = process.argv.slice(2);
try {
  if (mode === "reference") await reference(arg);
  else if (mode === "compare") await compare(arg);
  else if (mode === "faults") await faults(arg);
  else throw new Error("usage: disagg.mjs reference OUT | compare REF | faults CASE");
} catch (e) {
  console.error(`FAIL ${e && e.stack ? e.stack : e}`);
  process.exit(1);
}
