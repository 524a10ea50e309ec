"""The original Xvision route to OpenI: page through the search API, politely and resumably.

Xvision scraped OpenI's search pages (``gridquery.php``, then one detail page per image) with no
delay, no retry and no way to continue after an interruption. OpenI now answers the same search
as JSON at ``/api/search``; one page looks like (real response, abridged)::

    {"min": 1, "max": 2, "count": 2, "total": 7470, "approximage": "false",
     "list": [{"uid": "CXR1", "MeSH": {"major": ["normal"], "minor": []},
               "Problems": "normal", "image": {"id": "F1", "caption": "Xray Chest PA and Lateral"},
               "imgLarge": "/imgs/512/1/1/CXR1_1_IM-0001-3001.png", ...}, ...]}

``m`` and ``n`` are the 1-based first and last result wanted; ``coll=cxr`` selects the Indiana
chest X-ray collection. :func:`scrape` asks for ``page_size`` results at a time and

* identifies itself (:data:`USER_AGENT`, overridable) and waits ``delay`` seconds between any
  two requests (rate limit);
* fetches each page with :func:`mxvision.io.download.download`, so connection drops, 5xx, 429
  with Retry-After and truncated bodies are retried with backoff, and an HTML page where JSON
  was expected is refused; a page that is still not valid JSON after the retries is an error;
* appends the page's records to ``openi_records.jsonl`` and then records its progress in
  ``openi_scrape.json``; rerunning the same command continues after the last complete page
  (a half-written page is cut off first);
* optionally downloads each record's 512 px PNG (``imgLarge``) into ``images/`` (resumable,
  existing files skipped).

Each output line is one image: ``uid``, ``image_id``, ``major``, ``minor``, ``problems``,
``caption``, ``img_url``. :func:`mxvision.data.openi.read_scraped` turns them into the same
:class:`~mxvision.data.openi.Report` records as the bulk archive.
"""
import json
import logging
import os
import time
import urllib.parse

from tqdm import tqdm

from mxvision import __version__
from mxvision.errors import DownloadError
from mxvision.io.download import download
from mxvision.utils import write_json

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://openi.nlm.nih.gov/"
API_PATH = "api/search"
RECORDS_FILE = "openi_records.jsonl"
STATE_FILE = "openi_scrape.json"
IMAGES_DIR = "images"
USER_AGENT = (f"mxvision/{__version__} OpenI-scraper (chest X-ray research; rate-limited; "
              f"python-urllib)")
DEFAULT_DELAY = 1.0  # seconds between requests: OpenI asks nothing, this is being polite


class RateLimiter:
    """At most one request per ``interval`` seconds (monotonic clock)."""

    def __init__(self, interval):
        self.interval = max(0.0, float(interval))
        self._last = None

    def wait(self):
        now = time.monotonic()
        if self._last is not None:
            pause = self._last + self.interval - now
            if pause > 0:
                time.sleep(pause)
        self._last = time.monotonic()


def page_url(base_url, m, n, query="", coll="cxr", extra=None):
    """The search URL for results ``m``..``n`` (1-based, inclusive)."""
    params = {"query": query, "coll": coll, "m": int(m), "n": int(n)}
    params.update(extra or {})
    return urllib.parse.urljoin(base_url, API_PATH) + "?" + urllib.parse.urlencode(params)


def normalize_record(item, base_url):
    """One API list item -> our record dict, or None when it names no image."""
    if not isinstance(item, dict):
        return None
    img = item.get("imgLarge") or ""
    if not img:
        return None
    path = urllib.parse.urlsplit(img).path
    image_id = os.path.splitext(os.path.basename(path))[0]
    mesh = item.get("MeSH") if isinstance(item.get("MeSH"), dict) else {}
    image = item.get("image") if isinstance(item.get("image"), dict) else {}
    uid = str(item.get("uid") or "")
    if not uid and image_id.startswith("CXR"):
        uid = image_id.split("_", 1)[0]
    return {"uid": uid, "image_id": image_id,
            "major": [str(x) for x in mesh.get("major") or []],
            "minor": [str(x) for x in mesh.get("minor") or []],
            "problems": str(item.get("Problems") or ""),
            "caption": str(image.get("caption") or ""),
            "img_url": urllib.parse.urljoin(base_url, img)}


def _fetch_json(url, tmp, limiter, retries, timeout, backoff, user_agent):
    """GET ``url`` as JSON through download() (its retries), re-asking if the body is not JSON."""
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        limiter.wait()
        download(url, tmp, retries=retries, timeout=timeout, backoff=backoff, progress=False,
                 user_agent=user_agent, resume=False)
        try:
            with open(tmp, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            last = f"not valid JSON ({err})"
            log.warning("%s: %s; asking again", url, last)
            continue
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if not isinstance(data, dict) or not isinstance(data.get("list"), list):
            raise DownloadError(url, "not an OpenI search answer (no 'list' of results)")
        return data
    raise DownloadError(url, f"failed after {retries + 1} attempts: {last}")


def _same_job(state, job):
    return all(state.get(k) == v for k, v in job.items())


def scrape(out_dir, base_url=DEFAULT_BASE_URL, query="", coll="cxr", page_size=100,
           delay=DEFAULT_DELAY, max_records=None, images=False, retries=5, timeout=30,
           backoff=1.0, user_agent=USER_AGENT, restart=False, progress=True, extra_params=None):
    """Scrape OpenI search results into ``out_dir``; return a summary dict.

    Resumes a previous run of the same job (base URL, query, collection, page size) unless
    ``restart``; a different job in the same folder is refused rather than mixed in.
    ``max_records`` stops after about that many records (whole pages). Raises DownloadError.
    """
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    os.makedirs(out_dir, exist_ok=True)
    records_path = os.path.join(out_dir, RECORDS_FILE)
    state_path = os.path.join(out_dir, STATE_FILE)
    job = {"base_url": base_url, "query": query, "coll": coll, "page_size": page_size,
           "extra_params": extra_params or {}}
    state = None
    if not restart and os.path.isfile(state_path):
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
        if state is not None and not _same_job(state, job):
            raise DownloadError(state_path, "holds another scrape (other URL, query, collection or "
                                            "page size); use another --out or --restart")
    if state is None:
        if os.path.exists(records_path) and not restart:
            raise DownloadError(records_path, f"exists without {STATE_FILE}; use another --out "
                                              f"or --restart")
        state = dict(job, next_m=1, total=None, records=0, bytes=0, pages=0, complete=False)
    if state.get("complete") and not restart:
        log.info("%s: scrape already complete (%d records)", out_dir, state["records"])
    with open(records_path, "ab") as f:  # cut off a page written after the last saved state
        f.truncate(state["bytes"])
    write_json(state_path, state)

    limiter = RateLimiter(delay)
    tmp = os.path.join(out_dir, ".page.json")
    img_dir = os.path.join(out_dir, IMAGES_DIR)
    n_images = 0
    bar = tqdm(total=state["total"], initial=state["records"], unit="rec", desc="scrape",
               disable=not progress)
    try:
        while not state["complete"]:
            if max_records is not None and state["records"] >= max_records:
                break
            m = state["next_m"]
            url = page_url(base_url, m, m + page_size - 1, query, coll, extra_params)
            data = _fetch_json(url, tmp, limiter, retries, timeout, backoff, user_agent)
            items = data["list"]
            if data.get("total") is not None:
                state["total"] = int(data["total"])
                bar.total = state["total"]
            records = [r for r in (normalize_record(it, base_url) for it in items) if r]
            if images:
                for r in records:
                    dest = os.path.join(img_dir, r["image_id"] + ".png")
                    if not os.path.isfile(dest):
                        limiter.wait()
                        download(r["img_url"], dest, retries=retries, timeout=timeout,
                                 backoff=backoff, progress=False, user_agent=user_agent,
                                 resume=True)
                        n_images += 1
            with open(records_path, "ab") as f:
                for r in records:
                    f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            last = int(data.get("max") or (m + len(items) - 1))
            state.update(next_m=max(last, m + len(items) - 1) + 1, bytes=size,
                         records=state["records"] + len(records), pages=state["pages"] + 1)
            if not items or (state["total"] is not None and state["next_m"] > state["total"]):
                state["complete"] = True
            write_json(state_path, state)
            bar.update(len(records))
    finally:
        bar.close()
    return {"records": state["records"], "total": state["total"], "pages": state["pages"],
            "complete": state["complete"], "images_downloaded": n_images,
            "records_file": records_path, "state_file": state_path}


__all__ = ["scrape", "page_url", "normalize_record", "RateLimiter", "USER_AGENT",
           "DEFAULT_BASE_URL", "RECORDS_FILE", "STATE_FILE"]
