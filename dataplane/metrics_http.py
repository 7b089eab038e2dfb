"""The dataplane's /metrics over HTTP, off the packet loop.

A thread accepts; each connection gets a thread, at most MAX_CONNECTIONS at
once (more are closed at once and counted), and must send its request and take
its answer within REQUEST_SECONDS in all, so held-open or trickling connections
cost a bounded number of idle threads and nothing on the loop. Pages are
rendered one at a time: under a flood of scrapes the loop shares the
interpreter with one rendering thread, not with many. What the loop mutates is
copied on the loop's own thread (`run_on_loop`); if the loop does not get to it
within LOOP_ANSWER_SECONDS the scrape is answered 503, which is itself news.
"""

import asyncio
import concurrent.futures
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

log = logging.getLogger("pushgate.dataplane")

MAX_CONNECTIONS = 8  # a Prometheus or two, a health check and a person with curl
REQUEST_SECONDS = 3.0  # request in and answer out, in all: slow clients lose their slot
MAX_REQUEST_BYTES = 8192
LOOP_ANSWER_SECONDS = 2.0  # a loop that cannot copy its counters in this long is stuck


def run_on_loop(loop: asyncio.AbstractEventLoop, function: Callable, timeout: float):
    """Call `function` on `loop`'s thread between two callbacks; its result, or its
    exception, or TimeoutError after `timeout` seconds."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def call() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function())
            except BaseException as error:
                future.set_exception(error)

    loop.call_soon_threadsafe(call)
    try:
        return future.result(timeout)
    finally:
        future.cancel()  # given up on: the loop skips it if it gets there later


class _Request(socketserver.BaseRequestHandler):
    server: "MetricsServer"

    def handle(self) -> None:
        connection, deadline = self.request, time.monotonic() + REQUEST_SECONDS
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                left = deadline - time.monotonic()
                if left <= 0 or len(request) > MAX_REQUEST_BYTES:
                    return
                connection.settimeout(left)
                chunk = connection.recv(4096)
                if not chunk:
                    return
                request += chunk
            fields = request.split(b" ", 2)
            path = fields[1].split(b"?")[0] if len(fields) == 3 else b""
            status, kind, body = self.server.page(path, deadline)
            connection.settimeout(max(deadline - time.monotonic(), 0.1))
            connection.sendall(
                b"HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                % (status, kind.encode(), len(body))
                + body
            )
        except OSError:  # timed out, reset, gone: the slot is freed either way
            pass


class MetricsServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # waiting to be accepted (and closed): kernel memory only

    def __init__(self, listen: tuple[str, int], prometheus: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self._prometheus = prometheus
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._render = threading.Lock()
        self._last_failure = 0.0
        self.refused = Counter(
            "pushgate_dataplane_metrics_connections_refused",
            f"Connections to /metrics closed at once: {MAX_CONNECTIONS} were open",
            registry=prometheus,
        )
        super().__init__(listen, _Request)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused.inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a thread of its own
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def page(self, path: bytes, deadline: float) -> tuple[bytes, str, bytes]:
        if path != b"/metrics":
            return b"404 Not Found", "text/plain", b"not found; try /metrics\n"
        if not self._render.acquire(timeout=max(deadline - time.monotonic(), 0)):
            return b"503 Service Unavailable", "text/plain", b"busy: scrapes queued up\n"
        try:
            return b"200 OK", CONTENT_TYPE_LATEST, generate_latest(self._prometheus)
        except (TimeoutError, RuntimeError) as error:  # the loop stuck, or closed
            now = time.monotonic()
            if now - self._last_failure > 10:
                self._last_failure = now
                log.warning("/metrics: the packet loop did not answer (%r)", error)
            return b"503 Service Unavailable", "text/plain", b"the packet loop did not answer\n"
        finally:
            self._render.release()

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="metrics", daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
