"""The contract test-kit every checkpoint saver must pass, for its sync and its async API.

A backend subclasses the contract classes in its own tests and provides a ``saver`` fixture::

    from stepgraph.checkpoint.testing import AsyncSaverContract, SaverContract

    class TestMySaver(SaverContract):
        @pytest.fixture
        def saver(self, tmp_path):
            with MySaver.from_path(tmp_path / "db") as saver:
                yield saver

    class TestMyAsyncSaver(AsyncSaverContract):
        @pytest.fixture
        async def saver(self, tmp_path):
            async with MyAsyncSaver.from_path(tmp_path / "db") as saver:
                yield saver

Each scenario in ``scenarios.SCENARIOS`` becomes one test in each class. This module imports
pytest (and pytest-asyncio for the async class): only tests import it, never stepgraph itself.
Call ``pytest.register_assert_rewrite("stepgraph.checkpoint.testing")`` in a ``conftest.py``
for detailed assertion messages.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from stepgraph.checkpoint.base import BaseCheckpointSaver
from stepgraph.checkpoint.testing.api import SaverApi, drive
from stepgraph.checkpoint.testing.scenarios import SCENARIOS, Scenario

__all__ = ["SCENARIOS", "AsyncSaverContract", "SaverApi", "SaverContract"]


class SaverContract:
    """The contract over a saver's sync API. Subclasses provide the ``saver`` fixture."""


class AsyncSaverContract:
    """The contract over a saver's async API. Subclasses provide the ``saver`` fixture."""


def _sync_test(scenario: Scenario) -> Callable[[Any, BaseCheckpointSaver], None]:
    def test(self: Any, saver: BaseCheckpointSaver) -> None:
        coroutine = scenario(SaverApi(saver, use_async=False))
        drive(coroutine)  # type: ignore[arg-type]

    return test


def _async_test(
    scenario: Scenario,
) -> Callable[[Any, BaseCheckpointSaver], Coroutine[Any, Any, None]]:
    @pytest.mark.asyncio
    async def test(self: Any, saver: BaseCheckpointSaver) -> None:
        await scenario(SaverApi(saver, use_async=True))

    return test


for _scenario in SCENARIOS:
    for _cls, _make in ((SaverContract, _sync_test), (AsyncSaverContract, _async_test)):
        _test = _make(_scenario)
        _test.__name__ = _test.__qualname__ = f"test_{_scenario.__name__}"
        _test.__doc__ = _scenario.__doc__
        setattr(_cls, _test.__name__, _test)
