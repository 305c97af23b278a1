"""xattrs of a symlink: the host kernel's answer for the link itself, never its
target's (getxattr/listxattr used to answer EPERM, so `ls -la` printed
"Operation not permitted" for every link)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile

import pytest

from actorfs.runtime.core.attrs import RequestContext
from tests.support.helpers_fs import CTX, ROOT, errno_of, ops, running
from tests.support.mount_util import CliMount, env, force_unmount, needs_mount

NOBODY = RequestContext(uid=65534, gid=65534, pid=1)
SETPRIV = shutil.which("setpriv")
GETFATTR = shutil.which("getfattr")


def _tree(root) -> None:
    with open(os.path.join(root, "f"), "w") as f:
        f.write("x")
    os.setxattr(os.path.join(root, "f"), "user.target", b"t")
    os.symlink("f", os.path.join(root, "l"))
    if os.geteuid() == 0:
        os.setxattr(os.path.join(root, "l"), "trusted.onlink", b"v", follow_symlinks=False)


@pytest.mark.usefixtures("syscall_mode")
async def test_symlink_xattrs_are_the_links_own(tmp_path):
    _tree(tmp_path)
    host = sorted(os.listxattr(tmp_path / "l", follow_symlinks=False))
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"l")
        # the target's user.* attribute is not the link's
        assert await errno_of(ops.getxattr(fs, CTX, e.nodeid, b"user.target", 64)) == errno.ENODATA
        blob = (await ops.listxattr(fs, CTX, e.nodeid, 4096)).value
        assert sorted(n.decode() for n in blob.split(b"\0") if n) == host
        if os.geteuid() == 0:
            assert (await ops.getxattr(fs, CTX, e.nodeid, b"trusted.onlink", 64)).value == b"v"
            # trusted.* is listed to root only, as the host does
            blob = (await ops.listxattr(fs, NOBODY, e.nodeid, 4096)).value
            assert b"trusted." not in blob
        # user.* cannot be set on a link (the host's EPERM)
        assert await errno_of(ops.setxattr(fs, CTX, e.nodeid, b"user.k", b"v", 0)) == errno.EPERM
    assert os.getxattr(tmp_path / "f", "user.target") == b"t"


def _run(cmd: list[str], who: str) -> subprocess.CompletedProcess:
    if who == "nobody":
        cmd = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=env(LC_ALL="C"), cwd="/",
    )  # fmt: skip


@needs_mount
@pytest.mark.skipif(SETPRIV is None or GETFATTR is None, reason="needs setpriv and getfattr")
def test_ls_and_getfattr_on_a_link_through_a_mount():
    base = tempfile.mkdtemp(prefix="actorfs-lnkxattr-")  # /tmp: reachable by nobody
    src, mnt = os.path.join(base, "src"), os.path.join(base, "mnt")
    try:
        os.chmod(base, 0o755)
        os.mkdir(src, 0o755)
        os.mkdir(mnt, 0o755)
        _tree(src)
        with CliMount(src, mnt, "--allow-other"):
            for who in ("root", "nobody"):
                ls = _run(["ls", "-la", mnt], who)
                assert ls.returncode == 0 and ls.stderr == "", (who, ls.stderr)
                assert " l -> f" in ls.stdout
                outs = []
                for d in (src, mnt):
                    p = _run([GETFATTR, "-h", "-d", "-m", "-", "--absolute-names", os.path.join(d, "l")], who)
                    outs.append((p.returncode, p.stdout.replace(d, "D"), p.stderr.replace(d, "D")))
                assert outs[0] == outs[1], (who, outs)
                if who == "root":
                    assert 'trusted.onlink="v"' in outs[1][1]
    finally:
        force_unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)
