"""A short subset of CPython's filesystem tests (scripts/conformance.py runs all
of them into docs/CONFORMANCE.md): each module runs with cwd and TMPDIR inside
a default mount and in a plain directory of the same filesystem, in the same
run; every test case must end the same way on both."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import pytest

from scripts import conformance
from tests.support import mount_util

# fast modules that exercise links, renames, permissions and temp files
SUBSET = ["test_shutil", "test_glob", "test_genericpath", "test_stat", "test_filecmp"]

pytestmark = [
    mount_util.needs_mount,
    pytest.mark.skipif(importlib.util.find_spec("test.test_os") is None,
                       reason="this Python has no test package"),  # fmt: skip
]


@pytest.fixture(scope="module")
def places():
    base = tempfile.mkdtemp(prefix="actorfs-cpy-", dir="/tmp")
    src, mnt, native = (os.path.join(base, n) for n in ("src", "mnt", "native"))
    for d in (src, mnt, native):
        os.mkdir(d)
    m = mount_util.CliMount(src, mnt)
    m.start()
    try:
        yield mnt, native, m
    finally:
        m.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("module", SUBSET)
def test_cpython_module_same_on_mount_and_native(places, module):
    mnt, native, m = places
    rn = conformance.run_module(module, os.path.join(native, module), timeout=300)
    rm = conformance.run_module(module, os.path.join(mnt, module), timeout=300)
    assert rn["cases"], f"no test cases ran natively: {rn['tail']}"
    diff = conformance.compare(rn, rm)
    assert not diff, "\n".join(diff[:40]) + "\n" + "\n".join(rm["tail"])
    assert m.proc.poll() is None, m.stderr[-2000:]
