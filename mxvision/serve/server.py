"""Starting and stopping MXNet Model Server for mxvision archives, and the page beside it.

:func:`start` writes the server's ``config.properties`` into a state folder (one per port), starts
``multi-model-server --foreground`` there as a process group of its own (MMS keeps its pid file
in ``TMPDIR``, which is pointed at the state folder, so servers on other ports do not collide),
waits until ``GET /ping`` answers ``Healthy``, then registers each archive through the
management API with its batching (``batch_size``, ``max_batch_delay``) and workers, waiting
until they are up. Both APIs bind to 127.0.0.1 unless ``public=True``.

The web page is a static file served by a small thread of the calling process on its own port;
the inference API allows cross-origin requests from that page's origin only (MMS's
``cors_allowed_origin``). MMS has no way to serve a static file, and a static page keeps the
browser talking to the real inference API -- what a deployment's own front end would do.
"""
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mxvision.errors import MxvisionError
from mxvision.serve.archive import read_manifest
from mxvision.serve.handler import DEFAULT_MAX_BYTES, MAX_BYTES_VARIABLE

LOOPBACK = "127.0.0.1"
#: The highest port MMS 1.1.11 accepts (its Connector refuses 32767 and above).
MAX_MMS_PORT = 32766
PAGE = Path(__file__).resolve().parent / "page" / "index.html"
STATE_FILE = "server.json"


def state_dir_for(port, state_dir=None) -> Path:
    return Path(state_dir) if state_dir else Path(tempfile.gettempdir()) / f"mxvision-serve-{port}"


def write_config(state, archives, port, management_port, page_origin, workers, host=LOOPBACK,
                 max_image_bytes=DEFAULT_MAX_BYTES):
    """The model store (links to the archives) and ``config.properties``; returns the config path."""
    store = state / "model-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    for archive in archives:
        os.symlink(Path(archive).resolve(), store / Path(archive).name)
    lines = {
        "inference_address": f"http://{host}:{port}",
        "management_address": f"http://{LOOPBACK}:{management_port}",
        "model_store": str(store),
        "default_workers_per_model": str(workers),
        # room for multipart framing: the handler answers images over max_image_bytes itself
        # with a JSON 413; MMS answers a bare 413 only beyond twice that
        "max_request_size": str(2 * max_image_bytes + (1 << 20)),
        "max_response_size": str(1 << 20),
        "decode_input_request": "false",  # images arrive as bytes, never decoded to text
        "cors_allowed_origin": page_origin,
        "cors_allowed_methods": "GET, POST, OPTIONS",
        "cors_allowed_headers": "Content-Type",
        "async_logging": "true",
        # the JVM would otherwise leave /tmp/hsperfdata_<user>/<pid> files behind
        "vmargs": "-XX:-UsePerfData",
    }
    config = state / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in lines.items()), encoding="utf-8")
    return config


def _get(url, timeout=5.0, method="GET"):
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback
        return response.status, response.read()


def port_is_free(port, host=LOOPBACK):
    """Whether ``host:port`` can be bound now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class PageServer:
    """The static page and ``models.json`` on ``127.0.0.1:port``, in a daemon thread."""

    def __init__(self, port, info):
        page, models = PAGE.read_bytes(), json.dumps(info).encode("utf-8")

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = urllib.parse.urlparse(self.path).path
                body, kind = {"/": (page, "text/html; charset=utf-8"),
                              "/index.html": (page, "text/html; charset=utf-8"),
                              "/models.json": (models, "application/json")}.get(path, (None, None))
                if body is None:
                    self.send_error(404, "not found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: the console shows the URLs and errors only
                pass

        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Server:
    """A running MXNet Model Server with mxvision archives (see :func:`start`)."""

    def __init__(self, process, state, port, management_port, page, page_port, models, host):
        self.process, self.state, self.port, self.host = process, state, port, host
        self.management_port, self.page, self.page_port, self.models = management_port, page, page_port, models

    @property
    def inference_url(self):
        return f"http://{self.host}:{self.port}/predictions/"

    @property
    def page_url(self):
        return f"http://{LOOPBACK}:{self.page_port}/" if self.page else None

    def stop(self, timeout=20.0):
        """Terminate the server's whole process group (frontend and workers) and the page."""
        if self.page:
            self.page.close()
            self.page = None
        _kill_group(self.process.pid, timeout)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        (self.state / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _kill_group(pgid, timeout):
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_log_line(state):
    for name in ("mms_log.log", "model_log.log"):
        path = state / "logs" / name
        if path.is_file():
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return lines[-1][-300:]
    return ""


def start(archives, port=8080, workers=1, batch_size=1, max_batch_delay=100, page=True,
          page_port=None, public=False, state_dir=None, ready_timeout=300.0,
          max_image_bytes=DEFAULT_MAX_BYTES):
    """Start MXNet Model Server with the ``.mar`` files ``archives``; return a :class:`Server`.

    Every archive is checked to be an mxvision archive first. ``public=True`` binds the inference
    API to all interfaces (it has no authentication); the management API and the page stay on
    loopback. Raises MxvisionError with one line when a port is taken, Java or MMS is missing,
    or the server does not become healthy within ``ready_timeout`` seconds.
    """
    archives = [Path(a) for a in archives]
    if not archives:
        raise MxvisionError("serve", "give at least one model archive (NAME.mar)")
    manifests = {}
    for archive in archives:
        if archive.suffix != ".mar" or not archive.is_file():
            raise MxvisionError(str(archive), "no such model archive (expected NAME.mar, written by "
                                              "`mxvision export --mar`)")
        manifests[archive.stem] = read_manifest(archive)
    if len(manifests) != len(archives):
        raise MxvisionError("serve", "two archives have the same name; each NAME.mar is the model NAME")
    for option, value in (("--workers", workers), ("--batch-size", batch_size)):
        if int(value) < 1:
            raise MxvisionError(option, f"must be at least 1, got {value}")
    if int(max_batch_delay) < 0:
        raise MxvisionError("--max-batch-delay", f"must be >= 0 milliseconds, got {max_batch_delay}")
    host = "0.0.0.0" if public else LOOPBACK
    if not 1 <= port <= MAX_MMS_PORT - 1:
        raise MxvisionError(f"port {port}", f"MXNet Model Server takes ports up to {MAX_MMS_PORT} "
                                            f"(the management API uses port+1)")
    management_port = port + 1
    page_port = page_port or port + 2
    for what, p, h in (("inference", port, host), ("management", management_port, LOOPBACK),
                       ("page", page_port if page else None, LOOPBACK)):
        if p is not None and not port_is_free(p, h):
            raise MxvisionError(f"port {p}", f"is in use (the {what} API needs it); choose another "
                                             f"with --port")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise MxvisionError("serve", "MXNet Model Server needs a Java runtime (java not found; "
                                     "install a JRE 8+ or set JAVA_HOME)")
    try:
        import mms  # noqa: F401
    except ImportError:
        raise MxvisionError("serve", "MXNet Model Server is not installed: pip install "
                                     "'mxvision[serve]' (multi-model-server 1.1.11)") from None
    state = state_dir_for(port, state_dir)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "tmp").mkdir(exist_ok=True)
    page_origin = f"http://{LOOPBACK}:{page_port}"
    config = write_config(state, archives, port, management_port, page_origin, workers, host,
                          max_image_bytes)
    env = dict(os.environ, TMPDIR=str(state / "tmp"), TEMP=str(state / "tmp"),
               **{MAX_BYTES_VARIABLE: str(int(max_image_bytes))},
               LOG_LOCATION=str(state / "logs"), METRICS_LOCATION=str(state / "logs"))
    command = [sys.executable, "-m", "mms.model_server", "--start", "--foreground",
               "--mms-config", str(config), "--model-store", str(state / "model-store")]
    with open(state / "logs" / "console.log", "ab") as console:
        process = subprocess.Popen(command, cwd=state, env=env, stdout=console, stderr=console,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(process, state, port, management_port, None, page_port, manifests, host)
    try:
        _wait_healthy(server, ready_timeout)
        for archive in archives:
            _register(server, archive, workers, batch_size, max_batch_delay, ready_timeout)
        if page:
            info = {"inference": f"http://{LOOPBACK}:{port}/predictions/",
                    "models": [{"name": name, **_page_info(m)} for name, m in manifests.items()]}
            server.page = PageServer(page_port, info)
    except BaseException:
        server.stop()
        raise
    (state / STATE_FILE).write_text(json.dumps({"pid": process.pid, "port": port,
                                                "page_port": page_port if page else None}))
    return server


def _page_info(manifest):
    keys = ("family", "model", "classes", "pathologies", "unavailable", "precision", "random_weights")
    info = {k: manifest[k] for k in keys if k in manifest}
    weights = manifest.get("weights") or {}
    info["weights"] = weights.get("description") or weights.get("backbone") or "unknown"
    return info


def _wait_healthy(server, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise MxvisionError("serve", "MXNet Model Server exited during start-up (%s; logs: %s)"
                                % (_last_log_line(server.state) or "no log", server.state / "logs"))
        try:
            status, body = _get(f"http://{LOOPBACK}:{server.port}/ping", timeout=2)
            if status == 200 and b"Healthy" in body:
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    raise MxvisionError("serve", f"MXNet Model Server did not answer /ping within {timeout:.0f} s "
                                 f"(logs: {server.state / 'logs'})")


def _register(server, archive, workers, batch_size, max_batch_delay, timeout):
    query = urllib.parse.urlencode({
        "url": archive.name, "model_name": archive.stem, "initial_workers": workers,
        "batch_size": batch_size, "max_batch_delay": max_batch_delay, "synchronous": "true",
        "response_timeout": 120})
    url = f"http://{LOOPBACK}:{server.management_port}/models?{query}"
    try:
        _get(url, timeout=timeout, method="POST")
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("message", detail)
        except ValueError:
            pass
        raise MxvisionError(str(archive), "MXNet Model Server could not load it (HTTP %d: %s; logs: %s)"
                            % (err.code, " ".join(detail.split())[:200], server.state / "logs")) from None
    except (OSError, urllib.error.URLError) as err:
        raise MxvisionError(str(archive), f"registering it failed ({err}; logs: "
                                          f"{server.state / 'logs'})") from None


def stop(port=8080, state_dir=None):
    """Stop the server ``start`` left running on ``port``; False when none was running."""
    state = state_dir_for(port, state_dir)
    try:
        info = json.loads((state / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    _kill_group(int(info["pid"]), 20.0)
    (state / STATE_FILE).unlink()
    return True


__all__ = ["start", "stop", "Server", "write_config", "state_dir_for", "port_is_free", "MAX_MMS_PORT"]
