"""HANDLE_KILLPRIV_V2 on a real mount: set-ID bits fall as on a kernel filesystem.

The kernel stops asking GETXATTR security.capability before every write once
the server takes over dropping privileges; these tests run the same writes,
truncates and O_TRUNC opens, by root and by an unprivileged user, on a plain
directory and through the mount, and compare the modes left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time

import pytest

from tests.support.mount_util import CliMount, force_unmount, needs_mount

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.timeout(120)]

SETPRIV = shutil.which("setpriv")

# (mode, file's group, who, action): action runs as `who` on such a file.
CASES = [
    (0o4777, 0, "nobody", "write"),
    (0o2777, 0, "nobody", "write"),  # sgid with group x: dropped
    (0o2767, 0, "nobody", "write"),  # sgid, no group x, writer not in the group: dropped
    (0o2767, 65534, "nobody", "write"),  # ... writer in the group: kept
    (0o6777, 0, "nobody", "truncate"),
    (0o4777, 0, "nobody", "open_trunc"),
    (0o4777, 0, "root", "write"),  # CAP_FSETID keeps the bits
    (0o4777, 0, "root", "truncate"),
]

ACTIONS = {
    "write": "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); os.write(fd, b'x'); os.close(fd)",
    "truncate": "import os,sys; os.truncate(sys.argv[1], 3)",
    "open_trunc": "import os,sys; os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC))",
}


def run_as(who: str, action: str, path: str) -> None:
    cmd = ["python3", "-c", ACTIONS[action], path]
    if who == "nobody":
        cmd = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def base():
    d = tempfile.mkdtemp(prefix="actorfs-killpriv-")  # /tmp: reachable by nobody
    os.chmod(d, 0o755)
    yield d
    force_unmount(os.path.join(d, "mnt"))
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed")
def test_set_id_bits_fall_exactly_as_on_the_host(base):
    native, src, mnt = (os.path.join(base, n) for n in ("native", "src", "mnt"))
    for d in (native, src, mnt):
        os.mkdir(d, 0o755)
    with CliMount(src, mnt, "--allow-other"):
        for i, (mode, gid, who, action) in enumerate(CASES):
            for where, host in ((native, native), (mnt, src)):
                with open(os.path.join(host, f"f{i}"), "wb") as f:
                    f.write(b"content")
                os.chown(os.path.join(host, f"f{i}"), 0, gid)
                os.chmod(os.path.join(host, f"f{i}"), mode)
                time.sleep(0.01)
                run_as(who, action, os.path.join(where, f"f{i}"))
        for i, (mode, _gid, who, action) in enumerate(CASES):
            want = stat.S_IMODE(os.stat(os.path.join(native, f"f{i}")).st_mode)
            got = stat.S_IMODE(os.stat(os.path.join(src, f"f{i}")).st_mode)
            assert got == want, f"{oct(mode)} {action} by {who}: {oct(got)}, native {oct(want)}"
    # The table is not vacuous: some bits fell, some stayed.
    assert any(stat.S_IMODE(os.stat(os.path.join(native, f"f{i}")).st_mode) != m
               for i, (m, _, _, _) in enumerate(CASES))  # fmt: skip
    assert any(stat.S_IMODE(os.stat(os.path.join(native, f"f{i}")).st_mode) == m
               for i, (m, _, _, _) in enumerate(CASES))  # fmt: skip


def test_capabilities_are_dropped_on_write_and_getxattr_is_not_asked_per_write(base):
    src, mnt = os.path.join(base, "src"), os.path.join(base, "mnt")
    os.mkdir(src)
    os.mkdir(mnt)
    host = os.path.join(src, "tool")
    with open(host, "wb") as f:
        f.write(b"\0" * 16)
    os.chmod(host, 0o755)
    # vfs_cap_data, revision 2: CAP_NET_RAW (13) permitted.
    os.setxattr(host, "security.capability", struct.pack("<IIIII", 0x02000000, 1 << 13, 0, 0, 0))
    m = CliMount(src, mnt).start()
    try:
        with open(os.path.join(mnt, "tool"), "r+b") as f:
            for _ in range(50):
                f.write(b"x" * 4096)
                f.flush()
        with pytest.raises(OSError):
            os.getxattr(host, "security.capability")  # gone, as a write on the host drops it
        m.signal(signal.SIGUSR1)
        time.sleep(0.5)
        getxattrs = [line for line in m.stderr.splitlines() if line.strip().startswith("GETXATTR")]
        asked = int(getxattrs[-1].split()[1]) if getxattrs else 0
        assert asked <= 2, getxattrs  # not once per write(2)
    finally:
        assert m.stop() == 0, m.stderr
