"""`actorfs stats` against a socket that answers JSON which is not a stats object."""

from __future__ import annotations

import socket
import threading

import pytest

from actorfs.runtime.cli.observe import read_stats
from actorfs.runtime.cli.stats_view import StatsUnavailable, locate, run_stats_view


def _answering(path: str, body: bytes, times: int) -> threading.Thread:
    """A unix socket at `path` that writes `body` to each of `times` connections."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(times)

    def serve() -> None:
        with srv:
            for _ in range(times):
                conn, _ = srv.accept()
                with conn:
                    conn.sendall(body)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("body", [b"[1, 2]\n", b"42\n", b'"stats"\n', b"null\n"])
def test_read_stats_wants_a_json_object(tmp_path, body):
    path = str(tmp_path / "other.sock")
    t = _answering(path, body, 1)
    with pytest.raises(ValueError, match="not a JSON object"):
        read_stats(path, timeout=5)
    t.join(5)


def test_stats_of_a_socket_speaking_other_json_is_one_line(tmp_path, capsys):
    path = str(tmp_path / "other.sock")
    t = _answering(path, b"[1, 2]\n", 2)
    with pytest.raises(StatsUnavailable):
        locate(path)
    # `actorfs stats SOCKET`: the one-line user error, not a traceback from the view.
    assert run_stats_view(path, once=True) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("actorfs: error: no running actorfs server"), err
    t.join(5)
