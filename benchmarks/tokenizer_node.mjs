// tokenizer_node.mjs: a competitor tokenizer under node on the texts bench_tokenizer
// wrote, for scripts/bench-tokenizer.sh where Python `tokenizers` is not installed.
//
//   node benchmarks/tokenizer_node.mjs hf    PACKAGE_DIR TOKENIZER_DIR TEXT_DIR [MIN_TIME_S]
//   node benchmarks/tokenizer_node.mjs lenml BUNDLE      TOKENIZER_DIR TEXT_DIR [MIN_TIME_S]
//
//   hf     Hugging Face `tokenizers` (the Rust library, npm package `tokenizers`, its
//          node binding) from PACKAGE_DIR (the folder holding node_modules/tokenizers).
//          Its encode is asynchronous: each timed call includes one hop to node's
//          worker pool and back (tens of microseconds).
//   lenml  @lenml/tokenizers, a JavaScript port of Hugging Face's, from BUNDLE, the
//          browser build of one @lenml/tokenizer-NAME package (package/dist/
//          main.global.js, which carries the library).
// The tokenizer is read from TOKENIZER_DIR/tokenizer.json. Times the raw encoding (no
// special tokens) of each text after one warm-up, at least 5 runs and MIN_TIME_S
// seconds (default 0.5). Prints what tokenizer_hf.py prints: a "# NAME VERSION" line,
// then NAME, median ms, ids, whether the ids equal TEXT_DIR/NAME.ids, tab separated.
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import vm from "node:vm";

const [kind, from, tokDir, textDir, minTimeArg] = process.argv.slice(2);
const minTime = minTimeArg ? Number(minTimeArg) : 0.5;
const readJson = (p) => (fs.existsSync(p) ? JSON.parse(fs.readFileSync(p, "utf8")) : {});

let encode, version;
if (kind === "hf") {
  const req = createRequire(path.resolve(from, "package.json"));
  const { Tokenizer } = req("tokenizers");
  const tok = Tokenizer.fromFile(path.join(tokDir, "tokenizer.json"));
  encode = async (text) => (await tok.encode(text, null, { addSpecialTokens: false })).getIds();
  version = `tokenizers ${req("tokenizers/package.json").version} (node binding, node ${process.version})`;
} else if (kind === "lenml") {
  vm.runInThisContext(fs.readFileSync(from, "utf8"));
  const lib = Object.values(globalThis).find((v) => v && v.TokenizerLoader && v.tokenizerJSON);
  if (!lib) throw new Error(`${from}: no TokenizerLoader in this bundle`);
  const tok = lib.TokenizerLoader.fromPreTrained({
    tokenizerJSON: readJson(path.join(tokDir, "tokenizer.json")),
    tokenizerConfig: readJson(path.join(tokDir, "tokenizer_config.json")),
  });
  encode = async (text) => tok.encode(text, { add_special_tokens: false });
  const pkg = readJson(path.join(path.dirname(from), "..", "package.json"));
  version = `@lenml/tokenizers from ${pkg.name ?? "?"} ${pkg.version ?? "?"} (node ${process.version})`;
} else {
  throw new Error("usage: tokenizer_node.mjs hf|lenml PACKAGE_DIR|BUNDLE TOKENIZER_DIR TEXT_DIR [MIN_TIME_S]");
}

console.log(`# ${version}`);
const names = fs.readFileSync(path.join(textDir, "pdserve.tsv"), "utf8")
  .split("\n").filter((l) => l.trim()).map((l) => l.split("\t")[0]);
const now = () => Number(process.hrtime.bigint()) / 1e9;
for (const name of names) {
  const text = fs.readFileSync(path.join(textDir, name + ".txt"), "utf8");
  const ours = fs.readFileSync(path.join(textDir, name + ".ids"), "utf8").split(/\s+/).filter(Boolean).map(Number);
  const ids = Array.from(await encode(text));
  const times = [];
  const start = now();
  while (times.length < 5 || now() - start < minTime) {
    const t0 = now();
    await encode(text);
    times.push(now() - t0);
  }
  times.sort((a, b) => a - b);
  const n = times.length;
  const med = n % 2 ? times[(n - 1) / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
  const same = ids.length === ours.length && ids.every((v, i) => v === ours[i]) ? "yes" : "NO";
  console.log(`${name}\t${(med * 1e3).toFixed(4)}\t${ids.length}\t${same}`);
}
