"""How a mount served by the CLI ends: signals, external umount, kill -9, daemon mode.

Whatever the way out, the mountpoint is left unmounted (or, after kill -9,
fails fast with ENOTCONN until `umount -l`), and no server process is left.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.mount_util import (
    CliMount,
    cli,
    force_unmount,
    is_mounted,
    needs_mount,
    pid_alive,
    py,
    sh,
    wait_until,
)

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.timeout(120)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_and_exits_0(dirs, sig):
    src, mnt = dirs
    m = CliMount(src, mnt).start()
    assert is_mounted(mnt)
    assert sh(f"cat '{mnt}/hello'").stdout == "hi\n"
    m.signal(sig)
    assert m.wait(30) == 0, m.stderr
    assert not is_mounted(mnt)
    assert not pid_alive(m.pid)
    assert "Traceback" not in m.stderr


def test_external_umount_exits_0(dirs):
    src, mnt = dirs
    m = CliMount(src, mnt).start()
    subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    assert m.wait(30) == 0, m.stderr
    assert not is_mounted(mnt)
    assert "Traceback" not in m.stderr


def test_kill_9_leaves_a_mount_that_fails_fast(dirs):
    src, mnt = dirs
    m = CliMount(src, mnt).start()
    m.signal(signal.SIGKILL)
    assert m.wait(30) == -signal.SIGKILL
    # No hang: every access fails at once with ENOTCONN.
    code = f"import os\ntry:\n    os.stat({str(mnt)!r})\nexcept OSError as e:\n    print(e.errno)"
    t0 = time.monotonic()
    assert py(code, timeout=20).stdout.strip() == str(errno.ENOTCONN)
    assert time.monotonic() - t0 < 15
    # A new mount on it says what to do, in one line.
    r = cli("mount", str(src), str(mnt), "-f", timeout=20)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"actorfs: error: mountpoint {mnt} is a dead FUSE mount: clean it up with umount -l {mnt}"
    ]
    subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)
    assert not is_mounted(mnt)
    assert not pid_alive(m.pid)


def test_sigterm_while_a_file_is_held_open(dirs):
    """A program holding a file open cannot keep the server (or itself) hanging."""
    src, mnt = dirs
    m = CliMount(src, mnt).start()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time\nf = open({str(mnt / 'hello')!r})\nprint('open', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        m.signal(signal.SIGTERM)
        assert m.wait(30) == 0, m.stderr
        assert not is_mounted(mnt)
    finally:
        holder.kill()
        holder.wait(20)
    assert not pid_alive(m.pid)


def test_sigusr1_and_stats_interval_print_stats(dirs):
    src, mnt = dirs
    m = CliMount(src, mnt, "--stats-interval", "0.2").start()
    try:
        sh(f"ls -la '{mnt}' > /dev/null; cat '{mnt}/hello' > /dev/null")
        assert wait_until(lambda: m.stderr.count("actorfs stats:") >= 2, 10)
        n = m.stderr.count("actorfs stats:")
        m.signal(signal.SIGUSR1)
        assert wait_until(lambda: m.stderr.count("actorfs stats:") > n, 10)
        # OPEN, not READ: with passthrough (the default where the kernel has
        # it) the kernel reads the file itself.
        assert re.search(r"OPEN\s+\d+ req", m.stderr), m.stderr
        assert re.search(r"^  passthrough (on|off)", m.stderr, re.M), m.stderr
    finally:
        assert m.stop() == 0


def test_daemon_mode_returns_once_mounted_and_exits_on_umount(dirs):
    src, mnt = dirs
    r = cli("mount", str(src), str(mnt), timeout=30)
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt)
        found = re.search(r"server pid (\d+)", r.stdout)
        assert found and str(mnt) in r.stdout, r.stdout
        pid = int(found.group(1))
        assert pid_alive(pid)
        assert sh(f"cat '{mnt}/hello' && echo more > '{mnt}/new'").stdout == "hi\n"
        assert (src / "new").read_text() == "more\n"
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        assert wait_until(lambda: not pid_alive(pid), 20)
    finally:
        force_unmount(mnt)


def test_daemon_mode_sigterm(dirs):
    src, mnt = dirs
    r = cli("mount", str(src), str(mnt), "--cache", "never", timeout=30)
    assert r.returncode == 0, r.stderr
    pid = int(re.search(r"server pid (\d+)", r.stdout).group(1))
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not pid_alive(pid), 20)
    assert not is_mounted(mnt)


def test_read_only_mount(dirs):
    src, mnt = dirs
    with CliMount(src, mnt, "--read-only"):
        out = py(
            "import errno, os\n"
            f"os.chdir({str(mnt)!r})\n"
            "print(open('hello').read().strip())\n"
            "for f in (lambda: open('x', 'w'), lambda: os.mkdir('d'), lambda: os.unlink('hello')):\n"
            "    try:\n        f()\n    except OSError as e:\n        print(errno.errorcode[e.errno])\n"
        ).stdout.split()
    assert out == ["hi", "EROFS", "EROFS", "EROFS"]
    assert sorted(os.listdir(src)) == ["hello"]


def test_paths_with_spaces_and_commas(tmp_path):
    src, mnt = tmp_path / "my src, one", tmp_path / "my mnt"
    src.mkdir()
    mnt.mkdir()
    try:
        with CliMount(src, mnt, "--queues", "2"):
            assert is_mounted(mnt)
            sh(f"echo ok > '{mnt}/f'")
            assert (src / "f").read_text() == "ok\n"
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


@pytest.mark.parametrize("allow_other", [False, True])
def test_allow_other(allow_other):
    """Only the mounting user gets in, unless --allow-other (default_permissions applies)."""
    import shutil
    import tempfile

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    base = tempfile.mkdtemp(prefix="actorfs-allow-")  # under /tmp, reachable by nobody
    try:
        os.chmod(base, 0o755)
        src, mnt = os.path.join(base, "src"), os.path.join(base, "mnt")
        os.mkdir(src, 0o755)
        os.mkdir(mnt, 0o755)
        with open(os.path.join(src, "public"), "w") as f:
            f.write("for all\n")
        with open(os.path.join(src, "secret"), "w") as f:
            f.write("root only\n")
        os.chmod(os.path.join(src, "secret"), 0o600)
        with CliMount(src, mnt, *(["--allow-other"] if allow_other else [])):

            def as_nobody(path):
                return subprocess.run(
                    [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path],
                    capture_output=True, text=True, timeout=20,
                )  # fmt: skip

            opts = next(line.split()[3] for line in open("/proc/self/mounts") if line.split()[1] == mnt)
            # The kernel checks permissions itself only when others may enter.
            assert ("default_permissions" in opts.split(",")) == allow_other, opts
            public, secret = as_nobody(f"{mnt}/public"), as_nobody(f"{mnt}/secret")
            if allow_other:
                assert (public.returncode, public.stdout) == (0, "for all\n"), public.stderr
                assert secret.returncode != 0 and "Permission denied" in secret.stderr
            else:
                assert public.returncode != 0 and "Permission denied" in public.stderr
            assert sh(f"cat '{mnt}/secret'").stdout == "root only\n"
    finally:
        force_unmount(os.path.join(base, "mnt"))
        shutil.rmtree(base, ignore_errors=True)


def test_without_default_permissions_the_owner_still_gets_unix_semantics(dirs):
    """No default_permissions for the mount owner: exec bits, access(2) and a
    read-only mount still behave as on a kernel filesystem."""
    src, mnt = dirs
    with CliMount(src, mnt):
        script = f"{mnt}/run.sh"
        with open(f"{src}/run.sh", "w") as f:
            f.write("#!/bin/sh\necho ran\n")
        os.chmod(f"{src}/run.sh", 0o644)
        r = sh(f"'{script}'", check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr  # even root needs an x bit
        assert sh(f"test -x '{script}' || echo no-x").stdout == "no-x\n"  # access(2): FUSE_ACCESS
        os.chmod(f"{src}/run.sh", 0o755)
        time.sleep(1.1)  # past the attribute timeout
        assert sh(f"'{script}'").stdout == "ran\n"
        assert sh(f"cd '{mnt}' && pwd").stdout.strip() == str(mnt)


def test_sigterm_under_load_ends_everything(dirs):
    """Stop while programs are busy in the mount: they fail, nothing hangs, no leftovers."""
    src, mnt = dirs
    m = CliMount(src, mnt).start()
    # Each worker lives inside the mount (cwd), so it cannot fall through to
    # the empty mountpoint directory once the mount is gone.
    loop = (
        f"cd '{mnt}' || exit 1; while :; do "
        "dd if=/dev/zero of=w$$ bs=64k count=8 status=none || exit 0; ls >/dev/null || exit 0; done"
    )
    workers = [subprocess.Popen(["sh", "-c", loop], stderr=subprocess.DEVNULL) for _ in range(6)]
    try:
        time.sleep(0.5)
        m.signal(signal.SIGTERM)
        assert m.wait(30) == 0, m.stderr
        for w in workers:
            w.wait(30)  # every worker sees errors and exits: none hangs on the mount
        assert not is_mounted(mnt)
        assert "Traceback" not in m.stderr
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
