"""Turns a results file into Markdown tables and target verdicts.

python bench/report.py bench/results/<file>.json    # re-render a stored run
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

LIBS = ("langgraph", "stepgraph")
DB_SAVERS = ("SqliteSaver", "AsyncSqliteSaver", "PostgresSaver", "AsyncPostgresSaver")
# Both libraries forced to the same PRAGMA synchronous (their defaults may differ).
MATCHED_SQLITE = ("SqliteSaver FULL", "AsyncSqliteSaver FULL")
TITLES = {
    "chain": "1. Sequential chain of 20 nodes",
    "fan_out": "2. Fan-out: one node Sends to 100 workers, then a collector (3 supersteps)",
    "wide": "3. Wide state: 1,000 keys x 100 chars; 20 steps change only a counter",
    "long_thread": "4. Long thread: reads on a 1,000-checkpoint thread vs a 20-checkpoint one",
    "resume": "5. Resume: 20-node chain, node 15 raises once; the resume is timed (per step it ran)",
    "functional": "6. Functional API: an entrypoint calling 20 tasks in sequence (µs per task)",
}


# Figures -----------------------------------------------------------------------------------------


def median(samples: list[int]) -> float:
    return statistics.median(samples)


def spread(samples: list[int]) -> float:
    """Half the interquartile range, as a fraction of the median."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / 2 / median(samples)


def us_per_step(result: dict[str, Any]) -> float | None:
    if "ns" not in result:
        return None
    return median(result["ns"]) / result["steps"] / 1000


def floor_us(results: dict[str, Any], saver: str, outcome: dict[str, Any]) -> float | None:
    """The raw one-commit floor for the saver's backend; for SQLite, at the synchronous the saver
    ran with (FULL, SQLite's default, if it could not be read)."""
    floors = results.get("floors", {})
    if "Postgres" in saver:
        samples = floors.get("postgres")
    else:
        samples = floors.get(f"sqlite {outcome.get('synchronous') or 'FULL'}")
    return median(samples) / 1000 if samples else None


def fmt_us(value: float | None, samples: list[int] | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return f"{text} ±{spread(samples) * 100:.0f}%" if samples else text


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


# Tables ------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def saver_label(cell: dict[str, Any]) -> str:
    """The saver, with SQLite's PRAGMA synchronous for each library when it is known."""
    name, _, forced = cell["saver"].partition(" ")
    if forced:
        return f"{name} (both synchronous={forced})"
    settings = [cell[lib].get("synchronous") for lib in LIBS]
    if any(settings):
        return f"{name} (synchronous LG {settings[0] or '?'} / SG {settings[1] or '?'})"
    return name


def invocation_table(results: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    resume = cells[0]["workload"] == "resume"
    header = ["saver", "durability", "LangGraph µs/step", "stepgraph µs/step", "LG/SG"]
    header += [
        "LG x floor",
        "SG x floor",
        "LG rows/inv",
        "SG rows/inv",
        "LG bytes/inv",
        "SG bytes/inv",
    ]
    if resume:
        header += ["LG nodes re-run", "SG nodes re-run"]
    rows = []
    for cell in cells:
        lg, sg = cell["langgraph"], cell["stepgraph"]
        us = {lib: us_per_step(cell[lib]) for lib in LIBS}
        row = [saver_label(cell), cell["durability"] if cell["saver"] != "none" else "-"]
        row += [fmt_us(us[lib], cell[lib].get("ns")) for lib in LIBS]
        row.append(fmt_ratio(us["langgraph"], us["stepgraph"]))
        for lib in LIBS:
            # Only durability "sync" commits once per step, so only there is the floor comparable.
            floor = (
                floor_us(results, cell["saver"], cell[lib])
                if cell["saver"] in DB_SAVERS + MATCHED_SQLITE and cell["durability"] == "sync"
                else None
            )
            row.append(fmt_ratio(us[lib], floor))
        row += [f"{r['rows']:.1f}" if "rows" in r else "-" for r in (lg, sg)]
        row += [fmt_bytes(r.get("bytes")) for r in (lg, sg)]
        if resume:
            row += [str(r.get("extra", {}).get("rerun", "-")) for r in (lg, sg)]
        rows.append(row)
    return table(header, rows)


def reads_table(cells: list[dict[str, Any]]) -> list[str]:
    header = ["saver", "read", "LG 1,000 µs", "LG 20 µs", "LG long/short"]
    header += ["SG 1,000 µs", "SG 20 µs", "SG long/short", "LG/SG (1,000)"]
    rows = []
    for cell in cells:
        reads = {lib: cell[lib].get("reads", {}) for lib in LIBS}
        names = sorted({key.rsplit(" ", 1)[0] for lib in LIBS for key in reads[lib]})
        for name in names:
            row = [cell["saver"], name]
            long_us = {}
            for lib in LIBS:
                long_s, short_s = reads[lib].get(f"{name} long"), reads[lib].get(f"{name} short")
                long_us[lib] = median(long_s) / 1000 if long_s else None
                short_us = median(short_s) / 1000 if short_s else None
                row += [
                    fmt_us(long_us[lib], long_s),
                    fmt_us(short_us, short_s),
                    fmt_ratio(long_us[lib], short_us),
                ]
            row.append(fmt_ratio(long_us["langgraph"], long_us["stepgraph"]))
            rows.append(row)
    return table(header, rows)


def errors(cells: list[dict[str, Any]]) -> list[str]:
    """Each distinct failure once, with the cells it hit."""
    seen: dict[tuple[str, str], list[str]] = {}
    for cell in cells:
        for lib in LIBS:
            if "error" in cell[lib]:
                where = f"{cell['saver']}/{cell['durability']}"
                seen.setdefault((lib, cell[lib]["error"]), []).append(where)
    return [
        f"- {lib} could not run {'any cell' if len(where) == len(cells) else ', '.join(where)}: "
        f"`{error}`"
        for (lib, error), where in seen.items()
    ]


# Verdicts ----------------------------------------------------------------------------------------


def result(
    results: dict[str, Any], lib: str, workload: str, saver: str, durability: str = "sync"
) -> dict[str, Any] | None:
    for cell in results["cells"]:
        if (cell["workload"], cell["saver"], cell["durability"]) == (workload, saver, durability):
            return cell[lib]
    return None


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def per_step(r: dict[str, Any] | None) -> float | None:
    return us_per_step(r) if r else None


def why_missing(*needed: dict[str, Any] | None) -> str:
    for r in needed:
        if r is None:
            return "cell not in this run"
        if "error" in r:
            return r["error"].split("\n")[0][:120]
    return ""


def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []

    def check(name: str, value: float | None, target: float, at_least: bool, *needed: Any) -> None:
        if value is None:
            lines.append(f"- NOT RUN  {name} ({why_missing(*needed) or 'no figure'})")
            return
        ok = value >= target if at_least else value <= target
        sign = "≥" if at_least else "≤"
        lines.append(
            f"- {'PASS' if ok else 'MISS'}     {name}: {value:.2f}x (target {sign}{target}x)"
        )

    def speedup(saver: str, durability: str) -> None:
        lg = result(results, "langgraph", "chain", saver, durability)
        sg = result(results, "stepgraph", "chain", saver, durability)
        name = f"chain {saver}/{durability}: LangGraph ÷ stepgraph µs/step"
        check(name, div(per_step(lg), per_step(sg)), 4, True, lg, sg)

    speedup("none", "sync")
    for durability in ("exit", "async", "sync"):
        speedup("InMemorySaver", durability)
    for saver in DB_SAVERS + MATCHED_SQLITE:
        speedup(saver, "sync")
        sg = result(results, "stepgraph", "chain", saver)
        floor = floor_us(results, saver, sg) if sg else None
        check(
            f"chain {saver}/sync: stepgraph µs/step ÷ raw floor",
            div(per_step(sg), floor),
            1.5,
            False,
            sg,
        )
    for saver in DB_SAVERS:
        exit_ = result(results, "stepgraph", "chain", saver, "exit")
        async_ = result(results, "stepgraph", "chain", saver, "async")
        name = f"chain {saver}: stepgraph durability async ÷ exit"
        check(name, div(per_step(async_), per_step(exit_)), 1.3, False, async_, exit_)
    base = result(results, "langgraph", "wide", "SqliteSaver")
    for saver in ("SqliteSaver", "PostgresSaver"):
        sg = result(results, "stepgraph", "wide", saver)
        value = div(base.get("bytes") if base else None, sg.get("bytes") if sg else None)
        check(
            f"wide {saver}/sync: LangGraph SqliteSaver ÷ stepgraph bytes/step",
            value,
            10,
            True,
            base,
            sg,
        )
    for cell in results["cells"]:
        if cell["workload"] == "long_thread":
            reads = cell["stepgraph"].get("reads", {})
            for read in ("get_state", "list(limit=10)"):
                long_, short = reads.get(f"{read} long"), reads.get(f"{read} short")
                value = div(long_ and median(long_), short and median(short))
                name = f"long thread {cell['saver']} {read}: stepgraph 1,000 ÷ 20 checkpoints"
                check(name, value, 1.5, False, cell["stepgraph"])
    return lines


# The whole report --------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    pg = m.get("postgres", {})
    out = [
        f"# stepgraph vs LangGraph ({results['mode']} run, {results['started']}, {results.get('duration_s', '?')} s)",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['platform']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. Python {m['python']}, SQLite {m['sqlite']}, "
        + (
            f"PostgreSQL {pg['server_version']} (fsync {pg['fsync']}, synchronous_commit {pg['synchronous_commit']})."
            if pg
            else "PostgreSQL not reached."
        ),
        "Packages: "
        + ", ".join(f"{k}=={v}" for k, v in m["packages"].items())
        + f"; stepgraph commit {m['stepgraph_commit']}.",
        f"Each cell: {results['settings']['warmup']} warm-up + {results['settings']['repeats']} timed invocations per round, "
        f"{results['settings']['rounds']} rounds alternating LangGraph, stepgraph. µs/step is the median "
        "invocation time ÷ supersteps, ± half the interquartile range. LG/SG > 1 means stepgraph is faster.",
        "",
        "## Raw floor: one INSERT + COMMIT of a 512-byte row",
        "",
    ]
    floors = results.get("floors", {})
    out += table(
        ["backend", "µs per commit"], [[k, fmt_us(median(v) / 1000, v)] for k, v in floors.items()]
    )
    for workload, title in TITLES.items():
        cells = [c for c in results["cells"] if c["workload"] == workload]
        if not cells:
            continue
        out += ["", f"## {title}", ""]
        out += reads_table(cells) if workload == "long_thread" else invocation_table(results, cells)
        if workload == "long_thread":
            counts = {
                f"{lib}": cells[0][lib].get("checkpoints")
                for lib in LIBS
                if cells[0][lib].get("checkpoints")
            }
            if counts:
                out += ["", f"Checkpoints per thread (long, short): {counts}"]
        problems = errors(cells)
        if problems:
            out += ["", *problems]
    out += ["", "## Targets (stepgraph, measured in this run)", "", *verdicts(results)]
    return "\n".join(out)


def progress_line(cell: dict[str, Any]) -> str:
    parts = []
    for lib in LIBS:
        result = cell[lib]
        if "error" in result:
            parts.append(f"{lib} error")
        elif "ns" in result:
            parts.append(f"{lib} {fmt_us(us_per_step(result))} µs/step")
        else:
            parts.append(f"{lib} ok")
    return f"{cell['workload']} {cell['saver']}/{cell['durability']}: " + ", ".join(parts)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
