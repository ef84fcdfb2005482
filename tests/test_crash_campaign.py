"""The short version of benchmarks/crash_campaign.py (20 runs per command there, 1 here): real subprocesses killed
with SIGKILL at a drawn moment, start-up and mid-write included, resumed, and compared with the uninterrupted run.
The campaign seed is printed on a miss; CKPTKD_KILL_SEED replays it."""

import os
import random
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import crash_campaign  # noqa: E402

SEED = int(os.environ.get("CKPTKD_KILL_SEED", random.randrange(10**6)))


@pytest.mark.slow
@pytest.mark.parametrize("name, runs", [("train", 1), ("distill", 1), ("study", 1)])
def test_killed_and_resumed_runs_end_bit_identical(tmp_path, name, runs):
    command = crash_campaign.COMMANDS[name](tmp_path)
    ok, _killed, misses = crash_campaign.campaign(command, runs, SEED, say=lambda _line: None)
    assert ok == runs, f"CKPTKD_KILL_SEED={SEED}: " + "; ".join(misses)
