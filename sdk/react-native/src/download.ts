/**
 * Download a bundle folder from a URL: manifest first (validated), then every file it lists, each resumed with an
 * HTTP Range request from its `.part` file, checked against the manifest's size and sha256, then renamed to its
 * final name. manifest.json is written last, so a folder with a manifest.json is a complete, verified bundle;
 * a file under its final name is never partial.
 */

import {
  BundleIncompleteError,
  ChecksumMismatchError,
  DownloadCancelledError,
  DownloadError,
  InsufficientStorageError,
} from './errors';
import { type AbortSignalLike, type BundleIO, dirname, joinPath } from './io';
import { type BundleFile, type BundleManifest, parseManifest } from './manifest';

export interface DownloadProgress {
  /** The file being fetched (a path relative to the bundle). */
  file: string;
  fileBytes: number;
  fileTotal: number;
  /** Bytes of the whole bundle on disk and verified or being written, out of totalBytes. */
  bytes: number;
  totalBytes: number;
}

export interface DownloadOptions {
  /** URL of the bundle folder (manifest.json and the files it lists are fetched relative to it). */
  url: string;
  /** Local folder to put the bundle in. */
  dest: string;
  io: BundleIO;
  onProgress?: (progress: DownloadProgress) => void;
  signal?: AbortSignalLike;
  /** Free space to leave on the volume besides the bundle (default 100 MB: the OS needs room too). */
  reserveBytes?: number;
}

export interface DownloadResult {
  manifest: BundleManifest;
  dest: string;
  /** Bytes fetched by this call (less than the bundle's size when it resumed or found files in place). */
  fetchedBytes: number;
  /** Files whose download resumed from a .part left by an earlier, interrupted call. */
  resumed: string[];
}

export const DEFAULT_RESERVE_BYTES = 100e6;

function fileUrl(base: string, relative: string): string {
  return base.replace(/\/?$/, '/') + relative.split('/').map(encodeURIComponent).join('/');
}

/** A file in place: its size, and its sha256 unless this very manifest was installed before (then it was
 * verified when it was written; hashing a large model again on every call would take a while on a phone). */
async function isComplete(io: BundleIO, path: string, entry: BundleFile, installed: boolean): Promise<boolean> {
  const s = await io.stat(path);
  return s !== null && s.size === entry.bytes && (installed || (await io.sha256(path)) === entry.sha256);
}

export async function downloadBundle(options: DownloadOptions): Promise<DownloadResult> {
  const { url, dest, io, onProgress, signal } = options;
  const reserve = options.reserveBytes ?? DEFAULT_RESERVE_BYTES;
  const cancelled = (file: string): void => {
    if (signal?.aborted) throw new DownloadCancelledError(file);
  };
  await io.mkdir(dest);
  const manifestPart = joinPath(dest, 'manifest.json.part');
  cancelled('manifest.json');
  await io.download({ url: fileUrl(url, 'manifest.json'), path: manifestPart, offset: 0, signal });
  const manifestText = await io.readText(manifestPart);
  let manifest: BundleManifest;
  try {
    manifest = parseManifest(manifestText);
  } catch (e) {
    await io.remove(manifestPart); // an invalid or unsupported manifest leaves nothing behind
    throw e;
  }

  const finalManifest = joinPath(dest, 'manifest.json');
  const installed = (await io.stat(finalManifest)) !== null && (await io.readText(finalManifest)) === manifestText;
  const totalBytes = manifest.files.reduce((n, f) => n + f.bytes, 0);
  // What is already here: complete files (kept) and partial ones (resumed).
  const todo: { entry: BundleFile; final: string; part: string; have: number }[] = [];
  let doneBytes = 0;
  for (const entry of manifest.files) {
    const final = joinPath(dest, entry.path);
    if (await isComplete(io, final, entry, installed)) {
      doneBytes += entry.bytes;
      continue;
    }
    const part = `${final}.part`;
    const s = await io.stat(part);
    const have = s !== null && s.size <= entry.bytes ? s.size : 0;
    if (s !== null && have === 0) await io.remove(part); // larger than the file can be: not a prefix of it
    todo.push({ entry, final, part, have });
  }
  const needed = todo.reduce((n, t) => n + t.entry.bytes - t.have, 0);
  const free = await io.freeBytes(dest);
  if (needed > 0 && free < needed + reserve) throw new InsufficientStorageError(needed + reserve, free);

  let fetchedBytes = 0;
  const resumed: string[] = [];
  let base = doneBytes + todo.reduce((n, t) => n + t.have, 0);
  for (const { entry, final, part, have } of todo) {
    cancelled(entry.path);
    await io.mkdir(dirname(final));
    let offset = have;
    let counted = have; // bytes of this file included in `base`
    if (offset > 0) resumed.push(entry.path);
    for (let attempt = 0; ; attempt++) {
      const start = offset;
      const report = (received: number): void => {
        onProgress?.({ file: entry.path, fileBytes: Math.min(start + received, entry.bytes), fileTotal: entry.bytes,
          bytes: Math.min(base + received, totalBytes), totalBytes });
      };
      if (offset < entry.bytes || entry.bytes === 0) {
        const response = await io.download({ url: fileUrl(url, entry.path), path: part, offset, signal,
          onBytes: report });
        if (response.status === 200 && counted > 0) { // the server ignored the range: the file restarted at 0
          base -= counted;
          counted = 0;
        }
      }
      const size = (await io.stat(part))?.size ?? 0;
      fetchedBytes += Math.max(0, size - start);
      if (size === entry.bytes) break;
      if (size < entry.bytes) {
        // a short body without a transport error: keep the bytes, the next call resumes from them
        throw new DownloadError(`${entry.path}: got ${size} of ${entry.bytes} bytes; call again to resume`);
      }
      // more bytes than the file has: the server appended a whole body after the partial one; restart once
      await io.remove(part);
      if (attempt > 0) throw new DownloadError(`${entry.path}: the server sent ${size} bytes, the manifest says ${entry.bytes}`);
      base -= counted;
      counted = 0;
      offset = 0;
    }
    const actual = await io.sha256(part);
    if (actual !== entry.sha256) {
      await io.remove(part); // a corrupt file is not resumable
      throw new ChecksumMismatchError(entry.path, entry.sha256, actual);
    }
    await io.move(part, final);
    base += entry.bytes - counted;
    onProgress?.({ file: entry.path, fileBytes: entry.bytes, fileTotal: entry.bytes, bytes: base, totalBytes });
  }
  await io.move(manifestPart, finalManifest);
  return { manifest, dest, fetchedBytes, resumed };
}

/**
 * Read and validate a bundle already on disk: the manifest, and every file it lists present with its size
 * (`verify: 'sha256'` also hashes each one, which takes a while for a large model on a phone).
 */
export async function readBundle(dir: string, io: BundleIO,
  options: { verify?: 'size' | 'sha256' } = {}): Promise<BundleManifest> {
  const manifest = parseManifest(await io.readText(joinPath(dir, 'manifest.json')));
  for (const entry of manifest.files) {
    const path = joinPath(dir, entry.path);
    const s = await io.stat(path);
    if (s === null) throw new BundleIncompleteError(entry.path, `is missing from ${dir}`);
    if (s.size !== entry.bytes) throw new BundleIncompleteError(entry.path, `has ${s.size} bytes, not ${entry.bytes}`);
    if (options.verify === 'sha256') {
      const actual = await io.sha256(path);
      if (actual !== entry.sha256) throw new ChecksumMismatchError(entry.path, entry.sha256, actual);
    }
  }
  return manifest;
}
