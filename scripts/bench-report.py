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
  rslock's wait p99 over ours, rslock's commands per acquisition over ours,
  our hand-off share over rslock's);
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
import math
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


def svg_chart(rows: list[list[str]], headers: dict[str, tuple[str, ...]]) -> str:
    """Every ratio of every row as a bar from 1 on a log scale: right and
    green where tower-dsync does better than its baseline, left and red
    where it does worse."""
    items = []
    for bench, case, library, *ratios in rows:
        names = headers.get(bench, ())
        for i, ratio in enumerate(ratios):
            if not ratio:
                continue
            name = names[i] if i < len(names) else f"ratio {i + 1}"
            items.append((f"{bench}: {case}, {library}: {name}", float(ratio)))
    bar_h, gap, label_w, plot_w = 13, 3, 560, 420
    top = 48
    height = top + len(items) * (bar_h + gap) + 40
    width = label_w + plot_w + 70
    decades = 2  # 0.01 to 100
    one = label_w + plot_w / 2

    def x(value: float) -> float:
        clamped = min(max(value, 10 ** -decades), 10 ** decades)
        return one + math.log10(clamped) / decades * (plot_w / 2)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<text x="10" y="18" font-size="13">tower-dsync against the baseline of the same run, '
        "each ratio oriented so that above 1 (right, green) is better; log scale.</text>",
        '<text x="10" y="34" font-size="11">cycle: the raw floor; contention: rslock; http: bare axum, '
        "an rslock middleware; idempotency: a replay against a handler run.</text>",
    ]
    for i, (label, value) in enumerate(items):
        y = top + i * (bar_h + gap)
        colour = "#2b8a3e" if value >= 1.0 else "#e67700" if value >= 0.9 else "#c92a2a"
        left, right = sorted((one, x(value)))
        out.append(f'<text x="{label_w - 8}" y="{y + 10}" text-anchor="end">{escape(label)}</text>')
        out.append(
            f'<rect x="{left:.1f}" y="{y}" width="{max(right - left, 1):.1f}" height="{bar_h}" fill="{colour}"/>'
        )
        tx = right + 4 if value >= 1.0 else left - 4
        anchor = "start" if value >= 1.0 else "end"
        out.append(f'<text x="{tx:.1f}" y="{y + 10}" text-anchor="{anchor}">{value:.2f}</text>')
    bottom = top + len(items) * (bar_h + gap)
    for tick in (0.01, 0.1, 1, 10, 100):
        tx = x(tick)
        stroke = 'stroke="black"' if tick == 1 else 'stroke="#999" stroke-dasharray="2 3"'
        out.append(f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{bottom}" {stroke}/>')
        out.append(f'<text x="{tx:.1f}" y="{bottom + 14}" text-anchor="middle">{tick:g}</text>')
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
        "contention": ("acquisitions/s", "wait p99", "commands/acq", "hand-off"),
        "http": ("requests/s", "p50", "p99"),
        "idempotency": ("requests/s", "p50", "p99"),
    }
    lines = [
        "# Benchmark ratios",
        "",
        f"Measured on {machine()}.",
        "Each ratio compares tower-dsync with its baseline in the same run; above 1 is better.",
        "",
        "| bench | case | against | ratio 1 | ratio 2 | ratio 3 | ratio 4 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for bench, case, library, *ratios in rows:
        names = headers.get(bench, ("", "", "", ""))
        cells = [f"{float(r):.2f} ({n})" for r, n in zip(ratios, names)]
        cells += [""] * (4 - len(cells))
        lines.append(f"| {bench} | {case} | {library} | {' | '.join(cells)} |")
    overhead = layer_overhead_ns()
    if overhead is not None:
        lines += ["", f"DistLockLayer over MemorySync adds {overhead:.0f} ns per request (criterion's time per iteration)."]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    (OUT / "ratios.svg").write_text(svg_chart(rows, headers))
    print("\n".join(lines))
    print(f"\nwrote {OUT / 'report.md'} and {OUT / 'ratios.svg'}", file=sys.stderr)


if __name__ == "__main__":
    main()
