"""Settings for every test run in this repository."""

import os

# Every row of changes a saver writes is checked against the whole checkpoint blob it stands
# for (storage.CHECK_CHAINS), in this process and in the worker processes tests start.
os.environ["STEPGRAPH_CHECK_CHAINS"] = "1"

from stepgraph.checkpoint import storage

storage.CHECK_CHAINS = True
