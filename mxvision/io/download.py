"""Robust file downloads and safe archive extraction.

Pretrained weights and datasets come from mirrors that fail in ordinary ways: connections drop
half way through a 100 MB file, servers answer 500 or 429, proxies stall, captive portals send a
login page with status 200. ``mxnet.gluon.utils.download`` restarts from zero and cannot tell a
login page from a file, so this module:

* streams into ``path + ".part"`` and resumes it with an HTTP Range request (restarting cleanly
  if the server answers 200 instead of 206), so a dropped connection costs only what was lost;
* retries transient failures (connection errors, timeouts, 5xx, 408/429) with exponential
  backoff, honouring a bounded Retry-After, and gives up at once on permanent ones (404, 403,
  an HTML page where a file was expected -- announced as ``text/html``, or, for a URL naming a
  binary file such as ``.tgz`` or ``.params``, a body that starts like an HTML page whatever
  its Content-Type: mirrors store error pages under the file's name);
* checks the size against Content-Length and the optional sha1/sha256, and only then moves the
  file into place with ``os.replace``: ``path`` either holds a complete, verified file or nothing;
* caps the size, so a source that never ends (or announces terabytes) cannot fill the disk: the
  caller's known size plus a margin (:func:`size_cap`), else ``max_bytes`` (default
  :data:`DEFAULT_MAX_BYTES`, 16 GiB: the largest file mxvision fetches itself, NLMCXR_png.tgz, is
  1.3 GB, and the largest public chest X-ray archives users fetch, CheXpert-small's zip and
  NIH's image tarballs, are 11 GB and under 5 GB each). A transfer that reaches the cap stops
  there, its partial file is removed, and the error says so in one line;
* serialises concurrent downloads of the same path with an advisory lock on the ``.part`` file.

User-caused failures raise :class:`~mxvision.errors.DownloadError` with a one-line message naming
the URL. The safe archive extractors live in :mod:`mxvision.io.archive` and are re-exported here
because callers almost always download an archive and then unpack it.
"""
import email.utils
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

from tqdm import tqdm

from mxvision import __version__
from mxvision.errors import DownloadError, one_line
from mxvision.utils import file_digest
from mxvision.io.archive import MAX_MEMBER_SIZE, MAX_TOTAL_SIZE, safe_extract_tar, safe_extract_zip

try:  # POSIX advisory locks; on other platforms concurrent downloads are simply not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["download", "check_hash", "locked_file", "safe_extract_zip", "safe_extract_tar",
           "size_cap", "USER_AGENT", "MAX_MEMBER_SIZE", "MAX_TOTAL_SIZE", "DEFAULT_MAX_BYTES"]

log = logging.getLogger(__name__)

USER_AGENT = "mxvision/%s (python-urllib)" % __version__
MAX_WAIT = 60.0  # upper bound on any single wait between attempts (Retry-After included)
#: Largest download when the caller does not know the size (see the module docstring).
DEFAULT_MAX_BYTES = 16 << 30
_CHUNK = 1 << 16
_HEX_LENGTH = {"sha1": 40, "sha256": 64}


class _Retry(Exception):
    """A transient failure: wait (``wait`` seconds if the server said so) and try again."""

    def __init__(self, reason, wait=None):
        super().__init__(reason)
        self.wait = wait


class _Fatal(Exception):
    """A permanent failure: retrying cannot help."""


def _expected_hashes(sha1, sha256):
    expected = {}
    for algorithm, value in (("sha1", sha1), ("sha256", sha256)):
        if value is None:
            continue
        value = value.strip().lower()
        if not re.fullmatch("[0-9a-f]{%d}" % _HEX_LENGTH[algorithm], value):
            raise ValueError("%s must be %d hex digits, got %r" % (algorithm, _HEX_LENGTH[algorithm], value))
        expected[algorithm] = value
    return expected


def _mismatch(path, expected):
    """First (algorithm, actual, expected) that does not match, or None."""
    for algorithm, value in expected.items():
        actual = file_digest(path, algorithm)
        if actual != value:
            return algorithm, actual, value
    return None


def check_hash(path, sha1=None, sha256=None):
    """True if ``path`` exists and matches every given digest (at least one is required)."""
    expected = _expected_hashes(sha1, sha256)
    if not expected:
        raise ValueError("check_hash needs sha1 or sha256")
    return os.path.isfile(path) and _mismatch(path, expected) is None


def size_cap(expected_size, max_bytes=DEFAULT_MAX_BYTES):
    """The size cap of a download: ``expected_size`` plus 5 % (at least 1 MiB) when the caller
    knows it (a mirror may hold a slightly different build; the checksum decides), never more
    than ``max_bytes`` (None: :data:`DEFAULT_MAX_BYTES`)."""
    cap = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if expected_size is not None:
        cap = min(cap, expected_size + max(expected_size // 20, 1 << 20))
    return cap


def _over_cap(size, cap):
    return _Fatal("more than %d bytes: stopped at the download size cap (the server sent no end; "
                  "raise the cap with max_bytes, --max-size on the command line, if the file "
                  "really is larger); the partial file was removed" % cap) if size > cap else None


def _retry_after(headers, now=None):
    """Seconds asked for by a Retry-After header (delta-seconds or HTTP-date), or None."""
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _content_range(value):
    """(start, total) from 'bytes start-end/total' or 'bytes */total' (None where absent)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _describe(exc):
    """A short human reason for a network exception."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (TimeoutError, OSError)) and "timed out" in str(exc).lower():
        return "timed out"
    name = type(exc).__name__
    text = one_line(exc)
    return "%s: %s" % (name, text) if text else name


# Files that are never HTML: a body starting like a web page is an error page stored in their place.
_BINARY_SUFFIXES = (".zip", ".tgz", ".tar", ".gz", ".bz2", ".xz", ".params", ".pt", ".pth", ".bin",
                    ".npz", ".nd", ".rec", ".idx", ".onnx", ".png", ".jpg", ".jpeg", ".dcm", ".tif",
                    ".tiff")


def _html_body_for_binary(url, block):
    if not urllib.parse.urlsplit(url).path.lower().endswith(_BINARY_SUFFIXES):
        return False
    return block[:512].lstrip().lower().startswith((b"<!doctype html", b"<html"))


def _looks_like_html_page(url, content_type):
    """A text/html answer for a URL that does not name an HTML file is a portal or error page."""
    if not (content_type or "").lower().startswith(("text/html", "application/xhtml")):
        return False
    return not urllib.parse.urlsplit(url).path.lower().endswith((".html", ".htm"))


def _attempt(url, f, state, timeout, user_agent, bar, cap):
    """One HTTP request, appending to the open .part file ``f``; returns the final size.

    Raises _Retry for transient problems (the bytes written so far stay: they are a valid
    prefix) and _Fatal for permanent ones, among them a size past ``cap``.
    """
    offset = f.seek(0, os.SEEK_END)
    headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = "bytes=%d-" % offset
        if state.get("validator"):
            headers["If-Range"] = state["validator"]  # changed file -> 200 -> clean restart
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            _, total = _content_range(err.headers.get("Content-Range"))
            if total == offset:
                return offset  # the .part already holds the whole file
            f.truncate(0)
            raise _Retry("server cannot resume at byte %d; restarting" % offset, wait=0)
        if err.code in (408, 425, 429) or err.code >= 500:
            raise _Retry("HTTP %d %s" % (err.code, one_line(err.reason)), wait=_retry_after(err.headers))
        raise _Fatal("HTTP %d %s" % (err.code, one_line(err.reason)))
    except ValueError as err:  # malformed or unsupported URL
        raise _Fatal(one_line(err))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        if isinstance(err, urllib.error.URLError) and "unknown url type" in str(err.reason):
            raise _Fatal(one_line(err.reason))
        raise _Retry(_describe(err))

    with response:
        if _looks_like_html_page(url, response.headers.get("Content-Type")):
            raise _Fatal("server sent an HTML page (Content-Type %s) instead of the file; "
                         "check the URL, mirror or network login" % response.headers.get("Content-Type"))
        total = None
        if getattr(response, "status", 200) == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                f.truncate(0)
                raise _Retry("server resumed at the wrong offset; restarting", wait=0)
        else:
            if offset:
                log.info("%s: server ignored the Range request; restarting from zero", url)
                f.truncate(0)
                offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None and total > cap:
            raise _Fatal("the server announces %d bytes, more than the %d-byte download size cap "
                         "(raise it with max_bytes, --max-size on the command line, if that is "
                         "right); nothing was downloaded" % (total, cap))
        etag = response.headers.get("ETag")
        strong = etag if etag and not etag.startswith("W/") else None  # If-Range needs a strong one
        state["validator"] = strong or response.headers.get("Last-Modified")
        bar.reset(total=total)
        bar.update(offset)
        while True:
            try:
                block = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as err:
                f.flush()
                raise _Retry("connection lost after %d bytes (%s)" % (f.tell(), _describe(err)))
            if not block:
                break
            if f.tell() == 0 and _html_body_for_binary(url, block):
                raise _Fatal("server sent an HTML page instead of the file (Content-Type %s); "
                             "check the URL or mirror" % response.headers.get("Content-Type"))
            over = _over_cap(f.tell() + len(block), cap)
            if over is not None:
                raise over
            try:
                f.write(block)
            except OSError as err:  # disk full, quota: retrying cannot help
                raise _Fatal("cannot write %s (%s)" % (f.name, one_line(err.strerror or err)))
            bar.update(len(block))
    f.flush()
    size = f.tell()
    if total is not None and size < total:
        raise _Retry("connection closed after %d of %d bytes" % (size, total))
    if total is not None and size > total:
        f.truncate(0)
        raise _Retry("received %d bytes, more than the announced %d; restarting" % (size, total), wait=0)
    return size


@contextmanager
def locked_file(part, holder="another download"):
    """Open ``part`` for appending under an exclusive lock, waiting for any other holder
    (``holder`` says who, in the log line while waiting).

    Holders may rename the file into place or delete it while they hold the lock (that is how
    they release it without leaving lock files behind), so after waiting the lock only counts
    if the locked inode is still the one at ``part``; otherwise we try again with a fresh file.
    """
    while True:
        try:
            f = open(part, "ab")
        except OSError as err:
            reason = one_line(err.strerror or err)
            raise DownloadError(part, "cannot write the download (%s)" % reason) from None
        if fcntl is None:
            break
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (%s)", holder, part)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            if os.stat(part).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield f
    finally:
        f.close()  # closing releases the lock


def download(url, path, sha1=None, sha256=None, retries=5, timeout=30, backoff=0.5, progress=True,
             user_agent=USER_AGENT, *, resume=None, max_wait=MAX_WAIT, max_bytes=None,
             expected_size=None):
    """Download ``url`` to ``path`` atomically, resuming and retrying; return ``path``.

    retries: extra attempts after the first (so ``retries + 1`` requests at most); the wait
    before retry ``k`` (1, 2, ...) is ``backoff * 2**(k-1)`` seconds, or the server's
    Retry-After, and never more than ``max_wait``. timeout: seconds without progress on
    connect or read. resume: reuse a ``.part`` left by an earlier call; the default (None)
    does so only when a checksum will verify the result (without one a stale prefix of another
    version could go unnoticed). Within one call a dropped transfer is always resumed. If
    ``path`` already exists and matches the given checksum, nothing is downloaded.
    max_bytes, expected_size: the size cap, :func:`size_cap` (default 16 GiB); a larger
    announced size fails at once, a body growing past it is stopped and its partial file removed.
    Raises DownloadError(url, reason).
    """
    path = os.fspath(path)
    expected = _expected_hashes(sha1, sha256)
    if expected and os.path.isfile(path) and _mismatch(path, expected) is None:
        return path
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        reason = one_line(err.strerror or err)
        raise DownloadError(folder, "cannot create the folder (%s)" % reason) from None
    part = path + ".part"
    cap = size_cap(expected_size, max_bytes)
    resume = bool(expected) if resume is None else resume
    state = {}
    with locked_file(part) as f, tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024,
                                        desc=os.path.basename(path), disable=not progress,
                                        leave=False) as bar:
        if expected and os.path.isfile(path) and _mismatch(path, expected) is None:
            if f.tell() == 0:
                os.unlink(part)  # a concurrent download finished while we waited
            return path
        if not resume and f.seek(0, os.SEEK_END):
            f.truncate(0)
        reason = None
        for attempt in range(retries + 1):
            if attempt:
                wait = backoff * 2 ** (attempt - 1) if reason.wait is None else reason.wait
                wait = min(max(wait, 0.0), max_wait)
                log.warning("%s: %s; retry %d/%d in %.1fs", url, reason, attempt, retries, wait)
                time.sleep(wait)
            try:
                size = _attempt(url, f, state, timeout, user_agent, bar, cap)
                break
            except _Retry as err:
                reason = err
            except _Fatal as err:
                f.truncate(0)
                os.unlink(part)
                raise DownloadError(url, "%s (saving to %s)" % (err, path)) from None
        else:
            kept = f.seek(0, os.SEEK_END)
            if not kept:
                os.unlink(part)
            where = "; %d bytes kept in %s to resume" % (kept, part) if kept else ""
            raise DownloadError(url, "failed after %d attempts: %s%s" % (retries + 1, reason, where))
        bad = _mismatch(part, expected)  # still holding the lock until the file is in place
        if bad is not None:
            os.unlink(part)
            algorithm, actual, wanted = bad
            raise DownloadError(url, "%s of the %d downloaded bytes is %s, expected %s; deleted it (corrupt "
                                "transfer or wrong file on the server)" % (algorithm, size, actual, wanted))
        os.replace(part, path)
    return path
