// In-browser generation for an `ondevice convert MODEL --to onnx` folder: onnxruntime-web (WebAssembly CPU
// build) runs model.onnx with its KV cache fed back step by step, the tokenizer is tokenizers.js and the
// chat template is rendered by @huggingface/jinja. Everything is loaded from this server (vendor/ and the
// model folder): nothing comes from the internet.
import * as ort from "./vendor/onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "./vendor/tokenizers/tokenizers.min.mjs";
import { Template } from "./vendor/jinja/index.js";

ort.env.wasm.wasmPaths = new URL("./vendor/onnxruntime-web/", import.meta.url).href;
// Threads need SharedArrayBuffer, i.e. a cross-origin-isolated page (`ondevice serve` sends COOP/COEP).
ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

async function fetchOk(url) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
  return resp;
}

// The bytes of url, reporting (loaded, total) as they arrive.
async function readBytes(resp, onProgress) {
  const total = Number(resp.headers.get("Content-Length")) || 0;
  const reader = resp.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    onProgress(loaded, total);
  }
  const out = new Uint8Array(loaded);
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

function sample(logits, { temperature, topK, topP }) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (!(temperature > 0)) return best;  // greedy: the first maximum, as numpy's argmax
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]).slice(0, topK > 0 ? topK : undefined);
  const max = logits[order[0]];
  let probs = order.map((i) => Math.exp((logits[i] - max) / temperature));
  const sum = probs.reduce((a, b) => a + b, 0);
  probs = probs.map((p) => p / sum);
  let kept = 0, mass = 0;
  while (kept < probs.length && (kept === 0 || mass < topP)) mass += probs[kept++];
  let r = Math.random() * mass;
  for (let j = 0; j < kept; j++) { r -= probs[j]; if (r <= 0) return order[j]; }
  return order[kept - 1];
}

// Back to the event loop (a new task, not a microtask): between tokens the thread handles what is queued for it,
// e.g. the worker's "stop" message, so a reply can be stopped mid-way.
const nextTask = () => new Promise((resolve) => setTimeout(resolve, 0));

export class OnnxChat {
  // base: URL of the model folder (ending in "/"); onProgress(text) reports loading.
  static async load(base, onProgress = () => {}) {
    const self = new OnnxChat();
    const config = await (await fetchOk(base + "genai_config.json")).json();
    const model = config.model, dec = model.decoder;
    self.config = config;
    self.layers = dec.num_hidden_layers;
    self.kvHeads = dec.num_key_value_heads;
    self.headSize = dec.head_size;
    self.contextLength = model.context_length;
    self.eos = new Set([].concat(model.eos_token_id ?? []));
    self.names = dec.inputs;
    self.outNames = dec.outputs;
    const tokenizerJson = await (await fetchOk(base + "tokenizer.json")).json();
    const tokenizerConfig = await (await fetchOk(base + "tokenizer_config.json")).json();
    self.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    self.bosToken = typeof tokenizerConfig.bos_token === "string" ? tokenizerConfig.bos_token : "";
    self.eosToken = typeof tokenizerConfig.eos_token === "string" ? tokenizerConfig.eos_token : "";
    let template = null;
    const file = await fetch(base + "chat_template.jinja");
    if (file.ok) template = await file.text();
    else if (typeof tokenizerConfig.chat_template === "string") template = tokenizerConfig.chat_template;
    self.template = template ? new Template(template) : null;

    const mb = (n) => (n / 1e6).toFixed(0);
    const graph = await readBytes(await fetchOk(base + dec.filename), () => {});
    const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    const dataName = dec.filename + ".data";
    const dataResp = await fetch(base + dataName);  // weights beside the graph (absent for small graphs)
    if (dataResp.ok) {
      const data = await readBytes(dataResp, (n, total) =>
        onProgress(`loading weights ${mb(n)}${total ? " / " + mb(total) : ""} MB`));
      options.externalData = [{ path: dataName, data }];
    }
    onProgress("preparing the model (WebAssembly)…");
    self.session = await ort.InferenceSession.create(graph, options);
    self.name = base.replace(/\/$/, "").split("/").pop();
    return self;
  }

  promptTokens(messages) {
    if (!this.template) throw new Error("this model folder has no chat template");
    const text = this.template.render({ messages, add_generation_prompt: true, bos_token: this.bosToken,
                                        eos_token: this.eosToken });
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids.map(Number);
  }

  decode(ids) {
    return this.tokenizer.decode(ids, { skip_special_tokens: false });
  }

  emptyCache() {
    const past = {};
    const empty = () => new ort.Tensor("float32", new Float32Array(0), [1, this.kvHeads, 0, this.headSize]);
    for (let i = 0; i < this.layers; i++) {
      past[this.names.past_key_names.replace("%d", i)] = empty();
      past[this.names.past_value_names.replace("%d", i)] = empty();
    }
    return past;
  }

  // Run tokens through the decoder after `length` cached positions; returns the last position's logits.
  async forward(tokens, past, length) {
    const n = tokens.length;
    const feeds = {
      [this.names.input_ids]: new ort.Tensor("int64", BigInt64Array.from(tokens, BigInt), [1, n]),
      [this.names.attention_mask]: new ort.Tensor("int64", new BigInt64Array(length + n).fill(1n), [1, length + n]),
      ...past,
    };
    const out = await this.session.run(feeds);
    for (let i = 0; i < this.layers; i++) {
      past[this.names.past_key_names.replace("%d", i)] = out[this.outNames.present_key_names.replace("%d", i)];
      past[this.names.past_value_names.replace("%d", i)] = out[this.outNames.present_value_names.replace("%d", i)];
    }
    const logits = out[this.outNames.logits];
    const vocab = logits.dims[2];
    return logits.data.slice((n - 1) * vocab, n * vocab);
  }

  // Yields {text} pieces as they become valid UTF-8, then returns {tokens, promptTokens, finish, ids}.
  async *generate(messages, { maxTokens = 256, temperature = 0, topK = 40, topP = 0.95, repeatPenalty = 1.0,
                              signal = null } = {}) {
    const prompt = this.promptTokens(messages);
    if (prompt.length >= this.contextLength) {
      throw new Error(`the prompt is ${prompt.length} tokens; the context window is ${this.contextLength}`);
    }
    const past = this.emptyCache();
    const ids = [];
    let shown = "", finish = "length", length = 0, next = prompt;
    const limit = Math.min(maxTokens, this.contextLength - prompt.length);
    while (ids.length < limit) {
      await nextTask();
      if (signal && signal.aborted) { finish = "stopped"; break; }
      const logits = await this.forward(next, past, length);
      length += next.length;
      if (repeatPenalty !== 1.0) {
        for (const t of new Set(prompt.concat(ids))) {
          logits[t] = logits[t] > 0 ? logits[t] / repeatPenalty : logits[t] * repeatPenalty;
        }
      }
      const token = sample(logits, { temperature, topK, topP });
      if (this.eos.has(token)) { finish = "stop"; break; }
      ids.push(token);
      next = [token];
      const text = this.decode(ids);
      if (!text.endsWith("\uFFFD") && text.length > shown.length && text.startsWith(shown)) {
        yield { text: text.slice(shown.length) };
        shown = text;
      }
    }
    const text = this.decode(ids);
    if (text !== shown && text.startsWith(shown)) yield { text: text.slice(shown.length) };
    return { tokens: ids.length, promptTokens: prompt.length, finish, ids, prompt };
  }
}
