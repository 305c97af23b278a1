import os

import pytest

# Root's tools the tests run (modprobe and depmod for the guest image, losetup,
# mkfs.ext4) live in the sbin directories, which a CI runner's PATH may lack.
_path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
for _d in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
    if _d not in _path and os.path.isdir(_d):
        _path.append(_d)
os.environ["PATH"] = os.pathsep.join(_path)

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def pytest_asyncio_loop_factories(config, item):
    # The tests run on the loop the CLI uses.
    if uvloop is not None:
        return {"uvloop": uvloop.new_event_loop}
    return None


@pytest.fixture(params=["pool", "inline"])
def syscall_mode(request):
    """Run an op-level test twice: syscalls in the blocking pool, and inline on
    the loop (what a tmpfs root gets: runtime/host/backing_fs.py)."""
    from tests.support import helpers_fs

    helpers_fs.INLINE["mode"] = "never" if request.param == "pool" else "always"
    yield request.param
    helpers_fs.INLINE["mode"] = "never"


@pytest.fixture
def dirs(tmp_path):
    """(src, mnt) for a real mount: src with a hello file, mnt empty; unmounted after."""
    from tests.support.mount_util import force_unmount, make_dirs

    src, mnt = make_dirs(tmp_path)
    yield src, mnt
    force_unmount(mnt)


@pytest.fixture(params=["held", "evict-handle", "evict-name"])
def fd_cache_mode(request):
    """Run an op-level test with every inode's fd held (a large cache), and with
    eviction forced (a cache of one fd) reopening by file handle (root) or by name."""
    from tests.support import helpers_fs

    if request.param == "evict-handle" and os.geteuid() != 0:
        pytest.skip("reopening by file handle needs root")
    helpers_fs.DEFAULTS.clear()
    if request.param != "held":
        helpers_fs.DEFAULTS["fd_cache"] = 1
    if request.param == "evict-name":
        helpers_fs.DEFAULTS["file_handles"] = False
    yield request.param
    helpers_fs.DEFAULTS.clear()


def pytest_collection_modifyitems(config, items):
    """The tiers by folder: tests/mount/ mounts for real (root, /dev/fuse), tests/guest/
    boots a Linux guest; both are slow. `pytest -m "not slow"` runs the unit tier."""
    for item in items:
        parts = item.path.parts
        if "tests" not in parts:
            continue
        tier = parts[parts.index("tests") + 1] if parts.index("tests") + 1 < len(parts) else ""
        if tier == "mount":
            item.add_marker(pytest.mark.mount)
            item.add_marker(pytest.mark.slow)
        elif tier == "guest":
            item.add_marker(pytest.mark.guest)
            item.add_marker(pytest.mark.slow)
