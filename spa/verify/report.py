"""``spa report R.json -o report.html``: a prune report (``spa prune --report``/``--json``) as one
self-contained HTML page: no network, no script or style from elsewhere, the charts inline SVG.

The page: the sizes before and after (params, MACs, their factors), the fidelity per output, the
per-layer widths before and after as a bar chart (a transformer's heads, KV heads, head dim and MLP
width; for other models each pruned group's channels), the group table (sortable: a click on a
header sorts by it), and what was measured when it was: the fidelity search's rounds (MACs saved
against fidelity) and the latency table of ``--bench``.  Only the standard library: the report is
data, the page is text.  ``svg_bars`` and ``svg_scatter`` also draw ``spa sweep``'s plot.
"""
from __future__ import annotations

import html
import json

from ..errors import SpaError

PALETTE = ("#9aa5b1", "#1f6feb", "#d1242f", "#1a7f37", "#bf8700", "#8250df")
WIDTH_KEYS = (("num_attention_heads", "heads"), ("num_key_value_heads", "KV heads"), ("head_dim", "head dim"),
              ("intermediate_size", "MLP width"))

_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:right}th{background:#f6f8fa;cursor:pointer}
td.l,th.l{text-align:left}.cards{display:flex;gap:16px;flex-wrap:wrap}.card{border:1px solid #d0d7de;
border-radius:6px;padding:8px 14px}.card b{display:block;font-size:18px}svg{background:#fff}
.muted{color:#656d76}"""

_SCRIPT = """document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',
function(){var t=th.closest('table'),b=t.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th),
d=th.dataset.dir==='a'?'d':'a';th.dataset.dir=d;var rows=Array.prototype.slice.call(b.rows);
rows.sort(function(x,y){var p=x.cells[i].dataset.v||x.cells[i].textContent,q=y.cells[i].dataset.v||y.cells[i].textContent,
m=parseFloat(p),n=parseFloat(q),c=(!isNaN(m)&&!isNaN(n))?m-n:p.localeCompare(q);return d==='a'?c:-c;});
rows.forEach(function(r){b.appendChild(r);});});});document.body.dataset.ready='1';"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(n) -> str:
    n = float(n)
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def svg_bars(title: str, labels: list, series: list, ylabel: str = "", width: int = 760, height: int = 260) -> str:
    """Grouped bars: ``series`` [(name, values)], one bar per series at each label."""
    if not labels or not series:
        return ""
    top = max([float(v) for _, vals in series for v in vals if v is not None] + [1.0])
    left, bottom, pad = 56, 40, 24
    plot_w, plot_h = width - left - pad, height - bottom - pad - 18
    slot = plot_w / len(labels)
    bar = max(min(slot * 0.8 / len(series), 40), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{_e(title)}"><title>{_e(title)}</title>',
           f'<text x="{left}" y="14" font-size="13" font-weight="600">{_e(title)}</text>']
    y0 = pad + 18 + plot_h
    for k in range(5):
        v = top * k / 4
        y = y0 - plot_h * k / 4
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_num(v)}</text>')
    for i, lab in enumerate(labels):
        x0 = left + slot * i + (slot - bar * len(series)) / 2
        for j, (name, vals) in enumerate(series):
            v = vals[i]
            if v is None:
                continue
            h = plot_h * float(v) / top
            out.append(f'<rect x="{x0 + j * bar:.1f}" y="{y0 - h:.1f}" width="{bar * 0.95:.1f}" height="{h:.1f}" '
                       f'fill="{PALETTE[j % len(PALETTE)]}"><title>{_e(lab)} {_e(name)}: {_e(v)}</title></rect>')
        if len(labels) <= 40 or i % max(len(labels) // 40, 1) == 0:
            out.append(f'<text x="{left + slot * (i + 0.5):.1f}" y="{y0 + 14}" font-size="10" '
                       f'text-anchor="middle">{_e(lab)}</text>')
    for j, (name, _) in enumerate(series):
        out.append(f'<rect x="{left + 120 * j}" y="{height - 14}" width="10" height="10" '
                   f'fill="{PALETTE[j % len(PALETTE)]}"/><text x="{left + 120 * j + 14}" y="{height - 5}" '
                   f'font-size="11">{_e(name)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{pad + 18 + plot_h / 2:.0f}" font-size="11" transform="rotate(-90 12 '
                   f'{pad + 18 + plot_h / 2:.0f})" text-anchor="middle">{_e(ylabel)}</text>')
    return "".join(out) + "</svg>"


def svg_scatter(title: str, series: list, xlabel: str, ylabel: str, width: int = 640, height: int = 360) -> str:
    """Points ``series`` [(name, [(x, y, label)], joined)]: a joined series is drawn as a line (a Pareto front)."""
    pts = [(float(x), float(y)) for _, ps, _ in series for x, y, _ in ps]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1e-3)
    left, bottom, pad = 64, 44, 20
    pw, ph = width - left - pad, height - bottom - pad - 18

    def at(x, y):
        return left + pw * (x - x_lo) / (x_hi - x_lo), pad + 18 + ph * (1 - (y - y_lo) / (y_hi - y_lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{_e(title)}"><title>{_e(title)}</title>',
           f'<text x="{left}" y="14" font-size="13" font-weight="600">{_e(title)}</text>',
           f'<rect x="{left}" y="{pad + 18}" width="{pw}" height="{ph}" fill="none" stroke="#d0d7de"/>']
    for k in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * k / 4, y_lo + (y_hi - y_lo) * k / 4
        x, _ = at(xv, y_lo)
        _, y = at(x_lo, yv)
        out.append(f'<text x="{x:.1f}" y="{pad + 18 + ph + 14}" font-size="10" text-anchor="middle">{xv:.3g}</text>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{yv:.4g}</text>')
    for j, (name, ps, joined) in enumerate(series):
        colour = PALETTE[(j + 1) % len(PALETTE)]
        if joined and len(ps) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y, _ in sorted(ps)))
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y, lab in ps:
            cx, cy = at(x, y)
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{colour}"><title>{_e(lab)}: '
                       f'{x:.4g}, {y:.4g}</title></circle>')
        out.append(f'<rect x="{left + 150 * j}" y="{height - 14}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{left + 150 * j + 14}" y="{height - 5}" font-size="11">{_e(name)}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 20}" font-size="11" text-anchor="middle">{_e(xlabel)}</text>'
               f'<text x="14" y="{pad + 18 + ph / 2:.0f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {pad + 18 + ph / 2:.0f})">{_e(ylabel)}</text>')
    return "".join(out) + "</svg>"


def table(headers: list, rows: list, sortable: bool = True) -> str:
    """An HTML table; a cell is a value or ``(shown, sort key)``; text columns are left-aligned."""
    def cell(tag, v):
        shown, key = v if isinstance(v, tuple) else (v, None)
        cls = "" if isinstance(shown, (int, float)) or key is not None else ' class="l"'
        data = f' data-v="{_e(key)}"' if key is not None else ""
        return f"<{tag}{cls}{data}>{_e(shown)}</{tag}>"
    head = "".join(f'<th class="l">{_e(h)}</th>' if i == 0 else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in rows)
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str) -> str:
    """A complete self-contained page (the sorting script inline)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}<script>{_SCRIPT}</script></body></html>\n")


def width_charts(report: dict) -> str:
    """Per-layer widths before and after: a transformer's config numbers, else each pruned group."""
    layers = report.get("layers") or []
    charts = []
    for key, name in WIDTH_KEYS:
        have = [e for e in layers if key in e]
        if have:
            charts.append(svg_bars(f"{name} per layer", [str(e["layer"]) for e in have],
                                   [("before", [e[key][0] for e in have]), ("after", [e[key][1] for e in have])],
                                   name, width=min(760, 200 + 40 * len(have)), height=220))
    if not charts:
        groups = [g for g in report.get("groups", []) if g.get("prunable")]
        if groups:
            charts.append(svg_bars("channels per prunable group", [str(g["id"]) for g in groups],
                                   [("before", [g["channels"] for g in groups]),
                                    ("after", [g.get("kept", g["channels"]) for g in groups])], "channels"))
    return '<div class="cards">' + "".join(f"<div>{c}</div>" for c in charts) + "</div>"


def render(report: dict) -> str:
    """The HTML page of one prune report."""
    if not isinstance(report, dict) or not isinstance(report.get("groups"), list) or "before" not in report:
        raise SpaError("spa report: not a prune report (the JSON of spa prune --report or --json: "
                       "'before', 'after' and 'groups')")
    b, a = report["before"], report.get("after", report["before"])
    what = report.get("target") or (f"ratio {report['ratio']}" if report.get("ratio") is not None else "")
    cards = [("params", f"{_num(b['params'])} → {_num(a['params'])}", f"{b['params'] / max(a['params'], 1):.2f}x"),
             ("MACs", f"{_num(b['macs'])} → {_num(a['macs'])}", f"{b['macs'] / max(a['macs'], 1):.2f}x")]
    fid = report.get("fidelity") or {}
    if "min" in fid:
        cards.append(("fidelity", f"{fid['min']:.4f}", fid.get("inputs", "")))
    body = [f"<h1>spa prune report: {_e(report.get('output', ''))}</h1>",
            f'<p class="muted">criterion {_e(report.get("criterion"))}, {_e(what)}, '
            f'{_e(report.get("seconds", "?"))} s</p>',
            '<div class="cards">' + "".join(f'<div class="card">{_e(k)}<b>{_e(v)}</b>'
                                            f'<span class="muted">{_e(n)}</span></div>' for k, v, n in cards) + "</div>"]
    if fid.get("cosine"):
        rows = [[out, fid["cosine"][out], (fid.get("agreement") or {}).get(out, ""),
                 (fid.get("metric") or {}).get(out, "cosine")] for out in fid["cosine"]]
        body += ["<h2>Fidelity</h2>", table(["output", "cosine", "agreement", "metric"], rows, sortable=False)]
    elif fid.get("skipped"):
        body += ["<h2>Fidelity</h2>", f"<p>{_e(fid['skipped'])}</p>"]
    body += ["<h2>Widths before and after</h2>", width_charts(report) or "<p>nothing was pruned</p>"]
    rows = []
    for g in report["groups"]:
        ch, kept = g.get("channels", 0), g.get("kept", g.get("channels", 0))
        status = "approximate" if g.get("approximate") else "prunable" if g.get("prunable") else "blocked"
        rows.append([g["id"], ch, kept, ch - kept, round(100.0 * (ch - kept) / max(ch, 1), 1),
                     (_num(g.get("params", 0)), g.get("params", 0)), (_num(g.get("macs", 0)), g.get("macs", 0)),
                     status, ", ".join(g.get("ops", [])), g.get("reason", "")])
    body += [f"<h2>Groups ({len(rows)})</h2>",
             table(["id", "channels", "kept", "removed", "removed %", "params", "MACs", "status", "ops", "reason"],
                   rows)]
    rounds = (report.get("plan") or {}).get("rounds")
    if rounds:
        body += ["<h2>Fidelity search</h2>", svg_scatter(
            "measured fidelity against MACs removed",
            [("rounds", [(r["macs_saved"], r["fidelity"], f"round {i}") for i, r in enumerate(rounds)], False)],
            "MACs removed", "fidelity")]
    lat = (report.get("plan") or {}).get("latency")
    if lat:
        body += ["<h2>Latency target</h2>",
                 f"<p>measured {lat['measured_speedup']:.3f}x on {_e(lat['device'])} (predicted "
                 f"{lat['predicted_speedup']:.3f}x); {lat['table']['measured']} operator timings made, "
                 f"{lat['table']['reused']} from the cache</p>",
                 table(["round", "planned for", "original ms", "pruned ms", "measured"],
                       [[i + 1, r["goal"], r["original_ms"], r["pruned_ms"], r["speedup"]]
                        for i, r in enumerate(lat["rounds"])], sortable=False),
                 svg_scatter("predicted model time with one group cut (the groups that save most)",
                             [(f"group {gid}", [(k, ms, f"{k} kept") for k, ms in pts], True)
                              for gid, pts in list(lat.get("groups", {}).items())[:6]],
                             "channels kept", "predicted ms", width=960)]
    bench = report.get("bench")
    if bench and bench.get("results"):
        keys = [k for k in ("model", "provider", "batch", "median_ms", "speedup") if k in bench["results"][0]]
        body += ["<h2>Latency</h2>", table(keys, [[r.get(k, "") for k in keys] for r in bench["results"]])]
    return page(f"spa report {report.get('output', '')}", "".join(body))


#: a report bigger than this is not one spa wrote (a big model's report is a few MB)
MAX_REPORT_BYTES = 256 << 20


def read_report(path, what: str = "REPORT"):
    """The JSON of a report file, or a one-line SpaError."""
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise SpaError(f"{what} {p}: no such file" if not p.exists() else f"{what} {p}: not a regular file")
    if p.stat().st_size > MAX_REPORT_BYTES:
        raise SpaError(f"{what} {p}: over {MAX_REPORT_BYTES >> 20} MiB, not a report spa wrote")
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SpaError(f"{what} {p}: not a JSON file ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None


def write_report(json_path, output, *, inputs=()) -> str:
    """Read a prune report (JSON) and write its page to ``output`` (the safe writer)."""
    from ..io import write_text
    report = read_report(json_path)
    write_text(output, render(report), inputs=[json_path, *inputs], what="spa report")
    return str(output)
