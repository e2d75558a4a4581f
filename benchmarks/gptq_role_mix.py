"""Which matrices' GPTQ codes move the held-out perplexity (docs/BENCHMARKS.md 3.1.2): files that take the tensors
matching a pattern from the GPTQ file and the rest from the imatrix file (same types and sizes, each tensor
self-consistent), scored with ondevice's runtime against the f32 GGUF on the held-out text.

    python benchmarks/gptq_role_mix.py IMATRIX.gguf GPTQ.gguf REF_F32.gguf [--work /tmp/gptq-mix]

Windows: the held-out text's tokens in runs of 255 after a BOS (not `ondevice eval`'s exact windows: compare the rows
of one run with each other). Prints mean NLL, perplexity, mean entropy and mean KL(ref || file) per file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = {"attn q/k": r"attn_(q|k)\.", "attn v/o": r"attn_(v|output)", "ffn gate/up": r"ffn_(gate|up)",
            "ffn down": r"ffn_down", "all": r"(attn_|ffn_)"}


def mix(base: Path, over: Path, pattern: str, out: Path) -> None:
    from ondevice.formats.gguf import GGUFFile, PlannedTensor, write_gguf

    rx = re.compile(pattern)
    with GGUFFile(base) as a, GGUFFile(over) as b:
        planned = [PlannedTensor(n, i.shape, i.ggml_type,
                                 lambda n=n: np.asarray((b if rx.search(n) else a).tensor_data(n)))
                   for n, i in a.tensors.items()]
        write_gguf(out, dict(a.fields), planned, force=True)


def log_probs(path: Path, windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    from ondevice import load

    nll, lps = [], []
    with load(path, n_ctx=256, kv_cache="f32") as model:
        for window in windows:
            model.reset()
            logits = model.logits(window).astype(np.float64)[:-1]
            lp = logits - logits.max(-1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
            lps.append(lp)
            nll.append(-lp[np.arange(len(window) - 1), window[1:]])
    return np.concatenate(nll), np.concatenate(lps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("imatrix_file", type=Path)
    parser.add_argument("gptq_file", type=Path)
    parser.add_argument("ref", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq-mix"))
    args = parser.parse_args()
    from tokenizers import Tokenizer

    from ondevice.sources import open_source

    args.work.mkdir(parents=True, exist_ok=True)
    model = open_source(args.ref)
    bos = model.special.bos_id
    ids = Tokenizer.from_str(model.tokenizer_json).encode((ROOT / "ondevice/data/eval_text.txt").read_text(),
                                                          add_special_tokens=False).ids
    windows = [[bos] + ids[i:i + 255] for i in range(0, len(ids), 255)]
    _, ref_lp = log_probs(args.ref, windows)
    files = {"imatrix": args.imatrix_file, "gptq": args.gptq_file}
    for label, pattern in PATTERNS.items():
        if label != "all":
            files[f"gptq {label} only"] = args.work / f"mix-{label.replace(' ', '-').replace('/', '')}.gguf"
            mix(args.imatrix_file, args.gptq_file, pattern, files[f"gptq {label} only"])
    print("| file | NLL | PPL | entropy | KL |\n|---|---|---|---|---|")
    for label, path in files.items():
        nll, lp = log_probs(path, windows)
        entropy = -(np.exp(lp) * lp).sum(-1).mean()
        kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1).mean()
        print(f"| {label} | {nll.mean():.4f} | {np.exp(nll.mean()):.3f} | {entropy:.3f} | {kl:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
