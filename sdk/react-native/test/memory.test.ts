import { checkMemory, InsufficientMemoryError, memoryBudget, memoryNeed, validateManifest } from '../src';
import { goldenManifest } from './helpers';

const GB = 1e9;

function manifestNeeding(modelBytes: number, kvBytes: number, overhead: number, context = 2048) {
  const m = goldenManifest() as any;
  Object.assign(m.ram, { model_bytes: modelBytes, kv_cache_bytes: kvBytes, overhead_bytes: overhead,
    estimate_bytes: modelBytes + kvBytes + overhead, context });
  return validateManifest(m);
}

describe('memory check', () => {
  it('reads the need from the manifest and rescales the KV cache to the context asked for', () => {
    const m = manifestNeeding(1 * GB, 0.2 * GB, 0.1 * GB, 2048);
    expect(memoryNeed(m)).toBe(1.3 * GB);
    expect(memoryNeed(m, 4096)).toBe(1.5 * GB);
    expect(memoryNeed(m, 1024)).toBe(1.2 * GB);
    const golden = validateManifest(goldenManifest());
    expect(memoryNeed(golden)).toBe(golden.ram.estimate_bytes); // the export's estimate, as written
  });

  it('uses 90% of available memory when the OS reports it (PocketPal)', () => {
    expect(memoryBudget({ totalBytes: 8 * GB, availableBytes: 2 * GB }).budgetBytes).toBe(1.8 * GB);
  });

  it('falls back to min(65% of total, total - 1.2 GB) (PocketPal)', () => {
    expect(memoryBudget({ totalBytes: 8 * GB }).budgetBytes).toBe(5.2 * GB); // 65%
    expect(memoryBudget({ totalBytes: 3 * GB }).budgetBytes).toBe(1.8 * GB); // total - 1.2 GB
    expect(memoryBudget({ totalBytes: 1 * GB }).budgetBytes).toBe(0);
  });

  it('throws a typed error instead of loading a model that does not fit', () => {
    const m = manifestNeeding(1.6 * GB, 0.2 * GB, 0.1 * GB); // 1.9 GB
    expect(checkMemory(m, { totalBytes: 4 * GB }).budgetBytes).toBe(2.6 * GB);
    let error: unknown;
    try {
      checkMemory(m, { totalBytes: 3 * GB });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(InsufficientMemoryError);
    const e = error as InsufficientMemoryError;
    expect(e.code).toBe('INSUFFICIENT_MEMORY');
    expect(e.neededBytes).toBe(1.9 * GB);
    expect(e.budgetBytes).toBe(1.8 * GB);
    expect(e.message).toMatch(/1900 MB.*1800 MB/);
    // available memory decides when known, even on a large phone
    expect(() => checkMemory(m, { totalBytes: 12 * GB, availableBytes: 2 * GB })).toThrow(InsufficientMemoryError);
    // and a shorter context can make it fit
    expect(() => checkMemory(m, { totalBytes: 3 * GB }, 512)).not.toThrow();
  });
});
