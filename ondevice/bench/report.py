"""`ondevice bench report`: the stored measurements as tables (markdown, HTML, CSV, JSON) and PNG charts
(decode and prefill speed per backend and quantization, peak RSS against decode speed, devices side by side,
KL divergence per quantization). Speed and quality share one table per device.

The latest measurement of each configuration is shown (a configuration = device, backend, model, quantization,
threads, prompt and generation lengths); the store keeps every measurement.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondevice.errors import MissingExtraError, OndeviceError

SPEED_KEY = ("device_id", "backend", "model", "quant", "threads", "prompt_tokens", "gen_tokens")
QUALITY_KEY = ("model", "quant", "backend", "reference")


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class DeviceSection:
    device_id: str
    label: str
    facts: str
    tables: list[Table] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)  # latest ok/interrupted rows, for the charts


@dataclass
class Report:
    filters: dict[str, str | None]
    devices: list[dict[str, Any]]
    sections: list[DeviceSection]
    quality: list[dict[str, Any]]
    rows: list[dict[str, Any]]  # every matching measurement (for csv/json)
    charts: dict[str, str] = field(default_factory=dict)  # title -> file name


def _latest(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """The newest row per key, preferring a successful one over a later failure of the same configuration."""
    best: dict[tuple, dict[str, Any]] = {}
    for row in rows:  # rows come oldest first
        k = tuple(row.get(c) for c in key)
        old = best.get(k)
        if old is None or row["status"] == "ok" or old["status"] != "ok":
            best[k] = row
    return list(best.values())


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _spread(row: dict[str, Any], column: str, digits: int = 1) -> str:
    mid, low, high = row.get(column), row.get(f"{column}_min"), row.get(f"{column}_max")
    if mid is None:
        return "–"
    if low is None or high is None or row.get("repeats", 1) <= 1:
        return _num(mid, digits)
    return f"{_num(mid, digits)} ({_num(low, digits)}–{_num(high, digits)})"


def _sort_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row.get("quant") or "", row["backend"], row.get("threads") or 0,
            row.get("prompt_tokens") or 0, row.get("gen_tokens") or 0)


def _quality_for(quality: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """The quality measurement of the same model and quantization, from the same backend if there is one."""
    same = [q for q in quality if q["model"] == row["model"] and q.get("quant") == row.get("quant")]
    if not same:
        return None
    own = [q for q in same if q["backend"] == row["backend"]]
    return (own or same)[-1]


def _device_facts(device: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    hw = device["hardware"]
    bandwidth = next((r["environment"].get("mem_read_gbs") for r in reversed(rows)
                      if isinstance(r.get("environment"), dict) and r["environment"].get("mem_read_gbs")), None)
    parts = [f"{hw.get('arch', '?')}", f"{hw.get('cores_physical', '?')} cores ({hw.get('cores_logical', '?')} logical)",
             f"{hw.get('ram_gib', '?')} GiB RAM"]
    if hw.get("simd"):
        parts.append("SIMD " + " ".join(hw["simd"]))
    if bandwidth:
        parts.append(f"memory read {bandwidth:.1f} GB/s (measured)")
    env = next((r["environment"] for r in reversed(rows) if isinstance(r.get("environment"), dict)), {})
    if env.get("os"):
        parts.append(f"{env['os']}, Python {env.get('python', '?')}")
    return "; ".join(parts)


def build_report(store: Any, *, device: str | None = None, model: str | None = None) -> Report:
    rows = store.measurements(device=device, model=model)
    if not rows:
        raise OndeviceError("no measurements match" + (f" (device {device!r})" if device else "")
                            + (f" (model {model!r})" if model else "") + "; run `ondevice bench` first")
    quality = _latest([r for r in rows if r["kind"] == "quality" and r["status"] == "ok"], QUALITY_KEY)
    speed_rows = [r for r in rows if r["kind"] == "speed"]
    devices = [d for d in store.devices() if any(r["device_id"] == d["device_id"] for r in rows)]
    sections = []
    for dev in devices:
        mine = [r for r in speed_rows if r["device_id"] == dev["device_id"]]
        latest = sorted(_latest(mine, SPEED_KEY), key=_sort_key)
        overhead = _latest([r for r in latest if r["backend"] == "null" and r.get("decode_tok_s")],
                           ("threads", "prompt_tokens", "gen_tokens"))
        latest = [r for r in latest if r["backend"] != "null"]  # the harness measuring itself, shown apart
        measured = [r for r in latest if r["status"] in ("ok", "interrupted") and r.get("decode_tok_s") is not None]
        failed = [r for r in latest if r not in measured]
        section = DeviceSection(dev["device_id"], dev["label"], _device_facts(dev, mine), speed=measured)
        if measured:
            headers = ["model", "quant", "backend", "threads", "prompt", "gen", "size MB", "load s", "TTFT ms",
                       "prefill tok/s", "decode tok/s", "peak RSS MiB", "RSS growth MiB", "KL", "top-1", "PPL"]
            table_rows = []
            for r in measured:
                q = _quality_for(quality, r)
                table_rows.append([
                    r["model"], r.get("quant") or "", r["backend"] + (" (interrupted)" if r["status"] != "ok" else ""),
                    str(r["threads"]), str(r["prompt_tokens"]), str(r["gen_tokens"]),
                    _num((r.get("artifact_size_bytes") or 0) / 1e6), _num(r.get("load_s"), 2),
                    _spread(r, "ttft_ms", 0), _spread(r, "prefill_tok_s"), _spread(r, "decode_tok_s"),
                    _num(r.get("peak_rss_mib"), 0), _num(r.get("rss_growth_mib"), 0),
                    f"{q['kl_mean']:.4f}" if q else "–", f"{q['top1_agreement']:.1%}" if q else "–",
                    _num(q["perplexity"], 2) if q else "–"])
            section.tables.append(Table("Speed and memory", headers, table_rows,
                                        "median (min–max) over the repeats; KL, top-1 and PPL from `ondevice eval` "
                                        "of the same model and quantization"))
        if overhead:
            section.tables.append(Table("Harness overhead (null backend)", ["threads", "prompt", "gen",
                                                                            "µs per token", "µs per prompt"], [
                [str(r["threads"]), str(r["prompt_tokens"]), str(r["gen_tokens"]), _num(1e6 / r["decode_tok_s"], 2),
                 _num((r.get("ttft_ms") or 0) * 1000, 1)] for r in overhead],
                "what the timing loop itself costs: an empty backend whose tokens are available instantly"))
        if failed:
            section.tables.append(Table("Not measured", ["backend", "model", "quant", "status", "reason"], [
                [r["backend"], r["model"], r.get("quant") or "", r["status"], r.get("error") or ""] for r in failed]))
        sections.append(section)
    return Report({"device": device, "model": model}, devices, sections, sorted(quality, key=_sort_key), rows)


def quality_table(report: Report) -> Table | None:
    if not report.quality:
        return None
    return Table("Quality (ondevice eval)", ["model", "quant", "backend", "reference", "tokens", "PPL", "ref PPL",
                                             "KL mean", "KL max", "top-1"], [
        [q["model"], q.get("quant") or "", q["backend"], q.get("reference") or "", str(q.get("eval_tokens")),
         _num(q.get("perplexity"), 3), _num(q.get("ref_perplexity"), 3), f"{q['kl_mean']:.5f}",
         f"{q['kl_max']:.4f}", f"{q['top1_agreement']:.1%}"] for q in report.quality],
        "KL(reference || artifact) in nats per token, on the bundled public-domain text")


# ---------------------------------------------------------------------- renderers
def _md_table(table: Table, level: int = 3) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = [f"{'#' * level} {table.title}", ""]
    lines.append("| " + " | ".join(table.headers) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(table.headers))) + "|")
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"*{table.note}*"]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    out = ["# ondevice benchmark report", ""]
    filters = ", ".join(f"{k} ~ {v!r}" for k, v in report.filters.items() if v)
    out.append(f"{len(report.rows)} measurements on {len(report.devices)} device(s)"
               + (f" (filtered: {filters})" if filters else "") + ".")
    if report.charts:
        out += ["", "## Charts", ""]
        out += [f"![{title}]({name})" for title, name in report.charts.items()]
    for section in report.sections:
        out += ["", f"## {section.label}", "", f"device `{section.device_id}`: {section.facts}"]
        for table in section.tables:
            out += ["", _md_table(table)]
    quality = quality_table(report)
    if quality:
        out += ["", _md_table(quality, level=2)]
    return "\n".join(out) + "\n"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    note = f"<p class=note>{html.escape(table.note)}</p>" if table.note else ""
    return f"<h3>{html.escape(table.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def render_html(report: Report) -> str:
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(-n+3),"
             "th{text-align:left}th{background:#f3f3f3}.note{color:#666;font-size:13px}img{max-width:48%;margin:4px}")
    parts = [f"<!doctype html><meta charset=utf-8><title>ondevice benchmark report</title><style>{style}</style>",
             "<h1>ondevice benchmark report</h1>",
             f"<p>{len(report.rows)} measurements on {len(report.devices)} device(s).</p>"]
    if report.charts:
        parts.append("<h2>Charts</h2>" + "".join(f'<img src="{html.escape(name)}" alt="{html.escape(title)}">'
                                                 for title, name in report.charts.items()))
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.label)}</h2><p>device <code>{section.device_id}</code>: "
                     f"{html.escape(section.facts)}</p>")
        parts += [_html_table(t) for t in section.tables]
    quality = quality_table(report)
    if quality:
        parts.append(_html_table(quality).replace("<h3>", "<h2>").replace("</h3>", "</h2>"))
    return "\n".join(parts) + "\n"


FLAT_COLUMNS = ("recorded_at", "device_id", "device_label", "kind", "status", "backend", "backend_version", "model",
                "quant", "artifact_kind", "artifact_size_bytes", "threads", "prompt_tokens", "gen_tokens", "repeats",
                "load_s", "ttft_ms", "ttft_ms_min", "ttft_ms_max", "prefill_tok_s", "prefill_tok_s_min",
                "prefill_tok_s_max", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "peak_rss_mib",
                "baseline_rss_mib", "rss_growth_mib", "reference", "eval_tokens", "perplexity", "ref_perplexity",
                "kl_mean", "kl_max", "top1_agreement", "error", "artifact", "uid")


def render_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(FLAT_COLUMNS)
    for row in report.rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in FLAT_COLUMNS])
    return buf.getvalue()


def render_json(report: Report) -> str:
    return json.dumps({"filters": report.filters, "devices": report.devices, "measurements": report.rows,
                       "charts": report.charts}, indent=2, default=str) + "\n"


RENDERERS = {"md": render_markdown, "html": render_html, "csv": render_csv, "json": render_json}


# ---------------------------------------------------------------------- charts
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("charts need matplotlib: pip install 'ondevice[bench]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _group_label(row: dict[str, Any], varying: list[str]) -> str:
    names = {"model": "{}", "quant": "{}", "threads": "{} thr", "prompt_tokens": "p{}", "gen_tokens": "g{}"}
    return "\n".join(names[c].format(row[c]) for c in varying) or row["quant"]


def _varying(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    out = [c for c in columns if len({r.get(c) for r in rows}) > 1]
    return out or ["quant"]


# One colour per backend in every chart, so a reader matches bars and points at a glance.
BACKEND_COLORS = {"ondevice": "tab:blue", "llama.cpp": "tab:orange", "mlx": "tab:green", "onnxruntime": "tab:red",
                  "onnxruntime-plain": "tab:pink", "executorch": "tab:purple", "coreml": "tab:brown",
                  "coreml-interpreter": "tab:olive", "transformers": "tab:gray"}
BACKEND_ORDER = list(BACKEND_COLORS)


def _backend_key(name: str) -> tuple[int, str]:
    return (BACKEND_ORDER.index(name) if name in BACKEND_ORDER else len(BACKEND_ORDER), name)


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, dict[str, Any]], ylabel: str, title: str) -> None:
    """Bars per group and series; a value is a number or (median, min, max), drawn with a min-max whisker."""
    import numpy as np

    def parts(value: Any) -> tuple[float, float, float]:
        mid, low, high = value if isinstance(value, tuple) else (value, value, value)
        if mid is None:
            return np.nan, np.nan, np.nan
        mid = float(mid)
        return mid, float(low if low is not None else mid), float(high if high is not None else mid)

    names = list(series)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        triples = np.array([parts(series[name].get(g)) for g in groups]).reshape(len(groups), 3)
        values = triples[:, 0]
        whiskers = np.nan_to_num(np.stack([values - triples[:, 1], triples[:, 2] - values]))
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name, yerr=whiskers,
                      color=BACKEND_COLORS.get(name), error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#444"})
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    top = np.nanmax([np.nanmax([parts(v)[2] for v in s.values()] or [np.nan]) for s in series.values()] or [1.0])
    ax.set_ylim(0, (top if np.isfinite(top) and top > 0 else 1.0) * 1.3)  # headroom: the legend sits above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=min(3, max(1, len(names))))


def make_charts(report: Report, out_dir: Path) -> dict[str, str]:
    """Write the PNG charts into out_dir; returns {title: file name}."""
    plt = _pyplot()
    charts: dict[str, str] = {}
    for section in report.sections:
        rows = section.speed
        if not rows:
            continue
        suffix = "" if len(report.sections) == 1 else f"-{section.device_id[:8]}"
        varying = _varying(rows, ("model", "quant", "threads", "prompt_tokens", "gen_tokens"))
        ordered = sorted(rows, key=lambda r: _backend_key(r["backend"]))
        groups = list(dict.fromkeys(_group_label(r, varying) for r in ordered))
        fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(groups) + 4), 4.5))
        for ax, column, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
            series: dict[str, dict[str, Any]] = defaultdict(dict)
            for r in ordered:
                series[r["backend"]][_group_label(r, varying)] = (r[column], r.get(f"{column}_min"),
                                                                  r.get(f"{column}_max"))
            _grouped_bars(ax, groups, series, "tokens/s (median; whiskers: min-max)",
                          f"{title} speed, higher is better")
        fig.suptitle(section.label, fontsize=10)
        fig.tight_layout()
        name = f"speed{suffix}.png"
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        charts[f"Decode and prefill speed, {section.label}"] = name

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for backend in sorted({r["backend"] for r in rows}, key=_backend_key):
            mine = [r for r in rows if r["backend"] == backend and r.get("peak_rss_mib") and r.get("decode_tok_s")]
            ax.scatter([r["peak_rss_mib"] for r in mine], [r["decode_tok_s"] for r in mine], label=backend, s=40,
                       color=BACKEND_COLORS.get(backend))
            for r in mine:
                ax.annotate(f"{r['quant']} t{r['threads']}", (r["peak_rss_mib"], r["decode_tok_s"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.set_xlim(left=0, right=max(r["peak_rss_mib"] for r in rows if r.get("peak_rss_mib")) * 1.2)
        ax.set_ylim(bottom=0)  # from zero: distances on the chart stay proportional to the numbers
        ax.set_xlabel("peak RSS (MiB), lower is better")
        ax.set_ylabel("decode tokens/s, higher is better")
        ax.set_title("memory against speed", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle(section.label, fontsize=10)
        fig.tight_layout()
        name = f"rss_vs_speed{suffix}.png"
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        charts[f"Peak RSS against decode speed, {section.label}"] = name

    if len([s for s in report.sections if s.speed]) > 1:
        rows = [r for s in report.sections for r in s.speed]
        varying = _varying(rows, ("model", "quant", "threads", "prompt_tokens", "gen_tokens"))
        series = defaultdict(dict)
        labels = {}
        for s in report.sections:
            for r in s.speed:
                group = f"{r['backend']}\n" + _group_label(r, varying)
                labels[group] = None
                series[s.label][group] = r["decode_tok_s"]
        fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(labels) + 3), 4.5))
        _grouped_bars(ax, list(labels), series, "decode tokens/s (median)", "devices side by side")
        fig.tight_layout()
        fig.savefig(out_dir / "devices.png", dpi=120)
        plt.close(fig)
        charts["Devices side by side (decode)"] = "devices.png"

    if report.quality:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(report.quality) + 3), 4))
        labels = [f"{q['quant']}\n{q['backend']}" for q in report.quality]
        bars = ax.bar(range(len(labels)), [q["kl_mean"] for q in report.quality],
                      color=[BACKEND_COLORS.get(q["backend"], "tab:gray") for q in report.quality])
        ax.bar_label(bars, labels=[f"{q['kl_mean']:.4f}\ntop-1 {q['top1_agreement']:.0%}" for q in report.quality],
                     fontsize=7)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("KL divergence from reference (nats/token)")
        ax.margins(y=0.15)
        ax.set_title("quality lost to quantization, lower is better", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "quality.png", dpi=120)
        plt.close(fig)
        charts["KL divergence per quantization"] = "quality.png"
    return charts


def write_report(report: Report, fmt: str, out_dir: Path | None, charts: bool = True) -> tuple[str, list[Path]]:
    """Render the report; with out_dir, write report.<fmt> (and the charts for md/html) there. Returns the text
    and the files written."""
    if fmt not in RENDERERS:
        raise OndeviceError(f"unknown report format {fmt!r}; choose from {', '.join(RENDERERS)}")
    written: list[Path] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if charts and fmt in ("md", "html", "json"):
            report.charts = make_charts(report, out_dir)
            written += [out_dir / name for name in report.charts.values()]
    text = RENDERERS[fmt](report)
    if out_dir is not None:
        path = out_dir / f"report.{fmt}"
        path.write_text(text, encoding="utf-8")
        written.insert(0, path)
    return text, written
