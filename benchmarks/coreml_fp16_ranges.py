"""What a device that computes in fp16 does to the Core ML program, before and after the overflow-safe build (issue
20, docs/BENCHMARKS.md): the plain RMSNorm ((x/16)^2 in fp16, residual stream unscaled) against the built one
(max-abs prescale, residual stream / residual_scale), both run by ondevice's interpreter in fp16 on the first
window of the bundled eval text. Prints the norms that overflow at position 0, each program's largest op, and the
next-token top-1 agreement of each fp16 run with the same program in float32.

    python benchmarks/coreml_fp16_ranges.py smollm2-135m-instruct [--int4] [--tokens 128]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from ondevice.converters.coreml import build_program
    from ondevice.converters.coreml_fp16 import FP16_MAX, residual_range, residual_scale_for
    from tokenizers import Tokenizer

    from ondevice.bench.prompt import bundled_text
    from ondevice.hub import resolve_model
    from ondevice.quant.calibration import calibration_windows
    from ondevice.runners.coreml_interpreter import Interpreter
    from ondevice.sources import open_source

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="source (folder, GGUF or alias)")
    parser.add_argument("--int4", action="store_true", help="int4 blocks of 32 (output layer rounded, not GPTQ)")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model = open_source(str(resolve_model(args.model)))
    tokens = Tokenizer.from_str(model.tokenizer_json).encode(bundled_text(), add_special_tokens=False).ids
    tokens = ([model.special.bos_id] if model.special.add_bos else []) + tokens[:args.tokens]
    block = 32 if args.int4 else None
    scale = residual_scale_for(residual_range(model, calibration_windows(model, 2048)))
    print(f"residual scale chosen from the calibration text: {scale:g}")
    for label, options in (("plain norm, residual unscaled", {"overflow_safe_norms": False}),
                           (f"max-abs norm, residual / {scale:g}", {"residual_scale": scale})):
        program, _, _ = build_program(model, len(tokens), int4_block=block, calibrate=False, **options)
        logits = {}
        for precision in ("fp32", "fp16"):
            interpreter = Interpreter(program, precision)
            first: dict[str, float] = {}
            interpreter.ranges = first
            head = interpreter.run({"input_ids": np.asarray([tokens[:1]], np.int32),
                                    "position": np.asarray([0], np.int32)})
            interpreter.ranges = rest = {}
            tail = interpreter.run({"input_ids": np.asarray([tokens[1:]], np.int32),
                                    "position": np.asarray([1], np.int32)})
            logits[precision] = np.concatenate([np.asarray(next(iter(out.values())))[0] for out in (head, tail)])
            if precision == "fp16":
                overflowed = sorted(int(n.split(".")[2]) for n, top in first.items()
                                    if n.endswith("input_layernorm/mean") and np.isinf(top))
                both = {n: max(first.get(n, 0.0), rest.get(n, 0.0)) for n in {*first, *rest}}
                largest = max((top, n) for n, top in both.items() if n in interpreter.fp16_results)
                print(f"{label}: position 0 input-norm means inf in layers {overflowed or 'none'}; "
                      f"largest fp16 op {largest[1]} = {largest[0]:,.1f} ({FP16_MAX / largest[0]:.1f}x headroom)")
        agree = float((logits["fp16"].argmax(-1) == logits["fp32"].argmax(-1)).mean())
        print(f"{label}: fp16 vs fp32 top-1 agreement {agree:.1%} over {len(tokens)} positions")


if __name__ == "__main__":
    main()
