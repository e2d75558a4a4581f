"""Turn free-text complaints into well-formed GitHub issues with a JSON schema (structured output).

    python examples/issue_extraction.py                     # 50 complaints, temperature 0 and 0.8
    python examples/issue_extraction.py --limit 8 --temps 0 # quicker
    python examples/issue_extraction.py --model path/to/model.gguf --json

Every reply is parsed and validated with `jsonschema`; the summary reports the validity rate per temperature
and the cost of the token mask per generated token next to the decode time per token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SCHEMA_PATH = HERE / "github_issue.schema.json"
COMPLAINTS_PATH = HERE / "complaints.txt"
SYSTEM = ("You turn a user's complaint into a GitHub issue. Reply with JSON: a short title, the type, the "
          "priority and an estimate of the work.")


def extract(model, complaint: str, schema: dict, temperature: float, seed: int, max_tokens: int) -> dict:
    """One complaint -> {"issue" or "error", timings}."""
    from ondevice.structured import StructuredOutputError, stream_structured

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": complaint}]
    start = time.perf_counter()
    token_filter, stream = stream_structured(model, messages, json_schema=schema, temperature=temperature,
                                             seed=seed, max_tokens=max_tokens)
    try:
        text = "".join(stream)
    except StructuredOutputError as exc:
        return {"complaint": complaint, "error": str(exc)}
    stats = model.last_stats
    row = {"complaint": complaint, "text": text, "tokens": stats.generated_tokens,
           "finish_reason": stats.finish_reason, "seconds": time.perf_counter() - start,
           "decode_ms_per_token": stats.decode_s / max(1, stats.generated_tokens - 1) * 1e3,
           "mask_ms_per_token": token_filter.mask_s / max(1, token_filter.steps) * 1e3}
    return row


def main(argv: list[str] | None = None) -> int:
    import jsonschema

    import ondevice

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path or alias (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--limit", type=int, default=50, help="number of complaints (default 50)")
    ap.add_argument("--temps", type=float, nargs="+", default=[0.0, 0.8], help="temperatures (default 0 0.8)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print every row and the summary as JSON")
    args = ap.parse_args(argv)

    schema = json.loads(SCHEMA_PATH.read_text())
    complaints = [line.strip() for line in COMPLAINTS_PATH.read_text().splitlines() if line.strip()][: args.limit]
    model = ondevice.load(args.model)
    summary, rows = [], []
    for temperature in args.temps:
        valid, mask_ms, decode_ms, tokens = 0, [], [], 0
        for i, complaint in enumerate(complaints):
            row = extract(model, complaint, schema, temperature, args.seed + i, args.max_tokens)
            row["temperature"] = temperature
            if "text" in row:
                try:
                    jsonschema.validate(json.loads(row["text"]), schema)
                    row["valid"] = True
                    valid += 1
                except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                    row["valid"], row["error"] = False, str(exc).splitlines()[0]
                mask_ms.append(row["mask_ms_per_token"])
                decode_ms.append(row["decode_ms_per_token"])
                tokens += row["tokens"]
            else:
                row["valid"] = False
            rows.append(row)
            if not args.json:
                shown = row.get("text") or row.get("error")
                print(f"[t={temperature} {i + 1:2d}] {'ok ' if row['valid'] else 'BAD'} {shown}", flush=True)
        mean_mask = sum(mask_ms) / max(1, len(mask_ms))
        mean_decode = sum(decode_ms) / max(1, len(decode_ms))
        summary.append({"temperature": temperature, "complaints": len(complaints), "valid": valid,
                        "tokens": tokens, "mask_ms_per_token": round(mean_mask, 3),
                        "decode_ms_per_token": round(mean_decode, 2),
                        "mask_share_of_decode": round(mean_mask / mean_decode, 4) if mean_decode else None})
    if args.json:
        json.dump({"model": model.path, "summary": summary, "rows": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for s in summary:
            print(f"temperature {s['temperature']}: {s['valid']}/{s['complaints']} valid, "
                  f"mask {s['mask_ms_per_token']:.3f} ms/token vs decode {s['decode_ms_per_token']:.1f} ms/token "
                  f"({100 * (s['mask_share_of_decode'] or 0):.1f}%)")
    return 0 if all(s["valid"] == s["complaints"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
