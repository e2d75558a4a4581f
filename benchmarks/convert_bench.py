"""Conversion benchmark: ondevice vs llama.cpp's own tools on SmolLM2-135M-Instruct, side by side, one run.

    python benchmarks/convert_bench.py [--work DIR] [--json]

1. Builds a Hugging Face bf16 folder from the bundled SmolLM2 GGUF (`ondevice convert --to hf --quant bf16`),
   the same kind of checkpoint users download from the hub. That folder is the common source.
2. ondevice: `ondevice convert HF --to gguf --quant q4_k_m|q8_0` (one process each).
   llama.cpp: `convert_hf_to_gguf.py HF --outtype f16` then `llama_model_quantize` to Q4_K_M, and
   `convert_hf_to_gguf.py --outtype q8_0` for Q8_0 (its direct path). The llama.cpp scripts are taken from the
   llama-cpp-python 0.3.36 source distribution on PyPI (pip download), the same release as the runtime.
3. Wall time and peak RSS of every process (RUSAGE_CHILDREN), output sizes, and perplexity of each output on the
   bundled public-domain text with llama-cpp-python (same windows, same threads).
Nothing of llama.cpp is copied into this repository; the script downloads and runs it as a peer tool.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

LLAMA_CPP_VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command in a fresh process; (wall seconds, peak RSS MiB of that process)."""
    code = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t\n"
        "print(json.dumps([p.returncode, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=env)
    try:
        returncode, seconds, rss = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}") from None
    if returncode != 0:
        raise SystemExit(f"failed ({returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return seconds, rss


def llama_cpp_tools(work: Path) -> Path:
    """convert_hf_to_gguf.py and its gguf-py from the llama-cpp-python sdist (downloaded from PyPI)."""
    dest = work / f"llama.cpp-{LLAMA_CPP_VERSION}"
    if (dest / "conversion").is_dir():
        return dest
    sdist_dir = work / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(sdist_dir)], check=True)
    archive = next(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name == prefix + "convert_hf_to_gguf.py"
                   or m.name.startswith((prefix + "gguf-py/", prefix + "conversion/"))]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(dest, members=members, filter="data")
    return dest


QUANTIZE_SNIPPET = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def perplexity(path: Path, text: str, n_ctx: int = 512) -> float:
    """Perplexity with llama-cpp-python over non-overlapping windows of the text (BOS-less, like the file)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        nll, count = 0.0, 0
        for start in range(0, len(tokens) - 1, n_ctx):
            window = tokens[start : start + n_ctx]
            if len(window) < 2:
                break
            llm.reset()
            llm.eval(window)
            logits = np.array(llm.scores[: len(window)], dtype=np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
            count += len(window) - 1
        return float(np.exp(nll / count))
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ondevice-convert-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    from ondevice.hub import DEFAULT_MODEL, pull

    gguf_src = pull(DEFAULT_MODEL)
    hf = work / "smollm2-hf-bf16"
    if not hf.exists():
        subprocess.run([sys.executable, "-m", "ondevice", "convert", str(gguf_src), "--to", "hf", "--quant", "bf16",
                        "-o", str(hf), "--no-progress"], check=True)
    tools = llama_cpp_tools(work)
    env = dict(os.environ, PYTHONPATH=str(tools / "gguf-py"), NO_LOCAL_GGUF="")
    ondevice_cmd = [sys.executable, "-m", "ondevice", "convert", str(hf), "--to", "gguf", "--no-progress", "--force"]
    convert_py = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(hf)]
    rows = []
    for quant in ("q8_0", "q4_k_m"):
        ours_out = work / f"ondevice-{quant}.gguf"
        t, rss = run_measured(ondevice_cmd + ["--quant", quant, "-o", str(ours_out)])
        rows.append({"tool": "ondevice", "quant": quant, "seconds": t, "peak_rss_mib": rss, "path": ours_out})
        ref_out = work / f"llama.cpp-{quant}.gguf"
        if quant == "q8_0":
            t, rss = run_measured(convert_py + ["--outtype", "q8_0", "--outfile", str(ref_out)], env)
        else:
            f16 = work / "llama.cpp-f16.gguf"
            t1, rss1 = run_measured(convert_py + ["--outtype", "f16", "--outfile", str(f16)], env)
            t2, rss2 = run_measured([sys.executable, "-c", QUANTIZE_SNIPPET, str(f16), str(ref_out), "15"])
            t, rss = t1 + t2, max(rss1, rss2)
        rows.append({"tool": "llama.cpp", "quant": quant, "seconds": t, "peak_rss_mib": rss, "path": ref_out})
    text = (ROOT / "ondevice" / "data" / "eval_text.txt").read_text()
    for row in rows:
        row["size_bytes"] = row["path"].stat().st_size
        row["perplexity"] = perplexity(row["path"], text)
        row["path"] = str(row["path"])
    largest_tensor_mib = 49152 * 576 * 4 / 2**20  # token_embd in f32, SmolLM2's largest tensor
    if args.json:
        print(json.dumps({"rows": rows, "largest_tensor_f32_mib": largest_tensor_mib}, indent=2))
        return
    print("| tool | scheme | wall s | peak RSS MiB | size bytes | perplexity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['quant']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['size_bytes']} "
              f"| {r['perplexity']:.4f} |")
    for quant in ("q8_0", "q4_k_m"):
        ours = next(r for r in rows if r["tool"] == "ondevice" and r["quant"] == quant)
        ref = next(r for r in rows if r["tool"] == "llama.cpp" and r["quant"] == quant)
        print(f"{quant}: size ratio {ours['size_bytes'] / ref['size_bytes']:.4f}, perplexity ratio "
              f"{ours['perplexity'] / ref['perplexity']:.4f}, time ratio {ours['seconds'] / ref['seconds']:.2f}, "
              f"RSS ratio {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}")
    print(f"largest tensor in f32: {largest_tensor_mib:.0f} MiB")


if __name__ == "__main__":
    main()
