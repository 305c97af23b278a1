"""The test guest: Debian's cloud kernel and a busybox initramfs, built once and cached.

The kernel comes from the distribution's package (linux-image-cloud-amd64 and
the versioned linux-image package it depends on), fetched with
`apt-get download` and unpacked with `dpkg -x`. virtio, virtio_ring,
virtio_pci*, fuse and virtiofs are modules in that kernel: depmod runs on the
unpacked tree and `modprobe --show-depends` gives their load order, which the
initramfs's init follows with insmod.

Cache: ACTORFS_GUEST_CACHE or ~/.cache/actorfs-guest. The initramfs name
carries a hash of everything put in it, so editing init.sh or workload.sh
builds a new one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
META_PACKAGE = "linux-image-cloud-amd64"
MODULES = ("virtio_pci", "virtiofs")  # their dependencies come along
BUSYBOX = "/bin/busybox"


class GuestImageError(Exception):
    """The guest cannot be built: the message says what is missing."""


@dataclass
class GuestImage:
    kernel: Path
    initramfs: Path
    version: str


def cache_dir() -> Path:
    d = Path(os.environ.get("ACTORFS_GUEST_CACHE") or Path.home() / ".cache" / "actorfs-guest")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise GuestImageError(f"{cmd[0]} is not installed (needed to build the test guest)") from None
    except subprocess.TimeoutExpired:
        raise GuestImageError(f"{' '.join(cmd)} timed out") from None
    if p.returncode != 0:
        raise GuestImageError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return p.stdout


def _download(package: str, dest: Path) -> Path:
    _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise GuestImageError(f"apt-get download {package} produced no .deb in {dest}")
    return debs[-1]


def kernel_tree() -> tuple[Path, str]:
    """The unpacked kernel package (tree, version), downloading it on first use."""
    cache = cache_dir()
    for tree in sorted(cache.glob("tree-*")):
        if list(tree.glob("boot/vmlinuz-*")) and (tree / ".complete").exists():
            return tree, tree.name.removeprefix("tree-")
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    meta = _download(META_PACKAGE, debs)
    depends = _run(["dpkg-deb", "-f", str(meta), "Depends"])
    versioned = next((d.split()[0] for d in depends.split(",")
                      if d.strip().startswith("linux-image-")), None)
    if versioned is None:
        raise GuestImageError(f"{META_PACKAGE} depends on no linux-image package: {depends!r}")
    deb = _download(versioned.strip(), debs)
    version = versioned.strip().removeprefix("linux-image-")
    tree = cache / f"tree-{version}"
    shutil.rmtree(tree, ignore_errors=True)
    _run(["dpkg", "-x", str(deb), str(tree)])
    _run(["depmod", "-b", str(tree), version])
    (tree / ".complete").touch()
    return tree, version


def module_order(tree: Path, version: str) -> list[Path]:
    """The .ko files to insmod, dependencies first, each once."""
    order: list[Path] = []
    for mod in MODULES:
        out = _run(["modprobe", "-d", str(tree), "-S", version, "--show-depends", mod])
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in order:
                order.append(Path(parts[1]))
    if not order:
        raise GuestImageError(f"no virtio-fs modules found in {tree}")
    return order


def build(extra_files: dict[str, Path] | None = None) -> GuestImage:
    """Kernel + an initramfs with busybox, the modules, init.sh and workload.sh."""
    tree, version = kernel_tree()
    kernel = next(iter(sorted(tree.glob("boot/vmlinuz-*"))))
    if not os.path.exists(BUSYBOX):
        raise GuestImageError(f"{BUSYBOX} is missing: install busybox-static")
    modules = module_order(tree, version)
    files = {"init": HERE / "init.sh", "workload.sh": HERE / "workload.sh",
             "bin/busybox": Path(BUSYBOX)}
    files.update(extra_files or {})
    for ko in modules:
        files[f"modules/{ko.name}"] = ko
    order = "\n".join(ko.name for ko in modules) + "\n"
    h = hashlib.sha256(order.encode() + version.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].read_bytes())
    initramfs = cache_dir() / f"initramfs-{h.hexdigest()[:16]}.cpio.gz"
    if initramfs.exists():
        return GuestImage(kernel, initramfs, version)
    staging = cache_dir() / f"staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for d in ("bin", "dev", "proc", "sys", "mnt", "modules", "tmp"):
            (staging / d).mkdir(parents=True)
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
            os.chmod(staging / name, 0o755)
        (staging / "modules" / "order").write_text(order)
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
        tmp = initramfs.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=staging,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=out)
            cpio.stdout.close()
            cpio.communicate(("\n".join(names) + "\n").encode())
            gz.wait()
        if cpio.returncode or gz.returncode:
            raise GuestImageError("cpio/gzip failed to build the initramfs")
        os.replace(tmp, initramfs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in glob.glob(str(cache_dir() / "initramfs-*.cpio.gz")):
        if Path(old) != initramfs:
            os.unlink(old)
    return GuestImage(kernel, initramfs, version)


def qemu_command(image: GuestImage, socket_path: str, console_log: str, *,
                 mem: str = "512M", tag: str = "actorfs", reboot: bool = False) -> list[str]:
    """QEMU with memfd-backed shared guest RAM and a vhost-user-fs-pci device (TCG).

    reboot: the guest reboots once, still mounted, before its workload (else a
    reboot, e.g. after a panic, ends QEMU).
    """
    append = "actorfs.reboot=1" if reboot else ""
    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "2",
        "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=char0,path={socket_path}",
        "-device", f"vhost-user-fs-pci,chardev=char0,tag={tag}",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", f"console=ttyS0 panic=-1 rdinit=/init {append}".strip(),
        "-nographic",
        "-monitor", "none",
        "-serial", f"file:{console_log}",
    ]
    return cmd if reboot else cmd + ["-no-reboot"]
