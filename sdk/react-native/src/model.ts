/**
 * One model interface over both phone runtimes, and `loadModel`, which reads a bundle, checks memory and picks the
 * runtime from the manifest (llama.rn for GGUF, react-native-executorch for .pte).
 */

import { BlobUtilBundleIO } from './blobUtil';
import { UnsupportedBundleError } from './errors';
import { type BundleIO, joinPath } from './io';
import { type BundleManifest, bundleRuntime } from './manifest';
import { checkMemory, type DeviceMemory, deviceMemory, type MemoryCheck } from './memory';
import { readBundle } from './download';
import { ExecuTorchModel } from './executorch';
import { LlamaRnModel } from './llamaRn';

export type Role = 'system' | 'user' | 'assistant';

export interface ChatMessage {
  role: Role;
  content: string;
}

export interface GenerationStats {
  promptTokens: number;
  generatedTokens: number;
  /** Decode speed: generated tokens per second after the first one. */
  tokensPerSecond: number;
  /** Prompt processing speed, when the runtime reports it. */
  promptTokensPerSecond?: number;
  timeToFirstTokenMs?: number;
  stoppedBy: 'eos' | 'stop' | 'limit' | 'user' | 'unknown';
}

export interface ChatOptions {
  /** Defaults: the bundle's sampling (manifest.sampling), which `ondevice run` uses too. */
  maxTokens?: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repeatPenalty?: number;
  seed?: number;
  /** Each streamed piece of text, with the decode speed so far. */
  onToken?: (token: string, tokensPerSecond: number) => void;
}

export interface ChatResult {
  text: string;
  stats: GenerationStats;
}

export interface JsonResult<T> extends ChatResult {
  value: T;
}

export interface OndeviceModel {
  readonly manifest: BundleManifest;
  readonly runtime: 'llama.rn' | 'react-native-executorch';
  /** The options this runtime cannot apply (they are ignored), e.g. top_k on react-native-executorch. */
  readonly unsupportedOptions: readonly (keyof ChatOptions)[];
  /** Generate the assistant's reply to `messages` (the whole conversation), streaming through onToken. */
  chat(messages: readonly ChatMessage[], options?: ChatOptions): Promise<ChatResult>;
  /** A reply that is JSON matching `schema` (constrained decoding on llama.rn; see the runtime's notes). */
  chatJson<T = unknown>(messages: readonly ChatMessage[], schema: object, options?: ChatOptions): Promise<JsonResult<T>>;
  /** Stop the reply being generated (its promise resolves with the text so far, stoppedBy 'user'). */
  stop(): Promise<void>;
  /** Free the native model; the object cannot be used afterwards. */
  release(): Promise<void>;
}

export interface LoadOptions {
  /** File access; default: BlobUtilBundleIO (react-native-blob-util). */
  io?: BundleIO;
  /** Context length to allocate; default the manifest's recommended context (what its RAM estimate is sized for). */
  nCtx?: number;
  nThreads?: number;
  /** llama.rn: layers on the GPU (iOS Metal); default 99 (all) as llama.rn's examples. */
  nGpuLayers?: number;
  /** The device's memory; default from react-native-device-info. `false` skips the memory check. */
  memory?: DeviceMemory | false;
  /** Load progress 0..1 (llama.rn reports it). */
  onProgress?: (fraction: number) => void;
  /** Runtime modules, for tests or apps that load them their own way; default: require('llama.rn') etc. */
  modules?: { llama?: typeof import('llama.rn'); executorch?: typeof import('react-native-executorch') };
}

export interface LoadedBundle {
  dir: string;
  io: BundleIO;
  manifest: BundleManifest;
  memory?: MemoryCheck;
  nCtx: number;
  path(relative: string): string;
}

/**
 * Load a bundle folder (one downloadBundle wrote, or one shipped with the app): validate the manifest and files,
 * check memory (InsufficientMemoryError if the model would not fit), then open it in its runtime.
 */
export async function loadModel(dir: string, options: LoadOptions = {}): Promise<OndeviceModel> {
  const io = options.io ?? new BlobUtilBundleIO();
  const manifest = await readBundle(dir, io);
  const nCtx = options.nCtx ?? manifest.model.recommended_context ?? manifest.ram.context;
  let memory: MemoryCheck | undefined;
  if (options.memory !== false) {
    const device = options.memory ?? (await deviceMemory());
    if (device) memory = checkMemory(manifest, device, nCtx);
  }
  const bundle: LoadedBundle = { dir, io, manifest, memory, nCtx, path: (relative) => joinPath(dir, relative) };
  const runtime = bundleRuntime(manifest);
  if (runtime === 'llama.cpp') {
    return LlamaRnModel.load(bundle, options);
  }
  if (runtime === 'executorch') {
    return ExecuTorchModel.load(bundle, options);
  }
  throw new UnsupportedBundleError(`${runtime} bundles (${manifest.model.format}) cannot run in React Native: ` +
    'export the model with --app react-native (GGUF for llama.rn, or --format pte for ExecuTorch)');
}
