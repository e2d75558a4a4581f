"""Probe for issue 14's second half (not a feature): GPTQ error feedback on top of the imatrix, for q4_0.

    python benchmarks/gptq_q4_0_probe.py BASE.gguf OUT.gguf [--chunks 8] [--damp 0.1] [--ref /tmp/ondevice-imatrix/smol-f32]

BASE is ondevice's q4_0 file quantized with an imatrix (benchmarks/calibrated_vs_llama_cpp.py makes
/tmp/ondevice-imatrix/ondevice-q4_0-imatrix.gguf). Every Q4_0/Q4_1 tensor keeps BASE's block scales (and Q4_1's
mins) and gets new codes from ondevice.quant.gptq on E[x x^T] of its float inputs (the numpy reference over `--chunks`
chunks of 512 tokens of the bundled calibration text); the rest is copied. Then evaluate OUT as the benchmark does:
`ondevice eval OUT --ref REF --text ondevice/data/eval_text.txt --max-tokens 4096 --threads 2 --no-store`.

Measured once (SmolLM2, 8 chunks, damp 0.1; 278 s on the shared machine): KL 0.400 / top-1 71.9% / PPL 28.77 against
the imatrix file's 0.468 / 67.6% / 24.07: lower KL and higher top-1 but a worse perplexity, so not adopted yet.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ondevice.architectures import get_architecture
from ondevice.architectures.base import permute_for_gguf
from ondevice.decoder import run_decoder
from ondevice.formats.gguf import GGUFFile, PlannedTensor, write_gguf
from ondevice.quant import get_quant_type
from ondevice.quant.base import fp16_to_f32
from ondevice.quant.gptq import gptq_affine_4bit
from ondevice.quant.imatrix import bundled_calibration_text, chunk_tokens
from ondevice.quant.legacy import _split_halves
from ondevice.reference import FinalHiddenOps
from ondevice.sources import open_source

F32 = np.float32
TYPES = {2: "q4_0", 3: "q4_1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("out")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--damp", type=float, default=0.1)
    parser.add_argument("--ref", default="/tmp/ondevice-imatrix/smol-f32")
    args = parser.parse_args()
    model = open_source(args.ref)
    arch = get_architecture(model.spec.arch)
    base = GGUFFile(args.base)
    new_bytes: dict[str, np.ndarray] = {}

    def requantize(gguf_name: str, hf_name: str, hessian: np.ndarray) -> None:
        info = base.tensors[gguf_name]
        if info.ggml_type not in TYPES:
            return
        qtype = get_quant_type(TYPES[info.ggml_type])
        weight = model.tensors[hf_name].load()
        heads = arch.qk_heads(model.spec, hf_name)
        if heads:
            weight = permute_for_gguf(weight, heads)
        raw = np.asarray(base.tensor_data(gguf_name)).reshape(-1, qtype.type_size)
        scale = fp16_to_f32(raw[:, 0:2]).reshape(weight.shape[0], -1)
        bias = scale * F32(-8) if qtype.name == "q4_0" else fp16_to_f32(raw[:, 2:4]).reshape(weight.shape[0], -1)
        scale = np.where(scale == 0, F32(1e-30), scale)  # an all-zero block: any code decodes to 0
        codes, _, _ = gptq_affine_4bit(weight.astype(F32), hessian, 32, damp=args.damp, params=(scale, bias))
        out = raw.copy()
        out[:, -16:] = _split_halves(codes.reshape(-1, 32))
        new_bytes[gguf_name] = out.reshape(weight.shape[0], -1)

    class Collect(FinalHiddenOps):
        def project(self, x: np.ndarray, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[np.ndarray]:
            wide = x.astype(np.float64)
            hessian = wide.T @ wide / len(x)
            for role in roles:
                hf_name = self.tensor_name(role, layer)
                requantize(arch.gguf_name(hf_name), hf_name, hessian)
            return super().project(x, roles, layer, bias)

    start = time.perf_counter()
    run_decoder(Collect(model, chunk_tokens(model, bundled_calibration_text(), 512, args.chunks)))
    print(f"GPTQ on {len(new_bytes)} tensors in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    planned = [PlannedTensor(name, info.shape, info.ggml_type,
                             (lambda name=name: new_bytes.get(name, np.asarray(base.tensor_data(name)))))
               for name, info in base.tensors.items()]
    write_gguf(args.out, dict(base.fields), planned, force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
