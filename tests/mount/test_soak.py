"""The soak, short form: scripts/soak.py for 20 seconds with three clients.

Several client processes do a random mix of ops on a real mount (each checks
every read against what it wrote); afterwards the kernel drops its caches and
the server's RSS, fd count and inode table must be back where they were after
warm-up, with no handle left. Long runs: `python3 -m scripts.soak --seconds 3600
--clients 8 --stress` (figures in docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import mount_util

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SECONDS = os.environ.get("ACTORFS_SOAK_SECONDS", "20")


@mount_util.needs_mount
@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.parametrize("cache", ["auto", "never"])
def test_soak_short(tmp_path, cache):
    out = tmp_path / "soak.json"
    p = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "soak.py"), "--seconds", SECONDS,
         "--clients", "3", "--cache", cache, "--json", str(out)],
        capture_output=True, text=True, timeout=int(float(SECONDS)) * 10 + 120,
    )  # fmt: skip
    assert out.exists(), p.stdout[-2000:] + p.stderr[-3000:]
    s = json.loads(out.read_text())
    bad = [c for c in s["client_results"] if c["rc"] != 0]
    assert not bad, bad
    assert s["requests"] > 1000
    assert s["flat"] == {"inodes": True, "fds": True, "handles": True, "rss": True}, (
        s["baseline"], s["after"], s["peak"],
    )  # fmt: skip
    assert s["after"]["inodes"] == 1  # every nodeid forgotten once the kernel let go
    assert p.returncode == 0
