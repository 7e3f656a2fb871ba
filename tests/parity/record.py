"""Record LangGraph's observable behaviour of the parity programs into golden.json.

Run it with LangGraph installed (never in stepgraph's test env), from the repository root:

    python3 -m venv /tmp/lgvenv
    /tmp/lgvenv/bin/pip install langgraph==1.2.22 langgraph-checkpoint-sqlite==3.1.2
    /tmp/lgvenv/bin/python tests/parity/record.py

It imports only ``langgraph``; the programs are in programs.py, shared with test_parity.py.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from programs import PROGRAMS, observe  # noqa: E402

GOLDEN = HERE / "golden.json"


def main() -> None:
    golden = {
        "langgraph_version": version("langgraph"),
        "programs": {name: observe("langgraph", name) for name in PROGRAMS},
    }
    crashed = [name for name, seen in golden["programs"].items() if "crashed" in seen]
    if crashed:
        raise SystemExit(f"programs crashed under LangGraph: {crashed}")
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(PROGRAMS)} programs, langgraph {golden['langgraph_version']})")


if __name__ == "__main__":
    main()
