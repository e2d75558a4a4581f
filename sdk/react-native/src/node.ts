/**
 * BundleIO for Node (tests, desktop tools, CI): node:fs, node:crypto and node:http(s). Not imported by the
 * package's main entry, so React Native bundles never see these modules: `import { NodeBundleIO } from
 * '@ondevice/react-native/lib/node'`.
 */

import { createHash } from 'crypto';
import { createReadStream, createWriteStream, promises as fsp } from 'fs';
import * as http from 'http';
import * as https from 'https';

import { DownloadCancelledError, DownloadError } from './errors';
import type { BundleIO, DownloadRequest, DownloadResponse } from './io';

export class NodeBundleIO implements BundleIO {
  async stat(path: string): Promise<{ size: number } | null> {
    try {
      const s = await fsp.stat(path);
      return s.isFile() ? { size: s.size } : null;
    } catch {
      return null;
    }
  }

  async mkdir(path: string): Promise<void> {
    await fsp.mkdir(path, { recursive: true });
  }

  async remove(path: string): Promise<void> {
    await fsp.rm(path, { force: true });
  }

  async move(from: string, to: string): Promise<void> {
    await fsp.rename(from, to);
  }

  async readText(path: string): Promise<string> {
    return fsp.readFile(path, 'utf8');
  }

  sha256(path: string): Promise<string> {
    return new Promise((resolve, reject) => {
      const hash = createHash('sha256');
      createReadStream(path)
        .on('data', (chunk) => hash.update(chunk))
        .on('error', reject)
        .on('end', () => resolve(hash.digest('hex')));
    });
  }

  async freeBytes(path: string): Promise<number> {
    const s = await fsp.statfs(path);
    return Number(s.bavail) * Number(s.bsize);
  }

  download({ url, path, offset, signal, onBytes }: DownloadRequest): Promise<DownloadResponse> {
    return new Promise<DownloadResponse>((resolve, reject) => {
      if (signal?.aborted) {
        reject(new DownloadCancelledError(path));
        return;
      }
      const get = url.startsWith('https:') ? https.get : http.get;
      const headers: Record<string, string> = offset > 0 ? { Range: `bytes=${offset}-` } : {};
      let settled = false;
      const finish = (error: Error | null, response?: DownloadResponse): void => {
        if (settled) return;
        settled = true;
        signal?.removeEventListener('abort', onAbort);
        if (error) reject(error);
        else resolve(response as DownloadResponse);
      };
      let out: ReturnType<typeof createWriteStream> | undefined;
      // a failure after the body started: flush what was written (the .part keeps it for a resume), then report
      const fail = (error: Error): void => {
        const report = (): void => finish(signal?.aborted ? new DownloadCancelledError(path) : error);
        if (out && !out.writableFinished) out.end(report);
        else report();
      };
      const request = get(url, { headers }, (res) => {
        const status = res.statusCode ?? 0;
        if (status === 416 || status < 200 || status >= 300) {
          res.resume();
          if (status === 416) finish(null, { status });
          else finish(new DownloadError(`GET ${url}: HTTP ${status}`, status));
          return;
        }
        // 206: append to what is there; 200: the server sent the whole file, start over
        const file = createWriteStream(path, { flags: status === 206 ? 'a' : 'w' });
        out = file;
        let received = 0;
        res.on('data', (chunk: Buffer) => {
          received += chunk.length;
          onBytes?.(received);
        });
        res.on('aborted', () => fail(new DownloadError(`GET ${url}: the connection closed after ${received} bytes`)));
        res.on('error', (e) => fail(new DownloadError(`GET ${url}: ${e.message}`)));
        file.on('error', (e) => finish(new DownloadError(`writing ${path}: ${e.message}`)));
        file.on('finish', () => {
          if (signal?.aborted) finish(new DownloadCancelledError(path));
          else if (!res.complete) finish(new DownloadError(`GET ${url}: the connection closed after ${received} bytes`));
          else finish(null, { status });
        });
        res.pipe(file);
      });
      const onAbort = (): void => {
        request.destroy();
      };
      signal?.addEventListener('abort', onAbort);
      request.on('error', (e) => fail(new DownloadError(`GET ${url}: ${e.message}`)));
    });
  }
}
