#!/usr/bin/env python3
"""Runs the benchmarks and writes their ratios as a Markdown table and an
SVG bar chart.

    python3 scripts/bench-report.py            # writes docs/bench/report.md and ratios.svg
    DSYNC_BENCH_SECS=5 python3 scripts/bench-report.py

Every figure is a ratio to the baseline measured side by side in the same
run, oriented so that above 1 means tower-dsync does better:

- cycle: the uncontended lock + unlock against the raw redis-rs floor
  (cycles/s, and the floor's p50 and p99 over ours);
- contention: 8 contenders on one name against rslock (acquisitions/s,
  rslock's wait p99 over ours, rslock's commands per acquisition over ours);
- http: an axum server with the layer over Redis against the bare server
  (requests/s, p50, p99);
- idempotency: an IdempotencyLayer's replay against a handler run, on one
  Redis node and in process (requests/s, p50, p99);
- layer: the time the layer over MemorySync adds per request, from
  criterion's estimates (in ns, not a ratio; shown in the table only).

Needs only Python 3 and cargo; redis-server must be installed (the benches
start their own servers on loopback ports).
"""

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"


def run_benches(csv_path: Path) -> None:
    if csv_path.exists():
        csv_path.unlink()
    env = dict(os.environ, DSYNC_BENCH_CSV=str(csv_path))
    for bench in ["cycle", "contention", "http", "idempotency", "layer"]:
        print(f"== cargo bench --all-features --bench {bench}", file=sys.stderr, flush=True)
        subprocess.run(["cargo", "bench", "--all-features", "--bench", bench], cwd=ROOT, env=env, check=True)


def layer_overhead_ns() -> float | None:
    """The layer's added time per request, from criterion's estimates (the
    slope, which criterion prints as the time per iteration)."""
    group = ROOT / "target" / "criterion" / "request through a no-op handler"
    medians = {}
    for name in ["bare service", "DistLockLayer over MemorySync"]:
        estimates = group / name / "new" / "estimates.json"
        if not estimates.exists():
            return None
        data = json.loads(estimates.read_text())
        medians[name] = (data.get("slope") or data["mean"])["point_estimate"]
    return medians["DistLockLayer over MemorySync"] - medians["bare service"]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    version = next((w.split("=")[1] for w in redis.split() if w.startswith("v=")), "?")
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, redis-server {version}"


def svg_chart(rows: list[list[str]]) -> str:
    """Horizontal bars of the first ratio of every row, with a line at 1."""
    bar_h, gap, label_w, plot_w = 18, 6, 430, 360
    top = 40
    height = top + len(rows) * (bar_h + gap) + 40
    width = label_w + plot_w + 80
    high = max(2.0, max(float(r[3]) for r in rows) * 1.1)
    scale = plot_w / high
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<text x="10" y="20" font-size="14">Throughput against the baseline of the same run '
        "(cycle: the raw floor; contention: rslock; http: bare axum, an rslock middleware). Above 1 is better.</text>",
    ]
    for i, (bench, case, library, first, *_rest) in enumerate(rows):
        y = top + i * (bar_h + gap)
        value = float(first)
        colour = "#2b8a3e" if value >= 1.0 else "#c92a2a" if value < 0.9 else "#e67700"
        label = f"{bench}: {case}, {library}"
        out.append(f'<text x="{label_w - 8}" y="{y + 13}" text-anchor="end">{escape(label)}</text>')
        out.append(
            f'<rect x="{label_w}" y="{y}" width="{value * scale:.1f}" height="{bar_h}" fill="{colour}"/>'
        )
        out.append(f'<text x="{label_w + value * scale + 4:.1f}" y="{y + 13}">{value:.2f}</text>')
    one = label_w + scale
    bottom = top + len(rows) * (bar_h + gap)
    out.append(f'<line x1="{one:.1f}" y1="{top - 6}" x2="{one:.1f}" y2="{bottom}" stroke="black" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{one:.1f}" y="{bottom + 16}" text-anchor="middle">1.0</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    csv_path = OUT / "ratios.csv"
    if "--no-run" not in sys.argv:
        run_benches(csv_path)
    with csv_path.open() as f:
        # The floor against itself says nothing.
        rows = [row for row in csv.reader(f) if row and row[2] != "floor"]
    headers = {
        "cycle": ("cycles/s", "p50", "p99"),
        "contention": ("acquisitions/s", "wait p99", "commands/acq"),
        "http": ("requests/s", "p50", "p99"),
        "idempotency": ("requests/s", "p50", "p99"),
    }
    lines = [
        "# Benchmark ratios",
        "",
        f"Measured on {machine()}.",
        "Each ratio compares tower-dsync with its baseline in the same run; above 1 is better.",
        "",
        "| bench | case | against | ratio 1 | ratio 2 | ratio 3 |",
        "|---|---|---|---:|---:|---:|",
    ]
    for bench, case, library, *ratios in rows:
        names = headers.get(bench, ("", "", ""))
        cells = " | ".join(f"{float(r):.2f} ({n})" for r, n in zip(ratios, names))
        lines.append(f"| {bench} | {case} | {library} | {cells} |")
    overhead = layer_overhead_ns()
    if overhead is not None:
        lines += ["", f"DistLockLayer over MemorySync adds {overhead:.0f} ns per request (criterion's time per iteration)."]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    (OUT / "ratios.svg").write_text(svg_chart(rows))
    print("\n".join(lines))
    print(f"\nwrote {OUT / 'report.md'} and {OUT / 'ratios.svg'}", file=sys.stderr)


if __name__ == "__main__":
    main()
