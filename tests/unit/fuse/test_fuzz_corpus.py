"""Replay the fuzz corpus (tests/fuzz_corpus/) through the fuzz harness; no atheris needed.

Each file is one input of fuzz/atheris_dispatcher.py: a session of frames fed to
one Dispatcher over a small scratch tree. `regress-*` files reproduce bugs the
hostile tests found (a blocking OPEN of a FIFO, 32 MiB READ replies); `seed-*`
files reach deep into the op layer. Replaying them must raise nothing: every
request answered once, no reply too big, nothing hung.

When atheris is installed, a short coverage-guided run is done as well.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from fuzz import atheris_dispatcher as harness
from tests.support.hostile_client import fd_count, scratch_tmpfs

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CORPUS = sorted(glob.glob(os.path.join(REPO, "tests", "fuzz_corpus", "*")))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    with scratch_tmpfs(str(base)):
        root = base / "root"
        root.mkdir()
        h = harness.Harness(str(root))
        try:
            yield h
        finally:
            h.close()


def test_corpus_is_there():
    assert any(os.path.basename(p).startswith("regress-") for p in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=[os.path.basename(p) for p in CORPUS])
def test_replay(served, path):
    with open(path, "rb") as f:
        data = f.read()
    served.run(data)
    served.run(data)  # twice: state left by the first run must not matter


def test_replay_leaves_no_fd_behind(tmp_path):
    with scratch_tmpfs(str(tmp_path / "area")):
        root = tmp_path / "area" / "root"
        root.mkdir()
        before = fd_count()
        h = harness.Harness(str(root))
        for path in CORPUS:
            with open(path, "rb") as f:
                h.run(f.read())
        h.close()
        assert fd_count() <= before


def test_records_round_trip():
    frames = [(1, b"abc"), (0, b""), (255, bytes(300))]
    assert list(harness.records(harness.encode(frames))) == frames


@pytest.mark.slow
def test_short_atheris_run(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in CORPUS:
        (corpus / os.path.basename(p)).write_bytes(open(p, "rb").read())
    # libFuzzer ends the process with exit(), past the harness's cleanup: run it
    # in a private mount namespace so its scratch tmpfs goes away with it.
    ns = ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 and shutil.which("unshare") else []
    p = subprocess.run(
        [*ns, sys.executable, "-m", "fuzz.atheris_dispatcher",
         "-max_total_time=20", "-rss_limit_mb=2048", str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=REPO),  # this checkout's fuzz/ and actorfs
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    assert "DONE" in p.stderr
