"""Real programs on a default mount (`actorfs mount SRC MNT`), each checked
against the host copy: a venv, git with absolute and relative links, `ls -la`,
tar of device nodes and FIFOs, rm -rf (issue 13)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.support import mount_util

pytestmark = mount_util.needs_mount


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = mount_util.CliMount(src, mnt)  # the defaults: what a new user gets
    m.start()
    try:
        yield src, mnt, m
    finally:
        m.stop()


def run(cmd, cwd, timeout=180, **env):
    e = mount_util.env(LC_ALL="C", GIT_CONFIG_NOSYSTEM="1", HOME=str(cwd), **env)
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env=e, stdin=subprocess.DEVNULL)  # fmt: skip
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def listing(root) -> list[tuple]:
    """(path, type, mode, nlink, uid, gid, size, rdev, link target) of a tree, host side."""
    out = []
    for d, dirs, files in os.walk(root):
        for n in sorted(dirs + files):
            p = os.path.join(d, n)
            st = os.lstat(p)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            tgt = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out.append((os.path.relpath(p, root), st.st_mode, st.st_nlink, st.st_uid,
                        st.st_gid, size, st.st_rdev, tgt))  # fmt: skip
    return sorted(out)


def test_venv_runs_its_python_and_pip(mount):
    src, mnt, m = mount
    run([sys.executable, "-m", "venv", "v"], cwd=mnt, timeout=300)
    # bin/python is a link to a path outside the root: served as a link
    assert os.path.isabs(os.readlink(src / "v" / "bin" / "python3")) or os.readlink(
        src / "v" / "bin" / "python3"
    ).startswith("python")
    p = run([str(mnt / "v" / "bin" / "python"), "-c", "import sys; print(sys.prefix)"], cwd=mnt)
    assert p.stdout.strip() == str(mnt / "v")
    p = run([str(mnt / "v" / "bin" / "pip"), "--version"], cwd=mnt, timeout=300)
    assert p.stdout.startswith("pip ")
    p = run(["ls", "-la", str(mnt / "v" / "bin")], cwd=mnt)
    assert p.stderr == "" and "python ->" in p.stdout
    run(["rm", "-rf", "v"], cwd=mnt)
    assert not (src / "v").exists() and m.proc.poll() is None


def test_git_with_absolute_and_relative_links(mount):
    src, mnt, m = mount
    work = mnt / "repo"
    work.mkdir()
    (work / "f.txt").write_text("hello\n")
    os.symlink("/usr/bin/env", work / "abs")
    os.symlink("f.txt", work / "rel")
    os.symlink("/nonexistent/dangling", work / "dangling")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
           "-c", "init.defaultBranch=main", "-c", "safe.directory=*"]  # fmt: skip
    run([*git, "init", "-q"], cwd=work)
    run([*git, "add", "."], cwd=work)
    run([*git, "commit", "-qm", "links"], cwd=work)
    p = run([*git, "ls-files", "-s"], cwd=work)
    modes = {line.split()[-1]: line.split()[0] for line in p.stdout.splitlines()}
    assert modes == {"abs": "120000", "dangling": "120000", "f.txt": "100644", "rel": "120000"}
    run([*git, "clone", "-q", str(work), str(mnt / "clone")], cwd=mnt)
    assert os.readlink(src / "clone" / "abs") == "/usr/bin/env"
    assert os.readlink(src / "clone" / "rel") == "f.txt"
    # the host sees the same repository
    p = run([*git, "-C", str(src / "repo"), "status", "--porcelain"], cwd=src)
    assert p.stdout == ""
    p = run(["ls", "-la", str(work), str(mnt / "clone")], cwd=mnt)
    assert p.stderr == ""
    run(["rm", "-rf", "repo", "clone"], cwd=mnt)
    assert not (src / "repo").exists() and not (src / "clone").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")
def test_tar_of_devices_fifos_and_links_matches_the_host(mount, tmp_path):
    src, mnt, m = mount
    t = mnt / "tree"
    (t / "d" / "e").mkdir(parents=True)
    (t / "f").write_bytes(b"data" * 1000)
    os.link(t / "f", t / "d" / "hard")
    os.symlink("/etc/hostname", t / "abs")
    os.symlink("../f", t / "d" / "rel")
    os.symlink("missing", t / "d" / "e" / "dangling")
    os.mkfifo(t / "fifo")
    os.mknod(t / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(t / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.mknod(t / "d" / "whiteout", stat.S_IFCHR, 0)  # overlayfs whiteout
    os.chmod(t / "d", 0o2755)
    p = run(["ls", "-la", str(t), str(t / "d")], cwd=mnt)
    assert p.stderr == ""
    # tar c on the mount and on the host copy list the same archive
    run(["tar", "-cf", str(tmp_path / "m.tar"), "-C", str(t), "."], cwd=tmp_path)
    run(["tar", "-cf", str(tmp_path / "h.tar"), "-C", str(src / "tree"), "."], cwd=tmp_path)
    lm = run(["tar", "-tvf", str(tmp_path / "m.tar")], cwd=tmp_path).stdout.splitlines()
    lh = run(["tar", "-tvf", str(tmp_path / "h.tar")], cwd=tmp_path).stdout.splitlines()
    assert sorted(lm) == sorted(lh) and len(lm) == 12
    # tar x into the mount recreates the same tree on the host
    (mnt / "x").mkdir()
    run(["tar", "-xpf", str(tmp_path / "h.tar"), "-C", str(mnt / "x")], cwd=tmp_path)
    assert listing(src / "x") == listing(src / "tree")
    run(["rm", "-rf", "tree", "x"], cwd=mnt)
    assert "tree" not in os.listdir(src) and "x" not in os.listdir(src)


def test_rm_rf_leaves_the_host_directory_empty(mount):
    """Last in the module: rm -rf of everything on the mount empties the host dir."""
    src, mnt, m = mount
    t = mnt / "junk"
    (t / "a" / "b").mkdir(parents=True)
    (t / "a" / "b" / "f").write_text("x")
    os.symlink("/usr", t / "a" / "usr")
    os.symlink("..", t / "a" / "b" / "up")
    os.symlink("/nonexistent", mnt / "top-dangling")
    os.mkfifo(t / "a" / "p")
    os.link(t / "a" / "b" / "f", t / "hard")
    (mnt / ".hidden").write_text("h")
    p = run(["ls", "-laR", str(mnt)], cwd=mnt)
    assert p.stderr == ""
    run(["find", str(mnt), "-mindepth", "1", "-maxdepth", "1", "-exec", "rm", "-rf", "{}", "+"],
        cwd=mnt)  # fmt: skip
    assert os.listdir(src) == []
    assert os.listdir(mnt) == []
    assert m.proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")
def test_no_devices_refuses_device_nodes_but_whiteouts(dirs):
    src, mnt = dirs
    with mount_util.CliMount(src, mnt, "--no-devices"):
        p = subprocess.run(["mknod", str(mnt / "null"), "c", "1", "3"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert p.returncode != 0 and "not permitted" in p.stderr
        p = subprocess.run(["mknod", str(mnt / "loop"), "b", "7", "200"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert p.returncode != 0 and "not permitted" in p.stderr
        run(["mknod", str(mnt / "wh"), "c", "0", "0"], cwd=mnt)
        run(["mkfifo", str(mnt / "p")], cwd=mnt)
    assert sorted(os.listdir(src)) == ["hello", "p", "wh"]
    assert os.lstat(src / "wh").st_rdev == 0
