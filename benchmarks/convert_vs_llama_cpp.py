"""HF folder -> Q4_K_M GGUF: ondevice's one command against llama.cpp's two steps, side by side (issue 17).

    python benchmarks/convert_vs_llama_cpp.py HF_FOLDER [--quant q4_k_m] [--threads 2] [--work DIR] [--json]

llama.cpp: its convert_hf_to_gguf.py (from the llama-cpp-python sdist's vendored llama.cpp, fetched once with
`pip download`) writes an f16 GGUF, then llama_model_quantize (llama-cpp-python) quantizes it with --threads.
ondevice: `ondevice convert HF_FOLDER --to gguf --quant Q` (its quantizers use the kernels' pool, the physical
cores: give --threads the same number). Each step
runs in its own process under /usr/bin/time (wall seconds, peak RSS); the two pipelines alternate, ondevice first.
Then the tensors: ondevice converts llama.cpp's f16 file too, and every tensor of that output is compared byte for
byte with llama.cpp's (the same f16 source on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q6_k": 18}  # llama_ftype values


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run under /usr/bin/time: wall seconds and peak RSS (MiB) of the command."""
    out = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    line = next(x for x in reversed(out.stderr.splitlines()) if x.startswith("TIME "))
    wall, rss_kb = line.split()[1:]
    return {"wall_s": float(wall), "peak_rss_mib": int(rss_kb) / 1024}


def llama_cpp_source(work: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (convert_hf_to_gguf.py, conversion/, gguf-py)."""
    root = work / "llama-cpp-src"
    found = list(root.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0].parent
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON,
                    "-d", str(root), "-q"], check=True)
    with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   any(part in m.name for part in ("convert_hf_to_gguf.py", "/conversion/", "/gguf-py/"))]
        tar.extractall(root, members=members, filter="data")
    return next(root.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")).parent


QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def compare_tensors(ours: Path, theirs: Path) -> dict[str, int]:
    from ondevice.formats.gguf import GGUFFile

    a, b = GGUFFile(ours), GGUFFile(theirs)
    try:
        same = differ = 0
        for name, info in b.tensors.items():
            mine = a.tensors.get(name)
            if mine is not None and mine.ggml_type == info.ggml_type and \
                    a.tensor_data(name).tobytes() == b.tensor_data(name).tobytes():
                same += 1
            else:
                differ += 1
        return {"identical": same, "different": differ}
    finally:
        a.close()
        b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_folder", type=Path)
    parser.add_argument("--quant", default="q4_k_m", choices=sorted(FTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ondevice-convert-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = llama_cpp_source(work)
    # ondevice's quantizers run on its kernels' pool: the physical cores, as many as --threads on this machine
    threads = {"OMP_NUM_THREADS": str(args.threads)}

    ours = timed([sys.executable, "-m", "ondevice", "convert", str(args.hf_folder), "--to", "gguf", "--quant",
                  args.quant, "-o", str(work / "ours.gguf"), "--force", "--no-progress"], threads)
    f16 = work / "llama-cpp-f16.gguf"
    convert = timed([sys.executable, str(src / "convert_hf_to_gguf.py"), str(args.hf_folder), "--outtype", "f16",
                     "--outfile", str(f16)], {**threads, "PYTHONPATH": str(src / "gguf-py")})
    quantize = timed([sys.executable, "-c", QUANTIZE, str(f16), str(work / "theirs.gguf"),
                      str(FTYPES[args.quant]), str(args.threads)], threads)
    # the same f16 source on both sides, for the byte comparison (not timed)
    subprocess.run([sys.executable, "-m", "ondevice", "convert", str(f16), "--to", "gguf", "--quant", args.quant,
                    "-o", str(work / "ours-from-f16.gguf"), "--force", "--no-progress"], check=True,
                   capture_output=True, env={**os.environ, **threads})
    llama_total = convert["wall_s"] + quantize["wall_s"]
    report = {
        "quant": args.quant, "threads": args.threads, "ondevice": ours,
        "llama_cpp": {"convert_hf_to_gguf": convert, "llama_model_quantize": quantize, "wall_s": llama_total,
                      "peak_rss_mib": max(convert["peak_rss_mib"], quantize["peak_rss_mib"])},
        "speedup": llama_total / ours["wall_s"],
        "tensors_from_the_same_f16": compare_tensors(work / "ours-from-f16.gguf", work / "theirs.gguf"),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"ondevice {ours['wall_s']:.1f} s ({ours['peak_rss_mib']:.0f} MiB) | llama.cpp convert "
              f"{convert['wall_s']:.1f} s ({convert['peak_rss_mib']:.0f} MiB) + quantize {quantize['wall_s']:.1f} s "
              f"({quantize['peak_rss_mib']:.0f} MiB) | speedup {report['speedup']:.2f}x | tensors from the same f16: "
              f"{report['tensors_from_the_same_f16']}")


if __name__ == "__main__":
    main()
