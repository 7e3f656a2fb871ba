"""stepgraph runs the parity programs exactly as LangGraph did when golden.json was recorded.

golden.json is written by record.py under LangGraph (see its docstring); this test needs no
LangGraph. Observations hold no ids or timestamps, so they compare as plain JSON.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = json.loads((HERE / "golden.json").read_text())


def _load_programs() -> Any:
    # Loaded by path: under --import-mode=importlib this folder is not on sys.path.
    spec = importlib.util.spec_from_file_location("stepgraph_parity_programs", HERE / "programs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: resolving the TypedDicts' string annotations looks the module up.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


programs = _load_programs()

# Where stepgraph deliberately behaves differently: (program, field path) -> why. A listed field
# is left out of the comparison; everything else must match LangGraph exactly.
INTENTIONAL_DIFFERENCES: dict[tuple[str, str], str] = {}


def without(observation: Any, path: str) -> Any:
    """``observation`` with the field at dotted ``path`` removed (a copy)."""
    head, _, rest = path.partition(".")
    if not isinstance(observation, dict) or head not in observation:
        return observation
    copy = dict(observation)
    if rest:
        copy[head] = without(copy[head], rest)
    else:
        del copy[head]
    return copy


def differing_fields(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Dotted paths of the leaves (or lists) that differ."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [
            field
            for key in sorted(set(expected) | set(actual))
            for field in differing_fields(
                expected.get(key, "<missing>"), actual.get(key, "<missing>"), f"{path}{key}."
            )
        ]
    return [] if expected == actual else [path.rstrip(".")]


def test_golden_covers_every_program() -> None:
    assert set(GOLDEN["programs"]) == set(programs.PROGRAMS)


@pytest.mark.parametrize("name", sorted(programs.PROGRAMS))
def test_matches_langgraph(name: str) -> None:
    expected = GOLDEN["programs"][name]
    actual = programs.jsonable(programs.observe("stepgraph", name))
    for (program, field), _reason in INTENTIONAL_DIFFERENCES.items():
        if program == name:
            assert without(expected, field) != expected, f"no field {field!r} to allow in {name}"
            expected, actual = without(expected, field), without(actual, field)
    differing = differing_fields(expected, actual)
    report = "\n".join(
        f"  {field}:\n    langgraph: {_at(expected, field)}\n    stepgraph: {_at(actual, field)}"
        for field in differing
    )
    assert not differing, f"{name} differs from LangGraph {GOLDEN['langgraph_version']}:\n{report}"


def _at(observation: Any, path: str) -> str:
    for key in path.split(".") if path else []:
        observation = observation.get(key, "<missing>") if isinstance(observation, dict) else None
    return json.dumps(observation)
