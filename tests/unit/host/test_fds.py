"""OwnedFd (runtime/host/fds.py): the fd is closed however the block ends, unless
release() handed it on first."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from actorfs.runtime.host.fds import OwnedFd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def new_fd() -> int:
    return os.open("/", os.O_PATH | os.O_CLOEXEC)


def test_closes_on_an_exception():
    fd = new_fd()
    with pytest.raises(ValueError):
        with OwnedFd(fd) as owned:
            assert owned.fd == fd
            raise ValueError("boom")
    assert not is_open(fd)


def test_closes_on_a_normal_exit_without_release():
    fd = new_fd()
    with OwnedFd(fd):
        pass
    assert not is_open(fd)


def test_not_closed_after_release():
    fd = new_fd()
    try:
        with OwnedFd(fd) as owned:
            assert owned.release() == fd
            assert owned.fd == -1
            raise ValueError("after the hand-over")
    except ValueError:
        pass
    assert is_open(fd)
    os.close(fd)


def release_then_return() -> int:
    with OwnedFd(new_fd()) as owned:
        return owned.release()


def test_release_as_the_return_value():
    fd = release_then_return()
    assert is_open(fd)
    os.close(fd)


async def test_closes_when_the_task_is_cancelled():
    fd = new_fd()
    entered = asyncio.Event()

    async def op() -> None:
        with OwnedFd(fd):
            entered.set()
            await asyncio.sleep(3600)  # cancelled here (FUSE_INTERRUPT)

    task = asyncio.ensure_future(op())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not is_open(fd)


async def test_cancelled_after_release_keeps_the_fd():
    fd = new_fd()
    entered = asyncio.Event()

    async def op() -> int:
        with OwnedFd(fd) as owned:
            owned.release()
            entered.set()
            await asyncio.sleep(3600)
        return -1

    task = asyncio.ensure_future(op())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert is_open(fd)
    os.close(fd)


def test_keyboard_interrupt_closes_too():
    fd = new_fd()
    with pytest.raises(KeyboardInterrupt):
        with OwnedFd(fd):
            raise KeyboardInterrupt
    assert not is_open(fd)


def test_minus_one_holds_nothing():
    with OwnedFd(-1) as owned:
        assert owned.release() == -1
    with OwnedFd(-1):
        pass  # nothing to close, no EBADF


def test_replace_closes_the_old_fd_and_owns_the_new_one():
    a, b = new_fd(), new_fd()
    with pytest.raises(RuntimeError):
        with OwnedFd(a) as owned:
            owned.replace(b)
            assert not is_open(a) and owned.fd == b
            raise RuntimeError
    assert not is_open(b)


def test_close_is_idempotent():
    fd = new_fd()
    owned = OwnedFd(fd)
    owned.close()
    owned.close()
    assert not is_open(fd) and owned.fd == -1
    with owned:
        pass  # the block's exit has nothing left to close
