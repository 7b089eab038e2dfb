"""The dataplane's /metrics server (dataplane/metrics_http.py) in this process, on
127.0.0.1: snapshots taken on the loop's thread, a stuck loop, the connection cap."""

import asyncio
import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from dataplane.metrics import BoundedQueue, Counters, register_collectors
from dataplane.metrics_http import LOOP_ANSWER_SECONDS, MAX_CONNECTIONS, MetricsServer, run_on_loop
from dataplane.registry import Registry
from netlab import metrics
from push_protocol.drops import DropReason


def get(port: int, path: str = "/metrics") -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b" ", 2)[1].decode(), body


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def served(loop):
    """(port, counters) of a server whose collector copies the counters on `loop`."""
    counters, prometheus = Counters(), CollectorRegistry()
    register_collectors(
        prometheus,
        counters,
        Registry(),
        [BoundedQueue("udp_send", 4)],
        on_loop=lambda function: run_on_loop(loop, function, LOOP_ANSWER_SECONDS),
    )
    server = MetricsServer(("127.0.0.1", 0), prometheus)
    server.start()
    yield server.server_address[1], counters
    server.stop()


def test_every_scrape_balances_while_the_loop_counts(loop, served):
    """The loop counts a datagram received, makes a system call (which lets other
    threads run, as its TUN writes and UDP sends do), then counts where it ended: a
    reader on another thread catches it in between; the copy made on the loop's
    thread never does."""
    port, counters = served
    stop = threading.Event()

    def receive_one() -> None:
        counters.datagrams_received += 1
        time.sleep(0.0002)  # the system call between the two counts
        if counters.datagrams_received % 3:
            counters.datagrams_delivered += 1
        else:
            counters.inbound_drops[DropReason.FORBIDDEN_DESTINATION] += 1
        if not stop.is_set():
            loop.call_soon(receive_one)

    loop.call_soon_threadsafe(receive_one)
    try:
        for _ in range(100):
            status, body = get(port)
            assert status == "200"
            samples = metrics.parse(body.decode())
            received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
            delivered = metrics.total(samples, "pushgate_dataplane_datagrams_delivered_total")
            dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="inbound")
            assert received == delivered + dropped > 0
    finally:
        stop.set()


def test_a_stuck_loop_gets_a_503_not_a_hung_scrape(loop, served):
    port, _ = served
    loop.call_soon_threadsafe(time.sleep, LOOP_ANSWER_SECONDS + 1.5)
    started = time.monotonic()
    status, body = get(port)
    assert status == "503" and b"packet loop did not answer" in body
    assert time.monotonic() - started < LOOP_ANSWER_SECONDS + 1
    assert get(port, "/other")[0] == "404"  # pages that need no loop are served meanwhile
    time.sleep(1.5)
    assert get(port)[0] == "200"


def test_connections_past_the_cap_are_closed_at_once_and_counted(served):
    port, _ = served
    held = []
    for _ in range(MAX_CONNECTIONS + 5):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(b"GET /metrics HTTP/1.0\r\n")  # half a request, held
        held.append(conn)
    try:
        time.sleep(0.5)
        for conn in held[MAX_CONNECTIONS:]:
            assert conn.recv(1) == b""  # closed by the server
        for conn in held[:MAX_CONNECTIONS]:
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)  # still open, waiting for the rest
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.2)
    samples = metrics.parse(get(port)[1].decode())
    assert metrics.total(samples, "pushgate_dataplane_metrics_connections_refused_total") == 5
