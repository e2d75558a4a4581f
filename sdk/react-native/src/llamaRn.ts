/**
 * OndeviceModel over llama.rn (llama.cpp for React Native) for GGUF bundles.
 *
 * From the bundle: the chat template (manifest.chat.template, given to initLlama as chat_template so llama.rn
 * renders with exactly the template the export wrote, through its Jinja engine), the stop strings
 * (manifest.chat.stop, passed as `stop` to every completion besides the EOG ids llama.cpp reads from the GGUF),
 * and the sampling defaults (manifest.sampling). Structured output uses llama.rn's response_format json_schema,
 * which llama.cpp turns into a grammar: every sampled token keeps the reply valid against the schema.
 */

import type { CompletionParams, LlamaContext, NativeCompletionResult } from 'llama.rn';

import { TokenClock } from './clock';
import { BusyError, ModelReleasedError, optionalPeer, StructuredOutputError } from './errors';
import type { BundleManifest } from './manifest';
import type { ChatMessage, ChatOptions, ChatResult, GenerationStats, JsonResult, LoadedBundle, LoadOptions,
  OndeviceModel } from './model';

// Metro bundles a literal require(); optional peers are required lazily so a missing one is a typed error.
declare const require: (id: string) => unknown;

function llamaModule(options: LoadOptions): typeof import('llama.rn') {
  return optionalPeer(options.modules?.llama, () => require('llama.rn'), 'GGUF', 'llama.rn');
}

function stoppedBy(result: NativeCompletionResult): GenerationStats['stoppedBy'] {
  if (result.interrupted) return 'user';
  if (result.stopped_eos) return 'eos';
  if (result.stopped_word) return 'stop';
  if (result.stopped_limit) return 'limit';
  return 'unknown';
}

/** A plain prompt for a model without a chat template: the turns' text, one per line. */
function plainPrompt(messages: readonly ChatMessage[]): string {
  return messages.map((m) => m.content).join('\n');
}

export class LlamaRnModel implements OndeviceModel {
  readonly runtime = 'llama.rn' as const;
  readonly unsupportedOptions: readonly (keyof ChatOptions)[] = [];
  private released = false;
  private busy = false;

  private constructor(readonly manifest: BundleManifest, private readonly context: LlamaContext) {}

  static async load(bundle: LoadedBundle, options: LoadOptions): Promise<LlamaRnModel> {
    const llama = llamaModule(options);
    const { manifest } = bundle;
    const context = await llama.initLlama({
      model: bundle.path(manifest.model.file),
      n_ctx: bundle.nCtx,
      n_threads: options.nThreads,
      n_gpu_layers: options.nGpuLayers ?? 99,
      use_mlock: false,
      ...(manifest.chat.template ? { chat_template: manifest.chat.template } : {}),
    }, options.onProgress ? (p: number) => options.onProgress?.(p / 100) : undefined);
    return new LlamaRnModel(manifest, context);
  }

  private params(messages: readonly ChatMessage[], options: ChatOptions): CompletionParams {
    const s = this.manifest.sampling;
    const hasTemplate = this.manifest.chat.template !== null;
    return {
      ...(hasTemplate
        ? { messages: messages.map((m) => ({ role: m.role, content: m.content })), jinja: true }
        : { prompt: plainPrompt(messages) }),
      stop: this.manifest.chat.stop,
      n_predict: options.maxTokens ?? s.max_tokens ?? 256,
      temperature: options.temperature ?? s.temperature,
      top_k: options.topK ?? s.top_k,
      top_p: options.topP ?? s.top_p,
      min_p: options.minP ?? s.min_p,
      penalty_repeat: options.repeatPenalty ?? s.repeat_penalty,
      ...(options.seed !== undefined ? { seed: options.seed } : {}),
    };
  }

  private async run(params: CompletionParams, options: ChatOptions): Promise<ChatResult> {
    if (this.released) throw new ModelReleasedError();
    if (this.busy) throw new BusyError();
    this.busy = true;
    const clock = new TokenClock();
    const started = Date.now();
    try {
      const result = await this.context.completion(params, (data) => {
        const speed = clock.tick();
        options.onToken?.(data.token, speed);
      });
      const t = result.timings;
      const first = clock.firstAt;
      return {
        text: result.text,
        stats: {
          promptTokens: t?.prompt_n ?? result.tokens_evaluated,
          generatedTokens: t?.predicted_n ?? result.tokens_predicted,
          tokensPerSecond: t?.predicted_per_second ?? 0,
          promptTokensPerSecond: t?.prompt_per_second,
          timeToFirstTokenMs: first !== undefined ? first - started : undefined,
          stoppedBy: stoppedBy(result),
        },
      };
    } finally {
      this.busy = false;
    }
  }

  chat(messages: readonly ChatMessage[], options: ChatOptions = {}): Promise<ChatResult> {
    return this.run(this.params(messages, options), options);
  }

  async chatJson<T = unknown>(messages: readonly ChatMessage[], schema: object,
    options: ChatOptions = {}): Promise<JsonResult<T>> {
    const params: CompletionParams = {
      ...this.params(messages, options),
      response_format: { type: 'json_schema', json_schema: { strict: true, schema } },
    };
    const result = await this.run(params, options);
    try {
      return { ...result, value: JSON.parse(result.text) as T };
    } catch {
      throw new StructuredOutputError(result.stats.stoppedBy === 'limit'
        ? 'the reply hit maxTokens before the JSON was complete' : 'the reply is not JSON', result.text);
    }
  }

  async stop(): Promise<void> {
    if (!this.released) await this.context.stopCompletion();
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    await this.context.release();
  }
}
