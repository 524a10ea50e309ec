"""The web page in a real browser (headless Chromium driven by chromedriver): a person uploads a
radiograph and sees the scores the model server gives; a page on another origin is refused."""
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from mxvision.inference import classify
from mxvision.serve import server as mms
from mxvision.serve.archive import export_archive

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
XRV_MODEL = "densenet121-res224-all"
#: Where the test keeps its screenshots (outside the repository): MXVISION_SCREENSHOTS or tmp_path.
SCREENSHOTS = os.environ.get("MXVISION_SCREENSHOTS")


def _require_browser():
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                        ("java", shutil.which("java"))) if not found]
    try:
        import mms  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as err:
        missing.append(err.name)
    if missing:
        message = (f"the browser test needs {', '.join(missing)} (.ci/run installs Debian's chromium "
                   f"and chromium-driver; `make setup` the serve and test extras)")
        if IN_CI:
            pytest.fail(message + " -- CI=true, so this fails instead of skipping", pytrace=False)
        pytest.skip(message, allow_module_level=True)


_require_browser()

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from test_server import free_ports  # noqa: E402


@pytest.fixture(scope="module")
def int8_archive(shared, tmp_path_factory):
    """An INT8 archive of the DenseNet port with the soft weights that keep the bar (the INT8
    tests' conversion, from the session's cache when they ran first)."""
    from support.xrv_files import DENSE  # the model of those weights: the same conversion key
    from support.xrv_int8 import int8_setup
    setup = int8_setup(shared, tmp_path_factory.mktemp("int8"))
    return export_archive(tmp_path_factory.mktemp("mar8") / "q.mar", model=DENSE, weights=setup["weights"],
                          dtype="int8", calibration=str(setup["calibration"]), int8_tolerance=1.0)


@pytest.fixture(scope="module")
def server(small_run, int8_archive, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mars")
    archives = [export_archive(folder / "xv.mar", run=small_run)["archive"],
                export_archive(folder / "dn.mar", model=XRV_MODEL, weights="none")["archive"],
                int8_archive["archive"]]
    running = mms.start(archives, port=free_ports(), batch_size=2, max_batch_delay=50,
                        state_dir=tmp_path_factory.mktemp("state"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 # no DNS lookups from the test browser: every page it opens is on 127.0.0.1
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--window-size=1000,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _upload(browser, page_url, model, path, gradcam_target=None):
    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 2)
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    if gradcam_target:
        browser.find_element(By.ID, "gradcam").click()
        Select(browser.find_element(By.ID, "target")).select_by_value(gradcam_target)
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "go").click()
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#status .done, #status .error")))
    return wait


def _screenshot(browser, tmp_path, name):
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(folder / name))
    print(f"screenshot: {folder / name}")


def test_an_upload_shows_the_scores_the_server_gives_with_the_warnings(server, browser, shared, tmp_path):
    film = shared / "data" / "samples" / "00000001_000.png"
    _upload(browser, server.page_url, "dn", film)
    _screenshot(browser, tmp_path, "page-dn.png")
    status = browser.find_element(By.ID, "status").text
    assert status == f"Scored {film.name}.", status
    used = browser.find_element(By.CSS_SELECTOR, ".model-used").text
    assert "dn (xrv), float32," in used and "RANDOM" in used
    assert browser.find_elements(By.CSS_SELECTOR, ".precision") == []  # float32: no INT8 check to show
    warnings = [w.text for w in browser.find_elements(By.CSS_SELECTOR, ".warn")]
    assert any("RANDOM weights" in w for w in warnings), warnings
    want = classify([film], model=XRV_MODEL, weights="none")[0]
    bars = {row.get_attribute("data-name"): row.text for row in browser.find_elements(By.CSS_SELECTOR, ".bar")}
    assert set(bars) == set(want["scores"]) and len(bars) == 18
    for name, value in want["scores"].items():
        shown = bars[name].split("\n")[-1] if value is None else bars[name].split()[-1]
        assert (shown.startswith("n/a") if value is None else shown == f"{value:.3f}"), (name, bars[name], value)


def test_an_int8_model_shows_its_precision_and_its_check_against_float32(server, int8_archive, browser, shared):
    film = shared / "data" / "samples" / "00000001_000.png"
    _upload(browser, server.page_url, "q", film)
    assert browser.find_element(By.ID, "status").text == f"Scored {film.name}."
    assert "q (xrv), int8," in browser.find_element(By.CSS_SELECTOR, ".model-used").text
    check = int8_archive["manifest"]["int8"]
    assert browser.find_element(By.CSS_SELECTOR, ".precision").text == (
        "INT8 scores, within %.3f of float32 on %d held-out calibration films" % (check["max_score_difference"], check["films"]))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".bar")) == 18


def test_the_xvision_model_shows_its_classes_and_prediction(server, browser, shared, tmp_path):
    film = shared / "data" / "samples" / "16747_3_1.jpg"
    _upload(browser, server.page_url, "xv", film)
    _screenshot(browser, tmp_path, "page-xv.png")
    assert browser.find_element(By.ID, "status").text == f"Scored {film.name}."
    assert browser.find_element(By.CSS_SELECTOR, ".predicted").text.startswith("Predicted: ")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".bar")) == 2


def test_a_gradcam_overlay_is_shown_on_request_for_the_chosen_output(server, browser, shared, tmp_path):
    film = shared / "data" / "samples" / "00000001_000.png"
    _upload(browser, server.page_url, "dn", film)
    assert browser.find_elements(By.ID, "overlay") == []  # not unless asked for
    # the target list follows the model; its default is audit explain's (Nodule)
    assert Select(browser.find_element(By.ID, "target")).first_selected_option.text == "Nodule"
    wait = _upload(browser, server.page_url, "dn", film, gradcam_target="Cardiomegaly")
    wait.until(lambda d: d.execute_script(
        "const i = document.getElementById('overlay'); return i !== null && i.complete && i.naturalWidth > 0;"))
    _screenshot(browser, tmp_path, "page-dn-gradcam.png")
    caption = browser.find_element(By.CSS_SELECTOR, ".cam-caption").text
    assert caption.startswith("Grad-CAM of Cardiomegaly (logit "), caption
    width, height = browser.execute_script(
        "const i = document.getElementById('overlay'); return [i.naturalWidth, i.naturalHeight];")
    assert max(width, height) == 512 and len(browser.find_elements(By.CSS_SELECTOR, ".bar")) == 18


def test_a_file_that_is_not_an_image_shows_the_servers_one_line_error(server, browser, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a radiograph\n")
    _upload(browser, server.page_url, "xv", notes)
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("Error: ") and "not a supported image" in status, status
    assert browser.find_elements(By.CSS_SELECTOR, ".bar") == []


def test_the_same_page_from_another_origin_is_refused_by_the_browser(server, browser, shared, tmp_path):
    """CORS: the inference API allows the page's own origin only."""
    (tmp_path / "index.html").write_bytes(mms.PAGE.read_bytes())
    with open(tmp_path / "models.json", "w") as f:
        f.write('{"inference": "%s", "models": [{"name": "dn", "family": "xrv"}]}' % server.inference_url)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_ports(1)), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{httpd.server_port}/index.html")
        WebDriverWait(browser, 30).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1)
        browser.find_element(By.ID, "file").send_keys(str(shared / "data" / "samples" / "00000001_000.png"))
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#status .error")))
        assert "Failed to fetch" in browser.find_element(By.ID, "status").text
    finally:
        httpd.shutdown()
        httpd.server_close()
