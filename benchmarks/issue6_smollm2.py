"""Issue 6 checks on SmolLM2-135M-Instruct for the ExecuTorch and Core ML targets (docs/BENCHMARKS.md section 6).

    python benchmarks/issue6_smollm2.py replies ARTIFACT [--ref HF_F32_FOLDER] [--n 64]
        greedy replies to 5 chat prompts through the artifact's runner (a .pte through executorch.runtime, an
        .mlpackage through the numpy interpreter of the saved program, an mlx folder through mlx-lm, in float32
        off Apple silicon as `ondevice eval --backend mlx` does), beside the f32 reference's replies
    python benchmarks/issue6_smollm2.py layers ARTIFACT
        the per-layer schemes of the manifest: every linear of the model listed with its scheme
    python benchmarks/issue6_smollm2.py phases SOURCE [--quant 8da4w]
        CPU seconds of each export phase (torch.export, XNNPACK lowering, to_executorch) and the number of XNNPACK
        delegates and of non-delegated ops in the lowered graph
    python benchmarks/issue6_smollm2.py coreml PACKAGE
        size against the 4.5 bits/weight arithmetic (int4 + one fp16 scale per block of 32) and the op that
        produces every linear/embedding weight, counted from the saved spec

Quality (top-1 agreement, KL) and speed come from ondevice's own commands, see BENCHMARKS.md:
`ondevice eval ARTIFACT --ref HF_F32 --backend executorch|coreml-interpreter` and
`ondevice bench X.pte --backend executorch`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = [  # the first five of tests/test_runtime.py's PROMPTS
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]


def runner_for(path: Path):  # noqa: ANN201
    if path.is_dir() and (path / "model.safetensors").exists():  # an mlx folder (`--to mlx`)
        from ondevice.bench.backends.mlx import cpu_compute_dtype
        from ondevice.runners.mlx_runner import MLXRunner

        return MLXRunner(path, compute_dtype=cpu_compute_dtype())  # as `ondevice eval --backend mlx` runs it
    if path.suffix == ".pte":
        from ondevice.runners.executorch_runner import ExecuTorchRunner

        return ExecuTorchRunner(path)
    from ondevice.runners.coreml_interpreter import CoreMLInterpreterRunner

    return CoreMLInterpreterRunner(path)


def reference_replies(folder: Path, prompts: list[list[int]], n: int, eos: list[int]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for tokens in prompts:
            ids = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos[0])[0, len(tokens):].tolist()
            out.append(ids)
    return out


def replies(path: Path, ref: Path | None, n: int) -> None:
    runner = runner_for(path)
    eos = runner.eos_ids if hasattr(runner, "eos_ids") else runner.text.eos_ids
    prompts = [runner.chat_tokens([{"role": "user", "content": p}]) for p in PROMPTS]
    ours = [runner.greedy(t, n, stop_ids=eos) for t in prompts]
    theirs = reference_replies(ref, prompts, n, eos) if ref else [None] * len(prompts)
    identical = 0
    for prompt, mine, other in zip(PROMPTS, ours, theirs, strict=True):
        mine = [t for t in mine if t not in eos]
        print(f"## {prompt}\n{path.suffix or path.name}: {runner.decode(mine)!r}")
        if other is not None:
            other = [t for t in other if t not in eos]
            same = len(mine) if mine == other else next(
                (i for i, (a, b) in enumerate(zip(mine, other, strict=False)) if a != b), min(len(mine), len(other)))
            identical += mine == other
            print(f"f32: {runner.decode(other)!r}\n(identical for the first {same} tokens)")
    if ref:
        print(f"identical to the f32 reference: {identical}/{len(PROMPTS)}")


def layers(path: Path) -> None:
    manifest = json.loads(path.with_suffix(".json").read_text())
    spec = manifest["spec"]
    schemes = manifest["layers"]
    counts: dict[str, int] = {}
    for scheme in schemes.values():
        counts[scheme] = counts.get(scheme, 0) + 1
    expected = 7 * spec["n_layers"] + 1  # q k v o gate up down per block, plus the output layer
    linear = {k: v for k, v in schemes.items() if "embed" not in k}
    print(json.dumps({"schemes": counts, "linear_layers_listed": len(linear), "linear_layers_in_model": expected,
                      "all_quantized": len(linear) >= expected and not any(v in ("fp32", "fp16") for v in
                                                                            linear.values())}, indent=1))


def coreml(package: Path) -> None:
    from ondevice.converters.coreml import count_weight_ops

    manifest = json.loads(package.with_suffix(".json").read_text())
    spec = manifest["spec"]
    h, f, d = spec["hidden_size"], spec["ffn_size"], spec["head_dim"]
    nh, nkv, n = spec["n_heads"], spec["n_kv_heads"], spec["n_layers"]
    per_block = h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * f
    quantized = n * per_block + spec["vocab_size"] * h * (1 if spec["tie_embeddings"] else 2)
    fp16 = (2 * n + 1) * h + 2 * manifest["max_seq_len"] * d // 2  # norms, RoPE tables
    arithmetic = quantized * 4.5 / 8 + fp16 * 2
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    ops = count_weight_ops(package)
    print(json.dumps({"size_bytes": size, "quantized_weights": quantized, "arithmetic_bytes": int(arithmetic),
                      "size_over_arithmetic": round(size / arithmetic, 4), "weight_producers": ops,
                      "linear_and_embedding_weights_expected": 7 * n + (1 if spec["tie_embeddings"] else 2)},
                     indent=1))


def phases(source: str, quant: str) -> None:
    import time

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from ondevice.converters import executorch as ex
    from torchao.utils import unwrap_tensor_subclass

    from ondevice.sources import open_source

    model = open_source(source)
    max_seq = min(model.spec.context_length, ex.DEFAULT_MAX_SEQ)
    clock = time.process_time()
    module = ex.build_module(model, max_seq)
    if quant != "fp32":
        ex.quantize_module(module, quant, ex.DEFAULT_GROUP)
    module = unwrap_tensor_subclass(module)
    seq = torch.export.Dim("seq", min=1, max=min(ex.MAX_CHUNK, max_seq - 1))
    example = (torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    times = {"build": time.process_time() - clock}
    clock = time.process_time()
    with torch.no_grad():
        exported = torch.export.export(module, example, dynamic_shapes=({1: seq}, None), strict=False)
    times["export"] = time.process_time() - clock
    clock = time.process_time()
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    times["lower"] = time.process_time() - clock
    nodes = [n for n in edge.exported_program().graph_module.graph.nodes if n.op == "call_function"]
    delegates = sum("call_delegate" in str(n.target) for n in nodes)
    others: dict[str, int] = {}
    for n in nodes:
        name = str(n.target).split(":")[0]
        if "call_delegate" not in name and "getitem" not in name:
            others[name] = others.get(name, 0) + 1
    print(json.dumps({"cpu_seconds": {k: round(v, 1) for k, v in times.items()}, "delegates": delegates,
                      "non_delegated": others}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["replies", "layers", "phases", "coreml"])
    parser.add_argument("artifact", type=Path, help="artifact (or source, for phases)")
    parser.add_argument("--quant", default="8da4w", help="phases: fp32, 8da4w or int8")
    parser.add_argument("--ref", type=Path, help="f32 Hugging Face folder for reference replies")
    parser.add_argument("--n", type=int, default=64, help="tokens per reply at most")
    args = parser.parse_args()
    if args.what == "replies":
        replies(args.artifact, args.ref, args.n)
    elif args.what == "phases":
        phases(str(args.artifact), args.quant)
    elif args.what == "layers":
        layers(args.artifact)
    else:
        coreml(args.artifact)


if __name__ == "__main__":
    sys.exit(main())
