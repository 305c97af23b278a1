"""The actorfs CLI: every user error is one line and exit status 2; the demo runs.

Plus the small pure pieces of the mount code (mountinfo parsing, sizes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from actorfs.runtime.cli import main as actorfs_cli
from actorfs.runtime.devfuse import mounting as fuse_mount
from tests.support.mount_util import REPO, cli, env, force_unmount, is_mounted, needs_mount


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("actorfs: error: "), lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "src" / "in").mkdir(parents=True)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "file").write_text("x")
    return tmp_path


@pytest.mark.parametrize(
    "args, expect",
    [
        ([], "required: SRC, MNT"),
        (["{t}/src"], "required: MNT"),
        (["{t}/nope", "{t}/mnt"], "source directory {t}/nope does not exist"),
        (["{t}/file", "{t}/mnt"], "source {t}/file is not a directory"),
        (["{t}/src", "{t}/nope"], "mountpoint {t}/nope does not exist: create it with mkdir -p"),
        (["{t}/src", "{t}/file"], "mountpoint {t}/file is not a directory"),
        (["{t}/src", "/proc"], "mountpoint /proc is already a mount point: unmount it first"),
        (["{t}/src", "{t}/src/in"], "mountpoint {t}/src/in is inside the source directory {t}/src"),
        (["{t}/src", "{t}/mnt", "--cache", "sometimes"], "invalid choice: 'sometimes'"),
        (["{t}/src", "{t}/mnt", "--symlinks", "maybe"], "invalid choice: 'maybe'"),
        (["{t}/src", "{t}/mnt", "--queues", "0"], "out of range"),
        (["{t}/src", "{t}/mnt", "--queues", "many"], "not a whole number"),
        (["{t}/src", "{t}/mnt", "--stats-interval", "-1"], "more than 0 seconds"),
        (["{t}/src", "{t}/mnt", "--poll", "-1"], "out of range: use 0 to 100000"),
        (["{t}/src", "{t}/mnt", "--poll", "soon"], "not a whole number of microseconds"),
        (["{t}/src", "{t}/mnt", "--read-ahead", "lots"], "not a whole number of KiB"),
        (["{t}/src", "{t}/mnt", "--mount-flags", "noexec,nosuid"], "'nosuid' is not a mount flag: use noexec, sync"),
        (["{t}/src", "{t}/mnt", "--inline", "sometimes"], "invalid choice: 'sometimes'"),
        (["{t}/src", "{t}/mnt", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
@pytest.mark.parametrize("foreground", [True, False])
def test_mount_user_errors_are_one_line(tree, args, expect, foreground):
    argv = ["mount", *(a.format(t=tree) for a in args)] + (["-f"] if foreground else [])
    line = one_error_line(cli(*argv, timeout=30))
    assert expect.format(t=tree) in line


@pytest.mark.parametrize(
    "args, expect",
    [
        ([], "COMMAND"),  # no command: help, exit 2
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["serve", "{t}/src"], "required: --socket"),
        (["serve", "--socket", "{t}/sock", "{t}/nope"], "source directory {t}/nope does not exist"),
        (["serve", "--socket", "{t}/sock", "{t}/src", "--dax-size", "lots"], "not a size"),
    ],
)
def test_other_user_errors(tree, args, expect):
    r = cli(*(a.format(t=tree) for a in args), timeout=30)
    if not args:
        assert r.returncode == 2 and "COMMAND" in r.stderr
        return
    assert expect.format(t=tree) in one_error_line(r)


def test_no_dev_fuse_says_modprobe(tree, capsys, monkeypatch):
    monkeypatch.setattr(fuse_mount, "FUSE_DEVICE", str(tree / "no-such-device"))
    assert actorfs_cli.main(["mount", str(tree / "src"), str(tree / "mnt"), "-f"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "modprobe fuse" in err[0] and err[0].startswith("actorfs: error: ")


def test_not_root_without_fusermount_says_apt_get(tree, capsys, monkeypatch):
    # As an ordinary user with no fusermount3 on PATH.
    monkeypatch.setattr(actorfs_cli.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("PATH", str(tree))
    assert actorfs_cli.main(["mount", str(tree / "src"), str(tree / "mnt"), "-f"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("actorfs: error: "), err
    assert "fusermount3" in err[0] and "apt-get install fuse3" in err[0]


def test_help_exits_0():
    r = cli("mount", "--help", timeout=30)
    assert r.returncode == 0 and "--passthrough" in r.stdout and "--queues" in r.stdout


@needs_mount
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_demo_runs_and_cleans_up():
    before = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("actorfs-demo-")}
    r = cli("demo", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the changes are in the source directory: yes" in r.stdout
    assert "unmounted" in r.stdout
    after = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("actorfs-demo-")}
    for d in after - before:  # the demo removes its directories; never leave a mount
        mnt = os.path.join(tempfile.gettempdir(), d, "mnt")
        assert not is_mounted(mnt)
        force_unmount(mnt)
    assert after == before


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "actorfs", "--help"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and "mount" in r.stdout and "serve" in r.stdout


# -- small pieces -------------------------------------------------------------------------


def test_parse_size():
    assert actorfs_cli.parse_size("4096") == 4096
    assert actorfs_cli.parse_size("64M") == 64 << 20
    assert actorfs_cli.parse_size("1g") == 1 << 30
    assert actorfs_cli.parse_size("2GiB") == 2 << 30
    for bad in ("", "M", "1.5G", "-1", "12Q"):
        with pytest.raises(Exception, match="not a size"):
            actorfs_cli.parse_size(bad)


def test_mountinfo_parsing_unescapes_paths(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - ext4 /dev/root rw\n"
        "45 22 0:45 / /tmp/a\\040b\\011c\\134d rw,nosuid shared:1 - fuse.actorfs actorfs:/s\\040x rw\n"
        "garbage line\n"
    )
    entries = fuse_mount.mountinfo(str(info))
    assert [(m.minor, m.mountpoint, m.fstype, m.source) for m in entries] == [
        (21, "/", "ext4", "/dev/root"),
        (45, "/tmp/a b\tc\\d", "fuse.actorfs", "actorfs:/s x"),
    ]


def test_format_stats_of_an_idle_server():
    text = actorfs_cli.format_stats({"mountpoint": "/m", "uptime_s": 1, "requests": {}})
    assert text.startswith("actorfs stats: /m up 1s, 0 requests")


def test_fusermount_option_escaping():
    assert fuse_mount._escape_opt("actorfs:/a,b\\c") == "actorfs:/a\\,b\\\\c"


@pytest.mark.timeout(60)
def test_serve_listens_and_sigterm_removes_the_socket(tree):
    import signal
    import time

    sock = tree / "vhost.sock"
    p = subprocess.Popen([sys.executable, "-m", "actorfs", "serve", "--socket", str(sock),
                          str(tree / "src")], cwd=REPO, env=env(), stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.is_socket() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert sock.is_socket(), p.stderr.read() if p.poll() is not None else "no socket"
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert not sock.exists()
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
