/**
 * The file-system and network access the SDK needs, behind one small interface, so the same download and load
 * code runs on a phone (BlobUtilBundleIO, over react-native-blob-util) and in Node (NodeBundleIO, used by the
 * tests and by tools). Implement it yourself to use another library (expo-file-system, react-native-fs).
 */

/** What AbortController.signal offers (React Native and Node both have AbortController). */
export interface AbortSignalLike {
  readonly aborted: boolean;
  addEventListener(type: 'abort', listener: () => void): void;
  removeEventListener(type: 'abort', listener: () => void): void;
}

export interface DownloadRequest {
  url: string;
  /** The file to write (the SDK passes `<final name>.part`). */
  path: string;
  /**
   * Bytes already in `path`. When > 0 the adapter asks for `Range: bytes=<offset>-` and appends what a 206 response
   * carries; if the server ignores the range (200) it must write the body from the start of the file instead.
   */
  offset: number;
  signal?: AbortSignalLike;
  /** Called as bytes arrive, with the number of bytes received by this request so far. */
  onBytes?: (received: number) => void;
}

export interface DownloadResponse {
  /** The HTTP status (206 when the range was honoured, 200 when the body starts at byte 0, 416 past the end). */
  status: number;
}

export interface BundleIO {
  /** Size of a file, or null when there is none. */
  stat(path: string): Promise<{ size: number } | null>;
  /** Create a folder and its parents (no error if it exists). */
  mkdir(path: string): Promise<void>;
  /** Delete a file (no error if it does not exist). */
  remove(path: string): Promise<void>;
  /** Rename a file, replacing the destination. */
  move(from: string, to: string): Promise<void>;
  readText(path: string): Promise<string>;
  /** Lower-case hex SHA-256 of a file's content. */
  sha256(path: string): Promise<string>;
  /** Free bytes on the volume holding `path` (a folder that exists). */
  freeBytes(path: string): Promise<number>;
  /**
   * GET a URL into a file, as DownloadRequest describes. Rejects with DownloadCancelledError when the signal aborts
   * (keeping what was written) and DownloadError for a network failure or an HTTP error status other than 416.
   */
  download(request: DownloadRequest): Promise<DownloadResponse>;
}

export function joinPath(folder: string, relative: string): string {
  return `${folder.replace(/\/+$/, '')}/${relative}`;
}

export function dirname(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? (i === 0 ? '/' : '.') : path.slice(0, i);
}
