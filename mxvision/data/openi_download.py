"""The OpenI bulk archives: where they are, their checksums, downloading and extracting them.

OpenI publishes the Indiana collection as two archives under ``imgs/collections/`` of its site:
``NLMCXR_reports.tgz`` (1 MB, one XML per report) and ``NLMCXR_png.tgz`` (1.3 GB, the images).
:func:`download_openi_archive` fetches one with :func:`mxvision.io.download.download` (resumed
after a drop, retried with backoff, checked against the known sha256 when there is one) and
:func:`extract_once` unpacks it with :func:`mxvision.io.archive.safe_extract_tar`, skipping an
archive already extracted into the same folder, so a rerun after an interruption costs nothing.
Its stamp file lives in the extracted folder, which the archive itself filled: it is read only if
it is a regular file (never through a link, never a FIFO) and replaced atomically, so a member
planted under its name cannot redirect the write.
:func:`mxvision.data.openi.openi_index` reads either the archive or the extracted folder. The
other route to the same reports, the search API page by page, is :mod:`mxvision.data.openi_scrape`.
"""
import os
import stat
import urllib.parse

from mxvision.data.openi import IMAGES_ARCHIVE, REPORTS_ARCHIVE
from mxvision.errors import DownloadError, one_line
from mxvision.io.archive import safe_extract_tar
from mxvision.io.download import download
from mxvision.utils import atomic_path, file_digest

OPENI_BASE_URL = "https://openi.nlm.nih.gov/"
OPENI_COLLECTIONS = "imgs/collections/"
#: The OpenI archives by key, with their sha256 where known (the reports archive: checked against
#: the copy the project keeps in shared/data/openi, identical to the one torchxrayvision ships).
OPENI_FILES = {
    "reports": (REPORTS_ARCHIVE,
                "8fb6de7eec73d8c3665067ad4bb003ccd57f971ae316d2642e1627ac7268667a"),
    "images": (IMAGES_ARCHIVE, None),
}
#: Sizes in bytes where known (the shared copy of the reports archive): the download is capped a
#: little above it while the known checksum is the one verified.
OPENI_SIZES = {"reports": 1_112_632}
#: Values of a ``--sha256`` option (any case) that mean "do not verify".
SKIP_CHECKSUM = ("skip", "none", "")
#: The file :func:`extract_once` leaves in a folder it extracted into (name, size, mtime).
EXTRACTED_MARK = ".mxvision-extracted"


def expected_sha256(option, known=None):
    """The sha256 to verify a download against, from a ``--sha256`` option's value: ``known``
    when the option was not given (None), none for ``skip``/``none``/empty, else the value."""
    if option is None:
        return known
    return None if option.lower() in SKIP_CHECKSUM else option


def openi_archive_keys(what):
    """The archive keys of ``--what``: ``reports``, ``images`` or ``all`` (both, reports first)."""
    keys = list(OPENI_FILES) if what == "all" else [what]
    unknown = [k for k in keys if k not in OPENI_FILES]
    if unknown:
        raise ValueError(f"unknown OpenI archive {what!r}; one of {', '.join(OPENI_FILES)} or all")
    return keys


def openi_archive_url(key, base_url=OPENI_BASE_URL):
    """The address of archive ``key`` on a site laid out like OpenI's (a mirror, a test server)."""
    base = base_url if base_url.endswith("/") else base_url + "/"
    return urllib.parse.urljoin(base, OPENI_COLLECTIONS + OPENI_FILES[key][0])


def download_openi_archive(key, out_dir, base_url=OPENI_BASE_URL, sha256=None, retries=5,
                           timeout=30, backoff=1.0, progress=True):
    """Download OpenI archive ``key`` ("reports" or "images") into ``out_dir``, resuming a
    ``.part`` a previous call left. ``sha256``: as a ``--sha256`` option (None: the known
    checksum, if any; "skip": none). Returns ``{"key", "path", "bytes", "sha256", "verified",
    "extract_dir"}``: ``sha256`` is the one verified, else the file's own; ``extract_dir`` is
    where :func:`extract_once` would put it (the archive name without ``.tgz``).
    Raises DownloadError."""
    name, known = OPENI_FILES[key]
    expected = expected_sha256(sha256, known)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    download(openi_archive_url(key, base_url), path, sha256=expected, retries=retries,
             timeout=timeout, backoff=backoff, progress=progress, resume=True,
             expected_size=OPENI_SIZES.get(key) if expected == known else None)
    return {"key": key, "path": path, "bytes": os.path.getsize(path),
            "sha256": expected or file_digest(path, "sha256"), "verified": expected is not None,
            "extract_dir": os.path.join(out_dir, name[:-len(".tgz")])}


def extract_once(archive, dest, progress=False):
    """Safely extract the tar ``archive`` into ``dest`` unless the same archive (name, size,
    mtime) already was; return the number of files written, or None when there was nothing to
    do. With ``progress`` it says on stdout what it extracts, which can take minutes."""
    st = os.stat(archive)
    stamp = f"{os.path.basename(archive)} {st.st_size} {int(st.st_mtime)}\n".encode("utf-8")
    mark = os.path.join(dest, EXTRACTED_MARK)
    if _read_stamp(mark, len(stamp)) == stamp:
        return None
    if progress:
        print(f"extracting {archive} into {dest} ...")
    written = safe_extract_tar(archive, dest)
    try:
        with atomic_path(mark) as tmp:  # replaces whatever is there, never writes through it
            with open(tmp, "wb") as f:
                f.write(stamp)
    except OSError as err:
        raise DownloadError(mark, f"cannot write the extraction stamp "
                                  f"({one_line(err.strerror or err)})") from None
    return len(written)


def _read_stamp(mark, size):
    """The first ``size + 1`` bytes of ``mark`` if it is a regular file, else None."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(mark, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(size + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else None


__all__ = ["OPENI_BASE_URL", "OPENI_COLLECTIONS", "OPENI_FILES", "OPENI_SIZES", "SKIP_CHECKSUM",
           "EXTRACTED_MARK", "expected_sha256", "openi_archive_keys", "openi_archive_url",
           "download_openi_archive", "extract_once"]
