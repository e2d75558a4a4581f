/**
 * OndeviceModel over react-native-executorch (0.10) for .pte bundles, through its chat session API
 * (createLLMChatSession: generation on a worklet thread, tokens streamed back).
 *
 * What comes from the bundle: the model (.pte), tokenizer.json, and tokenizer_config.json, which `ondevice export
 * --app react-native` writes with the bundle's chat template and EOS token: react-native-executorch renders every
 * prompt with that template (its own Jinja engine) and stops at that EOS. The bundle's other stop strings
 * (manifest.chat.stop) become the session's stopRegex; temperature and max tokens come from manifest.sampling.
 *
 * What react-native-executorch 0.10 cannot take, and so this class does not do:
 * - top_k, top_p, min_p and the repeat penalty: its generation config has only temperature and maxNewTokens;
 *   they are listed in `unsupportedOptions` and ignored.
 * - constrained (schema-guided) decoding: chatJson asks for JSON in a system message carrying the schema, then
 *   parses the reply and throws StructuredOutputError if it is not JSON; nothing forces the reply to match.
 * - a seed: generation is not reproducible from the SDK.
 * - replacing the conversation: a session owns its history, so a conversation that is not the session's history
 *   plus one new user message (an edited or new chat) disposes the session and opens a new one with the earlier
 *   turns as initialMessages, which loads the model again.
 */

import type { LLMChatSession } from 'react-native-executorch';
import type { ChatMessage as EtMessage, LLMGenerationStats } from 'react-native-executorch/llm';

import { TokenClock } from './clock';
import { BusyError, ModelReleasedError, optionalPeer, StructuredOutputError, UnsupportedBundleError } from './errors';
import { type BundleManifest, fileWithRole } from './manifest';
import type * as api from './model';

type ChatMessage = api.ChatMessage;
type ChatOptions = api.ChatOptions;
type ExecuTorchModule = typeof import('react-native-executorch');

// Metro bundles a literal require(); optional peers are required lazily so a missing one is a typed error.
declare const require: (id: string) => unknown;

function executorchModule(options: api.LoadOptions): ExecuTorchModule {
  return optionalPeer(options.modules?.executorch, () => require('react-native-executorch'), '.pte',
    'react-native-executorch');
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function sameTurns(a: readonly ChatMessage[], b: readonly ChatMessage[]): boolean {
  return a.length === b.length && a.every((m, i) => {
    const other = b[i];
    return other !== undefined && other.role === m.role && other.content === m.content;
  });
}

export class ExecuTorchModel implements api.OndeviceModel {
  readonly runtime = 'react-native-executorch' as const;
  readonly unsupportedOptions: readonly (keyof ChatOptions)[] = ['topK', 'topP', 'minP', 'repeatPenalty', 'seed'];
  private released = false;
  private busy = false;
  private stopped = false;
  /** The conversation the session holds, as this class returned it to the app. */
  private history: ChatMessage[] = [];

  private constructor(readonly manifest: BundleManifest, private readonly et: ExecuTorchModule,
    private readonly paths: { modelPath: string; tokenizerPath: string; tokenizerConfigPath: string },
    private readonly stopRegex: RegExp | undefined, private session: LLMChatSession) {}

  static async load(bundle: api.LoadedBundle, options: api.LoadOptions): Promise<ExecuTorchModel> {
    const { manifest } = bundle;
    const tokenizer = fileWithRole(manifest, 'tokenizer');
    const config = fileWithRole(manifest, 'tokenizer_config');
    if (!tokenizer || !config) {
      throw new UnsupportedBundleError('this .pte bundle has no tokenizer_config.json (react-native-executorch ' +
        'reads the chat template from it): export it with `ondevice export MODEL --app react-native --format pte`');
    }
    if (manifest.chat.template === null) {
      throw new UnsupportedBundleError('the model has no chat template, which react-native-executorch needs');
    }
    // react-native-executorch renders with the tokenizer config's template: it must be the bundle's
    let tokenizerConfig: { chat_template?: unknown; eos_token?: unknown };
    try {
      tokenizerConfig = JSON.parse(await bundle.io.readText(bundle.path(config.path))) as typeof tokenizerConfig;
    } catch {
      throw new UnsupportedBundleError(`${config.path} is not JSON`);
    }
    if (tokenizerConfig.chat_template !== manifest.chat.template || typeof tokenizerConfig.eos_token !== 'string') {
      throw new UnsupportedBundleError(`${config.path} does not carry the manifest's chat template and an EOS token ` +
        '(react-native-executorch prompts with it): export the bundle again with --app react-native');
    }
    const et = executorchModule(options);
    const paths = { modelPath: bundle.path(manifest.model.file), tokenizerPath: bundle.path(tokenizer.path),
      tokenizerConfigPath: bundle.path(config.path) };
    const stops = manifest.chat.stop.filter((s) => s.length > 0);
    const stopRegex = stops.length ? new RegExp(stops.map(escapeRegExp).join('|')) : undefined;
    options.onProgress?.(0);
    const session = await et.createLLMChatSession(paths, ExecuTorchModel.sessionOptions(manifest, stopRegex, []));
    options.onProgress?.(1);
    return new ExecuTorchModel(manifest, et, paths, stopRegex, session);
  }

  private static sessionOptions(manifest: BundleManifest, stopRegex: RegExp | undefined,
    initialMessages: readonly EtMessage[]) {
    return {
      generationConfig: { temperature: manifest.sampling.temperature, maxNewTokens: manifest.sampling.max_tokens ?? 256 },
      initialMessages,
      ...(stopRegex ? { stopRegex } : {}),
    };
  }

  /** The session whose history is `earlier`: this one if it matches, else a new one started from `earlier`. */
  private async sessionFor(earlier: readonly ChatMessage[]): Promise<LLMChatSession> {
    if (sameTurns(earlier, this.history)) return this.session;
    this.session.dispose();
    this.history = [...earlier];
    const initial: EtMessage[] = earlier.map((m) => ({ role: m.role, content: m.content }));
    this.session = await this.et.createLLMChatSession(this.paths,
      ExecuTorchModel.sessionOptions(this.manifest, this.stopRegex, initial));
    return this.session;
  }

  async chat(messages: readonly ChatMessage[], options: ChatOptions = {}): Promise<api.ChatResult> {
    if (this.released) throw new ModelReleasedError();
    if (this.busy) throw new BusyError();
    const last = messages[messages.length - 1];
    if (!last || last.role !== 'user') throw new TypeError('the last message must be the user\'s');
    this.busy = true;
    this.stopped = false;
    try {
      const session = await this.sessionFor(messages.slice(0, -1));
      const clock = new TokenClock();
      let text = '';
      let shown = 0; // characters passed to onToken: never a stop string, nor what may be the start of one
      const show = (visible: string, speed: number): void => {
        if (visible.length > shown) options.onToken?.(visible.slice(shown), speed);
        shown = Math.max(shown, visible.length);
      };
      const turn = await session.sendMessage(last.content, (token) => {
        const speed = clock.tick();
        if (this.stopAt(text) >= 0) return; // past a stop string
        text += token;
        show(this.visible(text), speed);
      }, {
        temperature: options.temperature ?? this.manifest.sampling.temperature,
        maxNewTokens: options.maxTokens ?? this.manifest.sampling.max_tokens ?? 256,
      });
      const stats = turn.stats[turn.stats.length - 1];
      const end = this.stopAt(text);
      const reply = end >= 0 ? text.slice(0, end) : text;
      show(reply, clock.tick());
      this.history = [...messages, { role: 'assistant', content: reply }];
      return { text: reply, stats: this.stats(stats, clock, options) };
    } finally {
      this.busy = false;
    }
  }

  /** Where the first stop string starts in `text`, or -1. */
  private stopAt(text: string): number {
    const m = this.stopRegex?.exec(text);
    return m ? m.index : -1;
  }

  /** The text that can be shown: up to a stop string, holding back a tail that may be the start of one. */
  private visible(text: string): string {
    const end = this.stopAt(text);
    if (end >= 0) return text.slice(0, end);
    for (let k = Math.min(text.length, this.longestStop - 1); k > 0; k--) {
      const tail = text.slice(text.length - k);
      if (this.manifest.chat.stop.some((s) => s.startsWith(tail))) return text.slice(0, text.length - k);
    }
    return text;
  }

  private get longestStop(): number {
    return Math.max(0, ...this.manifest.chat.stop.map((s) => s.length));
  }

  private stats(s: LLMGenerationStats | undefined, clock: TokenClock, options: ChatOptions): api.ChatResult['stats'] {
    const generated = s?.numGeneratedTokens ?? clock.tokens;
    const decodeMs = s ? s.inferenceEndMs - s.firstTokenMs : 0;
    const limit = options.maxTokens ?? this.manifest.sampling.max_tokens ?? 256;
    return {
      promptTokens: s?.numPromptTokens ?? 0,
      generatedTokens: generated,
      tokensPerSecond: decodeMs > 0 && generated > 1 ? ((generated - 1) * 1000) / decodeMs : 0,
      timeToFirstTokenMs: s ? s.firstTokenMs - s.inferenceStartMs : undefined,
      stoppedBy: this.stopped ? 'user' : generated >= limit ? 'limit' : 'eos',
    };
  }

  async chatJson<T = unknown>(messages: readonly ChatMessage[], schema: object,
    options: ChatOptions = {}): Promise<api.JsonResult<T>> {
    const instruction: ChatMessage = { role: 'system', content:
      `Reply with one JSON value and nothing else. It must match this JSON Schema:\n${JSON.stringify(schema)}` };
    const withSchema = messages[0]?.role === 'system'
      ? [{ role: 'system' as const, content: `${messages[0].content}\n\n${instruction.content}` }, ...messages.slice(1)]
      : [instruction, ...messages];
    const result = await this.chat(withSchema, options);
    const start = result.text.search(/[[{]/);
    try {
      return { ...result, value: JSON.parse(start >= 0 ? result.text.slice(start) : result.text) as T };
    } catch {
      throw new StructuredOutputError('the reply is not JSON (react-native-executorch cannot constrain decoding ' +
        'to a schema)', result.text);
    }
  }

  async stop(): Promise<void> {
    if (this.released) return;
    this.stopped = true;
    this.session.stop();
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    this.session.dispose();
  }
}
