"""The compact Markdown table the README quotes, from a results file.

python bench/summary.py bench/results/<file>.json

One row per workload x saver at durability sync, plus exit and async for the chain and exit for
the short run; then the target verdicts. Every figure comes from the file, as `report.py`
computes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from report import (
    LIBS,
    TITLES,
    fmt_reruns,
    fmt_us,
    median,
    saver_label,
    table,
    unit_of,
    us_per_step,
    verdicts,
    x_floor,
)

NAMES = {
    "chain": "chain x20",
    "fan_out": "fan-out x100",
    "wide": "wide state",
    "resume": "resume",
    "functional": "functional x20 tasks",
    "short_run": "short run (1 node)",
    "long_thread": "long thread",
}
LONG_READ = "get_state"  # the long-thread read the summary shows


def fmt_x(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def short_label(cell: dict[str, Any]) -> str:
    """The saver, with SQLite's synchronous: "(FULL)" when forced on both, else each library's."""
    return (
        saver_label(cell)
        .replace("synchronous=", "")
        .replace("synchronous ", "")
        .replace("both ", "")
    )


def invocation_row(results: dict[str, Any], cell: dict[str, Any], unit: str) -> list[str]:
    us = {lib: us_per_step(cell[lib]) for lib in LIBS}
    ratio = us["langgraph"] / us["stepgraph"] if us["langgraph"] and us["stepgraph"] else None
    floored = cell["saver"] not in ("none", "InMemorySaver") and cell["durability"] == "sync"
    floors = [
        fmt_x(x_floor(results, cell["saver"], cell[lib]) if floored else None) for lib in LIBS
    ]
    note = ""
    if cell["workload"] == "resume":
        took = [
            fmt_us(median(cell[lib]["ns"]) / 1000) if "ns" in cell[lib] else "n/a" for lib in LIBS
        ]
        reruns = [fmt_reruns(cell[lib]) for lib in LIBS]
        note = (
            f"resume LG {took[0]} / SG {took[1]} µs; nodes re-run LG {reruns[0]} / SG {reruns[1]}"
        )
    return [
        NAMES[cell["workload"]],
        short_label(cell),
        cell["durability"] if cell["saver"] != "none" else "-",
        *(f"{fmt_us(us[lib])} µs/{unit}" if us[lib] else "n/a" for lib in LIBS),
        fmt_x(ratio),
        *floors,
        note,
    ]


def long_thread_row(cell: dict[str, Any]) -> list[str]:
    long_us: dict[str, float | None] = {}
    shares = []
    for lib in LIBS:
        reads = cell[lib].get("reads", {})
        long_, short = reads.get(f"{LONG_READ} long"), reads.get(f"{LONG_READ} short")
        long_us[lib] = median(long_) / 1000 if long_ else None
        if long_ and short:
            shares.append(
                f"{'LG' if lib == 'langgraph' else 'SG'} {median(long_) / median(short):.2f}x"
            )
    lg, sg = long_us["langgraph"], long_us["stepgraph"]
    return [
        NAMES["long_thread"],
        cell["saver"],
        "-",
        *(f"{fmt_us(long_us[lib])} µs/read" if long_us[lib] else "n/a" for lib in LIBS),
        fmt_x(lg / sg if lg and sg else None),
        "-",
        "-",
        f"{LONG_READ} on 1,000 checkpoints; ÷ on 20: " + (", ".join(shares) or "n/a"),
    ]


def summary(results: dict[str, Any]) -> str:
    m = results["machine"]
    rows = []
    for workload in TITLES:
        cells = [c for c in results["cells"] if c["workload"] == workload]
        if workload == "long_thread":
            rows += [long_thread_row(c) for c in cells]
            continue
        unit = unit_of(cells)
        wanted = {"chain": ("exit", "async", "sync"), "short_run": ("exit", "sync")}.get(
            workload, ("sync",)
        )
        rows += [invocation_row(results, c, unit) for c in cells if c["durability"] in wanted]
    header = ["workload", "saver", "durability", "LangGraph", "stepgraph", "LG/SG"]
    header += ["LG x floor", "SG x floor", "notes"]
    out = [
        f"From `{results['mode']}` run {results['started']} ({results.get('duration_s', '?')} s), "
        f"{m['cores']} cores, Python {m['python']}, SQLite {m['sqlite']}, "
        f"PostgreSQL {m.get('postgres', {}).get('server_version', 'not used')}, "
        f"stepgraph {m['stepgraph_commit'][:12]}{'+dirty' if 'dirty' in m['stepgraph_commit'] else ''}. "
        "Medians; LG/SG > 1 means stepgraph is faster; x floor: invocation time ÷ the commits "
        "durability sync needs ÷ one raw commit of the saver's backend.",
        "",
        *table(header, rows),
        "",
        *verdicts(results),
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(json.loads(Path(sys.argv[1]).read_text())))
