/**
 * The chat loop over the two runtimes with their native modules mocked (there is no phone here): the fakes
 * implement the published llama.rn / react-native-executorch types, and record what the SDK passed them.
 */

import { promises as fsp, readFileSync } from 'fs';
import * as path from 'path';

import type { CompletionParams, ContextParams, LlamaContext, NativeCompletionResult, TokenData } from 'llama.rn';
import type { LLMChatSession, LLMChatSessionOptions, LLMModel } from 'react-native-executorch';

import {
  BusyError,
  type ChatMessage,
  InsufficientMemoryError,
  loadModel,
  ModelReleasedError,
  StructuredOutputError,
  UnsupportedBundleError,
} from '../src';
import { NodeBundleIO } from '../src/node';
import { FIXTURE, goldenManifest, tempDir } from './helpers';

const io = new NodeBundleIO();
const roomy = { totalBytes: 8e9, availableBytes: 4e9 };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---- a fake llama.rn: initLlama + a context that streams a reply token by token ----
const llamaCalls: { init: ContextParams[]; completions: CompletionParams[]; released: number } =
  { init: [], completions: [], released: 0 };

function replyFor(params: CompletionParams): string {
  if (params.response_format) return '{"title": "Crash on upload", "priority": "high"}';
  const last = params.messages?.[params.messages.length - 1]?.content;
  return `You said: ${typeof last === 'string' ? last : params.prompt}`;
}

class FakeContext {
  private stopping = false;

  async completion(params: CompletionParams, onToken?: (data: TokenData) => void): Promise<NativeCompletionResult> {
    llamaCalls.completions.push(params);
    this.stopping = false;
    const tokens = replyFor(params).match(/\S+\s*/g) ?? [];
    const limit = params.n_predict ?? tokens.length;
    let text = '';
    let n = 0;
    for (const token of tokens) {
      if (this.stopping || n >= limit) break;
      await sleep(3);
      text += token;
      n += 1;
      onToken?.({ token });
    }
    return {
      text, content: text, reasoning_content: '', tool_calls: [], chat_format: 0, tokens_predicted: n,
      tokens_evaluated: 12, draft_tokens: 0, draft_tokens_accepted: 0, truncated: false,
      stopped_eos: !this.stopping && n === tokens.length, stopped_word: '', stopped_limit: n >= limit && n < tokens.length ? 1 : 0,
      stopping_word: '', context_full: false, interrupted: this.stopping, tokens_cached: 0,
      timings: { cache_n: 0, prompt_n: 12, prompt_ms: 6, prompt_per_token_ms: 0.5, prompt_per_second: 2000,
        predicted_n: n, predicted_ms: n * 3, predicted_per_token_ms: 3, predicted_per_second: 333 },
    };
  }

  async stopCompletion(): Promise<void> {
    this.stopping = true;
  }

  async release(): Promise<void> {
    llamaCalls.released += 1;
  }
}

jest.mock('llama.rn', () => ({
  initLlama: async (params: ContextParams, onProgress?: (p: number) => void): Promise<LlamaContext> => {
    llamaCalls.init.push(params);
    onProgress?.(0);
    onProgress?.(100);
    return new FakeContext() as unknown as LlamaContext;
  },
}));

// ---- a fake react-native-executorch: createLLMChatSession with its own history ----
const etCalls: { sessions: { config: LLMModel; options: LLMChatSessionOptions | undefined }[]; sent: string[] } =
  { sessions: [], sent: [] };

jest.mock('react-native-executorch', () => ({
  createLLMChatSession: async (config: LLMModel, options?: LLMChatSessionOptions): Promise<LLMChatSession> => {
    etCalls.sessions.push({ config, options });
    const history: unknown[] = [...(options?.initialMessages ?? [])];
    let stopping = false;
    return {
      stop: () => void (stopping = true),
      dispose: () => undefined,
      getHistory: () => history as never,
      getKVCacheState: () => ({ pos: 0, maxSeqLen: 256, remainingTokens: 256, usageRatio: 0 }),
      sendMessage: async (message, onToken) => {
        etCalls.sent.push(String(message));
        stopping = false;
        const reply = String(message).startsWith('JSON') ? 'Sure: {"ok": true}<|im_end|>'
          : `Echo: ${String(message)}<|im_end|>\nignored`;
        const start = Date.now();
        let n = 0;
        for (const token of reply.match(/<\|im_|end\|>|[^\s<]+\s*|\s+/g) ?? []) {
          if (stopping) break;
          await sleep(3);
          onToken?.(token);
          n += 1;
        }
        const end = Date.now();
        history.push({ role: 'user', content: message }, { role: 'assistant', content: reply });
        return { messages: [], finishReason: 'stop',
          stats: [{ numPromptTokens: 9, numGeneratedTokens: n, firstTokenMs: start + 3, inferenceStartMs: start,
            inferenceEndMs: end, modelLoadStartMs: 0, modelLoadEndMs: 0 }] };
      },
    };
  },
}));

beforeEach(() => {
  llamaCalls.init = [];
  llamaCalls.completions = [];
  llamaCalls.released = 0;
  etCalls.sessions = [];
  etCalls.sent = [];
});

describe('llama.rn (GGUF bundles)', () => {
  it('loads with the bundle template and chats over several turns, streaming with tokens/s', async () => {
    const manifest = goldenManifest() as any;
    const progress: number[] = [];
    const model = await loadModel(FIXTURE, { io, memory: roomy, onProgress: (p) => progress.push(p) });
    expect(model.runtime).toBe('llama.rn');
    expect(llamaCalls.init[0]).toMatchObject({ model: path.join(FIXTURE, manifest.model.file),
      n_ctx: manifest.model.recommended_context, chat_template: manifest.chat.template });
    expect(progress).toEqual([0, 1]);

    // the example screen's loop: append the user turn, stream the reply, append it
    const conversation: ChatMessage[] = [{ role: 'system', content: 'You are terse.' }];
    for (const question of ['Hello there', 'What is 2+2?', 'Thanks']) {
      conversation.push({ role: 'user', content: question });
      const streamed: string[] = [];
      const speeds: number[] = [];
      const { text, stats } = await model.chat(conversation, { onToken: (t, tps) => {
        streamed.push(t);
        speeds.push(tps);
      } });
      expect(text).toBe(`You said: ${question}`);
      expect(streamed.join('')).toBe(text);
      expect(speeds[speeds.length - 1]).toBeGreaterThan(0);
      expect(stats).toMatchObject({ promptTokens: 12, generatedTokens: streamed.length, tokensPerSecond: 333,
        stoppedBy: 'eos' });
      expect(stats.timeToFirstTokenMs).toBeGreaterThanOrEqual(0);
      conversation.push({ role: 'assistant', content: text });
    }
    const last = llamaCalls.completions[2]!;
    expect(last.messages).toEqual(conversation.slice(0, -1)); // the whole conversation, every turn
    expect(last.stop).toEqual(manifest.chat.stop); // stop strings from the bundle
    expect(last).toMatchObject({ jinja: true, temperature: manifest.sampling.temperature, top_k: manifest.sampling.top_k,
      top_p: manifest.sampling.top_p, min_p: manifest.sampling.min_p, penalty_repeat: manifest.sampling.repeat_penalty,
      n_predict: manifest.sampling.max_tokens });
    await model.release();
    expect(llamaCalls.released).toBe(1);
    await expect(model.chat(conversation)).rejects.toBeInstanceOf(ModelReleasedError);
  });

  it('stops a reply on request and refuses a second concurrent one', async () => {
    const model = await loadModel(FIXTURE, { io, memory: roomy });
    const long = 'a b c d e f g h i j k l m n o p q r s t u v w x y z';
    const reply = model.chat([{ role: 'user', content: long }], { onToken: () => undefined });
    await expect(model.chat([{ role: 'user', content: 'x' }])).rejects.toBeInstanceOf(BusyError);
    await sleep(15);
    await model.stop();
    const { text, stats } = await reply;
    expect(stats.stoppedBy).toBe('user');
    expect(text.length).toBeGreaterThan(0);
    expect(text.length).toBeLessThan(`You said: ${long}`.length);
    const next = await model.chat([{ role: 'user', content: 'again' }], { maxTokens: 2, temperature: 0, seed: 7 });
    expect(next.stats.stoppedBy).toBe('limit');
    expect(llamaCalls.completions[llamaCalls.completions.length - 1]).toMatchObject({ n_predict: 2, temperature: 0, seed: 7 });
  });

  it('asks llama.rn for schema-constrained JSON and parses it', async () => {
    const model = await loadModel(FIXTURE, { io, memory: roomy });
    const schema = { type: 'object', properties: { title: { type: 'string' }, priority: { enum: ['low', 'high'] } },
      required: ['title', 'priority'] };
    const { value } = await model.chatJson<{ title: string; priority: string }>(
      [{ role: 'user', content: 'The app crashes when I upload a photo.' }], schema);
    expect(value).toEqual({ title: 'Crash on upload', priority: 'high' });
    expect(llamaCalls.completions[0]!.response_format).toEqual({ type: 'json_schema',
      json_schema: { strict: true, schema } });
    // cut short by maxTokens: not JSON, a typed error that carries the text
    await expect(model.chatJson([{ role: 'user', content: 'x' }], schema, { maxTokens: 2 }))
      .rejects.toBeInstanceOf(StructuredOutputError);
  });

  it('checks memory before touching the native module', async () => {
    const phone = { totalBytes: 0.5e9 + 1.2e9 }; // budget ~0.5 GB... minus nothing: min(65%, total-1.2GB) = 0.5 GB
    const manifest = goldenManifest() as any;
    const dir = await tempDir();
    for (const f of manifest.files) await fsp.copyFile(path.join(FIXTURE, f.path), path.join(dir, f.path));
    manifest.ram.model_bytes = 0.6e9; // pretend a 600 MB model
    manifest.ram.estimate_bytes = manifest.ram.model_bytes + manifest.ram.kv_cache_bytes + manifest.ram.overhead_bytes;
    await fsp.writeFile(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
    await expect(loadModel(dir, { io, memory: phone })).rejects.toBeInstanceOf(InsufficientMemoryError);
    expect(llamaCalls.init).toHaveLength(0);
    await expect(loadModel(dir, { io, memory: false })).resolves.toBeDefined(); // the app may opt out
  });
});

async function pteBundle(): Promise<string> {
  const m = goldenManifest() as any;
  const dir = await tempDir();
  const files: Record<string, Buffer> = {
    'tiny.8da4w.pte': Buffer.alloc(1000, 1),
    'tiny.8da4w.tokenizer.json': Buffer.from('{"model": {}}'),
    'tokenizer_config.json': readFileSync(path.join(FIXTURE, 'tokenizer_config.json')),
  };
  for (const [name, data] of Object.entries(files)) await fsp.writeFile(path.join(dir, name), data);
  const roles: Record<string, string> = { 'tiny.8da4w.pte': 'model', 'tiny.8da4w.tokenizer.json': 'tokenizer',
    'tokenizer_config.json': 'tokenizer_config' };
  Object.assign(m, { runtime: 'executorch' });
  Object.assign(m.model, { format: 'pte', file: 'tiny.8da4w.pte', quantization: '8da4w' });
  m.files = Object.entries(files).map(([name, data]) => ({ path: name, role: roles[name], bytes: data.length,
    sha256: '0'.repeat(64) }));
  await fsp.writeFile(path.join(dir, 'manifest.json'), JSON.stringify(m));
  return dir;
}

describe('react-native-executorch (.pte bundles)', () => {
  it('opens a chat session from the bundle files and keeps it across turns', async () => {
    const dir = await pteBundle();
    const model = await loadModel(dir, { io, memory: roomy });
    expect(model.runtime).toBe('react-native-executorch');
    expect(model.unsupportedOptions).toEqual(expect.arrayContaining(['topK', 'topP', 'minP', 'repeatPenalty']));
    const first = etCalls.sessions[0]!;
    expect(first.config).toEqual({ modelPath: path.join(dir, 'tiny.8da4w.pte'),
      tokenizerPath: path.join(dir, 'tiny.8da4w.tokenizer.json'), tokenizerConfigPath: path.join(dir, 'tokenizer_config.json') });
    expect(first.options?.stopRegex?.test('foo<|im_end|>')).toBe(true); // the bundle's stop strings
    expect(first.options?.generationConfig).toEqual({ temperature: 0.2, maxNewTokens: 256 });

    const conversation: ChatMessage[] = [];
    for (const question of ['Hi', 'And then?']) {
      conversation.push({ role: 'user', content: question });
      let streamed = '';
      let count = 0;
      const { text, stats } = await model.chat(conversation, { onToken: (t) => {
        streamed += t;
        count += 1;
      } });
      expect(text).toBe(`Echo: ${question}`); // the stop token is cut off
      expect(streamed).toBe(text); // nor is it streamed
      expect(stats.generatedTokens).toBeGreaterThan(count); // the native count includes the stop token (split in two) and beyond
      expect(stats.tokensPerSecond).toBeGreaterThan(0);
      conversation.push({ role: 'assistant', content: text });
    }
    expect(etCalls.sessions).toHaveLength(1); // the session's history was the conversation: no reload
    expect(etCalls.sent).toEqual(['Hi', 'And then?']);

    // an edited conversation opens a new session with the earlier turns
    await model.chat([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello!' },
      { role: 'user', content: 'Bye' }]);
    expect(etCalls.sessions).toHaveLength(2);
    expect(etCalls.sessions[1]!.options?.initialMessages).toEqual([{ role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello!' }]);
    await model.release();
    await expect(model.chat(conversation)).rejects.toBeInstanceOf(ModelReleasedError);
  });

  it('parses JSON replies (unconstrained: the schema goes into the system prompt)', async () => {
    const model = await loadModel(await pteBundle(), { io, memory: roomy });
    const { value } = await model.chatJson([{ role: 'user', content: 'JSON please' }], { type: 'object' });
    expect(value).toEqual({ ok: true });
    expect(etCalls.sessions[1]!.options?.initialMessages?.[0]).toMatchObject({ role: 'system' });
  });

  it('refuses a tokenizer_config.json whose template is not the bundle\'s', async () => {
    const dir = await pteBundle();
    const original = readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8');
    const config = JSON.parse(original);
    config.chat_template = '{{ messages[0].content }}';
    // same size (the manifest lists it; only the content is wrong)
    await fsp.writeFile(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config).padEnd(original.length));
    await expect(loadModel(dir, { io, memory: roomy })).rejects.toThrow(/chat template/);
    expect(etCalls.sessions).toHaveLength(0);
  });

  it('refuses a .pte bundle without tokenizer_config.json', async () => {
    const dir = await pteBundle();
    const m = JSON.parse(readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
    m.files = m.files.filter((f: { role: string }) => f.role !== 'tokenizer_config');
    await fsp.writeFile(path.join(dir, 'manifest.json'), JSON.stringify(m));
    await expect(loadModel(dir, { io, memory: roomy })).rejects.toBeInstanceOf(UnsupportedBundleError);
  });
});
