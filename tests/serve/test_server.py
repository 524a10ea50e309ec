"""The real MXNet Model Server on 127.0.0.1 with mxvision archives: answers, batching, bad
requests, CORS, a killed worker, and stopping (no mocks: Java, MMS, MXNet and HTTP are real)."""
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from mxvision.inference import classify, predict
from mxvision.serve import server as mms
from mxvision.serve.archive import export_archive
from mxvision.serve.handler import BATCH_FIELD
from support.cli import one_line_error, run_cli
from support.image_builders import png_file

IN_CI = os.environ.get("CI", "").lower() == "true"
XRV_MODEL = "densenet121-res224-all"
MAX_IMAGE = 2 << 20


def _require_server_stack():
    missing = [what for what, ok in (("java", shutil.which("java")),
                                     ("multi-model-server", _importable("mms"))) if not ok]
    if missing:
        message = f"MXNet Model Server tests need {' and '.join(missing)} (`make setup` installs the " \
                  f"serve extra; Java 8+ must be on PATH)"
        if IN_CI:
            pytest.fail(message + " -- CI=true, so this fails instead of skipping", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


_require_server_stack()


def free_ports(count=3):
    """A base port with ``count`` consecutive free ports on 127.0.0.1, below the ports MMS refuses
    (32767 and above) and below Linux's ephemeral range."""
    import random
    for _ in range(200):
        base = random.randrange(20000, mms.MAX_MMS_PORT - count)
        if all(mms.port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free ports")


def post(url, body, content_type="application/octet-stream", timeout=60, headers=None):
    """(status, headers, parsed JSON or raw text) of one POST."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, data = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        status, head, data = err.code, dict(err.headers), err.read()
    try:
        return status, head, json.loads(data)
    except ValueError:
        return status, head, data.decode("utf-8", "replace")


def multipart(field, filename, data, **fields):
    """A multipart form body with one file field and text ``fields``; (body, content type)."""
    boundary = "mxvisionboundary7"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data
    for name, value in fields.items():
        body += (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                 f"{value}").encode()
    return body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def archives(small_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mars")
    export_archive(folder / "xv.mar", run=small_run)
    export_archive(folder / "dn.mar", model=XRV_MODEL, weights="none")
    return [folder / "xv.mar", folder / "dn.mar"]


@pytest.fixture(scope="module")
def server(archives, tmp_path_factory):
    port = free_ports()
    running = mms.start(archives, port=port, workers=1, batch_size=4, max_batch_delay=300,
                        state_dir=tmp_path_factory.mktemp("state"), max_image_bytes=MAX_IMAGE)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def films(synth_index, shared, tmp_path_factory):
    """Real sample films (PNG, JPEG, DICOM), one of them as a 16-bit TIFF, and synthetic PNGs."""
    import cv2

    real = sorted(p for p in (shared / "data" / "samples").iterdir() if p.is_file())
    tiff = tmp_path_factory.mktemp("tiff") / "00000001_000.tif"
    grey = cv2.imread(str(shared / "data" / "samples" / "00000001_000.png"), cv2.IMREAD_GRAYSCALE)
    assert cv2.imwrite(str(tiff), grey.astype(np.uint16) * 257)
    return real + [tiff] + sorted(Path(synth_index).parent.rglob("*.png"))[:4]


def test_served_answers_equal_predict_and_classify_on_the_same_files(server, small_run, films):
    url = server.inference_url
    offline_xv = predict(small_run, films)
    offline_dn = classify(films, model=XRV_MODEL, weights="none")
    for path, want_xv, want_dn in zip(films, offline_xv, offline_dn):
        status, _, got = post(url + "xv", path.read_bytes())
        assert status == 200, got
        np.testing.assert_allclose(list(got["probabilities"].values()),
                                   list(want_xv["probabilities"].values()), atol=1e-5)
        body, kind = multipart("data", path.name, path.read_bytes())  # a form upload, as from a page
        status, _, got = post(url + "dn", body, kind)
        assert status == 200, got
        assert got["random_weights"] is True and got["unavailable"] == want_dn["unavailable"]
        for name, value in want_dn["scores"].items():
            assert (got["scores"][name] is None) if value is None else abs(got["scores"][name] - value) <= 1e-5


def test_the_server_batches_concurrent_requests_and_answers_each_its_own(server, small_run, films):
    offline = {str(r["path"]): r for r in predict(small_run, films)}
    jobs = [films[i % len(films)] for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda p: post(server.inference_url + "xv", p.read_bytes()), jobs))
    batches = []
    for path, (status, head, got) in zip(jobs, answers):
        assert status == 200, got
        # JSON (parsed by post), sent without a Content-Type: the handler sets no response header
        # (see mxvision.serve.handler.BATCH_FIELD), and MMS adds none of its own
        assert isinstance(got, dict) and "Content-Type" not in head, head
        np.testing.assert_allclose(list(got["probabilities"].values()),
                                   list(offline[str(path)]["probabilities"].values()), atol=1e-5)
        batches.append(got[BATCH_FIELD])
    assert max(batches) > 1, batches  # several requests shared one forward pass
    assert max(batches) <= 4


def _bomb_png():
    """60000 x 60000 declared (3.6 Gpx), 10 kB of zeros: refused from its header."""
    return png_file(60000, 60000, zlib.compress(bytes(10000)))


@pytest.mark.parametrize("case, body, status, fragment", [
    ("text", b"just some text\n", 400, "not a supported image"),
    ("empty", b"", 400, "empty"),
    ("truncated", None, 400, "PNG"),
    ("bomb", _bomb_png(), 400, "60000"),
    ("too large", b"\x89PNG" + bytes(MAX_IMAGE + 10), 413, "over this server's limit"),
])
def test_a_bad_request_gets_a_4xx_one_line_json_error_and_the_next_one_is_answered(
        server, films, case, body, status, fragment):
    good = next(p for p in films if p.suffix == ".png")
    if body is None:
        body = good.read_bytes()[:2000]
    got_status, _, got = post(server.inference_url + "xv", body)
    assert got_status == status, got
    assert isinstance(got, dict) and fragment in got["error"] and "\n" not in got["error"], got
    assert got["code"] == status
    ok, _, answer = post(server.inference_url + "xv", good.read_bytes())
    assert ok == 200 and "probabilities" in answer


def test_gradcam_on_request_is_explains_gradcam_with_an_overlay_of_the_film(server, films):
    import base64

    import cv2
    import mxnet as mx
    from mxvision.audit.explain import explainer_from_xrv, grad_cam
    from mxvision.data import xrv_transforms
    from mxvision.io.images import read_image

    film = next(p for p in films if p.suffix == ".dcm")
    body, content_type = multipart("data", film.name, film.read_bytes(), gradcam="1", target="Mass")
    status, _, got = post(server.inference_url + "dn", body, content_type)
    assert status == 200 and len(got["scores"]) == 18, got
    cam = got["gradcam"]
    explainer = explainer_from_xrv(XRV_MODEL, weights="none")
    image = read_image(film)
    x = mx.nd.array(xrv_transforms.preprocess(xrv_transforms.xray_range(image), 224)[None])
    heat, logits, _ = grad_cam(explainer.features, explainer.head, x, explainer.target_index("Mass"))
    assert cam["target"] == "Mass" and heat.max() > 0
    assert abs(cam["logit"] - logits[0]) <= 1e-4 * max(1.0, abs(logits[0]))
    np.testing.assert_allclose(np.array(cam["grid"]), heat[0], atol=1e-4)
    header, data = cam["overlay"].split(",", 1)
    assert header == "data:image/png;base64"
    picture = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape
    assert max(picture.shape[:2]) == min(512, max(h, w))  # the film's aspect, at most 512 px
    assert abs(picture.shape[1] / picture.shape[0] - w / h) < 0.02
    # without the field there is no Grad-CAM (and no cost); an unknown target is a one-line 400
    status, _, plain = post(server.inference_url + "dn", *multipart("data", film.name, film.read_bytes()))
    assert status == 200 and "gradcam" not in plain
    status, _, bad = post(server.inference_url + "dn", *multipart("data", film.name, film.read_bytes(),
                                                                 gradcam="1", target="Bogus"))
    assert status == 400 and "target=Bogus" in bad["error"] and "\n" not in bad["error"]


def test_an_unknown_model_and_an_oversized_body_get_the_servers_own_4xx(server, films):
    status, _, got = post(server.inference_url + "nope", films[0].read_bytes())
    assert status == 404 and "nope" in got["message"]
    # beyond MMS's own max_request_size it answers 413 from the Content-Length alone, before the
    # body (a client still sending then sees the connection close: curl shows the 413)
    size = 2 * MAX_IMAGE + (2 << 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(f"POST /predictions/xv HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     f"application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode())
        conn.sendall(bytes(4096))
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    assert b" 413 " in status_line, status_line


def test_the_page_is_served_and_only_its_origin_may_call_the_api(server):
    with urllib.request.urlopen(server.page_url, timeout=10) as response:
        assert b"Score a chest radiograph" in response.read()
    with urllib.request.urlopen(server.page_url + "models.json", timeout=10) as response:
        info = json.loads(response.read())
    assert [m["name"] for m in info["models"]] == ["xv", "dn"]
    assert info["models"][0]["random_weights"] is True and info["inference"] == server.inference_url
    request = urllib.request.Request(server.inference_url + "xv", method="OPTIONS", headers={
        "Origin": server.page_url.rstrip("/"), "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(request, timeout=10) as response:
        allowed = response.headers["Access-Control-Allow-Origin"]
    assert allowed == server.page_url.rstrip("/")  # a browser on any other origin is refused


def _workers(server):
    """The processes that score: MMS starts a worker per model, which forks the child that
    serves its socket."""
    import psutil
    workers = [p for p in psutil.Process(server.process.pid).children(recursive=True)
               if "model_service_worker" in " ".join(p.cmdline())]
    pids = {p.pid for p in workers}
    return [p for p in workers if p.ppid() in pids]


def test_a_killed_worker_is_restarted_and_no_request_hangs(server, films):
    good = next(p for p in films if p.suffix == ".png").read_bytes()
    before = _workers(server)
    assert len(before) == 2  # one per model
    outcomes, started = [], time.monotonic()

    def client(i):
        tic = time.monotonic()
        try:
            status, _, _ = post(server.inference_url + "xv", good, timeout=60)
        except OSError as err:
            status = type(err).__name__
        return status, time.monotonic() - tic

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        time.sleep(0.3)
        for victim in before:  # both models' workers at once
            victim.send_signal(signal.SIGKILL)
        futures += [pool.submit(client, i) for i in range(8)]
        outcomes = [f.result(timeout=120) for f in futures]
    assert all(seconds < 60 for _, seconds in outcomes), outcomes  # every client got an answer in time
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, _, _ = post(server.inference_url + "xv", good, timeout=60)
        if status == 200:
            break
        time.sleep(1)
    assert status == 200, "the server did not recover after its worker was killed"
    assert not {p.pid for p in before} & {p.pid for p in _workers(server)}
    print(f"killed worker: {sum(s != 200 for s, _ in outcomes)} of {len(outcomes)} requests failed; "
          f"answered again {time.monotonic() - started:.1f} s after the kill")


def test_the_cli_starts_prints_the_urls_and_stops_on_ctrl_c_leaving_no_process(archives, tmp_path):
    port = free_ports()
    process = subprocess.Popen([sys.executable, "-m", "mxvision", "serve", str(archives[1]), "--port", str(port),
                                "--state", str(tmp_path / "state")], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in process.stdout:
        lines.append(line)
        if line.startswith("logs:") or time.monotonic() > deadline:
            break
    text = "".join(lines)
    assert f"POST http://127.0.0.1:{port}/predictions/dn" in text, text
    assert f"web page: http://127.0.0.1:{port + 2}/" in text
    state = json.loads((tmp_path / "state" / "server.json").read_text())
    import psutil
    family = [state["pid"]] + [p.pid for p in psutil.Process(state["pid"]).children(recursive=True)]
    assert len(family) >= 3  # launcher, Java frontend, a worker
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "stopping the server" in rest, rest
    time.sleep(1)
    assert [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"] == []
    assert all(mms.port_is_free(p) for p in (port, port + 1, port + 2))
    assert not (tmp_path / "state" / "server.json").exists()


def test_serve_refuses_bad_arguments_in_one_line(archives, tmp_path):
    code, _, err = run_cli("serve")
    one_line_error(code, err, "give the model archives")
    not_mar = tmp_path / "model.txt"
    not_mar.write_text("x")
    code, _, err = run_cli("serve", not_mar)
    one_line_error(code, err, "model.txt", "no such model archive")
    fake = tmp_path / "fake.mar"
    fake.write_bytes(png_file(8, 8, zlib.compress(bytes(72))))  # a PNG named .mar
    code, _, err = run_cli("serve", fake)
    one_line_error(code, err, "fake.mar", "not an mxvision model archive")
    port = free_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))  # the management API's port
        taken.listen()
        code, _, err = run_cli("serve", archives[0], "--port", port, "--state", tmp_path / "s")
    one_line_error(code, err, f"port {port + 1}", "in use", "management")
    code, out, err = run_cli("serve", "--stop", "--port", free_ports(), "--state", tmp_path / "none")
    assert code == 0 and "no mxvision server was running" in out
