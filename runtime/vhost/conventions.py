"""QEMU's vhost-user backend program conventions, for virtio-fs.

QEMU's docs/interop/vhost-user.rst ("Backend program conventions") asks a
backend program to accept `--socket-path=PATH` and `--fd=N` (an already
listening socket the launcher passes) and to print its capabilities as JSON
with `--print-capabilities`; management tools (libvirt) find backends through
JSON description files in share/qemu/vhost-user/. actorfs ships one naming
`actorfs-virtiofsd` (share/qemu/vhost-user/50-actorfs.json in the wheel's
data files), and `actorfs vhost-user-json` writes one naming the installed
binary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

# "separate-options": the daemon takes virtiofsd's separate options
# (--shared-dir, --cache, --xattr, ...), not only `-o source=...,cache=...`.
# No "migrate-precopy": actorfs does not migrate its state.
CAPABILITIES = {"type": "fs", "features": ["separate-options"]}

DAEMON = "actorfs-virtiofsd"


def capabilities_json() -> str:
    return json.dumps(CAPABILITIES, indent=2)


def description(binary: str) -> dict[str, str]:
    """The vhost-user JSON description (QEMU's docs/interop/vhost-user.json schema)."""
    return {
        "description": "actorfs: a passthrough virtio-fs daemon (asyncio actors)",
        "type": "fs",
        "binary": binary,
    }


def write_description(path: str | None, binary: str | None = None) -> int:
    if binary is None:
        binary = shutil.which(DAEMON) or os.path.join(os.path.dirname(sys.executable), DAEMON)
    binary = os.path.abspath(binary)
    text = json.dumps(description(binary), indent=2) + "\n"
    if path is None:
        sys.stdout.write(text)
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    print(f"actorfs: wrote {path} (binary {binary})")
    return 0
