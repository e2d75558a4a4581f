"""Prompt-lookup speculative decoding against plain decoding, side by side (issue 16).

    python benchmarks/speculative_lookup.py                  # rewrite, issue extraction, tool calls; 3 rounds
    python benchmarks/speculative_lookup.py --rounds 5 --json

One process, one loaded model, the same thread count: every prompt is generated plain (speculate="off") and with
speculate="lookup" (and, for the structured tasks, "grammar": drafts of the grammar's forced tokens only),
alternating, `--rounds` times; reported per task and mode are the median decode speeds (tok/s, after the first
token), their ratio, the share of drafted tokens accepted, the forward passes, and whether the outputs were
identical (they must be, at temperature 0: same tokens). Tasks: the rewrite task two ways, issue extraction
(examples/github_issue.schema.json) and tool calls (examples/tool_requests.json, tool_choice "required").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

PARAGRAPHS = [
    ("The old lighthouse stood at the edge of the cliff for more than a century. Every night its keeper climbed the "
     "narrow stairs, lit the great lamp and watched the ships pass safely through the rocky strait. When the keeper "
     "retired, the town decided to keep the light burning with an automatic lamp.", "replace 'century' with "
     "'hundred years'"),
    ("Our team meets every Monday at nine to plan the week. Each person shares what they finished, what they will "
     "work on next and anything that blocks them. The meeting lasts fifteen minutes, and notes are posted in the "
     "shared channel afterwards.", "change 'Monday' to 'Tuesday'"),
    ("To reset the router, unplug it from the wall and wait thirty seconds. Plug it back in and wait until the "
     "green light stops blinking. Then open the app on your phone and follow the steps to join the network "
     "again.", "change 'thirty seconds' to 'one minute'"),
    ("The museum is open from ten in the morning until six in the evening, every day except Monday. Tickets can "
     "be bought at the entrance or online, and children under twelve enter for free. Guided tours start every "
     "hour from the main hall.", "change 'twelve' to 'ten'"),
    ("Maria planted tomatoes, beans and basil in her small garden this spring. She watered them every evening and "
     "kept the snails away with crushed eggshells. By August the tomatoes were red and sweet, and she shared them "
     "with her neighbours.", "replace 'basil' with 'mint'"),
]
EDITOR = ("You are a careful editor. Repeat the user's paragraph word for word, making only the one change they ask "
          "for.")
ISSUE_SYSTEM = ("You turn a user's complaint into a GitHub issue. Reply with JSON: a short title, the type, the "
                "priority and an estimate of the work.")


def tasks(n_issues: int, n_tools: int) -> list[tuple[str, list[dict], dict]]:
    out = []
    for text, change in PARAGRAPHS:  # the paragraph first, then the change, with an editor's system prompt
        out.append(("rewrite", [{"role": "system", "content": EDITOR},
                                {"role": "user", "content": f"{text}\n\nRepeat this paragraph with one change: "
                                                            f"{change}."}], {"max_tokens": 120}))
    for text, change in PARAGRAPHS:  # the instruction first, no system prompt: SmolLM2 copies less of it
        out.append(("rewrite (instruction first)",
                    [{"role": "user", "content": f"Rewrite this paragraph with one change: {change}. Keep everything "
                                                 f"else the same.\n\n{text}"}], {"max_tokens": 120}))
    schema = json.loads((EXAMPLES / "github_issue.schema.json").read_text())
    complaints = [c for c in (EXAMPLES / "complaints.txt").read_text().splitlines() if c.strip()][:n_issues]
    for c in complaints:
        out.append(("issue-extraction", [{"role": "system", "content": ISSUE_SYSTEM}, {"role": "user", "content": c}],
                    {"max_tokens": 160, "json_schema": schema}))
    spec = json.loads((EXAMPLES / "tool_requests.json").read_text())
    for request in spec["requests"][::5][:n_tools]:
        out.append(("tool calls (required)", [{"role": "user", "content": request}],
                    {"max_tokens": 128, "tools": spec["tools"], "tool_choice": "required"}))
    return out


def pass_cost(model, rounds: int = 15, reps: int = 10) -> int:
    """What a verification pass costs against a one-token step: the break-even of speculation on this machine."""
    import time

    import numpy as np

    t = model.transformer
    t.forward(np.arange(100, 400, dtype=np.int32), 0)
    times: dict[int, list[float]] = {rows: [] for rows in (1, 2, 3, 5, 9)}
    for _ in range(rounds):
        for rows in times:
            tokens = np.arange(500, 500 + rows, dtype=np.int32)
            start = time.perf_counter()
            for _ in range(reps):
                t.forward(tokens, 300, all_logits=rows > 1)
            times[rows].append((time.perf_counter() - start) / reps)
    one = statistics.median(times[1])
    for rows, values in times.items():
        print(f"{rows} token(s) per pass: {1e3 * statistics.median(values):.1f} ms "
              f"({statistics.median(values) / one:.2f}x one token), {model.threads} threads")
    model.reset()
    return 0


def main(argv: list[str] | None = None) -> int:
    import ondevice

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path or alias (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--issues", type=int, default=10, help="issue-extraction complaints (default 10)")
    ap.add_argument("--tool-requests", type=int, default=10, help="tool-call requests (default 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pass-cost", action="store_true",
                    help="only time forward passes of 1, 2, 3, 5 and 9 tokens at position 300 (interleaved, median)")
    args = ap.parse_args(argv)

    model = ondevice.load(args.model, threads=args.threads)
    if args.pass_cost:
        return pass_cost(model)
    per_task: dict[tuple[str, str], dict] = {}
    identical = True
    for name, messages, kwargs in tasks(args.issues, args.tool_requests):
        modes = ["lookup"] if "json_schema" not in kwargs and "tools" not in kwargs else ["grammar", "lookup"]
        speeds: dict[str, list[float]] = {m: [] for m in ["off", *modes]}
        outputs: dict[str, list[int]] = {}
        stats = {}
        for _ in range(args.rounds):
            for mode in speeds:
                "".join(model.generate(messages, temperature=0, speculate=mode, **kwargs))
                s = model.last_stats
                speeds[mode].append(s.decode_tok_s)
                if mode in outputs and outputs[mode] != s.tokens:
                    identical = False
                outputs[mode] = list(s.tokens)
                stats[mode] = s
        plain = statistics.median(speeds["off"])
        for mode in modes:
            same = outputs["off"] == outputs[mode]
            identical &= same
            agg = per_task.setdefault((name, mode), {"ratio": [], "plain": [], "spec": [], "drafted": 0,
                                                     "accepted": 0, "tokens": 0, "passes_plain": 0,
                                                     "passes_spec": 0, "prompts": 0})
            spec = statistics.median(speeds[mode])
            agg["plain"].append(plain)
            agg["spec"].append(spec)
            agg["ratio"].append(spec / plain)
            agg["drafted"] += stats[mode].drafted_tokens
            agg["accepted"] += stats[mode].accepted_tokens
            agg["tokens"] += stats[mode].generated_tokens
            agg["passes_plain"] += stats["off"].forward_passes
            agg["passes_spec"] += stats[mode].forward_passes
            agg["prompts"] += 1
            if not args.json:
                print(f"{name:28s} {mode:7s} off {plain:6.1f} tok/s  on {spec:6.1f} tok/s  x{spec / plain:.2f}  "
                      f"accepted {stats[mode].accepted_tokens}/{stats[mode].drafted_tokens}  "
                      f"{'identical' if same else 'DIFFERENT'}", flush=True)
    summary = []
    for (name, mode), agg in per_task.items():
        summary.append({"task": name, "speculate": mode, "prompts": agg["prompts"], "threads": model.threads,
                        "median_plain_tok_s": round(statistics.median(agg["plain"]), 1),
                        "median_speculative_tok_s": round(statistics.median(agg["spec"]), 1),
                        "median_speedup": round(statistics.median(agg["ratio"]), 2),
                        "min_speedup": round(min(agg["ratio"]), 2), "max_speedup": round(max(agg["ratio"]), 2),
                        "accepted_of_drafted": f"{agg['accepted']}/{agg['drafted']}",
                        "tokens": agg["tokens"], "forward_passes_plain": agg["passes_plain"],
                        "forward_passes_speculative": agg["passes_spec"]})
    if args.json:
        json.dump({"model": model.path, "rounds": args.rounds, "identical": identical, "summary": summary},
                  sys.stdout, indent=2)
        print()
    else:
        for s in summary:
            print(f"{s['task']}, speculate={s['speculate']}: median speedup x{s['median_speedup']} "
                  f"({s['min_speedup']}-{s['max_speedup']}; {s['median_plain_tok_s']} -> "
                  f"{s['median_speculative_tok_s']} tok/s, {s['threads']} threads, {s['prompts']} prompts); accepted "
                  f"{s['accepted_of_drafted']} drafted tokens; forward passes {s['forward_passes_plain']} -> "
                  f"{s['forward_passes_speculative']} for {s['tokens']} tokens")
        print("outputs identical at temperature 0:", identical)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
