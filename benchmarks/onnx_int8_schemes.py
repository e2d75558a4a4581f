"""ONNX int8 schemes on SmolLM2-135M-Instruct: which linear layers stay f16 (converters/onnx.py FLOAT_LAYERS).

    python benchmarks/onnx_int8_schemes.py [--work DIR] [--rounds 4] [--schemes all-int8,default,...]

For each scheme: `--to onnx --quant int8` with FLOAT_LAYERS["int8"] set to it, then size, quality against the
transformers f32 reference (the bundled text, first 1,024 tokens in 256-token windows, as docs/BENCHMARKS.md
section 5; KL(reference || artifact), top-1 agreement, perplexity), the same on held-out text (the rest of the
bundled text and the start of docs/BENCHMARKS.md), and prefill(256) / decode(64) speed in onnxruntime-genai's loop
with 2 threads, all schemes interleaved round by round in one process (best round reported: other load on the
machine only slows rounds down).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCHEMES: dict[str, tuple[tuple[str, ...], int]] = {  # (layer kinds kept f16 in every block, last blocks kept whole)
    "all-int8": ((), 0),
    "qkv": (("qkv_proj",), 0),
    "default": (("qkv_proj",), 2),
    "qkv+gate_up": (("qkv_proj", "gate_up_proj"), 0),
    "qkv+gate_up+last2": (("qkv_proj", "gate_up_proj"), 2),
}


def windows(tokens: list[int], size: int = 256) -> list[list[int]]:
    return [w for w in (tokens[i:i + size] for i in range(0, len(tokens), size)) if len(w) >= 2]


def quality(folder: Path, texts: list[list[int]], refs: list[np.ndarray]) -> dict[str, float]:
    from ondevice.bench.quality import QualityTotals
    from ondevice.runners.onnx_runner import ONNXRunner

    run = ONNXRunner(folder, threads=2)
    totals = QualityTotals()
    for window, ref in zip(texts, refs, strict=True):
        run.reset()
        totals.add(ref[:-1], run.forward(window)[:-1], np.asarray(window[1:]))
    r = totals.result()
    return {"kl": r["kl_mean"], "top1": r["top1_agreement"], "ppl": r["perplexity"], "ref_ppl": r["ref_perplexity"],
            "tokens": r["tokens"]}


def speeds(folders: dict[str, Path], prompt: list[int], rounds: int, n_decode: int = 64) -> dict[str, list[float]]:
    import onnxruntime_genai as og

    models = {}
    for name, folder in folders.items():
        config_path = folder / "genai_config.json"
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 2
        config_path.write_text(json.dumps(config, indent=2))
        models[name] = og.Model(str(folder))
    best = {name: [0.0, 0.0] for name in folders}
    ids = np.asarray([prompt], np.int32)
    length = len(prompt) + n_decode + 1
    for _ in range(rounds):
        for name, model in models.items():
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, top_k=1, max_length=length, min_length=length)
            generator = og.Generator(model, params)
            start = time.perf_counter()
            generator.append_tokens(ids)
            prefill = len(prompt) / (time.perf_counter() - start)
            start, n = time.perf_counter(), 0
            while not generator.is_done() and n < n_decode:
                generator.generate_next_token()
                n += 1
            decode = n / (time.perf_counter() - start)
            best[name] = [max(best[name][0], prefill), max(best[name][1], decode)]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/onnx-int8-schemes", help="folder for the artifacts")
    parser.add_argument("--rounds", type=int, default=4, help="speed rounds (best kept)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated names from SCHEMES")
    args = parser.parse_args()

    import torch
    from ondevice.converters import hf as hf_target
    from ondevice.converters import onnx as onnx_target
    from ondevice.converters.base import ConvertOptions
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from ondevice.hub import DEFAULT_MODEL, pull
    from ondevice.sources import open_source

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = pull(DEFAULT_MODEL, quiet=True)
    reference = work / "hf-f32"
    if not reference.exists():
        model = open_source(source)
        try:
            hf_target.convert(model, reference, ConvertOptions(quant="f32", progress=False))
        finally:
            model.close()
    tokenizer = Tokenizer.from_file(str(reference / "tokenizer.json"))
    text = tokenizer.encode((ROOT / "ondevice/data/eval_text.txt").read_text(encoding="utf-8"),
                            add_special_tokens=False).ids
    doc = tokenizer.encode((ROOT / "docs/BENCHMARKS.md").read_text(encoding="utf-8")[:6000],
                           add_special_tokens=False).ids
    sets = {"bundled": windows(text[:1024]), "held-out": windows(text[1024:1536]) + windows(doc[:512])}
    hf = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.no_grad():
        refs = {key: [hf(torch.tensor([w])).logits[0].numpy() for w in ws] for key, ws in sets.items()}
    del hf

    folders, rows = {}, {}
    saved = dict(onnx_target.FLOAT_LAYERS)
    try:
        for name in args.schemes.split(","):
            onnx_target.FLOAT_LAYERS["int8"] = SCHEMES[name]
            out = work / f"onnx-int8-{name}"
            model = open_source(source)
            try:
                result = onnx_target.convert(model, out, onnx_target.ONNXOptions(quant="int8", force=True,
                                                                                  progress=False))
            finally:
                model.close()
            folders[name] = out
            rows[name] = {"size_mb": result.size_bytes / 1e6, "types": result.tensor_types,
                          **{key: quality(out, sets[key], refs[key]) for key in sets}}
            print(name, json.dumps(rows[name]), flush=True)
    finally:
        onnx_target.FLOAT_LAYERS.clear()
        onnx_target.FLOAT_LAYERS.update(saved)
    best = speeds(folders, text[:256], args.rounds)
    print("| int8 scheme (f16 layers) | size MB | KL | top-1 | perplexity | held-out KL / top-1 | prefill(256) tok/s "
          "| decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        b, h = row["bundled"], row["held-out"]
        print(f"| {name} | {row['size_mb']:.1f} | {b['kl']:.4f} | {b['top1']:.1%} | {b['ppl']:.2f} | "
              f"{h['kl']:.4f} / {h['top1']:.1%} | {best[name][0]:.0f} | {best[name][1]:.1f} |")


if __name__ == "__main__":
    main()
