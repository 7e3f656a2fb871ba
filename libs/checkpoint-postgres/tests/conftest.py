import sys
from pathlib import Path

import pytest

# The contract kit's asserts live in an installed module: ask pytest to rewrite them too.
pytest.register_assert_rewrite("stepgraph.checkpoint.testing")

# Test modules and the worker processes they start share pg_test_helpers (importlib mode puts
# no test folder on sys.path by itself).
sys.path.insert(0, str(Path(__file__).parent))

# A real server and a fresh schema per test (see postgres_test_server's docstring).
from postgres_test_server import postgres_server, postgres_uri  # noqa: E402, F401
