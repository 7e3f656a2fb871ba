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
DURABILITIES = ("exit", "async", "sync")
TITLES = {
    "chain": "1. Sequential chain of 20 nodes",
    "fan_out": "2. Fan-out x100: one node Sends to 100 workers, then a collector (µs per task: 102)",
    "wide": "3. Wide state: 1,000 keys x 100 chars; 20 steps change only a counter",
    "long_thread": "4. Long thread: reads on a 1,000-checkpoint thread vs a 20-checkpoint one",
    "resume": "5. Resume: 20-node chain, node 15 raises once; the resume is timed (per step it ran)",
    "functional": "6. Functional API: an entrypoint calling 20 tasks in sequence (µs per task)",
    "short_run": "7. Short run: START -> one node -> END (µs per invocation)",
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


def units(result: dict[str, Any]) -> int:
    return int(result.get("units", result.get("steps", 1)))  # "steps": files before tasks


def us_per_step(result: dict[str, Any]) -> float | None:
    """Median invocation time ÷ its unit count (supersteps, or tasks), in µs."""
    if "ns" not in result:
        return None
    return median(result["ns"]) / units(result) / 1000


def floor_name(saver: str, outcome: dict[str, Any]) -> str:
    """The raw floor a saver is held to; for SQLite, at the synchronous the saver ran with (FULL,
    SQLite's default, if it could not be read)."""
    if "Postgres" in saver:
        return "postgres"
    return f"sqlite {outcome.get('synchronous') or 'FULL'}"


def floor_us(results: dict[str, Any], saver: str, outcome: dict[str, Any]) -> float | None:
    samples = results.get("floors", {}).get(floor_name(saver, outcome))
    return median(samples) / 1000 if samples else None


def x_floor(results: dict[str, Any], saver: str, outcome: dict[str, Any]) -> float | None:
    """Median invocation time ÷ (the commits durability "sync" needs, times one raw commit)."""
    floor = floor_us(results, saver, outcome)
    if "ns" not in outcome or not floor:
        return None
    commits = outcome.get("commits", units(outcome))
    return median(outcome["ns"]) / 1000 / commits / floor


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


def unit_of(cells: list[dict[str, Any]]) -> str:
    for cell in cells:
        for lib in LIBS:
            if "unit" in cell[lib]:
                return str(cell[lib]["unit"])
    return "step"


def invocation_table(results: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    resume = cells[0]["workload"] == "resume"
    unit = unit_of(cells)
    header = ["saver", "durability", f"LangGraph µs/{unit}", f"stepgraph µs/{unit}", "LG/SG"]
    header += [
        "LG x floor",
        "SG x floor",
        "LG rows/inv",
        "SG rows/inv",
        "LG bytes/inv",
        "SG bytes/inv",
    ]
    if resume:
        header += ["LG resume µs", "SG resume µs", "LG nodes re-run", "SG nodes re-run"]
    rows = []
    for cell in cells:
        lg, sg = cell["langgraph"], cell["stepgraph"]
        us = {lib: us_per_step(cell[lib]) for lib in LIBS}
        row = [saver_label(cell), cell["durability"] if cell["saver"] != "none" else "-"]
        row += [fmt_us(us[lib], cell[lib].get("ns")) for lib in LIBS]
        row.append(fmt_ratio(us["langgraph"], us["stepgraph"]))
        for lib in LIBS:
            # Only durability "sync" commits at every step, so only there is the floor comparable.
            floored = cell["saver"] in DB_SAVERS + MATCHED_SQLITE and cell["durability"] == "sync"
            ratio = x_floor(results, cell["saver"], cell[lib]) if floored else None
            row.append(f"{ratio:.2f}x" if ratio else "-")
        row += [f"{r['rows']:.1f}" if "rows" in r else "-" for r in (lg, sg)]
        row += [fmt_bytes(r.get("bytes")) for r in (lg, sg)]
        if resume:
            row += [
                fmt_us(median(r["ns"]) / 1000, r["ns"]) if "ns" in r else "n/a" for r in (lg, sg)
            ]
            row += [fmt_reruns(r) for r in (lg, sg)]
        rows.append(row)
    return table(header, rows)


def fmt_reruns(outcome: dict[str, Any]) -> str:
    """Nodes re-run by the resumes: the one value, or min-max when the resumes differed."""
    reruns = outcome.get("extra", {}).get("rerun")
    if isinstance(reruns, int):  # files from before reruns were kept per resume
        return str(reruns)
    if not reruns:
        return "-"
    low, high = min(reruns), max(reruns)
    return str(low) if low == high else f"{low}-{high}"


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

ALL_SAVERS = ("InMemorySaver", *DB_SAVERS)


def find(results: dict[str, Any], workload: str, saver: str, durability: str) -> Any:
    for cell in results["cells"]:
        if (cell["workload"], cell["saver"], cell["durability"]) == (workload, saver, durability):
            return cell
    return None


def absent(results: dict[str, Any], workload: str, saver: str, durability: str) -> str:
    """Why a cell is not in the results."""
    settings = results.get("settings", {})
    if workload not in settings.get("workloads", [workload]):
        return f"workload {workload} not selected (--only)"
    if "Postgres" in saver and results.get("postgres_skipped"):
        return str(results["postgres_skipped"])
    if "Postgres" in saver and not results["machine"].get("postgres"):
        return "Postgres not reached"
    if workload == "long_thread" and "Async" in saver and not settings.get("long_thread_async"):
        return "quick run: long-thread reads on the sync savers only"
    if workload != "chain" and durability not in settings.get("durabilities", [durability]):
        return f"durability {durability} not run for {workload} in a {results['mode']} run"
    return f"cell {workload} {saver}/{durability} not in this run"


class Verdicts:
    """Collects one line per target: PASS/MISS with the figures, or NOT RUN and why."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        self.lines: list[str] = []

    def outcome(
        self, lib: str, workload: str, saver: str, durability: str = "sync"
    ) -> tuple[dict[str, Any] | None, str]:
        """A library's result for a cell, or None and why there is none."""
        cell = find(self.results, workload, saver, durability)
        if cell is None:
            return None, absent(self.results, workload, saver, durability)
        if "error" in cell[lib]:
            return None, f"{lib} failed: {cell[lib]['error'].splitlines()[0][:160]}"
        return cell[lib], ""

    def not_run(self, name: str, reason: str) -> None:
        self.lines.append(f"- NOT RUN  {name}: {reason}")

    def check(self, name: str, figures: str, value: float, target: float, at_least: bool) -> None:
        ok = value >= target if at_least else value <= target
        sign = "≥" if at_least else "≤"
        self.lines.append(
            f"- {'PASS' if ok else 'MISS'}     {name}: {figures} = {value:.2f}x "
            f"(target {sign} {target:g}x)"
        )


def verdicts(results: dict[str, Any]) -> list[str]:
    v = Verdicts(results)

    def speedup(saver: str, durability: str) -> None:
        name = f"chain {saver}/{durability}: LangGraph ÷ stepgraph µs/step"
        lg, why_lg = v.outcome("langgraph", "chain", saver, durability)
        sg, why_sg = v.outcome("stepgraph", "chain", saver, durability)
        if lg is None or sg is None:
            return v.not_run(name, why_lg or why_sg)
        a, b = us_per_step(lg), us_per_step(sg)
        if not a or not b:
            return v.not_run(name, "no timing")
        v.check(name, f"LG {fmt_us(a)} ÷ SG {fmt_us(b)} µs/step", a / b, 4, True)

    def near_floor(saver: str) -> None:
        name = f"chain {saver}/sync: stepgraph µs/step ÷ raw one-commit floor"
        sg, why = v.outcome("stepgraph", "chain", saver)
        if sg is None:
            return v.not_run(name, why)
        floor, ratio = floor_us(results, saver, sg), x_floor(results, saver, sg)
        if floor is None or ratio is None:
            return v.not_run(name, f"no {floor_name(saver, sg)} floor in this run")
        figures = (
            f"{fmt_us(us_per_step(sg))} µs/step ÷ {fmt_us(floor)} µs ({floor_name(saver, sg)})"
        )
        v.check(name, figures, ratio, 1.5, False)

    def async_vs_exit(saver: str) -> None:
        name = f"chain {saver}: stepgraph durability async ÷ exit, µs/step"
        async_, why_a = v.outcome("stepgraph", "chain", saver, "async")
        exit_, why_e = v.outcome("stepgraph", "chain", saver, "exit")
        if async_ is None or exit_ is None:
            return v.not_run(name, why_a or why_e)
        a, b = us_per_step(async_), us_per_step(exit_)
        if not a or not b:
            return v.not_run(name, "no timing")
        v.check(name, f"async {fmt_us(a)} ÷ exit {fmt_us(b)} µs/step", a / b, 1.3, False)

    def wide_bytes(saver: str) -> None:
        name = f"wide {saver}/sync: LangGraph SqliteSaver ÷ stepgraph bytes/step"
        lg, why_lg = v.outcome("langgraph", "wide", "SqliteSaver")
        sg, why_sg = v.outcome("stepgraph", "wide", saver)
        if lg is None or sg is None:
            return v.not_run(name, why_lg or why_sg)
        a, b = lg.get("bytes"), sg.get("bytes")
        if a is None or b is None:
            return v.not_run(name, "storage size not measured")
        if b <= 0 or a <= 0:
            who = "stepgraph" if b <= 0 else "LangGraph"
            return v.not_run(
                name,
                f"{who} grew the storage by {fmt_bytes(min(a, b))}/invocation, below what page "
                "growth resolves over this run's invocations (run `make bench`)",
            )
        steps = units(sg)
        figures = f"{fmt_bytes(a / units(lg))} ÷ {fmt_bytes(b / steps)}"
        v.check(name, figures, a / b * steps / units(lg), 10, True)

    def run_bytes(saver: str) -> None:
        # The backend issues' storage target: at most a quarter of LangGraph's bytes on disk
        # per run, on the same workload and the same kind of saver.
        name = f"chain {saver}/sync: LangGraph ÷ stepgraph bytes/run"
        lg, why_lg = v.outcome("langgraph", "chain", saver)
        sg, why_sg = v.outcome("stepgraph", "chain", saver)
        if lg is None or sg is None:
            return v.not_run(name, why_lg or why_sg)
        a, b = lg.get("bytes"), sg.get("bytes")
        if not a or not b or a <= 0 or b <= 0:
            return v.not_run(name, "storage size not measured")
        v.check(name, f"{fmt_bytes(a)} ÷ {fmt_bytes(b)}", a / b, 4, True)

    def long_thread(saver: str, read: str) -> None:
        name = f"long thread {saver} {read}: stepgraph 1,000 ÷ 20 checkpoints"
        sg, why = v.outcome("stepgraph", "long_thread", saver)
        if sg is None:
            return v.not_run(name, why)
        reads = sg.get("reads", {})
        long_, short = reads.get(f"{read} long"), reads.get(f"{read} short")
        if not long_ or not short:
            return v.not_run(name, "no timing")
        a, b = median(long_) / 1000, median(short) / 1000
        v.check(name, f"{fmt_us(a)} µs ÷ {fmt_us(b)} µs", a / b, 1.5, False)

    speedup("none", "sync")
    for durability in DURABILITIES:
        speedup("InMemorySaver", durability)
    for saver in DB_SAVERS + MATCHED_SQLITE:
        speedup(saver, "sync")
        near_floor(saver)
    for saver in ALL_SAVERS:
        async_vs_exit(saver)
    for saver in ("SqliteSaver", "PostgresSaver"):
        wide_bytes(saver)
        run_bytes(saver)
    for saver in ALL_SAVERS:
        for read in ("get_state", "list(limit=10)"):
            long_thread(saver, read)
    return v.lines


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
            else f"PostgreSQL not used ({results.get('postgres_skipped') or 'not reached'})."
        )
        + (f" libpq {m['libpq']}." if "libpq" in m else ""),
        "Packages: "
        + ", ".join(f"{k}=={v}" for k, v in m["packages"].items())
        + f"; stepgraph commit {m['stepgraph_commit']}.",
        "Unreachable Postgres, `--only` or `--quick` leave cells out; the targets say which.",
        f"Each cell: {results['settings']['warmup']} warm-up + {results['settings']['repeats']} timed invocations per round, "
        f"{results['settings']['rounds']} rounds alternating LangGraph, stepgraph. µs/step (µs/task) is the "
        "median invocation time ÷ its supersteps (tasks), ± half the interquartile range. "
        "LG/SG > 1 means stepgraph is faster. x floor: median invocation time ÷ (the commits "
        "durability sync needs: one per superstep, one per task of the functional API) ÷ one raw commit.",
        "",
        *floor_section(results),
    ]
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


def floor_section(results: dict[str, Any]) -> list[str]:
    floors = results.get("floors", {})
    loops = results.get("floor_commits")
    wal = results.get("floor_wal_bytes", {})
    out = ["## Raw floor: one INSERT + COMMIT of a 512-byte row", ""]
    if loops:
        out += [
            f"{loops['loops']} loops per backend (a fresh file or schema each, half at the start "
            f"of the run, half at the end), each {loops['warmup']} untimed then {loops['timed']} "
            "timed commits: the commits of one round of a chain cell at durability sync.",
            "",
        ]
    rows = []
    for name, samples in floors.items():
        sizes = wal.get(name)
        rows.append(
            [
                name,
                fmt_us(median(samples) / 1000, samples),
                f"{fmt_bytes(min(sizes))} - {fmt_bytes(max(sizes))}" if sizes else "-",
            ]
        )
    out += table(["backend", "µs per commit", "WAL at loop end"], rows)
    # The same for the cells the floor is compared with, to show whether their WAL wrapped.
    cell_wal = [
        f"{cell['saver']} {lib} {fmt_bytes(max(cell[lib]['wal_bytes']))}"
        for cell in results["cells"]
        if cell["workload"] == "chain" and cell["durability"] == "sync"
        for lib in LIBS
        if cell[lib].get("wal_bytes")
    ]
    if cell_wal:
        out += [
            "",
            "WAL after the timed invocations of the chain's SQLite cells at durability sync "
            "(SQLite checkpoints and reuses it at about 4 MB): " + ", ".join(cell_wal) + ".",
        ]
    return out


def progress_line(cell: dict[str, Any]) -> str:
    parts = []
    for lib in LIBS:
        result = cell[lib]
        if "error" in result:
            parts.append(f"{lib} error")
        elif "ns" in result:
            parts.append(f"{lib} {fmt_us(us_per_step(result))} µs/{result.get('unit', 'step')}")
        else:
            parts.append(f"{lib} ok")
    return f"{cell['workload']} {cell['saver']}/{cell['durability']}: " + ", ".join(parts)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
