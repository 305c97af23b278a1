"""Run the vhost-user-fs backend for the guest test:
`python3 -m tests.guest.serve SOCKET ROOT` (one frontend)."""

import asyncio
import logging
import sys

from actorfs.runtime.ops.filesystem import FsConfig  # noqa: E402
from actorfs.runtime.vhost.server import serve_vhost_user  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock, root = sys.argv[1], sys.argv[2]

    async def main() -> int:
        async with serve_vhost_user(FsConfig(root=root), sock, once=True) as server:
            await server.wait()
        return 0

    sys.exit(asyncio.run(main()))
