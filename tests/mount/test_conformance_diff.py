"""A differential test: one sequence of operations (tests/support/conformance_seq.py,
a few hundred checks over every op and file type) runs on a mount and on a
plain directory of the same tmpfs, as root, as nobody (65534) and as uid 4242
with a supplementary group, under the default cache and `--cache never`.
Return values, errnos, lstat fields and time relations must be the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.support import mount_util
from tests.support.hostile_client import scratch_tmpfs

pytestmark = mount_util.needs_mount

SEQ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "conformance_seq.py")
# (uid, gid, supplementary groups, the uid owning the "other" objects)
USERS = {
    "root": (0, 0, "0", 4242),
    "nobody": (65534, 65534, "", 4242),
    "u4242": (4242, 4242, "4242,4243", 65534),
}
CONFIGS = {"default": [], "never": ["--cache", "never"]}


@pytest.fixture(scope="module")
def area():
    base = tempfile.mkdtemp(prefix="actorfs-conform-", dir="/tmp")
    os.chmod(base, 0o755)  # non-root users walk down to the mount
    try:
        with scratch_tmpfs(base, "256m") as mounted:
            assert mounted, "a scratch tmpfs is needed (root)"
            yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_seq(d: str, user: str) -> list:
    uid, gid, groups, other = USERS[user]
    os.mkdir(d, 0o755)
    os.chown(d, uid, gid)
    os.chmod(d, 0o755)
    p = subprocess.run(
        [sys.executable, SEQ, d, str(uid), str(gid), groups, str(other)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd="/",
        env=mount_util.env(),
    )  # fmt: skip
    assert p.returncode == 0, f"sequence failed in {d} as {user}:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout)


def diff(a: list, b: list) -> list[str]:
    out = []
    names_a = [n for n, _ in a]
    names_b = [n for n, _ in b]
    if names_a != names_b:
        out.append(f"different checks ran: {set(names_a) ^ set(names_b)}")
    for (n, va), (_, vb) in zip(a, b, strict=False):
        if va != vb:
            out.append(f"{n}: mount {va!r} != native {vb!r}")
    return out


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_mount_behaves_as_the_native_directory(area, config):
    src = os.path.join(area, "src-" + config)
    plain = os.path.join(area, "plain-" + config)
    mnt = os.path.join(area, "mnt-" + config)
    for d in (src, plain, mnt):
        os.mkdir(d, 0o755)
    differences, checks = [], 0
    with mount_util.CliMount(src, mnt, "--allow-other", *CONFIGS[config]):
        for user in USERS:
            got = run_seq(os.path.join(mnt, user), user)
            want = run_seq(os.path.join(plain, user), user)
            checks += len(want)
            differences += [f"[{config} {user}] {line}" for line in diff(got, want)]
    print(f"{checks} checks, {len(differences)} differ")
    assert checks > 600
    assert not differences, f"{len(differences)} of {checks} checks differ:\n" + "\n".join(
        differences
    )
