/**
 * BundleIO over react-native-blob-util (a peer dependency react-native-executorch also uses): native downloads
 * that keep running off the JS thread, write straight to a file (appending when `overwrite: false`, which is what a
 * Range resume needs), report progress, cancel, and hash files natively (fs.hash sha256).
 */

import type { ReactNativeBlobUtil } from 'react-native-blob-util';

import { DownloadCancelledError, DownloadError, optionalPeer, RuntimeMissingError } from './errors';
import type { BundleIO, DownloadRequest, DownloadResponse } from './io';

// Metro bundles a literal require(); optional peers are required lazily so a missing one is a typed error.
declare const require: (id: string) => unknown;

type BlobUtil = ReactNativeBlobUtil;

function blobUtil(): BlobUtil {
  const mod = optionalPeer<{ default?: BlobUtil; ReactNativeBlobUtil?: BlobUtil } | undefined>(undefined,
    () => require('react-native-blob-util'), 'file access', 'react-native-blob-util');
  const rn = mod?.default ?? mod?.ReactNativeBlobUtil;
  if (!rn) throw new RuntimeMissingError('file access', 'react-native-blob-util');
  return rn;
}

export class BlobUtilBundleIO implements BundleIO {
  private readonly rn: BlobUtil;

  constructor(rn?: BlobUtil) {
    this.rn = rn ?? blobUtil();
  }

  /** The app's documents folder: a good place for bundles (not purged like the cache folder). */
  get documentDir(): string {
    return this.rn.fs.dirs.DocumentDir;
  }

  async stat(path: string): Promise<{ size: number } | null> {
    if (!(await this.rn.fs.exists(path))) return null;
    const s = await this.rn.fs.stat(path);
    return s.type === 'file' ? { size: Number(s.size) } : null;
  }

  async mkdir(path: string): Promise<void> {
    if (!(await this.rn.fs.exists(path))) await this.rn.fs.mkdir(path);
  }

  async remove(path: string): Promise<void> {
    if (await this.rn.fs.exists(path)) await this.rn.fs.unlink(path);
  }

  async move(from: string, to: string): Promise<void> {
    await this.remove(to);
    await this.rn.fs.mv(from, to);
  }

  async readText(path: string): Promise<string> {
    return (await this.rn.fs.readFile(path, 'utf8')) as string;
  }

  async sha256(path: string): Promise<string> {
    return (await this.rn.fs.hash(path, 'sha256')).toLowerCase();
  }

  async freeBytes(): Promise<number> {
    const df = await this.rn.fs.df();
    return Number(df.free ?? df.internal_free ?? 0);
  }

  async download({ url, path, offset, signal, onBytes }: DownloadRequest): Promise<DownloadResponse> {
    if (signal?.aborted) throw new DownloadCancelledError(path);
    const task = this.rn.config({ path, overwrite: offset === 0 })
      .fetch('GET', url, offset > 0 ? { Range: `bytes=${offset}-` } : {});
    const onAbort = (): void => {
      void task.cancel();
    };
    signal?.addEventListener('abort', onAbort);
    task.progress({ interval: 250 }, (received: number) => onBytes?.(Number(received)));
    try {
      const res = await task;
      const status = res.info().status;
      if (status !== 416 && (status < 200 || status >= 300)) {
        throw new DownloadError(`GET ${url}: HTTP ${status}`, status);
      }
      // A 200 to a Range request was appended after the partial file: the downloader sees the file is too long
      // and starts it again from zero.
      return { status };
    } catch (e) {
      if (signal?.aborted) throw new DownloadCancelledError(path);
      if (e instanceof DownloadError) throw e;
      throw new DownloadError(`GET ${url}: ${(e as Error).message}`);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }
}
