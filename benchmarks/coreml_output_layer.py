"""How the Core ML int4 output layer is quantized, on SmolLM2 (docs/BENCHMARKS.md section 6): top-1 agreement and KL
against transformers f32 on the bundled eval text when only the tied embedding / output layer is quantized (every
other weight exact), by plain rounding to Q4_1's grid, by GPTQ, and by GPTQ in Hadamard-rotated coordinates (what
`--to coreml --quant int4` does). float32 throughout: this isolates the layer, not the package's fp16 arithmetic.

    python benchmarks/coreml_output_layer.py SMOL_HF_F32_FOLDER   # from `convert smollm2-135m-instruct --to hf`
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    import torch
    from ondevice.converters.coreml import gptq_output_layer, hadamard_rotation, rotation_matrix, rounded_int4
    from transformers import AutoModelForCausalLM

    from ondevice.bench.prompt import bundled_text
    from ondevice.quant.calibration import output_layer_hessian
    from ondevice.sources import open_source

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="Hugging Face f32 folder of the model (tied embeddings)")
    args = parser.parse_args()
    source = open_source(args.reference)
    try:
        weight = source.tensors["model.embed_tokens.weight"].load()
        hessian = output_layer_hessian(source)
        tokenizer_json = source.tokenizer_json
    finally:
        source.close()
    from tokenizers import Tokenizer

    body = Tokenizer.from_str(tokenizer_json).encode(bundled_text(), add_special_tokens=False).ids[:1024]
    windows = [body[i:i + 256] for i in range(0, len(body), 256)]
    model = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32).eval()

    def run(table: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(torch.from_numpy(table))
            return [model(torch.tensor([w])).logits[0, :-1].double() for w in windows]

    reference = run(weight)
    with torch.no_grad():
        hidden = [model.model(torch.tensor([w])).last_hidden_state[0, :-1].double() for w in windows]

    def agreement(logits: list[torch.Tensor]) -> tuple[float, float]:
        same = kl = n = 0
        for ref, got in zip(reference, logits, strict=True):
            p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
            same += int((ref.argmax(-1) == got.argmax(-1)).sum())
            kl += float((p.exp() * (p - q)).sum())
            n += len(ref)
        return same / n, kl / n

    rotation = hadamard_rotation(weight.shape[1])
    variants = {  # the tables as the package computes them (offsets rounded to int8), un-rotated
        "rounded to Q4_1's grid": rounded_int4(weight, 32).dequantize(),
        "GPTQ": gptq_output_layer(weight, hessian, 32, None).dequantize(),
        "GPTQ, rotated (the converter's)": gptq_output_layer(weight, hessian, 32, rotation).dequantize()
        @ rotation_matrix(rotation).T,
    }
    for name, table in variants.items():
        table = np.ascontiguousarray(table, dtype=np.float32)
        head = torch.from_numpy(table).double()
        head_top1, head_kl = agreement([h @ head.T for h in hidden])  # the output layer only, exact hidden states
        tied_top1, tied_kl = agreement(run(table))  # the lookup too
        print(f"{name}: output layer only top-1 {head_top1:.1%} KL {head_kl:.4f}; tied (the embedding lookup too) "
              f"top-1 {tied_top1:.1%} KL {tied_kl:.4f}", flush=True)


if __name__ == "__main__":
    main()
