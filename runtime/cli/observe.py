"""Looking at a running server from outside: a stats socket and Prometheus metrics.

Both are served by the server's own event loop (no threads), so reading the
statistics never races with the requests that update them.

- The stats socket (on by default): a unix socket that writes one JSON object,
  the server's stats(), to whoever connects (root or the server's own user:
  checked with SO_PEERCRED), then closes. `actorfs stats MNT` finds it by the
  mountpoint (or vhost-user socket) it serves: by default it is an abstract
  socket (no file: it goes away with the process, even a killed one) named
  `actorfs-stats-` + a hash of that path; `--stats-socket PATH` makes it a
  file instead.
- Metrics (opt-in, `--metrics ADDR`): the same figures in Prometheus' text
  format, rendered by prometheus_client, on a localhost TCP port (PORT or
  HOST:PORT) or a unix socket (a path), answering plain HTTP GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger("actorfs.observe")

# A server's stats(): a JSON-ready mapping (MountedServer.stats(), or `actorfs serve`'s).
StatsFn: TypeAlias = Callable[[], Mapping[str, Any]]


# -- where the stats socket lives -----------------------------------------------------


def canonical(path: str) -> str:
    """The path's directory resolved, its last component kept as is.

    Never resolves the last component itself: for a live mountpoint that would
    go through the mount, and the server must not wait on itself.
    """
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def stats_socket_for(target: str) -> str:
    """The (abstract) stats socket of the server serving `target` (a mountpoint or socket)."""
    key = hashlib.sha256(canonical(target).encode()).hexdigest()[:16]
    return f"\0actorfs-stats-{key}"


def shown(path: str) -> str:
    """A socket address for humans: abstract ones as @name."""
    return "@" + path[1:] if path.startswith("\0") else path


# -- the stats socket -------------------------------------------------------------


class StatsSocket:
    """Serves `stats()` as JSON on a unix socket until closed."""

    def __init__(self, path: str, stats: StatsFn):
        self.path = path
        self.stats = stats
        self._server: asyncio.AbstractServer | None = None
        self._ino: int | None = None

    async def start(self) -> StatsSocket:
        if self.path.startswith("\0"):  # abstract: nothing on disk to create or remove
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
            return self
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a leftover of a server that died
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)
        self._ino = os.lstat(self.path).st_ino
        return self

    @staticmethod
    def _allowed(writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))  # fmt: skip
        except OSError:
            return False
        return uid in (0, os.geteuid())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self._allowed(writer):
                return  # another user: closed without a word
            try:
                body = json.dumps(self.stats(), default=str)
            except Exception as exc:  # a half-built server: say so, do not crash it
                body = json.dumps({"error": repr(exc)})
            writer.write(body.encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._ino is not None:
            with contextlib.suppress(OSError):
                if os.lstat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
        self._server = None


def read_stats(path: str, timeout: float = 10.0) -> dict[str, Any]:
    """One reading from a stats socket (blocking; for `actorfs stats`).

    ValueError if the answer is not a JSON object: not an actorfs stats socket.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    stats = json.loads(b"".join(chunks))
    if not isinstance(stats, dict):
        raise ValueError(f"{shown(path)} answered {type(stats).__name__}, not a JSON object")
    return stats


# -- Prometheus metrics -------------------------------------------------------------


class _Collector:
    """A prometheus_client collector reading the server's stats() on each scrape."""

    def __init__(self, stats: StatsFn):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.stats()
        req = s.get("requests") or {}
        ops = req.get("ops", {})
        count = CounterMetricFamily("actorfs_requests", "FUSE requests answered, by opcode",
                                    labels=["op"])  # fmt: skip
        errors = CounterMetricFamily("actorfs_request_errors",
                                     "FUSE requests answered with an error, by opcode",
                                     labels=["op"])  # fmt: skip
        latency = HistogramMetricFamily("actorfs_request_duration_seconds",
                                        "Time from request to reply, by opcode (log2 buckets)",
                                        labels=["op"])  # fmt: skip
        for name, o in ops.items():
            count.add_metric([name], o["count"])
            errors.add_metric([name], o["errors"])
            buckets: list[tuple[str, float]] = []
            seen = 0
            for bound, n in sorted((int(b), n) for b, n in o.get("histogram_us", {}).items()):
                seen += n
                buckets.append((repr(bound / 1e6), seen))
            buckets.append(("+Inf", o["count"]))
            latency.add_metric([name], buckets, o.get("sum_us", o["mean_us"] * o["count"]) / 1e6)
        yield count
        yield errors
        yield latency
        for key, help_text in (("in_flight", "Requests being served now"),
                               ("max_in_flight", "At most this many requests run at once")):
            if key in req:
                yield GaugeMetricFamily(f"actorfs_{key}", help_text, value=req[key])
        for key in ("protocol_errors", "interrupts", "send_errors"):
            if key in req:
                yield CounterMetricFamily(f"actorfs_{key}", f"Dispatcher {key.replace('_', ' ')}",
                                          value=req[key])  # fmt: skip
        if "uptime_s" in s:
            yield GaugeMetricFamily("actorfs_uptime_seconds", "Seconds since the server started",
                                    value=s["uptime_s"])  # fmt: skip
        t = s.get("transport")
        if t:
            for key in ("frames", "replies_dropped", "notify_delivered", "notify_undelivered"):
                if key in t:
                    yield CounterMetricFamily(f"actorfs_fuse_{key}", f"/dev/fuse {key.replace('_', ' ')}",
                                              value=t[key])  # fmt: skip


def render_metrics(stats: StatsFn) -> tuple[bytes, str]:
    """(body, content type) of one scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def parse_metrics_addr(addr: str) -> tuple[Literal["unix", "tcp"], str]:
    """ "9101" / "127.0.0.1:9101" -> ("tcp", ...); a path -> ("unix", path)."""
    if "/" in addr:
        return "unix", addr
    host, _, port = addr.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        from actorfs.runtime.ops.filesystem import ConfigError

        raise ConfigError(f"--metrics {addr!r}: use PORT, HOST:PORT or a unix socket path")
    return "tcp", f"{host or '127.0.0.1'}:{port}"


class MetricsServer:
    """Plain HTTP GET /metrics on a TCP port or unix socket (the event loop's)."""

    def __init__(self, addr: str, stats: StatsFn):
        self.kind, self.where = parse_metrics_addr(addr)
        self.stats = stats
        self._server: asyncio.Server | None = None

    async def start(self) -> MetricsServer:
        if self.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.where).st_mode):
                    os.unlink(self.where)
            self._server = await asyncio.start_unix_server(self._serve, path=self.where)
        else:
            host, _, port = self.where.rpartition(":")
            self._server = await asyncio.start_server(self._serve, host.strip("[]"), int(port))
        log.info("metrics on %s %s", self.kind, self.where)
        return self

    @property
    def address(self) -> str:
        """Where it listens (for a port of 0, the one the kernel chose)."""
        if self.kind == "unix" or self._server is None:
            return self.where
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            line = head.split(b"\r\n", 1)[0].decode(errors="replace").split()
            if len(line) < 2 or line[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"use GET\n", "text/plain"
            elif line[1].split("?")[0] not in ("/", "/metrics"):
                status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                body, ctype = render_metrics(self.stats)
                status = "200 OK"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if line[:1] != ["HEAD"]:
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        if self.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.where)
        self._server = None


class Observers:
    """The stats socket and the metrics endpoint of one server, started and closed together."""

    def __init__(self, stats: StatsFn, *, stats_socket: str | None, metrics: str | None):
        self.stats = stats
        self.stats_socket = StatsSocket(stats_socket, stats) if stats_socket else None
        self.metrics = MetricsServer(metrics, stats) if metrics else None

    async def start(self) -> Observers:
        if self.stats_socket is not None:
            try:
                await self.stats_socket.start()
            except OSError as exc:  # on by default: a read-only /run must not stop the server
                log.warning("no stats socket at %s: %s", shown(self.stats_socket.path), exc)
                self.stats_socket = None
        if self.metrics is not None:
            await self.metrics.start()  # asked for: failing to listen is an error
        return self

    async def close(self) -> None:
        for o in (self.stats_socket, self.metrics):
            if o is not None:
                with contextlib.suppress(Exception):
                    await o.close()

    def summary(self) -> str:
        parts = []
        if self.stats_socket is not None:
            parts.append(f"stats {shown(self.stats_socket.path)}")
        if self.metrics is not None:
            parts.append(f"metrics {self.metrics.kind}:{self.metrics.address}")
        return ", ".join(parts)
