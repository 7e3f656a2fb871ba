import pytest

# The contract kit's asserts live in an installed module: ask pytest to rewrite them too.
pytest.register_assert_rewrite("stepgraph.checkpoint.testing")
