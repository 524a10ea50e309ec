"""A real, fault-injecting HTTP file server for tests (no mocks).

Downloads fail in the field in specific ways: connections drop mid-file, mirrors answer 500 or
429 with Retry-After, proxies stall, captive portals return HTML, and broken servers lie about
Content-Length. Testing the downloader against the real stdlib ``ThreadingHTTPServer`` on
127.0.0.1 with those faults injected on purpose exercises the same socket and HTTP code paths
users hit, which a mocked ``urlopen`` never would.

Usage::

    with serve(tmp_path / "www", faults=[Fault.status(500), Fault.drop(after=1000)]) as server:
        download(server.url + "file.bin", dest)
        assert server.count("/file.bin") == 3

``faults`` is a queue: each request (optionally only those whose path matches ``Fault.path``)
consumes the next fault; once the queue is empty, requests are served normally. The server
supports GET/HEAD, single ``bytes=a-b`` Range requests (206 / 416), and records every request
in ``server.requests``. The fixture name to register in conftest is ``http_server`` (see
:func:`http_server` below, a plain generator function).
"""
import email.utils
import hashlib
import os
import re
import socket
import struct
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, NamedTuple, Optional

import pytest


@dataclass
class Fault:
    """One injected misbehaviour, applied to one request.

    kind: ``status`` (answer ``code`` with a short body and extra ``headers``), ``drop``
    (send the headers and ``after`` bytes, then reset the TCP connection), ``truncate`` (same
    but close cleanly), ``stall`` (sleep ``seconds`` before answering), ``length`` (announce
    ``length`` as Content-Length but send the real body up to that length), ``html`` (answer
    200 text/html with a login page), ``ignore_range`` (answer 200 with the whole file even if
    a Range was asked for), ``endless`` (answer 200 without Content-Length and send zeros until
    the client hangs up: a source that would fill the disk).
    """

    kind: str
    code: int = 200
    after: int = 0
    seconds: float = 0.0
    length: Optional[int] = None
    headers: Optional[dict] = None
    path: Optional[str] = None  # apply only to requests for this URL path (None: any)

    @classmethod
    def status(cls, code, retry_after=None, path=None):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return cls("status", code=code, headers=headers, path=path)

    @classmethod
    def drop(cls, after, path=None):
        return cls("drop", after=after, path=path)

    @classmethod
    def truncate(cls, after, path=None):
        return cls("truncate", after=after, path=path)

    @classmethod
    def stall(cls, seconds, path=None):
        return cls("stall", seconds=seconds, path=path)

    @classmethod
    def lie_length(cls, length, path=None):
        return cls("length", length=length, path=path)

    @classmethod
    def html(cls, path=None):
        return cls("html", path=path)

    @classmethod
    def ignore_range(cls, path=None):
        return cls("ignore_range", path=path)

    @classmethod
    def endless(cls, path=None):
        return cls("endless", path=path)


class Request(NamedTuple):
    method: str
    path: str
    headers: dict
    fault: Optional[str]


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_HTML = (b"<!DOCTYPE html><html><head><title>Sign in</title></head>"
         b"<body><form>Please log in to continue</form></body></html>\n")


class FileHandler(BaseHTTPRequestHandler):
    """Serves the files of its :class:`Server`, applying the server's queued faults.

    A server that needs dynamic answers (tests/support/openi_server.py's search API) subclasses
    it, overrides :meth:`serve_request` and passes the subclass to ``Server(handler=...)``.
    """

    protocol_version = "HTTP/1.0"  # one request per connection: faults never leak across

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass

    def do_HEAD(self):
        self.serve_request(send_body=False)

    def do_GET(self):
        self.serve_request(send_body=True)

    def serve_request(self, send_body):
        """Answer the request for ``self.path`` (GET, or HEAD without ``send_body``)."""
        srv = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        fault = srv._next_fault(path)
        srv._record(Request(self.command, path, dict(self.headers), fault.kind if fault else None))
        if fault is not None and fault.kind == "stall":
            if srv._stop.wait(fault.seconds):
                return
        if fault is not None and fault.kind == "status":
            return self._simple(fault.code, b"injected error\n", fault.headers)
        if fault is not None and fault.kind == "html":
            return self._simple(200, _HTML, {"Content-Type": "text/html; charset=utf-8"})
        if fault is not None and fault.kind == "endless":
            return self._endless(send_body)

        file_path = srv.resolve(path)
        if file_path is None:
            return self._simple(404, b"not found\n")
        with open(file_path, "rb") as f:
            data = f.read()
        stat = os.stat(file_path)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
            "ETag": '"%s"' % hashlib.sha1(data).hexdigest()[:16],
        }
        status, body = 200, data
        wanted = self.headers.get("Range")
        if wanted and not (fault is not None and fault.kind == "ignore_range"):
            match = _RANGE.match(wanted.strip())
            start = int(match.group(1)) if match and match.group(1) else None
            if match is None or start is None:
                pass  # unsupported (suffix/multi) ranges: answer 200 like many servers do
            elif start >= len(data):
                return self._simple(416, b"", {"Content-Range": "bytes */%d" % len(data)})
            else:
                end = int(match.group(2)) if match.group(2) else len(data) - 1
                end = min(end, len(data) - 1)
                status, body = 206, data[start:end + 1]
                headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, len(data))
        announced = len(body)
        if fault is not None and fault.kind == "length":
            announced = fault.length
            body = body[:fault.length]
        headers["Content-Length"] = str(announced)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not send_body:
            return
        if fault is not None and fault.kind in ("drop", "truncate"):
            self.wfile.write(body[:fault.after])
            self.wfile.flush()
            if fault.kind == "drop":  # RST instead of FIN: the client sees ECONNRESET
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.wfile.write(body)

    def _endless(self, send_body):
        """200, no Content-Length, zeros until the client disconnects or the server stops."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        block = bytes(1 << 16)
        while send_body and not self.server.owner._stop.is_set():
            try:
                self.wfile.write(block)
            except OSError:  # the client hung up: what a size cap does
                break
        self.close_connection = True

    def _simple(self, status, body, headers=None):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "text/plain")
        headers["Content-Length"] = str(len(body))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class Server:
    """Handle returned by :func:`serve`: base ``url`` (ends in '/'), request log, fault queue."""

    def __init__(self, directory, faults=(), handler=FileHandler):
        self.directory = os.path.realpath(os.fspath(directory))
        self.requests: List[Request] = []
        self._faults = list(faults)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.url = "http://127.0.0.1:%d/" % self.port
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def add_faults(self, *faults):
        """Queue more faults (consumed in order by the next matching requests)."""
        with self._lock:
            self._faults.extend(faults)

    def pending_faults(self):
        with self._lock:
            return list(self._faults)

    def count(self, path=None):
        """Number of requests received so far (for one URL path, or all)."""
        with self._lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    def resolve(self, url_path):
        """Map a URL path to a file inside ``directory`` (None if absent or outside)."""
        candidate = os.path.realpath(os.path.join(self.directory, url_path.lstrip("/")))
        if not candidate.startswith(self.directory + os.sep) or not os.path.isfile(candidate):
            return None
        return candidate

    def _next_fault(self, path):
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.path is None or fault.path == path:
                    return self._faults.pop(i)
        return None

    def _record(self, request):
        with self._lock:
            self.requests.append(request)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()  # wakes stalled handlers so nothing outlives the test
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@contextmanager
def serve(directory, faults=()):
    """Serve ``directory`` on 127.0.0.1 (random port) for the duration of the block."""
    server = Server(directory, faults).start()
    try:
        yield server
    finally:
        server.stop()


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused), for 'unreachable' tests."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return "http://127.0.0.1:%d/" % port


@pytest.fixture
def http_server(tmp_path):
    """Fixture: a fault-injecting server over a fresh ``tmp_path / 'www'`` directory.

    Put files in ``server.directory``; add faults with ``server.add_faults(...)``.
    """
    www = tmp_path / "www"
    www.mkdir()
    with serve(www) as server:
        yield server


def wait_until(predicate, timeout=5.0):
    """Poll ``predicate`` (for server-side effects that land just after the client returns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
