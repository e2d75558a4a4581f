/**
 * The memory check before load: the bundle's RAM need (manifest.ram, from `ondevice fit`: model file + KV cache
 * for the context + runtime overhead, with the KV cache rescaled to the context the app asks for) against what the
 * device can give, with PocketPal's margins:
 * - when the OS reports available memory: 90% of it (a 10% safety margin);
 * - otherwise, from total RAM: min(65% of it, total - 1.2 GB) (PocketPal's rule before it measured available
 *   memory: the OS and other apps keep the rest).
 * A model that does not fit raises InsufficientMemoryError instead of being loaded and killed by the OS.
 */

import { InsufficientMemoryError, mb } from './errors';
import type { BundleManifest } from './manifest';

// Metro bundles a literal require(); optional peers are required lazily so a missing one is a typed error.
declare const require: (id: string) => unknown;

export interface DeviceMemory {
  totalBytes: number;
  /** Memory the OS says is available now (Android's ActivityManager.MemoryInfo.availMem, iOS's
   * os_proc_available_memory); better than the total when known. */
  availableBytes?: number;
}

export const MEMORY_MARGINS = {
  availableFraction: 0.9,
  totalFraction: 0.65,
  totalReserveBytes: 1.2e9,
} as const;

export interface MemoryCheck {
  needBytes: number;
  budgetBytes: number;
  /** How the budget was computed, for logs and error messages. */
  detail: string;
}

/** RAM the bundle needs at `nCtx` (default: the context the manifest's estimate is sized for). */
export function memoryNeed(manifest: BundleManifest, nCtx?: number): number {
  const ram = manifest.ram;
  const kv = nCtx === undefined ? ram.kv_cache_bytes : Math.ceil((ram.kv_cache_bytes * nCtx) / ram.context);
  return ram.model_bytes + kv + ram.overhead_bytes;
}

export function memoryBudget(device: DeviceMemory): { budgetBytes: number; detail: string } {
  const m = MEMORY_MARGINS;
  if (device.availableBytes !== undefined && device.availableBytes > 0) {
    return { budgetBytes: Math.floor(device.availableBytes * m.availableFraction),
      detail: `90% of the ${mb(device.availableBytes)} available` };
  }
  const budget = Math.max(0, Math.min(device.totalBytes * m.totalFraction, device.totalBytes - m.totalReserveBytes));
  return { budgetBytes: Math.floor(budget),
    detail: `min(65% of ${mb(device.totalBytes)} total, total - 1.2 GB)` };
}

/** Throws InsufficientMemoryError when the bundle does not fit; returns the numbers when it does. */
export function checkMemory(manifest: BundleManifest, device: DeviceMemory, nCtx?: number): MemoryCheck {
  const needBytes = memoryNeed(manifest, nCtx);
  const { budgetBytes, detail } = memoryBudget(device);
  if (needBytes > budgetBytes) throw new InsufficientMemoryError(needBytes, budgetBytes, detail);
  return { needBytes, budgetBytes, detail };
}

/**
 * The device's memory from react-native-device-info (total RAM only: it has no available-memory call), or
 * undefined when that package is not installed. Pass your own DeviceMemory (e.g. with availableBytes from a
 * native module) to loadModel for the tighter check.
 */
export async function deviceMemory(): Promise<DeviceMemory | undefined> {
  let info: typeof import('react-native-device-info') | undefined;
  try {
    info = require('react-native-device-info') as typeof import('react-native-device-info');
  } catch {
    return undefined;
  }
  const total = await info.getTotalMemory();
  return total > 0 ? { totalBytes: total } : undefined;
}
