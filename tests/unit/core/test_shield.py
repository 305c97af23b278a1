"""The asyncio core: shielded cleanups, and no anyio anywhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from actorfs.runtime.core.shield import shielded


def test_a_cancel_waits_for_the_cleanup_then_is_raised():
    done = []

    async def cleanup():
        await asyncio.sleep(0.05)
        done.append(True)
        return 7

    async def owner():
        return await shielded(cleanup())

    async def main():
        task = asyncio.create_task(owner())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # twice: still waits
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done == [True]
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert await shielded(cleanup()) == 7

    asyncio.run(main())


def test_the_core_does_not_import_anyio():
    code = (
        "import sys, pkgutil, importlib, actorfs\n"
        "for m in pkgutil.walk_packages(actorfs.__path__, 'actorfs.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('anyio' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
