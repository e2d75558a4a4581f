/**
 * The bundle manifest `ondevice export` writes (manifest.json), as TypeScript types, and its validation.
 *
 * The schema is ondevice's `app-bundle-manifest.v2.schema.json` (a copy ships in src/schema/, kept identical by
 * ondevice's Python tests; the jest tests check this validator agrees with it on valid and broken manifests).
 * manifest_version is the major version: 1 and 2 are read, anything else is refused with
 * UnsupportedManifestVersionError rather than guessed at.
 */

import { InvalidManifestError, UnsupportedManifestVersionError } from './errors';

export const SUPPORTED_MANIFEST_VERSIONS: readonly number[] = [1, 2];

export type BundleApp = 'pocketpal' | 'ios' | 'android' | 'react-native';
export type BundleRuntime = 'llama.cpp' | 'executorch' | 'coreml';
export type FileRole = 'model' | 'tokenizer' | 'chat_template' | 'runtime_manifest' | 'readme' | 'tokenizer_config';

export interface BundleFile {
  path: string;
  role: FileRole;
  bytes: number;
  sha256: string;
}

export interface BundleModel {
  name: string;
  architecture: string;
  format: 'gguf' | 'pte' | 'mlpackage';
  file: string;
  file_type?: 'file' | 'directory';
  quantization: string;
  context_length: number;
  recommended_context?: number;
  vocab_size: number;
  license?: string;
  source?: string;
}

export interface BundleChat {
  template: string | null;
  template_file?: string;
  bos_token: string | null;
  add_bos: boolean;
  eos_tokens: { id: number; text: string }[];
  stop: string[];
}

export interface BundleSampling {
  temperature: number;
  top_k: number;
  top_p: number;
  min_p: number;
  repeat_penalty: number;
  max_tokens?: number;
  source: 'gguf' | 'ondevice-defaults';
}

export interface BundleRam {
  estimate_bytes: number;
  model_bytes: number;
  kv_cache_bytes: number;
  overhead_bytes: number;
  context: number;
  device: string;
  fits: boolean;
  decode_tok_s_estimate?: number;
  method: string;
}

export interface BundleManifest {
  $schema?: string;
  manifest_version: 1 | 2;
  app: BundleApp;
  runtime?: BundleRuntime; // required from version 2
  created_by: string;
  created_at?: string;
  model: BundleModel;
  files: BundleFile[];
  chat: BundleChat;
  sampling: BundleSampling;
  ram: BundleRam;
  coreml?: Record<string, unknown>;
  notes?: string[];
}

type Json = unknown;

class Checker {
  constructor(private readonly version: number) {}

  fail(path: string, problem: string): never {
    throw new InvalidManifestError(path, problem);
  }

  object(value: Json, path: string, required: readonly string[], allowed: readonly string[]): Record<string, Json> {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) this.fail(path, 'is not an object');
    const obj = value as Record<string, Json>;
    for (const key of required) if (!(key in obj)) this.fail(path, `'${key}' is a required property`);
    for (const key of Object.keys(obj)) {
      if (!allowed.includes(key)) this.fail(path, `additional property '${key}' is not allowed`);
    }
    return obj;
  }

  string(value: Json, path: string, opts: { minLength?: number; pattern?: RegExp; nullable?: boolean } = {}): void {
    if (value === null && opts.nullable) return;
    if (typeof value !== 'string') this.fail(path, `${JSON.stringify(value)} is not a string`);
    if (opts.minLength !== undefined && value.length < opts.minLength) this.fail(path, 'is too short');
    if (opts.pattern && !opts.pattern.test(value)) this.fail(path, `${JSON.stringify(value)} does not match ${opts.pattern}`);
  }

  enumOf(value: Json, path: string, values: readonly Json[]): void {
    if (!values.includes(value)) this.fail(path, `${JSON.stringify(value)} is not one of ${JSON.stringify(values)}`);
  }

  integer(value: Json, path: string, minimum = -Infinity): void {
    if (typeof value !== 'number' || !Number.isInteger(value)) this.fail(path, `${JSON.stringify(value)} is not an integer`);
    if (value < minimum) this.fail(path, `${value} is less than the minimum of ${minimum}`);
  }

  number(value: Json, path: string, range: { min?: number; max?: number; exclMin?: number; exclMax?: number } = {}): void {
    if (typeof value !== 'number' || !Number.isFinite(value)) this.fail(path, `${JSON.stringify(value)} is not a number`);
    if (range.min !== undefined && value < range.min) this.fail(path, `${value} is less than the minimum of ${range.min}`);
    if (range.max !== undefined && value > range.max) this.fail(path, `${value} is greater than the maximum of ${range.max}`);
    if (range.exclMin !== undefined && value <= range.exclMin) this.fail(path, `${value} must be > ${range.exclMin}`);
    if (range.exclMax !== undefined && value >= range.exclMax) this.fail(path, `${value} must be < ${range.exclMax}`);
  }

  boolean(value: Json, path: string): void {
    if (typeof value !== 'boolean') this.fail(path, `${JSON.stringify(value)} is not a boolean`);
  }

  array(value: Json, path: string, minItems = 0): Json[] {
    if (!Array.isArray(value)) this.fail(path, 'is not an array');
    if (value.length < minItems) this.fail(path, `should have at least ${minItems} item(s)`);
    return value as Json[];
  }

  get v2(): boolean {
    return this.version >= 2;
  }
}

const APPS_V1: readonly BundleApp[] = ['pocketpal', 'ios', 'android'];
const APPS_V2: readonly BundleApp[] = [...APPS_V1, 'react-native'];
const ROLES_V1: readonly FileRole[] = ['model', 'tokenizer', 'chat_template', 'runtime_manifest', 'readme'];
const ROLES_V2: readonly FileRole[] = [...ROLES_V1, 'tokenizer_config'];
const RUNTIMES: readonly BundleRuntime[] = ['llama.cpp', 'executorch', 'coreml'];
const SAFE_PATH = /^(?!\/)(?!.*(^|\/)\.\.(\/|$)).+$/;
const SHA256 = /^[0-9a-f]{64}$/;
// RFC 3339 date-time, as JSON Schema's "date-time" format checks it
const DATE_TIME = /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;

/**
 * Check a parsed manifest.json and return it typed. Throws UnsupportedManifestVersionError for an unknown major
 * version and InvalidManifestError (naming the field) for anything that does not match the schema of its version.
 */
export function validateManifest(value: unknown): BundleManifest {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new InvalidManifestError('(root)', 'is not an object');
  }
  const version = (value as Record<string, unknown>).manifest_version;
  if (version === undefined) throw new InvalidManifestError('(root)', "'manifest_version' is a required property");
  if (typeof version !== 'number' || !SUPPORTED_MANIFEST_VERSIONS.includes(version)) {
    throw new UnsupportedManifestVersionError(version, SUPPORTED_MANIFEST_VERSIONS);
  }
  const c = new Checker(version);
  const top = c.object(value, '(root)',
    ['manifest_version', 'app', ...(c.v2 ? ['runtime'] : []), 'created_by', 'model', 'files', 'chat', 'sampling', 'ram'],
    ['$schema', 'manifest_version', 'app', 'runtime', 'created_by', 'created_at', 'model', 'files', 'chat', 'sampling',
      'ram', 'notes', ...(c.v2 ? ['coreml'] : [])]);
  if ('$schema' in top) c.string(top.$schema, '$schema');
  c.enumOf(top.app, 'app', c.v2 ? APPS_V2 : APPS_V1);
  if ('runtime' in top) c.enumOf(top.runtime, 'runtime', RUNTIMES);
  c.string(top.created_by, 'created_by', { pattern: /^ondevice [0-9]/ });
  if ('created_at' in top) c.string(top.created_at, 'created_at', { pattern: DATE_TIME });

  const model = c.object(top.model, 'model',
    ['name', 'architecture', 'format', 'file', 'quantization', 'context_length', 'vocab_size',
      ...(c.v2 ? ['file_type'] : [])],
    ['name', 'architecture', 'format', 'file', 'quantization', 'context_length', 'recommended_context', 'vocab_size',
      'license', 'source', ...(c.v2 ? ['file_type'] : [])]);
  c.string(model.name, 'model/name', { minLength: 1 });
  c.string(model.architecture, 'model/architecture', { minLength: 1 });
  c.enumOf(model.format, 'model/format', c.v2 ? ['gguf', 'pte', 'mlpackage'] : ['gguf', 'pte']);
  c.string(model.file, 'model/file', { minLength: 1 });
  if ('file_type' in model) c.enumOf(model.file_type, 'model/file_type', ['file', 'directory']);
  c.string(model.quantization, 'model/quantization');
  c.integer(model.context_length, 'model/context_length', 1);
  if ('recommended_context' in model) c.integer(model.recommended_context, 'model/recommended_context', 1);
  c.integer(model.vocab_size, 'model/vocab_size', 1);
  if ('license' in model) c.string(model.license, 'model/license');
  if ('source' in model) c.string(model.source, 'model/source');

  c.array(top.files, 'files', 1).forEach((entry, i) => {
    const f = c.object(entry, `files/${i}`, ['path', 'role', 'bytes', 'sha256'], ['path', 'role', 'bytes', 'sha256']);
    c.string(f.path, `files/${i}/path`, { minLength: 1, pattern: SAFE_PATH });
    c.enumOf(f.role, `files/${i}/role`, c.v2 ? ROLES_V2 : ROLES_V1);
    c.integer(f.bytes, `files/${i}/bytes`, 0);
    c.string(f.sha256, `files/${i}/sha256`, { pattern: SHA256 });
  });

  const chat = c.object(top.chat, 'chat', ['template', 'bos_token', 'add_bos', 'eos_tokens', 'stop'],
    ['template', 'template_file', 'bos_token', 'add_bos', 'eos_tokens', 'stop']);
  c.string(chat.template, 'chat/template', { nullable: true });
  if ('template_file' in chat) c.string(chat.template_file, 'chat/template_file');
  c.string(chat.bos_token, 'chat/bos_token', { nullable: true });
  c.boolean(chat.add_bos, 'chat/add_bos');
  c.array(chat.eos_tokens, 'chat/eos_tokens').forEach((entry, i) => {
    const e = c.object(entry, `chat/eos_tokens/${i}`, ['id', 'text'], ['id', 'text']);
    c.integer(e.id, `chat/eos_tokens/${i}/id`, 0);
    c.string(e.text, `chat/eos_tokens/${i}/text`);
  });
  c.array(chat.stop, 'chat/stop').forEach((s, i) => c.string(s, `chat/stop/${i}`, { minLength: 1 }));

  const s = c.object(top.sampling, 'sampling', ['temperature', 'top_k', 'top_p', 'min_p', 'repeat_penalty', 'source'],
    ['temperature', 'top_k', 'top_p', 'min_p', 'repeat_penalty', 'max_tokens', 'source']);
  c.number(s.temperature, 'sampling/temperature', { min: 0, max: 2 });
  c.integer(s.top_k, 'sampling/top_k', 0);
  c.number(s.top_p, 'sampling/top_p', { exclMin: 0, max: 1 });
  c.number(s.min_p, 'sampling/min_p', { min: 0, exclMax: 1 });
  c.number(s.repeat_penalty, 'sampling/repeat_penalty', { exclMin: 0 });
  if ('max_tokens' in s) c.integer(s.max_tokens, 'sampling/max_tokens', 1);
  c.enumOf(s.source, 'sampling/source', ['gguf', 'ondevice-defaults']);

  const ram = c.object(top.ram, 'ram',
    ['estimate_bytes', 'model_bytes', 'kv_cache_bytes', 'overhead_bytes', 'context', 'device', 'fits', 'method'],
    ['estimate_bytes', 'model_bytes', 'kv_cache_bytes', 'overhead_bytes', 'context', 'device', 'fits',
      'decode_tok_s_estimate', 'method']);
  c.integer(ram.estimate_bytes, 'ram/estimate_bytes', 1);
  c.integer(ram.model_bytes, 'ram/model_bytes', 1);
  c.integer(ram.kv_cache_bytes, 'ram/kv_cache_bytes', 0);
  c.integer(ram.overhead_bytes, 'ram/overhead_bytes', 0);
  c.integer(ram.context, 'ram/context', 1);
  c.string(ram.device, 'ram/device');
  c.boolean(ram.fits, 'ram/fits');
  if ('decode_tok_s_estimate' in ram) c.number(ram.decode_tok_s_estimate, 'ram/decode_tok_s_estimate', { min: 0 });
  c.string(ram.method, 'ram/method');

  if ('notes' in top) c.array(top.notes, 'notes').forEach((n, i) => c.string(n, `notes/${i}`));
  if (c.v2) {
    // the schema's if/then/else: a Core ML package is a directory with a coreml block; everything else a file
    const isPackage = model.format === 'mlpackage';
    if (isPackage) {
      if (!('coreml' in top)) c.fail('(root)', "'coreml' is a required property");
      c.object(top.coreml, 'coreml', [], Object.keys(top.coreml as object));
      c.enumOf(top.runtime, 'runtime', ['coreml']);
      c.enumOf(model.file_type, 'model/file_type', ['directory']);
    } else {
      if ('coreml' in top) c.fail('(root)', "'coreml' must not be present unless model.format is mlpackage");
      c.enumOf(model.file_type, 'model/file_type', ['file']);
    }
  }
  return value as BundleManifest;
}

/** Parse manifest.json text (JSON errors become InvalidManifestError too). */
export function parseManifest(text: string): BundleManifest {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new InvalidManifestError('(root)', `not JSON: ${(e as Error).message}`);
  }
  return validateManifest(value);
}

/** The runtime that runs the bundle's primary model (version 1 manifests have no runtime field: from the format). */
export function bundleRuntime(manifest: BundleManifest): BundleRuntime {
  if (manifest.runtime) return manifest.runtime;
  return manifest.model.format === 'gguf' ? 'llama.cpp' : manifest.model.format === 'pte' ? 'executorch' : 'coreml';
}

/** The first file with a role (e.g. 'tokenizer_config'), or undefined. */
export function fileWithRole(manifest: BundleManifest, role: FileRole): BundleFile | undefined {
  return manifest.files.find((f) => f.role === role);
}
