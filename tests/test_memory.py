"""The CLI gives freed chunks back to the system (`recengine.core.memory`), so a long job's resident
memory follows its chunk size, not what it once held."""

import json
import os
import subprocess
import sys

import pytest

from recengine.core.memory import _glibc_mallopt

glibc = pytest.mark.skipif(_glibc_mallopt() is None, reason="the C library is not glibc")

# After one 24-MB array is freed, glibc serves arrays up to 24 MB from its heap; 100 arrays of 5 MB
# freed under a last one still held stay resident there, as a chunk's freed columns did at 20M events.
HELD_AFTER_FREE = """
import json, sys
import numpy as np
if sys.argv[1] == "fixed":
    from recengine.core.memory import return_freed_memory
    assert return_freed_memory()
if sys.argv[1] == "cli":  # any command, here the lightest
    from click.testing import CliRunner
    from recengine.interfaces.cli import cli
    assert CliRunner().invoke(cli, ["plugins"]).exit_code == 0
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
big = np.ones(3 << 20)  # 24 MB, freed: glibc's own threshold rises to it
del big
start = rss()
arrays = [np.ones(5 << 17) for _ in range(100)]  # 100 x 5 MB
last = np.ones(5 << 17)
del arrays
print(json.dumps({"held_mb": rss() - start}))
"""


def _held(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", HELD_AFTER_FREE, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)["held_mb"]


@glibc
def test_freed_arrays_leave_the_process_once_the_threshold_is_fixed():
    assert _held("glibc") >= 400  # the 500 MB freed stays resident under glibc's own threshold
    assert _held("fixed") <= 50  # with it fixed at 4 MB, only the array still held (5 MB) remains


@glibc
def test_the_users_own_threshold_wins(monkeypatch):
    from recengine.core.memory import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False


@glibc
def test_every_cli_command_fixes_the_threshold():
    assert _held("cli") <= 50
