"""The driver notices a lost GCS (the head node) and ends in one line; a GCS that is only briefly away is not
reported."""

from __future__ import annotations

import socket
import threading
import time

from pipeline.runtime.head_watch import HeadWatch, default_grace_s, gcs_accepts


def listening() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


def address_of(server: socket.socket) -> str:
    host, port = server.getsockname()
    return f"{host}:{port}"


def test_grace_follows_rays_own_reconnect_timeout():
    assert default_grace_s({}) == 48.0  # 80% of Ray's default 60 s
    assert default_grace_s({"RAY_gcs_rpc_server_reconnect_timeout_s": "10"}) == 8.0
    assert default_grace_s({"RAY_gcs_rpc_server_reconnect_timeout_s": "0.5"}) == 1.0
    assert default_grace_s({"RAY_gcs_rpc_server_reconnect_timeout_s": "soon"}) == 48.0


def test_a_gcs_that_stops_answering_is_reported_once_after_the_grace_period():
    server = listening()
    address = address_of(server)
    assert gcs_accepts(address)
    lost: list[tuple[float, str]] = []
    done = threading.Event()

    def on_lost(message: str) -> None:
        lost.append((time.monotonic(), message))
        done.set()

    with HeadWatch(address, grace_s=1.0, interval_s=0.1, on_lost=on_lost) as watch:
        time.sleep(0.5)
        assert not lost, "reported while the GCS answered"
        server.close()
        closed = time.monotonic()
        assert done.wait(10), "a GCS gone for 10 s was never reported"
        time.sleep(0.5)
    assert len(lost) == 1 and watch.fired
    assert 0.9 <= lost[0][0] - closed < 5
    assert address in lost[0][1] and "submit the same command again" in lost[0][1]
    assert not gcs_accepts(address)


def test_a_gcs_back_within_the_grace_period_is_not_reported():
    server = listening()
    host, port = server.getsockname()
    lost: list[str] = []
    with HeadWatch(f"{host}:{port}", grace_s=3.0, interval_s=0.1, on_lost=lost.append):
        server.close()
        time.sleep(1.0)
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((host, port))  # a GCS restarted by fault tolerance, on the same port
        again.listen(16)
        time.sleep(3.5)
        again.close()
    assert lost == []


def test_stop_ends_the_watch_without_a_report():
    server = listening()
    lost: list[str] = []
    watch = HeadWatch(address_of(server), grace_s=0.2, interval_s=0.05, on_lost=lost.append).start()
    watch.stop()
    server.close()
    time.sleep(0.6)
    assert lost == [] and not watch.fired
