"""End to end: a real Linux guest under QEMU mounts actorfs over virtio-fs.

The guest (Debian's cloud kernel + a busybox initramfs, tests/guest/) mounts
the `actorfs` tag, runs tests/guest/workload.sh, prints a report on its serial
console, unmounts and powers off. The backend is `serve_vhost_user(once=True)`
in its own process. The test checks the guest's report and then the host
directory itself.

TCG, not KVM: a Linux guest under QEMU 7.2 with KVM hangs in early boot on
these (nested) machines, while TCG boots this guest in seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest import image

pytestmark = [pytest.mark.slow, pytest.mark.guest]

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 600  # TCG on a loaded CI machine; the run itself takes ~10 s here


def _guest_image() -> image.GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: install the qemu-system-x86 package")
    try:
        return image.build()
    except image.GuestImageError as exc:
        pytest.fail(f"cannot build the test guest: {exc}")


def _wait_for_socket(path: Path, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if server.poll() is not None:
            pytest.fail(f"the backend exited early with status {server.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"the backend did not create {path}")
        time.sleep(0.05)


def _report(console: str) -> list[str]:
    m = re.search(r"ACTORFS-REPORT-BEGIN\s*\n(.*?)ACTORFS-REPORT-END", console, re.S)
    assert m, f"no workload report on the guest console:\n{console[-3000:]}"
    return [line.strip() for line in m.group(1).splitlines() if line.strip()]


def test_linux_guest_workload_over_virtiofs(tmp_path):
    img = _guest_image()
    root = tmp_path / "shared"
    root.mkdir()
    (root / "from_host.txt").write_text("written by the host")
    sock = tmp_path / "vhost-fs.sock"
    console_log = tmp_path / "console.log"
    server_log = tmp_path / "server.log"

    with open(server_log, "wb") as slog:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "guest" / "serve.py"), str(sock), str(root)],
            stdout=slog, stderr=subprocess.STDOUT, cwd=REPO,
        )
        try:
            _wait_for_socket(sock, server)
            qemu = subprocess.run(image.qemu_command(img, str(sock), str(console_log)),
                                  capture_output=True, text=True, timeout=BOOT_TIMEOUT)
            status = server.wait(timeout=60)  # --once: the backend leaves with the frontend
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    console = console_log.read_text(errors="replace") if console_log.exists() else ""
    context = (f"\n--- qemu (status {qemu.returncode}) ---\n{qemu.stderr[-2000:]}"
               f"\n--- backend ---\n{server_log.read_text(errors='replace')[-3000:]}"
               f"\n--- console ---\n{console[-4000:]}")
    assert "ACTORFS-INSMOD-FAIL" not in console, context
    assert "ACTORFS-MOUNTED" in console, context
    lines = _report(console)
    failures = [line for line in lines if line.startswith("FAIL")]
    assert not failures, "\n".join(failures) + context
    result = next(line for line in lines if line.startswith("RESULT"))
    assert result.endswith("fail=0") and "pass=0" not in result, result
    assert "ACTORFS-UMOUNTED" in console, context
    assert status == 0, f"backend exit status {status}" + context
    assert not sock.exists(), "the backend left its socket file behind"

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
    st = os.stat(root / "attrs")
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 1234, 2345)
    assert int(st.st_mtime) == 981173106
    assert len(os.listdir(root / "many")) == 300
    assert (root / "many" / "f299").read_text() == "small file 299\n"
    for w in (1, 2, 3, 4):
        log = (root / "par" / f"log{w}").read_text().splitlines()
        assert log == [f"writer {w} line {j}" for j in range(40)]
        assert (root / "par" / f"w{w}_39").read_text() == f"writer {w} file 39\n"
