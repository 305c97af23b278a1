"""Where op syscalls run: inline on a memory-backed root, in the pool otherwise."""

from __future__ import annotations

import os
import subprocess

import pytest

from actorfs.runtime.host import backing_fs
from actorfs.runtime.ops.filesystem import ConfigError, Filesystem, FsConfig

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def tmpfs(tmp_path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "t", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


@needs_root
def test_tmpfs_is_memory_backed_and_gets_inline_syscalls(tmpfs):
    assert backing_fs.memory_backed(str(tmpfs))
    assert Filesystem(FsConfig(root=str(tmpfs))).inline
    # follow opens link targets anywhere, our own mount included: never inline.
    assert not Filesystem(FsConfig(root=str(tmpfs), symlinks="follow")).inline
    assert not Filesystem(FsConfig(root=str(tmpfs), inline="never")).inline


def test_a_disk_root_keeps_the_pool_unless_asked(tmp_path):
    if backing_fs.memory_backed(str(tmp_path)):
        pytest.skip(f"{tmp_path} is itself on tmpfs: no disk directory to test with")
    fs = Filesystem(FsConfig(root=str(tmp_path)))
    assert not fs.inline
    # fstat of a held fd reads the in-memory inode on a local disk filesystem.
    assert fs.inline_fstat == (backing_fs.fs_type(str(tmp_path)) in backing_fs.LOCAL_DISK)
    assert not Filesystem(FsConfig(root=str(tmp_path), inline="never")).inline_fstat
    assert Filesystem(FsConfig(root=str(tmp_path), inline="always")).inline


def test_a_mountpoint_beneath_the_root_turns_inline_off(tmp_path):
    fs = Filesystem(FsConfig(root=str(tmp_path), inline="always"))
    fs.serving_at(str(tmp_path.parent / "elsewhere"))
    assert fs.inline
    (tmp_path / "mnt").mkdir()
    fs.serving_at(str(tmp_path / "mnt"))
    assert not fs.inline  # a lookup of "mnt" would stat our own mount from the loop
    assert not fs.inline_fstat


def test_bad_inline_mode_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown inline mode 'sometimes': use one of auto, always, never"):
        FsConfig(root=str(tmp_path), inline="sometimes")


def test_beneath():
    assert backing_fs.beneath("/a/b", "/a")
    assert backing_fs.beneath("/a", "/a")
    assert not backing_fs.beneath("/ab", "/a")
    assert backing_fs.beneath("/x", "/")
