"""Issue 14, first half: SmolLM2-135M-Instruct at q4_k_m and q4_0 (and with --recipes any other recipe, e.g.
q5_k_m,iq4_xs,q3_k_m for docs/BENCHMARKS.md 3.1.1), with and without an importance matrix, quantized
by ondevice and by llama.cpp (llama_model_quantize given the same importance vectors); size, KL, top-1 and perplexity
against the f32 reference on the held-out text (docs/BENCHMARKS.md, "Calibrated quantization").

    python benchmarks/imatrix_smollm2.py [--work /tmp/ondevice-imatrix] [--recipes q4_k_m,q4_0] [--threads 2]

Every step is an `ondevice` command (printed as it runs) except llama.cpp's tools, which have no command in
llama-cpp-python: its quantizer and its imatrix collection are called through the low-level API
(ondevice.bench.llama_cpp_tools). Rows: each quantizer without an imatrix, with ondevice's imatrix, and llama.cpp's
quantizer with the imatrix llama.cpp's own forward pass collects on the same chunks. Steps whose output exists under
--work are skipped (evaluations included: eval-*.json). The calibration text (ondevice/data/calibration_text.txt) and the evaluation text
(ondevice/data/eval_text.txt, public-domain passages) are disjoint (ondevice/data/SOURCES.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --model: (bundled model, file prefix under --work); the f32 reference is the bundled weights dequantized
MODELS = {"smollm2": ("smollm2-135m-instruct", "smol"), "gemma3": ("gemma3-270m", "gemma")}
HELD_OUT = ROOT / "ondevice" / "data" / "eval_text.txt"


def ondevice(*args: str, capture: bool = False) -> str:
    command = ["ondevice", *map(str, args)]
    print("$", shlex.join(command), file=sys.stderr, flush=True)
    run = subprocess.run([sys.executable, "-m", "ondevice", *map(str, args)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE if capture else None, check=True)
    return run.stdout or ""


def llama_cpp(src: Path, dst: Path, recipe: str, imatrix: Path | None) -> None:
    from ondevice.bench.llama_cpp_tools import llama_cpp_quantize
    from ondevice.quant.imatrix import Imatrix

    print(f"$ llama_model_quantize {src} {dst} {recipe}" + (f" (imatrix {imatrix})" if imatrix else ""),
          file=sys.stderr, flush=True)
    llama_cpp_quantize(src, dst, recipe, imatrix=Imatrix.load(imatrix) if imatrix else None)


def llama_cpp_collect(ref: Path, f32: Path, out: Path) -> None:
    """llama.cpp's forward pass collects the imatrix over the chunks `ondevice imatrix` uses (bundled text, 512)."""
    from ondevice.bench.llama_cpp_tools import llama_cpp_imatrix
    from ondevice.quant.imatrix import bundled_calibration_text, chunk_tokens
    from ondevice.sources import open_source

    print(f"$ llama_cpp_imatrix {f32} (llama.cpp's cb_eval collection) -> {out}", file=sys.stderr, flush=True)
    model = open_source(ref)
    try:
        chunks = chunk_tokens(model, bundled_calibration_text(), 512)
    finally:
        model.close()
    imatrix = llama_cpp_imatrix(f32, chunks)
    imatrix.datasets = ["ondevice/data/calibration_text.txt"]
    imatrix.save(out)


def same_tensors(a: Path, b: Path) -> bool:
    from ondevice.formats.gguf import GGUFFile

    with GGUFFile(a) as fa, GGUFFile(b) as fb:
        return set(fa.tensors) == set(fb.tensors) and all(
            fa.tensors[n].ggml_type == fb.tensors[n].ggml_type and bytes(fa.tensor_data(n)) == bytes(fb.tensor_data(n))
            for n in fa.tensors)


def evaluate(path: Path, ref: Path, work: Path, threads: int) -> dict:
    """`ondevice eval` of one artifact against the f32 reference on the held-out text, cached beside it."""
    cache = work / f"eval-{path.stem}.json"
    if not cache.exists():
        cache.write_text(ondevice("eval", path, "--ref", ref, "--text", HELD_OUT, "--max-tokens", "4096",
                                  "--threads", threads, "--no-store", "--json", capture=True))
    result = json.loads(cache.read_text())[0]
    return {"size_bytes": path.stat().st_size, **{k: result[k] for k in (
        "kl_mean", "kl_p99", "top1_agreement", "perplexity", "ref_perplexity", "tokens", "backend", "ref_backend")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ondevice-imatrix"))
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--recipes", default="q4_k_m,q4_0")
    parser.add_argument("--methods", default="", help="ondevice --method rows beyond --imatrix, e.g. awq,awq+gptq")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bundled, prefix = MODELS[args.model]
    ref, f32, imatrix = work / f"{prefix}-f32", work / f"{prefix}-f32.gguf", work / f"{prefix}.imatrix.gguf"
    if not ref.exists():
        ondevice("convert", bundled, "--to", "hf", "--quant", "f32", "-o", ref, "--no-progress")
    if not f32.exists():  # llama.cpp's quantizer reads a GGUF
        ondevice("convert", ref, "--to", "gguf", "--quant", "f32", "-o", f32, "--no-progress")
    if not imatrix.exists():
        ondevice("imatrix", ref, "-o", imatrix, "--no-progress")
    theirs_imatrix = work / ("llama.cpp-collected.imatrix.gguf" if prefix == "smol" else
                             f"{prefix}.llama.cpp-collected.imatrix.gguf")
    stem = "" if prefix == "smol" else f"{prefix}-"  # SmolLM2's files keep their earlier names
    if not theirs_imatrix.exists():
        llama_cpp_collect(ref, f32, theirs_imatrix)

    rows = []
    for recipe in args.recipes.split(","):
        for kind, matrix in (("none", None), ("ondevice's", imatrix), ("llama.cpp's", theirs_imatrix)):
            tag = recipe + {"none": "", "ondevice's": "-imatrix", "llama.cpp's": "-llama-imatrix"}[kind]
            ours, theirs = work / f"ondevice-{stem}{tag}.gguf", work / f"llama.cpp-{stem}{tag}.gguf"
            if not ours.exists():
                ondevice("convert", ref, "--to", "gguf", "--quant", recipe, *(["--imatrix", matrix] if matrix
                                                                               else []), "-o", ours, "--no-progress")
            if not theirs.exists():
                llama_cpp(f32, theirs, recipe, matrix)
            identical = same_tensors(ours, theirs)
            # llama.cpp's own imatrix row: its quantizer only (ondevice's with that file writes the same bytes);
            # where ondevice's tensors equal llama.cpp's, the evaluation of llama.cpp's file serves both rows
            measured = evaluate(theirs, ref, work, args.threads)
            for quantizer, path in (("llama.cpp", theirs), ("ondevice", ours))[: 1 if kind == "llama.cpp's" else 2]:
                result = measured if path == theirs or identical else evaluate(path, ref, work, args.threads)
                rows.append({"recipe": recipe, "quantizer": quantizer, "imatrix": kind, "method": "-",
                             "identical_tensors": identical, **result, "size_bytes": path.stat().st_size})
                print(json.dumps(rows[-1]), flush=True)
        for method in filter(None, args.methods.split(",")):
            ours = work / f"ondevice-{stem}{recipe}-{method.replace('+', '')}.gguf"
            if not ours.exists():
                ondevice("convert", ref, "--to", "gguf", "--quant", recipe, "--method", method, "-o", ours,
                         "--no-progress")
            rows.append({"recipe": recipe, "quantizer": "ondevice", "imatrix": "(its pass)", "method": method,
                         "identical_tensors": None, **evaluate(ours, ref, work, args.threads)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| recipe | quantizer | imatrix | method | size (bytes) | KL nats/token (p99) | KL vs llama.cpp+imatrix | "
          "top-1 | PPL | ondevice's tensors = llama.cpp's |")
    print("|---|---|---|---|---|---|---:|---|---|---|")
    bar = {r["recipe"]: r["kl_mean"] for r in rows if r["quantizer"] == "llama.cpp" and r["imatrix"] == "ondevice's"}
    for r in rows:
        same = {None: "", True: "yes", False: "NO"}[r["identical_tensors"]]
        print(f"| {r['recipe']} | {r['quantizer']} | {r['imatrix']} | {r['method']} | {r['size_bytes']:,} | "
              f"{r['kl_mean']:.4f} ({r['kl_p99']:.3f}) | {r['kl_mean'] / bar[r['recipe']]:.3f}x | "
              f"{r['top1_agreement']:.1%} | {r['perplexity']:.3f} | {same} |")
    print(f"\nreference perplexity {rows[0]['ref_perplexity']:.3f} over {rows[0]['tokens']} tokens; artifact backend "
          f"{rows[0]['backend']}, reference {rows[0]['ref_backend']}")
    (work / f"{stem}results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
