import Ajv2020 from 'ajv/dist/2020';
import { readFileSync } from 'fs';
import * as path from 'path';

import {
  InvalidManifestError,
  parseManifest,
  SUPPORTED_MANIFEST_VERSIONS,
  UnsupportedManifestVersionError,
  validateManifest,
} from '../src';
import { goldenManifest } from './helpers';

const schema = JSON.parse(readFileSync(path.join(__dirname, '..', 'src', 'schema',
  'app-bundle-manifest.v2.schema.json'), 'utf8'));
const ajv = new Ajv2020({ strict: false, allErrors: false });
ajv.addFormat('date-time', /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/);
const schemaValid = ajv.compile(schema);

type Mutation = [string, (m: any) => void];

// Each breaks one rule of the schema (or keeps the manifest valid, for the last few).
const MUTATIONS: Mutation[] = [
  ['no app', (m) => delete m.app],
  ['unknown app', (m) => (m.app = 'windows-phone')],
  ['no runtime', (m) => delete m.runtime],
  ['unknown runtime', (m) => (m.runtime = 'tflite')],
  ['created_by not ondevice', (m) => (m.created_by = 'someone')],
  ['bad created_at', (m) => (m.created_at = 'yesterday')],
  ['extra top-level key', (m) => (m.extra = 1)],
  ['model name empty', (m) => (m.model.name = '')],
  ['model format unknown', (m) => (m.model.format = 'onnx')],
  ['context_length 0', (m) => (m.model.context_length = 0)],
  ['context_length float', (m) => (m.model.context_length = 2.5)],
  ['vocab_size string', (m) => (m.model.vocab_size = '401')],
  ['no file_type', (m) => delete m.model.file_type],
  ['file_type directory for gguf', (m) => (m.model.file_type = 'directory')],
  ['extra model key', (m) => (m.model.params = 1)],
  ['no files', (m) => (m.files = [])],
  ['absolute path', (m) => (m.files[0].path = '/etc/passwd')],
  ['dot-dot path', (m) => (m.files[0].path = 'a/../../b')],
  ['unknown role', (m) => (m.files[0].role = 'weights')],
  ['negative bytes', (m) => (m.files[0].bytes = -1)],
  ['upper-case sha', (m) => (m.files[0].sha256 = m.files[0].sha256.toUpperCase())],
  ['short sha', (m) => (m.files[0].sha256 = 'abc')],
  ['template number', (m) => (m.chat.template = 5)],
  ['add_bos string', (m) => (m.chat.add_bos = 'yes')],
  ['eos id negative', (m) => (m.chat.eos_tokens[0].id = -1)],
  ['empty stop string', (m) => (m.chat.stop = [''])],
  ['temperature 3', (m) => (m.sampling.temperature = 3)],
  ['top_p 0', (m) => (m.sampling.top_p = 0)],
  ['min_p 1', (m) => (m.sampling.min_p = 1)],
  ['repeat_penalty 0', (m) => (m.sampling.repeat_penalty = 0)],
  ['sampling source unknown', (m) => (m.sampling.source = 'vibes')],
  ['no ram method', (m) => delete m.ram.method],
  ['ram estimate 0', (m) => (m.ram.estimate_bytes = 0)],
  ['coreml block on a gguf', (m) => (m.coreml = { package: 'x.mlpackage' })],
  // still valid
  ['null template', (m) => (m.chat.template = null)],
  ['no created_at', (m) => delete m.created_at],
  ['pocketpal app', (m) => (m.app = 'pocketpal')],
  ['pte bundle', (m) => { m.model.format = 'pte'; m.runtime = 'executorch'; }],
];

const STILL_VALID = new Set(['null template', 'no created_at', 'pocketpal app', 'pte bundle']);

describe('manifest validation', () => {
  it('accepts the golden bundle ondevice export wrote', () => {
    const m = validateManifest(goldenManifest());
    expect(m.app).toBe('react-native');
    expect(m.model.format).toBe('gguf');
    expect(m.chat.stop).toContain('<|im_end|>');
    expect(schemaValid(goldenManifest())).toBe(true);
  });

  it.each(MUTATIONS)('agrees with the JSON Schema: %s', (_name, mutate) => {
    const m = goldenManifest();
    mutate(m);
    const bySchema = schemaValid(m);
    expect(bySchema).toBe(STILL_VALID.has(_name)); // the corpus breaks what it says it breaks
    let byUs = true;
    try {
      validateManifest(m);
    } catch (e) {
      expect(e).toBeInstanceOf(InvalidManifestError);
      byUs = false;
    }
    expect(byUs).toBe(bySchema);
  });

  it('knows every app, runtime and file role the schema allows (a new one fails here first)', () => {
    const apps: string[] = schema.properties.app.enum;
    const runtimes: string[] = schema.properties.runtime.enum;
    const roles: string[] = schema.properties.files.items.properties.role.enum;
    for (const app of apps) expect(() => validateManifest({ ...goldenManifest(), app })).not.toThrow();
    for (const runtime of runtimes.filter((r) => r !== 'coreml')) {
      expect(() => validateManifest({ ...goldenManifest(), runtime })).not.toThrow();
    }
    for (const role of roles) {
      const m = goldenManifest();
      m.files[0]!.role = role;
      expect(() => validateManifest(m)).not.toThrow();
    }
  });

  it('names the offending field', () => {
    const m = goldenManifest() as any;
    m.files[1].sha256 = 'nope';
    expect(() => validateManifest(m)).toThrow(/files\/1\/sha256/);
  });

  it('refuses unknown major versions with a typed error', () => {
    for (const version of [0, 3, 99, '2', null]) {
      const m = { ...goldenManifest(), manifest_version: version };
      let error: unknown;
      try {
        validateManifest(m);
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(UnsupportedManifestVersionError);
      expect((error as UnsupportedManifestVersionError).code).toBe('UNSUPPORTED_MANIFEST_VERSION');
    }
    expect(SUPPORTED_MANIFEST_VERSIONS).toEqual([1, 2]);
  });

  it('still reads version 1 manifests (no file_type, runtime optional)', () => {
    const m = goldenManifest() as any;
    m.manifest_version = 1;
    m.app = 'android';
    delete m.runtime;
    delete m.model.file_type;
    m.files = m.files.filter((f: { role: string }) => f.role !== 'tokenizer_config');
    expect(validateManifest(m).manifest_version).toBe(1);
    m.app = 'react-native'; // not a version 1 app
    expect(() => validateManifest(m)).toThrow(InvalidManifestError);
  });

  it('turns JSON syntax errors into InvalidManifestError', () => {
    expect(() => parseManifest('{"manifest_version": 2,')).toThrow(InvalidManifestError);
    expect(() => parseManifest('[]')).toThrow(InvalidManifestError);
  });
});
