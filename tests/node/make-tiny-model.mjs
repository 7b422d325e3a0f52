// make-tiny-model.mjs: writes a minimal Llama model directory (config.json, random
// model.safetensors, and the tokenizer files of TOKDIR) whose vocabulary is the
// tokenizer's, so that any text and any chat template fit the model. Used by
// tests/test_server_e2e.sh only when `pdserve make-model` is not in the build.
//
//   node make-tiny-model.mjs OUTDIR TOKDIR
import fs from "node:fs";
import path from "node:path";

const [out, tokdir] = process.argv.slice(2);
if (!out || !tokdir) throw new Error("usage: node make-tiny-model.mjs OUTDIR TOKDIR");
fs.mkdirSync(out, { recursive: true });
const tokJson = JSON.parse(fs.readFileSync(path.join(tokdir, "tokenizer.json"), "utf8"));
let V = Object.keys(tokJson.model.vocab).length;
for (const t of tokJson.added_tokens || []) V = Math.max(V, t.id + 1);
V = Math.ceil(V / 64) * 64;
const tokCfg = JSON.parse(fs.readFileSync(path.join(tokdir, "tokenizer_config.json"), "utf8"));
const idOf = (s) => {
  if (s && typeof s === "object") s = s.content;
  if (!s) return null;
  if (s in tokJson.model.vocab) return tokJson.model.vocab[s];
  const a = (tokJson.added_tokens || []).find((t) => t.content === s);
  return a ? a.id : null;
};
const bos = idOf(tokCfg.bos_token), eos = idOf(tokCfg.eos_token);

const C = 32, F = 64, H = 4, K = 2, D = 8, L = 2;
const config = {
  architectures: ["LlamaForCausalLM"], model_type: "llama", hidden_size: C, intermediate_size: F,
  num_attention_heads: H, num_key_value_heads: K, head_dim: D, num_hidden_layers: L,
  vocab_size: V, max_position_embeddings: 4096, rms_norm_eps: 1e-5, rope_theta: 500000.0,
  bos_token_id: bos, eos_token_id: eos, tie_word_embeddings: true, torch_dtype: "float32",
};
fs.writeFileSync(path.join(out, "config.json"), JSON.stringify(config, null, 2));

// mulberry32 + Box-Muller: the same bytes on every run
let seed = 12345;
const rand = () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const normal = () => Math.sqrt(-2 * Math.log(rand() + 1e-12)) * Math.cos(2 * Math.PI * rand());

const tensors = [];
const add = (name, shape, scale) => {
  const n = shape.reduce((a, b) => a * b, 1);
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = scale === null ? 1 : normal() * scale;
  tensors.push({ name, shape, data: a });
};
add("model.embed_tokens.weight", [V, C], 1.0);
for (let l = 0; l < L; l++) {
  const p = `model.layers.${l}.`;
  add(p + "input_layernorm.weight", [C], null);
  add(p + "self_attn.q_proj.weight", [H * D, C], 0.3);
  add(p + "self_attn.k_proj.weight", [K * D, C], 0.3);
  add(p + "self_attn.v_proj.weight", [K * D, C], 0.3);
  add(p + "self_attn.o_proj.weight", [C, H * D], 0.3);
  add(p + "post_attention_layernorm.weight", [C], null);
  add(p + "mlp.gate_proj.weight", [F, C], 0.3);
  add(p + "mlp.up_proj.weight", [F, C], 0.3);
  add(p + "mlp.down_proj.weight", [C, F], 0.3);
}
add("model.norm.weight", [C], null);

const header = { __metadata__: { format: "pt" } };
let off = 0;
for (const t of tensors) {
  header[t.name] = { dtype: "F32", shape: t.shape, data_offsets: [off, off + t.data.byteLength] };
  off += t.data.byteLength;
}
let hjson = JSON.stringify(header);
while ((8 + hjson.length) % 8) hjson += " ";
const len = Buffer.alloc(8);
len.writeBigUInt64LE(BigInt(hjson.length));
const fd = fs.openSync(path.join(out, "model.safetensors"), "w");
fs.writeSync(fd, len);
fs.writeSync(fd, Buffer.from(hjson, "utf8"));
for (const t of tensors) fs.writeSync(fd, Buffer.from(t.data.buffer));
fs.closeSync(fd);
for (const f of ["tokenizer.json", "tokenizer_config.json"])
  fs.copyFileSync(path.join(tokdir, f), path.join(out, f));
console.error(`make-tiny-model: ${out}: vocab ${V}, ${L} layers, dim ${C}, ${(off / 1048576).toFixed(1)} MiB`);
