"""Run the vhost-user-fs backend for the guest test: serve.py SOCKET ROOT (one frontend)."""

import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.filesystem import FsConfig  # noqa: E402
from runtime.vhost_server import serve_vhost_user  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock, root = sys.argv[1], sys.argv[2]
    sys.exit(asyncio.run(serve_vhost_user(FsConfig(root=root), sock, once=True)))
