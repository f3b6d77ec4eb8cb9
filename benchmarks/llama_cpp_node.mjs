// Batch-1 latency of llama.cpp on a GGUF, through node-llama-cpp's prebuilt binaries.
//
// benchmarks/llama_cpp.py measures the same through llama-cpp-python, which builds llama.cpp
// from source; where that build does not finish (2-core machines), node-llama-cpp ships
// llama.cpp prebuilt, with a CPU backend per x86 generation (zen4, sapphirerapids, ...) that
// ggml picks at run time. Not a project dependency; install it by hand, outside the repo:
//
//     npm i -E node-llama-cpp@3.21.1 --prefix /tmp/nodellama --ignore-scripts
//     node benchmarks/llama_cpp_node.mjs --modules /tmp/nodellama/node_modules \
//         --gguf "$(.venv/bin/python -c 'from xla_inference.loading.default_model import \
//             default_gguf_path; print(default_gguf_path())')" \
//         --input-len 512 --output-len 64 --threads 2 --num-prompts 8
//
// As llama_cpp.py: for each of --num-prompts prompts of random token ids (new ids per
// prompt, the sequence's history cleared: nothing reused), after one untimed warm-up prompt,
// greedily (temperature 0, end-of-generation tokens yielded, not stopping), it times TTFT
// (prompt handed over until the first generated token) and TPOT (mean time per token of the
// remaining --output-len - 1), and prints the medians against the memory floor (the GGUF's
// bytes / --bandwidth-gbs per token).
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: {
    modules: { type: "string", default: "/tmp/nodellama/node_modules" },
    gguf: { type: "string" },
    "input-len": { type: "string", default: "512" },
    "output-len": { type: "string", default: "64" },
    "num-prompts": { type: "string", default: "8" },
    threads: { type: "string", default: "2" },
    seed: { type: "string", default: "0" },
    "bandwidth-gbs": { type: "string", default: "45" },
    json: { type: "string" },
  },
});
const inputLen = Number(args["input-len"]);
const outputLen = Number(args["output-len"]);
const numPrompts = Number(args["num-prompts"]);
const threads = Number(args.threads);
if (!args.gguf) throw new Error("--gguf is required (the file xla-inference serves)");

const { getLlama } = await import(path.join(args.modules, "node-llama-cpp/dist/index.js"));

// A small seeded generator (mulberry32): the prompts are reproducible run to run.
function randomIds(seed, count, low, high) {
  let state = seed >>> 0;
  const ids = [];
  for (let i = 0; i < count; i++) {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    const unit = ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    ids.push(low + Math.floor(unit * (high - low)));
  }
  return ids;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

async function timeOne(sequence, prompt) {
  await sequence.clearHistory(); // nothing of the previous prompt is reused
  const stamps = [];
  const t0 = performance.now();
  for await (const _token of sequence.evaluate(prompt, { temperature: 0, yieldEogToken: true })) {
    stamps.push(performance.now());
    if (stamps.length === outputLen) break;
  }
  const ttft = stamps[0] - t0;
  const tpot = (stamps[stamps.length - 1] - stamps[0]) / (stamps.length - 1);
  return [ttft, tpot, stamps.length];
}

const llama = await getLlama({ gpu: false, build: "never", maxThreads: threads, logLevel: process.env.LLAMA_LOG ?? "warn" });
const model = await llama.loadModel({ modelPath: args.gguf, gpuLayers: 0 });
const contextSize = inputLen + outputLen + 16;
// The whole prompt in one batch, as llama_cpp.py does.
const context = await model.createContext({ contextSize, batchSize: contextSize, threads });
const sequence = context.getSequence();
const vocab = model.tokens.size ?? model.fileInsights?.tokens?.size ?? 49152;
const prompts = Array.from({ length: numPrompts + 1 }, (_, i) =>
  randomIds(Number(args.seed) * 1000 + i + 1, inputLen, 100, vocab - 100));
await timeOne(sequence, prompts[0]); // warm-up
const runs = [];
for (const prompt of prompts.slice(1)) runs.push(await timeOne(sequence, prompt));
if (runs.some((r) => r[2] !== outputLen)) throw new Error("a generation ended early");

const ttft = median(runs.map((r) => r[0]));
const tpot = median(runs.map((r) => r[1]));
const weightBytes = fs.statSync(args.gguf).size;
const floorMs = (weightBytes / (Number(args["bandwidth-gbs"]) * 1e9)) * 1e3;
console.log(`llama.cpp (node-llama-cpp, ${llama.cpuMathCores ?? "?"} math cores) on ` +
  `${path.basename(args.gguf)}: ${numPrompts} prompts x ${inputLen} tokens in, ${outputLen} ` +
  `out (greedy), ${threads} threads`);
console.log("per prompt TTFT ms: " + runs.map((r) => r[0].toFixed(0)).join(" "));
console.log("per prompt TPOT ms: " + runs.map((r) => r[1].toFixed(2)).join(" "));
console.log(`TTFT med ms ${ttft.toFixed(0)}  TPOT med ms ${tpot.toFixed(2)}  weight MB ` +
  `${(weightBytes / 1e6).toFixed(1)}  floor ms ${floorMs.toFixed(2)}  floor/TPOT ` +
  `${(floorMs / tpot).toFixed(2)}`);
if (args.json) {
  fs.writeFileSync(args.json, JSON.stringify({ config: args, median_ttft_ms: ttft,
    median_tpot_ms: tpot, weight_bytes: weightBytes, floor_ms: floorMs, runs_ms: runs }, null, 1));
}
await context.dispose();
await model.dispose();
await llama.dispose();
