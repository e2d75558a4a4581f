import { createHash } from 'crypto';
import { existsSync, promises as fsp, readdirSync, readFileSync } from 'fs';
import * as path from 'path';

import {
  BundleIncompleteError,
  ChecksumMismatchError,
  DownloadCancelledError,
  DownloadError,
  type DownloadProgress,
  downloadBundle,
  InsufficientStorageError,
  readBundle,
  UnsupportedManifestVersionError,
} from '../src';
import { NodeBundleIO } from '../src/node';
import { FIXTURE, goldenManifest, type Served, serveFolder, tempDir } from './helpers';

const io = new NodeBundleIO();
const manifest = goldenManifest();
const gguf = manifest.files.find((f) => f.role === 'model')!;
const total = manifest.files.reduce((n, f) => n + f.bytes, 0);

let server: Served;
let dest: string;

beforeEach(async () => {
  server = await serveFolder(FIXTURE);
  dest = path.join(await tempDir(), 'bundle');
});

afterEach(async () => {
  await server.close();
});

function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

function finalFiles(): string[] {
  return existsSync(dest) ? readdirSync(dest).sort() : [];
}

describe('downloadBundle', () => {
  it('fetches every file, verified, with progress up to the total', async () => {
    const seen: DownloadProgress[] = [];
    const result = await downloadBundle({ url: server.url, dest, io, onProgress: (p) => seen.push(p), reserveBytes: 0 });
    expect(result.fetchedBytes).toBe(total);
    for (const f of manifest.files) expect(sha256(path.join(dest, f.path))).toBe(f.sha256);
    expect(finalFiles()).toEqual([...manifest.files.map((f) => f.path), 'manifest.json'].sort());
    const last = seen[seen.length - 1]!;
    expect(last.bytes).toBe(total);
    expect(last.totalBytes).toBe(total);
    const overall = seen.map((p) => p.bytes);
    expect(overall).toEqual([...overall].sort((a, b) => a - b)); // never goes backwards
    expect((await readBundle(dest, io, { verify: 'sha256' })).model.file).toBe(gguf.path);
  });

  it('resumes an interrupted download with an HTTP Range request', async () => {
    const cut = 40_000;
    server.cutAfter(gguf.path, cut);
    await expect(downloadBundle({ url: server.url, dest, io, reserveBytes: 0 })).rejects.toBeInstanceOf(DownloadError);
    // nothing under a final name but what is complete; the partial model is kept as .part
    expect(existsSync(path.join(dest, gguf.path))).toBe(false);
    expect(existsSync(path.join(dest, 'manifest.json'))).toBe(false);
    const partSize = (await fsp.stat(path.join(dest, `${gguf.path}.part`))).size;
    expect(partSize).toBe(cut);

    server.requests.length = 0;
    const result = await downloadBundle({ url: server.url, dest, io, reserveBytes: 0 });
    expect(result.resumed).toEqual([gguf.path]);
    expect(server.requests.find((r) => r.path === gguf.path)?.range).toBe(`bytes=${cut}-`);
    expect(result.fetchedBytes).toBe(total - cut);
    expect(sha256(path.join(dest, gguf.path))).toBe(gguf.sha256);
    expect(finalFiles().some((f) => f.endsWith('.part'))).toBe(false);
  });

  it('starts over when the server ignores the Range header', async () => {
    server.cutAfter(gguf.path, 10_000);
    await expect(downloadBundle({ url: server.url, dest, io, reserveBytes: 0 })).rejects.toBeInstanceOf(DownloadError);
    server.ignoreRanges = true;
    await downloadBundle({ url: server.url, dest, io, reserveBytes: 0 });
    expect(sha256(path.join(dest, gguf.path))).toBe(gguf.sha256);
  });

  it('skips files already in place on a second call, without hashing them again', async () => {
    await downloadBundle({ url: server.url, dest, io, reserveBytes: 0 });
    server.requests.length = 0;
    let hashed = 0;
    const counting = Object.assign(Object.create(io) as NodeBundleIO,
      { sha256: (p: string) => ((hashed += 1), io.sha256(p)) });
    const again = await downloadBundle({ url: server.url, dest, io: counting, reserveBytes: 0 });
    expect(again.fetchedBytes).toBe(0);
    expect(hashed).toBe(0); // the same manifest was installed: sizes suffice
    expect(server.requests.map((r) => r.path)).toEqual(['manifest.json']);
    // a bundle folder with a file missing is reported as such, and the next download fetches just that file
    await fsp.unlink(path.join(dest, 'chat_template.jinja'));
    await expect(readBundle(dest, io)).rejects.toBeInstanceOf(BundleIncompleteError);
    const repaired = await downloadBundle({ url: server.url, dest, io, reserveBytes: 0 });
    expect(repaired.fetchedBytes).toBe(manifest.files.find((f) => f.path === 'chat_template.jinja')!.bytes);
  });

  it('deletes a file whose sha256 does not match and says which', async () => {
    const bad = readFileSync(path.join(FIXTURE, gguf.path));
    bad[1000] = bad[1000]! ^ 0xff; // same size, one byte flipped
    server.override(gguf.path, bad);
    const error = await downloadBundle({ url: server.url, dest, io, reserveBytes: 0 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ChecksumMismatchError);
    expect((error as ChecksumMismatchError).file).toBe(gguf.path);
    expect((error as ChecksumMismatchError).expected).toBe(gguf.sha256);
    expect(existsSync(path.join(dest, gguf.path))).toBe(false);
    expect(existsSync(path.join(dest, `${gguf.path}.part`))).toBe(false); // not resumable: gone
    expect(existsSync(path.join(dest, 'manifest.json'))).toBe(false);
  });

  it('can be cancelled, keeping the partial file for a resume', async () => {
    server.throttle = { chunk: 8_192, delayMs: 5 };
    const controller = new AbortController();
    const error = await downloadBundle({ url: server.url, dest, io, reserveBytes: 0, signal: controller.signal,
      onProgress: (p) => {
        if (p.file === gguf.path && p.fileBytes >= 30_000) controller.abort();
      } }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(DownloadCancelledError);
    expect(existsSync(path.join(dest, gguf.path))).toBe(false);
    const partial = (await fsp.stat(path.join(dest, `${gguf.path}.part`))).size;
    expect(partial).toBeGreaterThan(0);
    expect(partial).toBeLessThan(gguf.bytes);
    server.throttle = { chunk: 0, delayMs: 0 };
    const result = await downloadBundle({ url: server.url, dest, io, reserveBytes: 0 });
    expect(result.resumed).toContain(gguf.path);
    expect(sha256(path.join(dest, gguf.path))).toBe(gguf.sha256);
  });

  it('checks free space before fetching anything', async () => {
    const small = Object.assign(Object.create(io) as NodeBundleIO, { freeBytes: async () => 50_000 });
    const error = await downloadBundle({ url: server.url, dest, io: small, reserveBytes: 0 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InsufficientStorageError);
    expect((error as InsufficientStorageError).neededBytes).toBe(total);
    expect(server.requests.map((r) => r.path)).toEqual(['manifest.json']);
    // the default reserve (100 MB) also counts
    const roomy = Object.assign(Object.create(io) as NodeBundleIO, { freeBytes: async () => total + 1e6 });
    await expect(downloadBundle({ url: server.url, dest, io: roomy })).rejects.toBeInstanceOf(InsufficientStorageError);
  });

  it('refuses a manifest of an unknown major version and leaves nothing behind', async () => {
    server.override('manifest.json', Buffer.from(JSON.stringify({ ...manifest, manifest_version: 3 })));
    await expect(downloadBundle({ url: server.url, dest, io })).rejects.toBeInstanceOf(UnsupportedManifestVersionError);
    expect(finalFiles()).toEqual([]);
  });

  it('reports HTTP errors as DownloadError with the status', async () => {
    const error = await downloadBundle({ url: `${server.url}missing/`, dest, io }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(DownloadError);
    expect((error as DownloadError).status).toBe(404);
  });
});
