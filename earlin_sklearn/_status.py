"""The operator's status page (``GET /status``): the fleet's acceptance over time, alarms, throughput and latency.

Server-rendered HTML with inline SVG plots: no script, no external file, no
plotting library on the server (the page sends ``Content-Security-Policy:
default-src 'none'``). What it shows comes from the drift monitor (the edge
reports, ``_drift.py``) and the request log (``_metrics.RequestLog``).
Device ids are restricted to ``[A-Za-z0-9._:@-]`` by the report route and
escaped here all the same.
"""

import html
import math
import time

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
PLOTTED_DEVICES = 8
LISTED_DEVICES = 200


def svg_chart(title, series, y_label, x_label="seconds (0 = now)", x_range=None, y_range=None, guide=None,
              width=390, height=230):
    """A line chart as an SVG element: ``series`` is ``{name: [(x, y), ...]}`` (NaN ``y`` breaks a line).

    ``guide``: ``(y, label)`` of a dashed horizontal line (the target rate).
    """
    left, right, top, bottom = 50, 62, 28, 36  # the legend sits right of the plot
    points = [(x, y) for values in series.values() for x, y in values if math.isfinite(y)]
    xs = [x for values in series.values() for x, _ in values]
    x0, x1 = x_range if x_range is not None else ((min(xs), max(xs)) if xs else (0.0, 1.0))
    if y_range is not None:
        y0, y1 = y_range
    else:
        ys = [y for _, y in points] + ([guide[0]] if guide else [])
        y0, y1 = (min(0.0, min(ys)), max(ys) * 1.1) if ys else (0.0, 1.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" class="title">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'class="frame"/>']
    for i in range(5):  # y ticks
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" class="tick" text-anchor="end">{y:.3g}</text>')
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>')
    for i in range(5):  # x ticks
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 14}" class="tick" text-anchor="middle">'
                     f'{x:.0f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" class="tick" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{(top + height - bottom) / 2}" class="tick" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{html.escape(y_label)}</text>')
    if guide is not None:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(guide[0]):.1f}" y2="{py(guide[0]):.1f}" '
                     f'class="guide"><title>{html.escape(guide[1])}</title></line>')
    for k, (name, values) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        runs, run = [], []
        for x, y in values:
            if math.isfinite(y):
                run.append(f"{px(x):.1f},{py(min(max(y, y0), y1)):.1f}")
            elif run:
                runs.append(run)
                run = []
        runs.append(run)
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
            elif run:
                parts.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        parts.append(f'<text x="{width - right + 6}" y="{top + 10 + 13 * k}" class="legend" '
                     f'fill="{colour}">{html.escape(str(name))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ago(seconds):
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def render_status(version, monitor, log, routes=("/v1/activations", "/v1/raw"), now=None, span=600.0):
    """The status page's HTML from the drift ``monitor`` and the request ``log``."""
    now = time.time() if now is None else now
    rows = []
    for device, timeline in monitor.timeline.items():
        seen, accepted = monitor.totals[device]
        recent = [(t, s, a) for t, s, a in timeline if now - t <= span]
        alarms = sum(1 for _, d, scope, _, _ in monitor.alarm_log if d == device and scope != "fleet")
        rows.append((device, seen, accepted, accepted / seen if seen else float("nan"), timeline[-1][0], alarms,
                     recent))
    # plotted: devices with alarms first, then the lowest acceptance
    rows.sort(key=lambda r: (-r[5], r[3] if math.isfinite(r[3]) else 2.0, r[0]))
    plotted = {f"{r[0]}": [(t - now, a / s if s else float("nan")) for t, s, a in r[6]] for r in rows[:PLOTTED_DEVICES]}
    target = monitor.rate
    acceptance = svg_chart("Acceptance per report (edge devices)", plotted, "accepted / seen",
                           x_range=(-span, 0.0), y_range=(0.0, 1.0), guide=(target, f"target TPR {target:.3f}"))
    binned = log.binned(now, span, routes=set(routes))
    throughput = svg_chart("Throughput (inference requests)", {"req/s": [(t, r) for t, r, _, _ in binned]},
                           "requests / s", x_range=(-span, 0.0))
    latency = svg_chart("Latency (inference requests)", {"p50": [(t, p) for t, _, p, _ in binned],
                                                          "p99": [(t, p) for t, _, _, p in binned]}, "ms",
                        x_range=(-span, 0.0))
    fleet = monitor.fleet_rate()
    alarms = list(monitor.alarm_log)[::-1][:20]
    # a fleet alarm is the fleet's (its last reports pooled), raised on a report from the device named
    alarm_rows = "".join(
        f"<tr><td>{_ago(now - t)}</td><td>{'the fleet, on a report from ' if scope == 'fleet' else ''}"
        f"{html.escape(d)}</td><td>{html.escape(scope)}</td><td>{a} of {s}</td>"
        f"<td>{target * s:.0f}</td></tr>" for t, d, scope, s, a in alarms) or \
        '<tr><td colspan="5">no alarm raised</td></tr>'
    device_rows = "".join(
        f'<tr class="{"alarm" if n_alarms else ""}"><td>{html.escape(d)}</td><td>{s}</td><td>{a}</td>'
        f"<td>{100 * rate:.1f}%</td><td>{_ago(now - last)}</td><td>{n_alarms}</td></tr>"
        for d, s, a, rate, last, n_alarms, _ in rows[:LISTED_DEVICES]) or \
        '<tr><td colspan="6">no device has reported yet</td></tr>'
    more = f"<p>{len(rows) - LISTED_DEVICES} more devices not listed.</p>" if len(rows) > LISTED_DEVICES else ""
    fleet_text = "no reports yet" if not math.isfinite(fleet) else f"{100 * fleet:.1f}%"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>earlin cloud status</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 17px; margin: 22px 0 6px; }}
.summary span {{ display: inline-block; margin-right: 22px; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.chart {{ background: #fff; border: 1px solid #ddd; }}
.chart .title {{ font-size: 13px; font-weight: 600; }} .chart .tick {{ font-size: 10px; fill: #555; }}
.chart .legend {{ font-size: 11px; }} .chart .frame {{ fill: none; stroke: #bbb; }}
.chart .grid {{ stroke: #eee; }} .chart .guide {{ stroke: #555; stroke-dasharray: 5 4; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border-bottom: 1px solid #e4e4e4; padding: 3px 10px; text-align: left; }}
tr.alarm td {{ background: #fde8e8; }}
</style></head>
<body>
<h1>earlin cloud status</h1>
<p class="summary"><span>split version <code>{html.escape(version[:16])}</code></span>
<span>devices reporting: <b>{len(rows)}</b></span>
<span>fleet acceptance (last {monitor.window} reports): <b>{fleet_text}</b></span>
<span>target TPR: <b>{100 * target:.1f}%</b></span>
<span>alarms: <b>{sum(monitor.alarms.values())}</b></span></p>
<div class="charts">{acceptance}{throughput}{latency}</div>
<h2>Latest alarms</h2>
<table><tr><th>when</th><th>device</th><th>test</th><th>accepted</th><th>expected</th></tr>{alarm_rows}</table>
<h2>Devices</h2>
<table><tr><th>device</th><th>seen</th><th>accepted</th><th>rate</th><th>last report</th><th>alarms</th></tr>
{device_rows}</table>{more}
<p>Rendered {time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))} UTC; the last {span / 60:.0f} minutes.
The figures are this server process's.</p>
</body></html>
"""
