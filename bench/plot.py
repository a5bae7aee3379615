"""Draw the fleet benchmark's samples: what a fleet costs against its size N.

Reads bench/results/fleet.json (written by bench/fleet.py) and writes
bench/results/fleet.png: medians with min-max bars, the goals dashed.

    python bench/plot.py [--input bench/results/fleet.json] [--output bench/results/fleet.png]

Needs matplotlib (requirements-plot.txt; ./dev/bench-fleet --plot installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")

# (title, y label, [(measure key, legend)], log scale); every measure's goal, if any, is drawn.
PANELS = [
    ("Heartbeat writes", "UPDATEs of processes per second",
     [("heartbeats_counted", "counted in the window"), ("heartbeats_steady", "steady: sum of 1/period")], False),
    ("PostgreSQL CPU", "% of one core",
     [("pg_cpu", "idle fleet"), ("crash_pg_cpu", "during one crash loop")], False),
    ("Memory", "PSS, MB",
     [("worker_pss", "per idle worker"), ("backend_pss", "per worker's backend"), ("manager_pss", "per manager")],
     False),
    ("Starting all N", "seconds", [("start_all", "scale(N) -> all registered")], False),
    ("Stopping all N", "ms", [("delete_all", "DELETE FROM workers -> all exited")], False),
    # Logarithmic: one start that waits for a periodic plan would flatten the rest.
    ("One worker", "ms (log scale)", [("insert_one", "inserted -> registered"), ("delete_one", "deleted -> exited")],
     True),
]


def _goal(text: str) -> Optional[float]:
    """The bound of a goal such as "<= 5" or "0"."""
    try:
        return float(text.split()[-1]) if text else None
    except ValueError:
        return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=os.path.join(RESULTS, "fleet.json"))
    parser.add_argument("--output", default=os.path.join(RESULTS, "fleet.png"))
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        print("plot: matplotlib is missing: pip install -r requirements-plot.txt (./dev/bench-fleet --plot does)", file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with open(args.input) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"plot: cannot read {args.input} ({e}): run bench/fleet.py first", file=sys.stderr)
        return 1
    sizes = sorted(data["sizes"], key=lambda s: s["n"])
    by_size: List[Dict[str, dict]] = [{row["key"]: row for row in size["rows"]} for size in sizes]
    ns = [size["n"] for size in sizes]

    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (title, ylabel, series, log) in zip(axes.flat, PANELS):
        drawn = set()  # goals already drawn on this panel
        for index, (key, legend) in enumerate(series):
            points = [(n, rows[key]) for n, rows in zip(ns, by_size) if key in rows]
            if not points:
                continue
            colour = f"C{index}"
            xs = [n for n, _ in points]
            medians = [row["median"] for _, row in points]
            below = [row["median"] - row["min"] for _, row in points]
            above = [row["max"] - row["median"] for _, row in points]
            unit = points[0][1]["unit"]
            ax.errorbar(xs, medians, yerr=[below, above], marker="o", capsize=4, color=colour,
                        label=f"{legend} ({unit})" if unit not in ylabel else legend)
            goal = _goal(points[0][1].get("goal", ""))
            if goal is not None and goal not in drawn:
                drawn.add(goal)
                ax.axhline(goal, linestyle="--", color=colour, alpha=0.6, label=f"goal {points[0][1]['goal']}")
        ax.set_title(title)
        ax.set_xlabel("N idle workers")
        ax.set_ylabel(ylabel)
        ax.set_xticks(ns)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    machine = data.get("machine", {})
    figure.suptitle(f"uniphant fleet: {data.get('hosts', 4)} managers, N idle workers; medians of "
                    f"{data['settings']['runs']} runs, bars min to max, goals dashed\n"
                    f"{data.get('revision', '?')}; {machine.get('cores', '?')} cores ({machine.get('cpu', '?')}), "
                    f"Python {machine.get('python', '?')}, PostgreSQL "
                    f"{machine.get('postgresql', '?').split()[0]} ({machine.get('server', '')})", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"plot: {os.path.relpath(args.output, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
