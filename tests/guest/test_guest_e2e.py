"""End to end: a real Linux guest under QEMU mounts actorfs over virtio-fs.

The guest (Debian's cloud kernel + a busybox initramfs, tests/guest/) mounts
the `actorfs` tag, runs tests/guest/workload.sh, prints a report on its serial
console, unmounts and powers off. The backend is `actorfs serve --once` (the
CLI, in its own process). The test checks the guest's report and then the
host directory itself.

TCG, not KVM: a Linux guest under QEMU 7.2 with KVM hangs in early boot on
these (nested) machines, while TCG boots this guest in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess

import pytest

from tests.guest import image
from tests.guest import run as run_mod

# The first guest test also builds the guest image (a kernel package fetched with
# apt-get download), and a boot under TCG may take its full BOOT_TIMEOUT.
pytestmark = [pytest.mark.slow, pytest.mark.guest, pytest.mark.timeout(900)]


def _guest_image() -> image.GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: install the qemu-system-x86 package")
    try:
        return image.build()
    except image.GuestImageError as exc:
        pytest.fail(f"cannot build the test guest: {exc}")


def test_linux_guest_workload_over_virtiofs(tmp_path):
    img = _guest_image()
    root = tmp_path / "shared"
    run_mod.prepare_root(root)
    run = run_mod.run_guest(img, "actorfs", tmp_path, root)
    context = run.context()
    console = run.console
    assert "ACTORFS-INSMOD-FAIL" not in console, context
    assert "ACTORFS-MOUNTED" in console, context
    lines = run.report()
    assert lines, "no workload report on the guest console" + context
    failures = [line for line in lines if line.startswith("FAIL")]
    assert not failures, "\n".join(failures) + context
    result = next(line for line in lines if line.startswith("RESULT"))
    assert result.endswith("fail=0") and "pass=0" not in result, result
    assert "ACTORFS-UMOUNTED" in console, context
    assert run.backend_status == 0, context  # --once: it left with the frontend
    assert not (tmp_path / "actorfs.sock").exists(), "the backend left its socket file behind"

    # The host directory holds what the guest did.
    facts = dict(line.split()[1:3] for line in lines if line.startswith("FACT"))
    big = (root / "big.bin").read_bytes()
    assert len(big) == 16 << 20
    assert hashlib.sha256(big).hexdigest() == facts["big.bin"]
    assert (root / "created.txt").read_text() == "second\nmore\n"
    assert os.path.samefile(root / "created.txt", root / "hard")
    assert os.readlink(root / "link") == "created.txt"
    assert (root / "victim").read_text() == "replacement\n"
    assert not (root / "winner").exists() and not (root / "mv_src").exists()
    assert (root / "mv_dst").read_text() == "moving\n"
    assert (root / "dir" / "renamed_sub").is_dir() and not (root / "dir" / "sub").exists()
    assert not (root / "doomed").exists()
    assert os.readlink(root / "venv" / "bin" / "python") == "/usr/bin/python3"
    assert os.readlink(root / "venv" / "moved_link") == "/etc/passwd"
    assert stat.S_ISFIFO(os.lstat(root / "special" / "fifo").st_mode)
    wh = os.lstat(root / "special" / "wh")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert not (root / "doomed_tree").exists()
    st = os.stat(root / "attrs")
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 1234, 2345)
    assert int(st.st_mtime) == 981173106
    assert len(os.listdir(root / "many")) == 300
    assert (root / "many" / "f299").read_text() == "small file 299\n"
    for w in (1, 2, 3, 4):
        log = (root / "par" / f"log{w}").read_text().splitlines()
        assert log == [f"writer {w} line {j}" for j in range(40)]
        assert (root / "par" / f"w{w}_39").read_text() == f"writer {w} file 39\n"


def test_guest_walks_a_tree_with_the_backend_held_to_1024_fds(tmp_path):
    """5,000 files, a backend whose RLIMIT_NOFILE is 1,024 (issue 15): the guest's
    find and ls -lR see every file, again after it drops its caches."""
    img = _guest_image()
    root = tmp_path / "shared"
    run_mod.prepare_root(root)
    for d in range(5):
        (root / "tree" / f"d{d}").mkdir(parents=True)
        for i in range(1000):
            (root / "tree" / f"d{d}" / f"f{i}").touch()
    (root / "tree.count").write_text("5000\n")
    held = ["prlimit", "--nofile=1024:1024",
            *run_mod.backend_command("actorfs", tmp_path / "actorfs.sock", root)]  # fmt: skip
    run = run_mod.run_guest(img, "actorfs", tmp_path, root, command=held)
    context = run.context()
    lines = run.report()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert lines and not failures, "\n".join(failures) + context
    for check in ("tree_find", "tree_ls_lR", "tree_find_after_drop", "tree_ls_lR_after_drop"):
        assert f"OK {check}" in lines, context
    assert run.backend_status == 0, context


def test_guest_reboot_without_unmount_gets_a_fresh_session(tmp_path):
    """The guest reboots while mounted: no DESTROY, the device is reset, INIT comes again."""
    img = _guest_image()
    root = tmp_path / "shared"
    run_mod.prepare_root(root)
    # Through serve_vhost_user() directly (tests/guest/serve.py), which logs at INFO.
    run = run_mod.run_guest(img, "actorfs-api", tmp_path, root, reboot=True)
    context = run.context()
    assert run.console.count("ACTORFS-MOUNTED") == 2, context
    assert "ACTORFS-REBOOTING" in run.console, context
    assert "INIT again" in run.backend_log, context  # same connection, new session
    lines = run.report()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert lines and not failures, "\n".join(failures) + context
    assert (root / ".rebooted").read_text() == "first boot\n"
    assert run.backend_status == 0, context


@pytest.mark.parametrize("form", ["separate-options", "o-options"])
def test_libvirt_command_line_through_actorfs_virtiofsd(tmp_path, monkeypatch, form):
    """The daemon started exactly as libvirt starts a <binary path=...> virtio-fs daemon.

    libvirt's command-line builder (src/qemu/qemu_virtiofs.c) opens the vhost-user
    socket itself (bound, listening, non-blocking), passes it as --fd=N, then asks
    the binary for --print-capabilities. A daemon with "separate-options" (as
    actorfs-virtiofsd says) is run as

        BINARY --fd=N --shared-dir DIR --cache MODE --sandbox MODE --xattr
               --thread-pool-size=N --rlimit-nofile=N

    one without it (libvirt before the capability, or C virtiofsd) as

        BINARY --fd=N -o source=DIR,cache=MODE,sandbox=MODE,xattr,no_flock,no_posix_lock
               --thread-pool-size=N

    with commas in DIR doubled. Then QEMU gets a chardev on the socket's path.
    """
    from tests.mount.test_integration import _listening_socket, program, script_env

    img = _guest_image()
    root = tmp_path / "shared,dir"  # a comma: escaped as ",," in the -o form
    run_mod.prepare_root(root)
    sock_path = tmp_path / "actorfs-virtiofsd.sock"
    caps = subprocess.run([program("actorfs-virtiofsd"), "--print-capabilities"],
                          env=script_env(), capture_output=True, text=True, timeout=60)
    assert "separate-options" in json.loads(caps.stdout)["features"], caps.stdout + caps.stderr
    if form == "separate-options":
        args = ["--shared-dir", str(root), "--cache", "always", "--sandbox", "chroot",
                "--xattr", "--thread-pool-size=16", "--rlimit-nofile=65536"]
        ignored = ["--sandbox=chroot", "--xattr", "--thread-pool-size=16",
                   "--rlimit-nofile=65536"]
    else:
        source = str(root).replace(",", ",,")
        args = ["-o", f"source={source},cache=always,sandbox=chroot,xattr,no_flock,no_posix_lock",
                "--thread-pool-size=16"]
        ignored = ["-o sandbox=chroot", "-o xattr", "-o no_flock", "-o no_posix_lock",
                   "--thread-pool-size=16"]

    def launch() -> tuple[list[str], tuple[int, ...]]:
        fd = _listening_socket(str(sock_path)).detach()  # a new socket for each boot
        return [program("actorfs-virtiofsd"), f"--fd={fd}", *args], (fd,)

    monkeypatch.setenv("PYTHONPATH", script_env()["PYTHONPATH"])  # this checkout's code
    run = run_mod.run_guest(img, "actorfs-virtiofsd", tmp_path, root, launch=launch)
    context = run.context()
    assert "ACTORFS-MOUNTED" in run.console, context
    lines = run.report()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert lines and not failures, "\n".join(failures) + context
    assert "ACTORFS-UMOUNTED" in run.console, context
    assert run.backend_status == 0, context  # like virtiofsd: it leaves with its frontend
    assert (root / "created.txt").read_text() == "second\nmore\n"
    # Each libvirt option it does not use, said once in its log (libvirt's log file).
    for opt in ignored:
        assert run.backend_log.count(f"ignoring {opt}:") == 1, (opt, run.backend_log)
