"""Real programs through a real FUSE mount served by the actorfs CLI.

Each test works in its own directory of a shared mount, drives it from
subprocesses (Python os/shutil, cp, tar, git, sqlite3, mmap...) and then
checks the host directory underneath. The whole set runs once per mount
mode: default caching, no caching (direct I/O), long caching with writeback,
FUSE passthrough, and syscalls inline on the event loop.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import textwrap

import pytest

from tests.support.mount_util import CliMount, needs_mount, py, sh

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.timeout(300)]

MODES = {
    "auto": [],
    "never": ["--cache", "never"],
    "always-writeback": ["--cache", "always", "--writeback"],
    "passthrough": ["--passthrough"],
    # The source is on the disk here: force what a tmpfs source gets by default.
    "inline": ["--inline", "always"],
}


@pytest.fixture(scope="module", params=list(MODES))
def mounted(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"e2e-{request.param}")
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = CliMount(src, mnt, *MODES[request.param]).start()
    m.mode = request.param
    yield m
    rc = m.stop()
    assert rc == 0, m.stderr
    assert "Traceback" not in m.stderr, m.stderr


@pytest.fixture
def area(mounted, request):
    """(host dir, the same dir through the mount, mode) for one test."""
    name = request.node.name.replace("[", "-").replace("]", "")
    host = os.path.join(mounted.src, name)
    os.mkdir(host)
    return host, os.path.join(mounted.mnt, name), mounted.mode


def tree_digest(root: str, mtime_res: int = 1) -> dict:
    """path -> (type, mode, content hash or link target, mtime for files in mtime_res ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    h = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("f", stat.S_IMODE(st.st_mode), h, st.st_mtime_ns // mtime_res)
    return out


def make_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "dir/sub/deeper"))
    with open(os.path.join(root, "small.txt"), "w") as f:
        f.write("hello\n")
    with open(os.path.join(root, "dir/big.bin"), "wb") as f:
        f.write(os.urandom(3 * 1024 * 1024 + 17))
    for i in range(40):
        with open(os.path.join(root, f"dir/sub/f{i:02}"), "w") as f:
            f.write(f"file {i}\n" * i)
    os.chmod(os.path.join(root, "dir/sub/f07"), 0o600)
    os.chmod(os.path.join(root, "dir/sub/f08"), 0o755)
    os.symlink("../small.txt", os.path.join(root, "dir/link"))
    os.symlink("nowhere", os.path.join(root, "dir/sub/dangling"))
    os.utime(os.path.join(root, "small.txt"), ns=(1_500_000_000_123_456_789,) * 2)


# -- Python os / shutil ------------------------------------------------------------------


def test_python_os_and_shutil(area):
    host, mnt, _ = area
    code = textwrap.dedent(
        """
        import json, os, shutil, stat
        os.makedirs("a/b/c")
        with open("a/f.txt", "w") as f:
            f.write("x" * 10000)
        os.chmod("a/f.txt", 0o640)
        os.truncate("a/f.txt", 100)
        shutil.copytree("a", "copy")
        shutil.copy2("a/f.txt", "a/g.txt")
        os.rename("copy", "moved")
        shutil.rmtree("moved/b")
        os.mkfifo("fifo")
        os.remove("a/g.txt")
        with open("a/f.txt", "r+b") as f:
            f.seek(50)
            f.write(b"MIDDLE")
        os.utime("a/f.txt", ns=(1_000_000_000, 2_000_000_123))
        st = os.stat("a/f.txt")
        print(json.dumps({
            "size": st.st_size, "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime_ns,
            "top": sorted(os.listdir(".")), "moved": sorted(os.listdir("moved")),
            "statvfs": os.statvfs(".").f_bsize > 0,
        }))
        """
    )
    out = json.loads(py(code, cwd=mnt).stdout)
    assert out == {
        "size": 100, "mode": 0o640, "mtime": 2_000_000_123,
        "top": ["a", "fifo", "moved"], "moved": ["f.txt"], "statvfs": True,
    }  # fmt: skip
    st = os.stat(os.path.join(host, "a/f.txt"))
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (100, 0o640, 2_000_000_123)
    with open(os.path.join(host, "a/f.txt"), "rb") as f:
        assert f.read() == b"x" * 50 + b"MIDDLE" + b"x" * 44
    assert stat.S_ISFIFO(os.lstat(os.path.join(host, "fifo")).st_mode)
    assert sorted(os.listdir(host)) == ["a", "fifo", "moved"]
    assert os.listdir(os.path.join(host, "moved")) == ["f.txt"]
    assert os.path.isdir(os.path.join(host, "a/b/c"))


# -- cp -a and tar -----------------------------------------------------------------------


def test_cp_a_round_trip(area, tmp_path):
    host, mnt, _ = area
    tree = tmp_path / "tree"
    make_tree(str(tree))
    sh(f"cp -a '{tree}' '{mnt}/copy' && cp -a '{mnt}/copy' '{tmp_path}/back'")
    want = tree_digest(str(tree))
    assert tree_digest(os.path.join(host, "copy")) == want
    assert tree_digest(str(tmp_path / "back")) == want
    assert sh(f"diff -r --no-dereference '{tree}' '{mnt}/copy'").returncode == 0


def test_tar_create_extract_round_trip(area, tmp_path):
    host, mnt, _ = area
    tree = tmp_path / "tree"
    make_tree(str(tree))
    sh(
        f"""
        tar -C '{tree}' -cf '{mnt}/t.tar' .
        mkdir '{mnt}/out'
        tar -C '{mnt}/out' -xpf '{mnt}/t.tar'
        tar -C '{mnt}/out' -cf '{tmp_path}/again.tar' .
        mkdir '{tmp_path}/again'
        tar -C '{tmp_path}/again' -xpf '{tmp_path}/again.tar'
        """
    )
    want = tree_digest(str(tree), 10**9)  # tar keeps whole seconds
    assert tree_digest(os.path.join(host, "out"), 10**9) == want
    assert tree_digest(str(tmp_path / "again"), 10**9) == want
    listing = sh(f"tar -tf '{host}/t.tar' | sort").stdout
    assert "./dir/sub/f39" in listing and "./dir/link" in listing


# -- git ---------------------------------------------------------------------------------


def test_git_init_add_commit_status(area, tmp_path):
    host, mnt, _ = area
    git = "git -c user.name=t -c user.email=t@example.org -c init.defaultBranch=main -c safe.directory='*'"
    sh(
        f"""
        export HOME='{tmp_path}' GIT_CONFIG_NOSYSTEM=1
        cd '{mnt}'
        {git} init -q repo
        cd repo
        mkdir -p src/pkg
        for i in $(seq 1 30); do echo "line $i" > src/pkg/m$i.py; done
        echo '# readme' > README.md
        {git} add -A
        {git} commit -qm first
        echo changed >> README.md
        {git} mv src/pkg/m1.py src/pkg/renamed.py
        test "$({git} status --porcelain | wc -l)" -ge 2
        {git} commit -qam second
        test -z "$({git} status --porcelain)"
        {git} gc -q
        {git} fsck --strict
        """
    )
    repo = os.path.join(host, "repo")
    hostgit = ["git", "-c", "safe.directory=*", "-C", repo]
    log = sh(" ".join(hostgit) + " log --oneline").stdout.split("\n")
    assert [line.split(" ", 1)[1] for line in log if line] == ["second", "first"]
    assert sh(" ".join(hostgit) + " status --porcelain").stdout == ""
    sh(" ".join(hostgit) + " fsck --strict")
    assert os.path.exists(os.path.join(repo, "src/pkg/renamed.py"))


# -- sqlite in WAL mode --------------------------------------------------------------------

SQLITE_WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
db.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v TEXT)")
for batch in range(40):
    db.execute("BEGIN")
    for j in range(25):
        db.execute("INSERT INTO t (v) VALUES (?)", (f"row {batch} {j}" * 10,))
    db.execute("COMMIT")
db.close()
"""

SQLITE_READER = """
import sqlite3, sys, time
deadline = time.monotonic() + 60
last = 0
while time.monotonic() < deadline:
    try:
        db = sqlite3.connect(sys.argv[1], timeout=30)
        n = db.execute("SELECT count(*) FROM t").fetchone()[0]
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        db.close()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            continue
        raise
    assert n >= last, (n, last)   # readers never see committed rows vanish
    assert n % 25 == 0, n          # and never a half transaction
    last = n
    if n == 1000:
        print("done")
        break
"""


def test_sqlite_wal_with_concurrent_readers(area):
    import subprocess
    import sys

    host, mnt, _ = area
    db = os.path.join(mnt, "db.sqlite")
    # Create the database (and WAL mode) before readers start.
    py(
        f"import sqlite3; c = sqlite3.connect({db!r}); c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)'); c.close()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", SQLITE_READER, db], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    writer = subprocess.run([sys.executable, "-c", SQLITE_WRITER, db], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert writer.returncode == 0, writer.stderr
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.strip() == "done", err
    import sqlite3

    con = sqlite3.connect(os.path.join(host, "db.sqlite"))
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# -- mmap ------------------------------------------------------------------------------------


def test_mmap_read_and_write_through_the_mount(area):
    host, mnt, mode = area
    with open(os.path.join(host, "ro.bin"), "wb") as f:
        f.write(bytes(range(256)) * 256)
    code = textwrap.dedent(
        """
        import mmap, os
        with open("ro.bin", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:256] == bytes(range(256)) and len(m) == 65536
        fd = os.open("rw.bin", os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, 1 << 20)
        with mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED) as m:
            for i in range(0, 1 << 20, 4096):
                m[i:i + 8] = i.to_bytes(8, "little")
            m.flush()
        os.close(fd)
        """
    )
    py(code, cwd=mnt)
    with open(os.path.join(host, "rw.bin"), "rb") as f:
        data = f.read()
    assert len(data) == 1 << 20
    for i in range(0, 1 << 20, 4096):
        assert data[i : i + 8] == i.to_bytes(8, "little")


# -- concurrent writers --------------------------------------------------------------------


def test_concurrent_writers_distinct_files(area):
    host, mnt, _ = area
    sh(
        f"""
        cd '{mnt}'
        for i in $(seq 1 8); do
          (for j in $(seq 1 50); do printf '%s-%04d\\n' "$i" "$j"; done > w$i.txt; dd if=/dev/zero of=z$i.bin bs=64k count=16 status=none) &
        done
        wait
        """
    )
    for i in range(1, 9):
        with open(os.path.join(host, f"w{i}.txt")) as f:
            assert f.read() == "".join(f"{i}-{j:04}\n" for j in range(1, 51))
        assert os.path.getsize(os.path.join(host, f"z{i}.bin")) == 1 << 20


SAME_FILE_WRITER = """
import os, sys
k, path = int(sys.argv[1]), sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
chunk = bytes([65 + k]) * 65536
for rnd in range(4):
    for slot in range(k, 32, 8):                 # this writer's slots only
        os.pwrite(fd, chunk, slot * 65536)
    os.fsync(fd)
afd = os.open(path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for j in range(100):
    os.write(afd, f"writer {k} line {j:03}\\n".encode())
os.close(afd)
os.close(fd)
"""


def test_concurrent_writers_same_file(area):
    import subprocess
    import sys

    host, mnt, _ = area
    path = os.path.join(mnt, "shared.bin")
    procs = [subprocess.Popen([sys.executable, "-c", SAME_FILE_WRITER, str(k), path],
                              stderr=subprocess.PIPE) for k in range(8)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with open(os.path.join(host, "shared.bin"), "rb") as f:
        data = f.read()
    assert len(data) == 32 * 65536
    for slot in range(32):
        assert data[slot * 65536 : (slot + 1) * 65536] == bytes([65 + slot % 8]) * 65536, slot
    with open(os.path.join(host, "shared.bin.log")) as f:
        lines = f.read().splitlines()
    # O_APPEND from 8 processes: every line whole, none lost.
    assert sorted(lines) == sorted(f"writer {k} line {j:03}" for k in range(8) for j in range(100))


READER_SEES_WRITER = r"""
import os, sys
p = sys.argv[1]
with open(p, "wb") as f:
    f.write(b"a" * 10000)
r = os.open(p, os.O_RDONLY)
assert os.pread(r, 10, 5000) == b"a" * 10  # now in the reader's page cache
w = os.open(p, os.O_WRONLY | os.O_APPEND)  # write-only: direct I/O under auto
os.write(w, b"TAIL")
w2 = os.open(p, os.O_WRONLY)
os.pwrite(w2, b"MID", 5000)
got = (os.pread(r, 10, 5000), os.pread(r, 10, 9996), os.fstat(r).st_size)
assert got == (b"MIDaaaaaaa", b"aaaaTAIL", 10004), got
"""


def test_a_reader_sees_a_write_only_writer_at_once(area):
    """Writes through write-only opens reach a reader's cached pages at once, as
    on a kernel filesystem (not after the attribute timeout)."""
    host, mnt, _ = area
    py(READER_SEES_WRITER.replace("sys.argv[1]", repr(os.path.join(mnt, "coherent"))))
    with open(os.path.join(host, "coherent"), "rb") as f:
        assert f.read()[4998:5005] == b"aaMIDaa"


# -- links, rename, xattrs ---------------------------------------------------------------------


def test_hard_links(area):
    host, mnt, _ = area
    out = py(
        textwrap.dedent(
            """
            import os
            open("orig", "w").write("one")
            os.link("orig", "alias")
            os.mkdir("d"); os.link("orig", "d/third")
            with open("alias", "a") as f: f.write("+two")
            a, b = os.stat("orig"), os.stat("d/third")
            print(a.st_nlink, a.st_ino == b.st_ino, open("d/third").read())
            os.unlink("orig")
            print(os.stat("alias").st_nlink)
            """
        ),
        cwd=mnt,
    ).stdout.split()
    assert out == ["3", "True", "one+two", "2"]
    a, b = os.stat(os.path.join(host, "alias")), os.stat(os.path.join(host, "d/third"))
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert not os.path.exists(os.path.join(host, "orig"))
    with open(os.path.join(host, "alias")) as f:
        assert f.read() == "one+two"


def test_symlinks(area):
    host, mnt, _ = area
    os.makedirs(os.path.join(host, "real"))
    with open(os.path.join(host, "real/file"), "w") as f:
        f.write("content")
    out = py(
        textwrap.dedent(
            """
            import os, stat
            os.symlink("real/file", "rel")
            os.symlink("missing", "dangling")
            os.symlink("real", "dirlink")
            print(os.readlink("rel"), open("rel").read(), os.listdir("dirlink"))
            print(stat.S_ISLNK(os.lstat("dangling").st_mode), os.path.exists("dangling"))
            os.rename("rel", "rel2")
            os.unlink("dirlink")
            """
        ),
        cwd=mnt,
    ).stdout.split()
    assert out == ["real/file", "content", "['file']", "True", "False"]
    assert os.readlink(os.path.join(host, "rel2")) == "real/file"
    assert os.readlink(os.path.join(host, "dangling")) == "missing"
    assert not os.path.lexists(os.path.join(host, "dirlink"))
    assert os.path.isdir(os.path.join(host, "real"))  # unlinking the link left the target


def test_rename_over_existing(area):
    host, mnt, _ = area
    out = py(
        textwrap.dedent(
            """
            import ctypes, errno, os
            open("a", "w").write("AAA"); open("b", "w").write("BBB")
            os.rename("a", "b")
            os.mkdir("d1"); os.mkdir("d2"); open("d1/x", "w").write("x")
            os.rename("d1", "d2")               # over an empty directory
            os.mkdir("full"); open("full/y", "w").write("y"); os.mkdir("e")
            try:
                os.rename("e", "full")
            except OSError as e:
                print(errno.errorcode[e.errno])
            libc = ctypes.CDLL(None, use_errno=True)
            AT = -100
            open("p", "w").write("P"); open("q", "w").write("Q")
            rc = libc.renameat2(AT, b"p", AT, b"q", 1)  # RENAME_NOREPLACE
            print(errno.errorcode[ctypes.get_errno()] if rc else "replaced")
            rc = libc.renameat2(AT, b"p", AT, b"q", 2)  # RENAME_EXCHANGE
            print(errno.errorcode[ctypes.get_errno()] if rc else "exchanged")
            print(open("p").read(), open("q").read(), sorted(os.listdir(".")))
            """
        ),
        cwd=mnt,
    ).stdout.split("\n")
    assert out[:4] == ["ENOTEMPTY", "EEXIST", "exchanged", "Q P ['b', 'd2', 'e', 'full', 'p', 'q']"]
    with open(os.path.join(host, "b")) as f:
        assert f.read() == "AAA"
    assert not os.path.exists(os.path.join(host, "a"))
    assert os.listdir(os.path.join(host, "d2")) == ["x"]
    assert not os.path.exists(os.path.join(host, "d1"))
    assert open(os.path.join(host, "p")).read() == "Q"
    assert open(os.path.join(host, "q")).read() == "P"


def test_user_xattrs(area):
    host, mnt, _ = area
    with open(os.path.join(host, "f"), "w") as f:
        f.write("x")
    os.setxattr(os.path.join(host, "f"), "user.from_host", b"H")
    out = py(
        textwrap.dedent(
            """
            import errno, os
            os.setxattr("f", "user.k", b"value")
            os.setxattr("f", "user.big", b"z" * 3000)
            print(os.getxattr("f", "user.k").decode(), os.getxattr("f", "user.from_host").decode())
            print(sorted(a for a in os.listxattr("f") if a.startswith("user.")))
            os.removexattr("f", "user.big")
            try:
                os.getxattr("f", "user.big")
            except OSError as e:
                print(errno.errorcode[e.errno])
            try:
                os.setxattr("f", "user.k", b"again", os.XATTR_CREATE)
            except OSError as e:
                print(errno.errorcode[e.errno])
            """
        ),
        cwd=mnt,
    ).stdout.split("\n")
    assert out[:4] == ["value H", "['user.big', 'user.from_host', 'user.k']", "ENODATA", "EEXIST"]
    p = os.path.join(host, "f")
    assert os.getxattr(p, "user.k") == b"value"
    assert sorted(os.listxattr(p)) == ["user.from_host", "user.k"]


# -- fallocate, SEEK_DATA / SEEK_HOLE ------------------------------------------------------------


def test_fallocate(area):
    host, mnt, _ = area
    py(
        textwrap.dedent(
            """
            import ctypes, os
            fd = os.open("f", os.O_RDWR | os.O_CREAT, 0o644)
            os.posix_fallocate(fd, 0, 1 << 20)
            os.pwrite(fd, b"\\xff" * (1 << 20), 0)
            os.fsync(fd)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE over the first half
            assert libc.fallocate(fd, 1 | 2, 0, 1 << 19) == 0, ctypes.get_errno()
            # FALLOC_FL_KEEP_SIZE beyond the end: blocks but no size change
            assert libc.fallocate(fd, 1, 1 << 20, 1 << 20) == 0, ctypes.get_errno()
            assert os.fstat(fd).st_size == 1 << 20
            assert os.pread(fd, 16, 0) == bytes(16)
            os.close(fd)
            """
        ),
        cwd=mnt,
    )
    p = os.path.join(host, "f")
    st = os.stat(p)
    assert st.st_size == 1 << 20
    with open(p, "rb") as f:
        data = f.read()
    assert data[: 1 << 19] == bytes(1 << 19) and data[1 << 19 :] == b"\xff" * (1 << 19)
    # Punched half gone, kept-size preallocation beyond EOF present (512-byte blocks).
    assert st.st_blocks * 512 >= (1 << 19) + (1 << 20) - 8192


def test_seek_data_and_hole(area):
    host, mnt, _ = area
    p = os.path.join(host, "sparse")
    with open(p, "wb") as f:
        f.write(b"a" * 4096)
        f.seek(1 << 20)
        f.write(b"b" * 4096)
        f.truncate(4 << 20)
    fd = os.open(p, os.O_RDONLY)
    try:
        want = [os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 4096, os.SEEK_DATA),
                os.lseek(fd, (1 << 20) + 1, os.SEEK_HOLE)]  # fmt: skip
    finally:
        os.close(fd)
    if want[0] == 4 << 20:
        pytest.skip("the host filesystem does not report holes")
    out = py(
        textwrap.dedent(
            """
            import errno, os
            fd = os.open("sparse", os.O_RDONLY)
            print(os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 4096, os.SEEK_DATA),
                  os.lseek(fd, (1 << 20) + 1, os.SEEK_HOLE))
            try:
                os.lseek(fd, (1 << 20) + 8192, os.SEEK_DATA)
            except OSError as e:
                print(errno.errorcode[e.errno])
            """
        ),
        cwd=mnt,
    ).stdout.split("\n")
    assert out[0].split() == [str(w) for w in want]
    assert out[1] == "ENXIO"


def test_errors_reach_programs(area):
    """Failures come back as the right errno, not EIO."""
    host, mnt, _ = area
    out = py(
        textwrap.dedent(
            """
            import errno, os
            def err(f, *a):
                try:
                    f(*a)
                except OSError as e:
                    return errno.errorcode[e.errno]
                return "ok"
            os.mkdir("d"); open("d/f", "w").close()
            print(err(os.stat, "missing"), err(os.mkdir, "d"), err(os.rmdir, "d"),
                  err(os.unlink, "d"), err(os.listdir, "d/f"), err(open, "d/f/x", "w"))
            """
        ),
        cwd=mnt,
    ).stdout.split()
    assert out == ["ENOENT", "EEXIST", "ENOTEMPTY", "EISDIR", "ENOTDIR", "ENOTDIR"]
    assert errno.ENOENT  # the names above are Linux's


def test_large_file_integrity(area):
    host, mnt, _ = area
    sh(
        f"dd if=/dev/urandom of='{mnt}/big' bs=1M count=24 status=none && cp '{mnt}/big' '{mnt}/big2'"
    )
    a = sh(f"sha256sum < '{host}/big'").stdout
    assert sh(f"sha256sum < '{mnt}/big2'").stdout == a
    assert sh(f"sha256sum < '{host}/big2'").stdout == a


def test_fio_random_writes_verify(area):
    import shutil

    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    host, mnt, _ = area
    out = sh(
        f"fio --name=v --directory='{mnt}' --rw=randwrite --bs=4k-256k --size=16m --numjobs=4 "
        "--verify=crc32c --do_verify=1 --verify_fatal=1 --ioengine=psync --group_reporting "
        "--output-format=terse --terse-version=3",
        timeout=240,
    ).stdout
    assert out.split(";")[4] == "0", out  # fio's error field
    files = sorted(os.listdir(host))
    assert files == [f"v.{j}.0" for j in range(4)]
    assert all(os.path.getsize(os.path.join(host, f)) == 16 << 20 for f in files)
