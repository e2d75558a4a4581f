/**
 * Typed errors: every failure the SDK knows about is one of these, so an app can tell "the bundle is broken" from
 * "the phone is too small" from "the network dropped" with `instanceof` (or `error.code`) instead of a crash.
 */

export type OndeviceErrorCode =
  | 'INVALID_MANIFEST'
  | 'BUNDLE_INCOMPLETE'
  | 'UNSUPPORTED_MANIFEST_VERSION'
  | 'UNSUPPORTED_BUNDLE'
  | 'DOWNLOAD_FAILED'
  | 'DOWNLOAD_CANCELLED'
  | 'CHECKSUM_MISMATCH'
  | 'INSUFFICIENT_STORAGE'
  | 'INSUFFICIENT_MEMORY'
  | 'RUNTIME_MISSING'
  | 'MODEL_RELEASED'
  | 'BUSY'
  | 'STRUCTURED_OUTPUT';

export class OndeviceError extends Error {
  readonly code: OndeviceErrorCode;

  constructor(code: OndeviceErrorCode, message: string) {
    super(message);
    this.code = code;
    this.name = new.target.name;
    Object.setPrototypeOf(this, new.target.prototype); // instanceof across ES5 targets
  }
}

/** The manifest does not match the schema of its version; `path` names the first offending field. */
export class InvalidManifestError extends OndeviceError {
  constructor(readonly path: string, problem: string) {
    super('INVALID_MANIFEST', `bundle manifest invalid at ${path}: ${problem}`);
  }
}

/** A bundle folder whose files are not all there with the size the manifest lists. */
export class BundleIncompleteError extends OndeviceError {
  constructor(readonly file: string, problem: string) {
    super('BUNDLE_INCOMPLETE', `bundle file ${file} ${problem}: download the bundle again (downloadBundle resumes)`);
  }
}

/** A manifest_version this SDK does not know: a newer ondevice wrote it; update the SDK. */
export class UnsupportedManifestVersionError extends OndeviceError {
  constructor(readonly version: unknown, readonly supported: readonly number[]) {
    super('UNSUPPORTED_MANIFEST_VERSION',
      `bundle manifest_version ${JSON.stringify(version)} is not supported by this SDK ` +
        `(it reads ${supported.join(', ')}); update @ondevice/react-native`);
  }
}

/** A valid bundle this SDK cannot run (e.g. a Core ML package: neither llama.rn nor ExecuTorch loads it). */
export class UnsupportedBundleError extends OndeviceError {
  constructor(message: string) {
    super('UNSUPPORTED_BUNDLE', message);
  }
}

export class DownloadError extends OndeviceError {
  constructor(message: string, readonly status?: number) {
    super('DOWNLOAD_FAILED', message);
  }
}

export class DownloadCancelledError extends OndeviceError {
  constructor(readonly file: string) {
    super('DOWNLOAD_CANCELLED', `download of ${file} was cancelled (the partial file is kept to resume)`);
  }
}

/** The bytes on disk are not the ones the manifest lists; the bad file has been deleted. */
export class ChecksumMismatchError extends OndeviceError {
  constructor(readonly file: string, readonly expected: string, readonly actual: string) {
    super('CHECKSUM_MISMATCH', `${file}: sha256 ${actual} does not match the manifest's ${expected}`);
  }
}

export class InsufficientStorageError extends OndeviceError {
  constructor(readonly neededBytes: number, readonly freeBytes: number) {
    super('INSUFFICIENT_STORAGE',
      `not enough free storage: the bundle needs ${mb(neededBytes)} more, ${mb(freeBytes)} is free`);
  }
}

/** Loading would likely be killed by the OS: the manifest's RAM need exceeds the memory budget. */
export class InsufficientMemoryError extends OndeviceError {
  constructor(readonly neededBytes: number, readonly budgetBytes: number, readonly detail: string) {
    super('INSUFFICIENT_MEMORY',
      `the model needs about ${mb(neededBytes)} of RAM but only ${mb(budgetBytes)} can safely be used ` +
        `(${detail}); pick a smaller bundle or a shorter context`);
  }
}

export class RuntimeMissingError extends OndeviceError {
  constructor(readonly runtime: string, readonly packageName: string) {
    super('RUNTIME_MISSING', `${runtime} bundles need the ${packageName} package: npm install ${packageName}`);
  }
}

export class ModelReleasedError extends OndeviceError {
  constructor() {
    super('MODEL_RELEASED', 'the model was released; load it again');
  }
}

export class BusyError extends OndeviceError {
  constructor() {
    super('BUSY', 'a reply is already being generated: await it or call stop() first');
  }
}

export class StructuredOutputError extends OndeviceError {
  constructor(message: string, readonly text: string) {
    super('STRUCTURED_OUTPUT', message);
  }
}

/** An optional peer dependency: the one given (tests, custom loading), else `load()`, else RuntimeMissingError. */
export function optionalPeer<T>(given: T | undefined, load: () => unknown, what: string, packageName: string): T {
  if (given !== undefined) return given;
  try {
    return load() as T;
  } catch {
    throw new RuntimeMissingError(what, packageName);
  }
}

export function mb(bytes: number): string {
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;
}
