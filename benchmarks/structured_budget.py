"""Structured output at a token budget (issue 16): is the JSON valid when max_tokens runs out?

    python benchmarks/structured_budget.py                       # budgets 32/64/160, temperature 0.8
    python benchmarks/structured_budget.py --per-schema 2 --budgets 32 --json

Two workloads: the 50 issue-extraction complaints (examples/github_issue.schema.json) and the ten schemas with
unbounded strings and arrays of examples/budget_schemas.json (each with --per-schema complaints). Every reply is
parsed and validated with jsonschema, with the closing at the limit on (the default) and, for the baseline, off
(close_at_limit=False: what generate() did before). Also reported: how often the limit forced the closing and the
time the budget check costs per token next to decode time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ISSUE_SYSTEM = ("You turn a user's complaint into a GitHub issue. Reply with JSON: a short title, the type, the "
                "priority and an estimate of the work.")


def run_one(model, messages, schema, budget: int, seed: int, close: bool) -> dict:
    import jsonschema

    from ondevice.structured import StructuredOutputError, TokenFilter

    token_filter = TokenFilter(model, json_schema=schema, close_at_limit=close)
    try:
        text = "".join(model.generate(messages, token_filter=token_filter, temperature=0.8, seed=seed,
                                      max_tokens=budget))
    except StructuredOutputError as exc:
        return {"valid": False, "error": str(exc)}
    stats = model.last_stats
    try:
        jsonschema.validate(json.loads(text), schema)
        valid = True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        valid = False
    return {"valid": valid, "text": text, "tokens": stats.generated_tokens, "finish": stats.finish_reason,
            "closed": stats.closed_at_limit, "decode_s": stats.decode_s, "budget_s": token_filter.budget_s,
            "mask_s": token_filter.mask_s}


def main(argv: list[str] | None = None) -> int:
    import ondevice

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path or alias (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 160])
    ap.add_argument("--complaints", type=int, default=50, help="issue-extraction complaints (default 50)")
    ap.add_argument("--per-schema", type=int, default=5, help="complaints per unbounded schema (default 5)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the close_at_limit=False runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    complaints = [c for c in (EXAMPLES / "complaints.txt").read_text().splitlines() if c.strip()]
    issue_schema = json.loads((EXAMPLES / "github_issue.schema.json").read_text())
    unbounded = json.loads((EXAMPLES / "budget_schemas.json").read_text())["schemas"]
    cases = [("issue", [{"role": "system", "content": ISSUE_SYSTEM}, {"role": "user", "content": c}], issue_schema)
             for c in complaints[: args.complaints]]
    for j, entry in enumerate(unbounded):
        for r in range(args.per_schema):
            c = complaints[(7 * j + r) % len(complaints)]
            cases.append((entry["name"], [{"role": "system", "content": entry["prompt"] + " Reply with JSON."},
                                          {"role": "user", "content": c}], entry["schema"]))
    model = ondevice.load(args.model, threads=args.threads)
    modes = [True] if args.no_baseline else [True, False]
    summary = []
    start = time.perf_counter()
    for budget in args.budgets:
        for close in modes:
            for workload in ("issue", "unbounded"):
                rows = [run_one(model, msgs, schema, budget, seed, close)
                        for seed, (name, msgs, schema) in enumerate(cases)
                        if (name == "issue") == (workload == "issue")]
                tokens = sum(r.get("tokens", 0) for r in rows)
                summary.append({
                    "budget": budget, "close_at_limit": close, "workload": workload, "requests": len(rows),
                    "valid": sum(r["valid"] for r in rows), "closed_at_limit": sum(r.get("closed", False) for r in rows),
                    "budget_ms_per_token": round(1e3 * sum(r.get("budget_s", 0) for r in rows) / max(1, tokens), 3),
                    "decode_ms_per_token": round(1e3 * sum(r.get("decode_s", 0) for r in rows) / max(1, tokens), 2),
                })
                s = summary[-1]
                if not args.json:
                    print(f"budget {budget:3d} close={'on ' if close else 'off'} {workload:9s}: "
                          f"{s['valid']}/{s['requests']} valid, {s['closed_at_limit']} closed at the limit, "
                          f"budget check {s['budget_ms_per_token']:.3f} ms/token vs decode "
                          f"{s['decode_ms_per_token']:.1f} ms/token", flush=True)
    if args.json:
        json.dump({"model": model.path, "seconds": round(time.perf_counter() - start, 1), "summary": summary},
                  sys.stdout, indent=2)
        print()
    return 0 if all(s["valid"] == s["requests"] for s in summary if s["close_at_limit"]) else 1


if __name__ == "__main__":
    sys.exit(main())
