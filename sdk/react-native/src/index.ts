/**
 * @ondevice/react-native: load ondevice bundles on phones.
 *
 *   const { dest } = await downloadBundle({ url, dest: `${io.documentDir}/smol`, io, onProgress });
 *   const model = await loadModel(dest);                    // memory check, then llama.rn or ExecuTorch
 *   const { text, stats } = await model.chat(messages, { onToken });
 */

export * from './errors';
export * from './manifest';
export * from './memory';
export * from './download';
export * from './model';
export type { AbortSignalLike, BundleIO, DownloadRequest, DownloadResponse } from './io';
export { BlobUtilBundleIO } from './blobUtil';
export { LlamaRnModel } from './llamaRn';
export { ExecuTorchModel } from './executorch';
