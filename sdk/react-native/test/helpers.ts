/** Test helpers: the golden bundle (written by ondevice's Python tests) and a local HTTP server for it. */

import { promises as fsp, readFileSync } from 'fs';
import * as http from 'http';
import type { AddressInfo } from 'net';
import * as os from 'os';
import * as path from 'path';

export const FIXTURE = path.join(__dirname, 'fixtures', 'bundle-gguf');

export function goldenManifest(): Record<string, unknown> & { files: { path: string; bytes: number; sha256: string; role: string }[] } {
  return JSON.parse(readFileSync(path.join(FIXTURE, 'manifest.json'), 'utf8'));
}

export async function tempDir(prefix = 'ondevice-rn-'): Promise<string> {
  return fsp.mkdtemp(path.join(os.tmpdir(), prefix));
}

export interface Served {
  url: string;
  /** Every request: path and Range header. */
  requests: { path: string; range?: string }[];
  /** Drop the connection after this many body bytes on the next GET of `path` (once). */
  cutAfter(path: string, bytes: number): void;
  /** Replace what a path serves. */
  override(path: string, body: Buffer): void;
  /** Answer Range requests with the whole file (200), like servers without range support. */
  ignoreRanges: boolean;
  /** Slow the body down: bytes per chunk and ms between chunks (0: all at once). */
  throttle: { chunk: number; delayMs: number };
  close(): Promise<void>;
}

export async function serveFolder(folder: string): Promise<Served> {
  const requests: Served['requests'] = [];
  const cuts = new Map<string, number>();
  const overrides = new Map<string, Buffer>();
  const state: Served = {
    url: '',
    requests,
    cutAfter: (p, bytes) => void cuts.set(p, bytes),
    override: (p, body) => void overrides.set(p, body),
    ignoreRanges: false,
    throttle: { chunk: 0, delayMs: 0 },
    close: async () => undefined,
  };
  const server = http.createServer(async (req, res) => {
    const rel = decodeURIComponent((req.url ?? '/').replace(/^\/+/, ''));
    requests.push({ path: rel, range: req.headers.range });
    let body: Buffer;
    try {
      body = overrides.get(rel) ?? (await fsp.readFile(path.join(folder, rel)));
    } catch {
      res.writeHead(404).end();
      return;
    }
    let start = 0;
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (range && !state.ignoreRanges) {
      start = Number(range[1]);
      if (start >= body.length) {
        res.writeHead(416, { 'Content-Range': `bytes */${body.length}` }).end();
        return;
      }
      res.writeHead(206, { 'Content-Length': body.length - start,
        'Content-Range': `bytes ${start}-${body.length - 1}/${body.length}`, 'Accept-Ranges': 'bytes' });
    } else {
      res.writeHead(200, { 'Content-Length': body.length, 'Accept-Ranges': 'bytes' });
    }
    let rest = body.subarray(start);
    const cut = cuts.get(rel);
    if (cut !== undefined) {
      cuts.delete(rel);
      res.write(rest.subarray(0, cut), () => setTimeout(() => req.socket.destroy(), 20));
      return;
    }
    const { chunk, delayMs } = state.throttle;
    if (!chunk) {
      res.end(rest);
      return;
    }
    while (rest.length > 0 && !res.destroyed) {
      res.write(rest.subarray(0, chunk));
      rest = rest.subarray(chunk);
      await new Promise((r) => setTimeout(r, delayMs));
    }
    res.end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  state.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;
  state.close = () => new Promise((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  });
  return state;
}
