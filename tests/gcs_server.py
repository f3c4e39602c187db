"""A real GCS emulator server on loopback, and a fault-injecting HTTP proxy in front of it.

The emulator (`gcp-storage-emulator`, in memory) runs as its own process. The proxy is a
threaded HTTP server that forwards every request and, following its plan, answers with a
retryable status instead (503, 429, 500), cuts the connection halfway through a request body,
or flips a byte of a downloaded object. It counts what it injected. It also enforces the
create-only precondition (`ifGenerationMatch=0`, answered 412 when the object exists), which
the emulator ignores and demix's gs:// output locks rely on.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`python -m gcp_storage_emulator start` on a free loopback port, in memory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gcp_storage_emulator",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--in-memory",
                "--quiet",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the GCS emulator did not start within 30 s")

    def stop(self) -> None:
        """Terminate the emulator process."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class FaultPlan:
    """What the proxy does to the next requests (thread-safe; counts what it injected).

    every: inject a retryable status into every n-th request (0: never);
    statuses: the statuses cycled through; drop_uploads: cut this many of the next request
    bodies larger than drop_min_bytes halfway; corrupt: a substring of object paths whose
    downloads get one byte flipped, `corrupt_times` times (None: always); strip_hash drops the
    x-goog-hash header so the client cannot catch the flip itself; fail_all answers 503 to
    everything; delay_s holds every upload request back (so a kill can land mid-publish). `counts` holds the faults injected, `requests` the requests seen per method.
    """

    every: int = 0
    statuses: tuple[int, ...] = (503, 429, 500)
    drop_uploads: int = 0
    drop_min_bytes: int = 64 * 1024
    corrupt: str | None = None
    corrupt_times: int | None = None
    strip_hash: bool = False
    fail_all: bool = False
    delay_s: float = 0.0
    counts: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, method: str, path: str, length: int) -> str | None:
        """The fault for this request: 'status:<code>', 'drop', 'corrupt' or None."""
        with self._lock:
            self.requests[method] += 1
            n = self.requests.total()
            if self.fail_all:
                self.counts["503"] += 1
                return "status:503"
            if self.drop_uploads and method in ("PUT", "POST") and length > self.drop_min_bytes:
                self.drop_uploads -= 1
                self.counts["dropped_connection"] += 1
                return "drop"
            if self.every and n % self.every == 0:
                code = self.statuses[(n // self.every) % len(self.statuses)]
                self.counts[str(code)] += 1
                return f"status:{code}"
            if (
                self.corrupt
                and method == "GET"
                and "alt=media" in path
                and self.corrupt in path
                and (self.corrupt_times is None or self.corrupt_times > 0)
            ):
                if self.corrupt_times is not None:
                    self.corrupt_times -= 1
                self.counts["corrupted_download"] += 1
                return "corrupt"
            return None

    @property
    def injected(self) -> int:
        """Faults injected so far."""
        return self.counts.total()


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.command in ("PUT", "POST") and self.server.plan.delay_s:
            time.sleep(self.server.plan.delay_s)
        fault = self.server.plan.decide(self.command, self.path, length)
        if fault == "drop":
            self.rfile.read(length // 2)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = self.rfile.read(length) if length else b""
        if fault and fault.startswith("status:"):
            self._reply(int(fault.split(":")[1]), {"Content-Type": "text/plain"}, b"injected")
            return
        if self.command == "POST" and "ifGenerationMatch=0" in self.path:
            with self.server.create_only:  # check and create as one step, as GCS does
                if self._exists(body):
                    error = b'{"error": {"code": 412, "message": "Precondition Failed"}}'
                    self._reply(412, {"Content-Type": "application/json"}, error)
                    return
                self._forward(fault, body)
            return
        self._forward(fault, body)

    def _exists(self, body: bytes) -> bool:
        """Whether the object a create-only upload (ifGenerationMatch=0) names exists already:
        the emulator ignores the precondition, so the proxy enforces it."""
        found = re.search(r"/b/([^/]+)/o", self.path)
        name = re.search(rb'"name": ?"([^"]+)"', body)
        if found is None or name is None:
            return False
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        quoted = urllib.parse.quote(name.group(1).decode(), safe="")
        upstream.request("GET", f"/storage/v1/b/{found.group(1)}/o/{quoted}")
        status = upstream.getresponse().status
        upstream.close()
        return status == 200

    def _forward(self, fault: str | None, body: bytes) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        out_headers = {
            k: v
            for k, v in response.getheaders()
            if k.lower() not in ("transfer-encoding", "connection", "content-length")
        }
        upstream.close()
        if fault == "corrupt" and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
            if self.server.plan.strip_hash:
                out_headers = {k: v for k, v in out_headers.items() if k.lower() != "x-goog-hash"}
        self._reply(response.status, out_headers, data)

    def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class FaultProxy(ThreadingHTTPServer):
    """Loopback HTTP proxy to the emulator that injects the faults of its `plan`."""

    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_port = upstream_port
        self.create_only = threading.Lock()
        self.plan = FaultPlan()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
