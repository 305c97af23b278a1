"""actorfs where users already run filesystem daemons, each convention exercised
the way its launcher uses it (docs/INTEGRATION.md):

- vhost-user backend conventions: --print-capabilities parsed as JSON, --fd with a
  listening socket the test creates (as libvirt and VMM launchers do);
- systemd: READY=1 / STATUS= / STOPPING=1 read from a NOTIFY_SOCKET the test
  listens on, a clean exit on SIGTERM;
- Prometheus: a scrape parsed with prometheus_client's own parser;
- `actorfs stats` in a pseudo-terminal showing live figures;
- the libfuse mount helper: `mount -t fuse.actorfs` and an fstab line (through
  util-linux's --fstab, not /etc/fstab) with `mount MNT` and `umount MNT`.
The guest smoke through libvirt's exact command line is in test_guest_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from tests.support.mount_util import (
    ACTORFS,
    env,
    force_unmount,
    is_mounted,
    needs_mount,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
# Where `pip install -e .` (scripts/setup.sh) puts the console scripts.
SCRIPT_DIRS = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable), "/usr/local/bin"]
# The PATH /bin/sh falls back to: mount(8) drops the caller's PATH before it runs
# mount.fuse3, which finds the filesystem's program on this one.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def program(name: str) -> str:
    """The installed console script `name` (scripts/setup.sh installs them)."""
    path = os.pathsep.join(SCRIPT_DIRS + [os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (pip install -e .)")
    return found


def script_env(**extra: str) -> dict:
    e = env(**extra)
    e["PATH"] = os.pathsep.join(SCRIPT_DIRS + [e.get("PATH", "")])
    return e


class NotifyListener:
    """A NOTIFY_SOCKET, as systemd's: collects the datagrams the service sends."""

    def __init__(self, tmp_path: Path):
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if key in m:
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} from the service; got {self.messages}")
            r, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if r:
                data = self.sock.recv(4096).decode()
                self.messages.append(dict(line.split("=", 1) for line in data.splitlines()))

    def close(self) -> None:
        self.sock.close()


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


# -- vhost-user conventions ----------------------------------------------------------


def test_print_capabilities_is_json_for_both_programs(tmp_path):
    for cmd in ([*ACTORFS, "serve", "--print-capabilities"],
                [program("actorfs-virtiofsd"), "--print-capabilities"]):
        p = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        caps = json.loads(p.stdout)
        assert caps["type"] == "fs" and isinstance(caps["features"], list), caps
    # The shipped description, and the one written for the installed binary.
    shipped = json.loads((REPO / "share/qemu/vhost-user/50-actorfs.json").read_text())
    assert shipped["type"] == "fs" and shipped["binary"].endswith("/actorfs-virtiofsd")
    out = tmp_path / "vhost-user" / "50-actorfs.json"
    p = subprocess.run([*ACTORFS, "vhost-user-json", str(out)], env=script_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    written = json.loads(out.read_text())
    assert written["type"] == "fs" and os.access(written["binary"], os.X_OK), written


def _listening_socket(path: str) -> socket.socket:
    """What libvirt hands its virtio-fs daemon: bound, listening, non-blocking."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    s.setblocking(False)
    return s


def _fuse_session(sock_path: str, root: Path) -> None:
    """A FUSE session over vhost-user (the test's frontend): INIT, LOOKUPs, GETATTR, one ENOENT."""
    from tests.support.vhost_frontend import Frontend

    fe = Frontend(sock_path, timeout=60)
    try:
        fe.start(nqueues=2, size=64)
        q = fe.queues[1]
        body = struct.pack("<IIIIII", 7, 38, 1 << 20, 0, 0, 0) + bytes(40)
        assert q.fuse(26, 0, body)[0] == 0  # INIT
        for _ in range(5):
            error, reply = q.fuse(1, 1, b"hello\0")  # LOOKUP
            assert error == 0
        nodeid = struct.unpack_from("<Q", reply)[0]
        assert q.fuse(3, nodeid, struct.pack("<IIQ", 0, 0, 0))[0] == 0  # GETATTR
        error, _ = q.fuse(3, 987654321, struct.pack("<IIQ", 0, 0, 0))  # an unknown nodeid
        assert error != 0
    finally:
        fe.close()


def test_serve_on_a_passed_fd_notifies_systemd_and_exports_metrics(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    root = tmp_path / "shared"
    root.mkdir()
    (root / "hello").write_text("hi\n")
    sock_path = str(tmp_path / "vu.sock")
    metrics = str(tmp_path / "metrics.sock")
    stats_sock = str(tmp_path / "stats.sock")
    listener = _listening_socket(sock_path)
    notify = NotifyListener(tmp_path)
    proc = subprocess.Popen(
        [*ACTORFS, "serve", f"--fd={listener.fileno()}", "--metrics", metrics,
         "--stats-socket", stats_sock, "--log-level", "info", str(root)],
        env=env(NOTIFY_SOCKET=notify.path), pass_fds=[listener.fileno()],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    listener.close()  # the launcher's copy: the daemon owns it now
    try:
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid), ready
        assert str(root) in ready["STATUS"] and "fd" in ready["STATUS"], ready
        assert "\n" not in ready["STATUS"]
        _fuse_session(sock_path, root)
        # One scrape over the unix socket, parsed by prometheus_client's own parser.
        families = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the session's counters land as it ends
            families = {f.name: f for f in text_string_to_metric_families(_scrape(metrics))}
            counts = {s.labels.get("op"): s.value for s in families["actorfs_requests"].samples
                      if s.name == "actorfs_requests_total"}  # fmt: skip
            if counts.get("LOOKUP", 0) >= 5:
                break
            time.sleep(0.1)
        assert counts.get("LOOKUP") == 5 and counts.get("GETATTR") == 2, counts
        errors = {s.labels["op"]: s.value for s in families["actorfs_request_errors"].samples
                  if s.name == "actorfs_request_errors_total"}  # fmt: skip
        assert errors["GETATTR"] == 1 and errors["LOOKUP"] == 0, errors
        hist = [s for s in families["actorfs_request_duration_seconds"].samples
                if s.labels.get("op") == "LOOKUP"]  # fmt: skip
        inf = [s.value for s in hist if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
        assert inf == [5.0], hist
        assert "actorfs_uptime_seconds" in families
        # The stats socket says the same.
        from actorfs.runtime.cli.observe import read_stats

        assert read_stats(stats_sock)["requests"]["ops"]["LOOKUP"]["count"] == 5
        # SIGTERM: STOPPING=1, a clean exit, the launcher's socket left alone.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
        assert "STOPPING" in notify.wait_for("STOPPING")
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert not os.path.exists(metrics) and not os.path.exists(stats_sock)
        log = proc.stderr.read()
        assert re.search(r"^actorfs: INFO actorfs\.vhost: waiting for a vhost-user frontend on fd",
                         log, re.M), log  # fmt: skip
    finally:
        stop_process(proc)
        notify.close()


def _scrape(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert b"text/plain" in head
    return body.decode()


def test_fd_that_is_not_a_listening_socket_is_one_line(tmp_path):
    a, b = socket.socketpair()
    try:
        p = subprocess.run([*ACTORFS, "serve", f"--fd={a.fileno()}", str(tmp_path)], env=env(),
                           pass_fds=[a.fileno()], capture_output=True, text=True, timeout=60)
    finally:
        a.close()
        b.close()
    assert p.returncode != 0
    assert "not a listening unix stream socket" in p.stderr and "Traceback" not in p.stderr


def test_virtiofsd_separate_options_serve_one_frontend_then_exit(tmp_path):
    """The launcher form of virtiofsd's own options: mapped, or ignored with one line each."""
    root = tmp_path / "shared"
    root.mkdir()
    (root / "hello").write_text("hi\n")
    sock_path = tmp_path / "vfsd.sock"
    ignored = ["--sandbox=none", "--announce-submounts", "--inode-file-handles=mandatory",
               "--xattr", "--posix-acl", "--thread-pool-size=4", "--seccomp=kill"]  # fmt: skip
    proc = subprocess.Popen(
        [program("actorfs-virtiofsd"), f"--socket-path={sock_path}", "--shared-dir", str(root),
         "--cache=never", "--log-level=info", *ignored],
        env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: sock_path.exists() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.stderr.read()
        _fuse_session(str(sock_path), root)
        assert proc.wait(60) == 0  # one frontend, then it leaves, as virtiofsd does
        log = proc.stderr.read()
        for opt in ignored:
            assert log.count(f"ignoring {opt}") == 1, (opt, log)
        assert not sock_path.exists()
    finally:
        stop_process(proc)
    p = subprocess.run([program("actorfs-virtiofsd"), "--socket-path=/nowhere", "-o",
                        f"source={root}", "--frobnicate"], env=script_env(),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "actorfs-virtiofsd: error: unknown option --frobnicate"], p.stderr


# -- mount mode: systemd, TCP metrics, the live view ----------------------------------


def _read_pty(fd: int, buf: bytearray, timeout: float) -> None:
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        with contextlib.suppress(OSError):
            buf.extend(os.read(fd, 65536))


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@needs_mount
def test_mount_notifies_systemd_and_stats_shows_live_figures(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    for i in range(20):
        (src / f"f{i}").write_text(f"file {i}\n")
    notify = NotifyListener(tmp_path)
    server = subprocess.Popen(
        [*ACTORFS, "mount", "-f", str(src), str(mnt), "--metrics", "127.0.0.1:0"],
        env=env(NOTIFY_SOCKET=notify.path), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    viewer = None
    stop_load = threading.Event()
    master = None
    try:
        ready = notify.wait_for("READY")
        assert is_mounted(mnt), "READY=1 before the mount was live"
        assert str(mnt) in ready["STATUS"] and "metrics tcp:127.0.0.1:" in ready["STATUS"], ready
        port = int(re.search(r"metrics tcp:127\.0\.0\.1:(\d+)", ready["STATUS"]).group(1))

        def load() -> None:  # stats and reads through the mount until told to stop
            while not stop_load.is_set():
                subprocess.run(["sh", "-c", f"cat {mnt}/f* > /dev/null; ls -l {mnt} > /dev/null"],
                               timeout=60, check=False)  # fmt: skip
                time.sleep(0.05)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        # `actorfs stats MNT` in a terminal: the live figures, refreshed in place.
        master, slave = pty.openpty()
        # Started with SIGINT ignored, as a shell without job control starts a
        # background command: Ctrl-C must still quit it (it used to hang there).
        viewer = subprocess.Popen([*ACTORFS, "stats", str(mnt), "-n", "0.3"],
                                  env=env(TERM="xterm-256color", COLUMNS="120", LINES="40"),
                                  stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        os.close(slave)
        out = bytearray()
        live = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and live is None:
            _read_pty(master, out, 0.5)
            text = ANSI.sub("", out.decode(errors="replace"))
            for m in re.finditer(r"^\s*(READ|LOOKUP|GETATTR|OPEN|READDIRPLUS)\s+([\d.]+)\s+(\d+)\s+"
                                 r"(\d+)\s+(\S+)\s+(\S+)", text, re.M):  # fmt: skip
                if float(m.group(2)) > 0:
                    live = m
        text = ANSI.sub("", out.decode(errors="replace"))
        assert live is not None, f"no live rate in `actorfs stats`:\n{text[-3000:]}"
        assert "REQ/S" in text and "P99" in text and str(mnt) in text, text[-3000:]
        assert re.fullmatch(r"[\d.]+(us|ms|s)", live.group(5)), live.group(0)
        assert b"\x1b[" in out  # drawn in place (cursor movement), not appended
        viewer.send_signal(signal.SIGINT)
        # Keep draining the terminal while it exits: a viewer whose pty is full
        # blocks in write() and never gets to exit (seen on a loaded machine).
        deadline = time.monotonic() + 60
        while viewer.poll() is None and time.monotonic() < deadline:
            _read_pty(master, out, 0.2)
        assert viewer.wait(1) == 0
        # The TCP scrape, for good measure.
        from prometheus_client.parser import text_string_to_metric_families

        body = subprocess.run([sys.executable, "-c", (
            "import urllib.request,sys;"
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics',"
            " timeout=30).read().decode())")], capture_output=True, text=True, timeout=60).stdout
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"actorfs_requests", "actorfs_fuse_frames"} <= names, names
        stop_load.set()
        loader.join(60)
        # SIGTERM: STOPPING=1, unmounted, status 0.
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.stderr.read()
        assert notify.wait_for("STOPPING")["STOPPING"] == "1"
        assert not is_mounted(mnt)
    finally:
        stop_load.set()
        if viewer is not None and viewer.poll() is None:
            viewer.kill()
            viewer.wait()
        if master is not None:
            os.close(master)
        stop_process(server)
        force_unmount(mnt)
        notify.close()


# -- the libfuse mount helper ---------------------------------------------------------


@contextlib.contextmanager
def actorfs_on_default_path():
    """mount.fuse3 runs `actorfs` from the default PATH (mount drops the caller's).

    pip puts it in /usr/local/bin on Debian; where it went elsewhere (a
    pyenv), a symlink in /usr/local/bin for the test's duration, then removed.
    """
    if shutil.which("actorfs", path=DEFAULT_PATH):
        yield
        return
    real = program("actorfs")
    link = "/usr/local/bin/actorfs"
    os.makedirs("/usr/local/bin", exist_ok=True)
    os.symlink(real, link)
    try:
        yield
    finally:
        os.unlink(link)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, **kw)  # fmt: skip


def _wait_server_gone(mnt: Path) -> bool:
    """The daemonized server has exited: its (abstract) stats socket no longer answers."""
    from actorfs.runtime.cli.observe import read_stats, stats_socket_for

    def gone() -> bool:
        try:
            read_stats(stats_socket_for(str(mnt)), timeout=10)
        except ConnectionRefusedError:
            return True
        except (OSError, ValueError):
            return False
        return False

    return wait_until(gone, timeout=60, step=0.2)


@needs_mount
def test_mount_t_fuse_actorfs_and_an_fstab_line(tmp_path):
    if shutil.which("mount.fuse3", path=DEFAULT_PATH) is None:
        pytest.fail("mount.fuse3 is missing: install fuse3 (scripts/setup.sh)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "hello").write_text("hi\n")
    (src / "prog").write_text("#!/bin/sh\necho ran\n")
    (src / "prog").chmod(0o755)
    try:
        with actorfs_on_default_path():
            # mount -t: options of ours, the kernel's and fstab's all in one -o.
            p = _run(["mount", "-t", "fuse.actorfs", str(src), str(mnt), "-o",
                      "allow_other,ro,cache=always,noauto,nofail,_netdev,noatime,noexec"])  # fmt: skip
            assert p.returncode == 0, p.stderr + p.stdout
            assert is_mounted(mnt)
            assert (mnt / "hello").read_text() == "hi\n"
            w = _run(["sh", "-c", f"echo x > {mnt}/new"])
            assert w.returncode != 0 and "Read-only" in w.stderr, w.stderr
            opts = next(line.split()[3] for line in open("/proc/mounts")
                        if line.split()[1] == str(mnt))  # fmt: skip
            assert "allow_other" in opts, opts
            # The VFS flags asked for are on the mount (they used to be dropped).
            assert {"noexec", "noatime", "nosuid", "nodev"} <= set(opts.split(",")), opts
            with pytest.raises(PermissionError):  # execve: EACCES on a noexec mount
                _run([str(mnt / "prog")])
            p = _run(["umount", str(mnt)])
            assert p.returncode == 0, p.stderr
            assert not is_mounted(mnt) and _wait_server_gone(mnt)

            # The fstab line, read from a file of the test's (util-linux --fstab).
            fstab = tmp_path / "fstab"
            fstab.write_text(f"# test\n{src} {mnt} fuse.actorfs "
                             "noauto,nofail,_netdev,user,cache=auto,x-systemd.automount 0 0\n")
            p = _run(["mount", "-T", str(fstab), str(mnt)])
            assert p.returncode == 0, p.stderr + p.stdout
            assert is_mounted(mnt)
            with pytest.raises(PermissionError):  # `user` implies noexec, as on any fstab line
                _run([str(mnt / "prog")])
            (mnt / "through-fstab").write_text("written\n")
            assert (src / "through-fstab").read_text() == "written\n"
            p = _run(["umount", str(mnt)])
            assert p.returncode == 0, p.stderr
            assert not is_mounted(mnt) and _wait_server_gone(mnt)

            # An option that maps to nothing is refused, naming it.
            p = _run(["mount", "-t", "fuse.actorfs", str(src), str(mnt), "-o", "frobnicate"])
            assert p.returncode != 0 and "frobnicate" in p.stderr + p.stdout
            assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
