"""The pretrained-weights store: named, sha1-pinned ``.params`` files fetched from a Gluon-style repo.

It follows ``mxnet.gluon.model_zoo.model_store`` so the two share one cache and one mirror
layout: a weight file is ``{name}-{sha1[:8]}.params`` in ``$MXNET_HOME/models``, fetched as
``{MXNET_GLUON_REPO}gluon/models/{name}-{sha1[:8]}.zip``, and its full sha1 is pinned in a table
that starts as MXNet's own (so ``resnet50_v2`` etc. keep working against the real Apache repo or
any mirror of it). What it adds over Gluon's ``get_model_file``: downloads resume and retry
(:func:`mxvision.io.download.download`), the zip is extracted safely, a corrupt cache entry or a
wrong file on the mirror never ends up installed, concurrent first uses fetch once, and every
failure is a one-line :class:`~mxvision.errors.WeightsError` saying what was tried and how to fix
it -- on machines without internet the fix is usually a mirror or a local file, so the message
says so.

``register_weights`` lets mxvision's own model families (and tests) add entries: GluonCV's
networks are pinned to GluonCV's own sha1 table (same repo layout and file names, see
:mod:`mxvision.models.gluoncv_zoo`), torchxrayvision conversions to the sha1 of the converted file.
"""
import logging
import os
import re
import shutil
import struct
import tempfile

import numpy as np
from mxnet.gluon.model_zoo import model_store as _gluon_store

from mxvision.errors import DownloadError, WeightsError, one_line
from mxvision.io.download import download, locked_file, safe_extract_zip
from mxvision.io.torchfile.files import open_weights_file
from mxvision.utils import file_digest

__all__ = ["register_weights", "pinned_sha1", "known_weights", "PINNED_SHA1", "PINNED_URLS",
           "short_hash", "weights_file_name", "weights_url", "cache_dir", "cached_weights_file",
           "get_weights_file", "resolve_weights", "APACHE_REPO_URL", "check_params_file",
           "check_weight_values", "mxnet_error_line"]

log = logging.getLogger(__name__)

APACHE_REPO_URL = _gluon_store.apache_repo_url
# name -> full sha1 (copied: never mutate MXNet's table); register_weights adds entries.
PINNED_SHA1 = dict(_gluon_store._model_sha1)
PINNED_URLS = {}  # name -> explicit zip URL overriding the repo layout
_FIX = "set MXNET_GLUON_REPO to a reachable mirror, or pass a local .params file instead of 'imagenet'"


def register_weights(name, sha1, url=None):
    """Pin ``name`` to the weights with this full ``sha1`` (optionally at an explicit zip ``url``).

    Re-registering a name replaces its entry (tests and new releases need that); the file name,
    and so the cache entry, changes with the hash, so old and new weights never get mixed up.
    Returns the weight file name.
    """
    sha1 = str(sha1).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{40}", sha1):
        raise ValueError("sha1 for %r must be 40 hex digits, got %r" % (name, sha1))
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError("invalid weights name %r" % (name,))
    PINNED_SHA1[name] = sha1
    if url is None:
        PINNED_URLS.pop(name, None)
    else:
        PINNED_URLS[name] = url
    return weights_file_name(name)


def pinned_sha1(name):
    """The full sha1 pinned for ``name``, or None when the store knows no weights by that name."""
    return PINNED_SHA1.get(name)


def known_weights():
    """Sorted names of all weights the store knows how to fetch."""
    return sorted(PINNED_SHA1)


def _sha1(name):
    try:
        return PINNED_SHA1[name]
    except KeyError:
        known = _abbrev(known_weights())
        raise WeightsError(name, "no pretrained weights are registered under this name (known: %s); "
                           "pass a local .params file or register_weights() it" % known) from None


def _abbrev(names, limit=8):
    shown = ", ".join(names[:limit])
    return shown + (", ... %d more" % (len(names) - limit) if len(names) > limit else "")


def short_hash(name):
    """First 8 hex digits of the pinned sha1 (the part that goes into file names)."""
    return _sha1(name)[:8]


def weights_file_name(name):
    return "%s-%s.params" % (name, short_hash(name))


def _repo_url():
    repo = os.environ.get("MXNET_GLUON_REPO") or APACHE_REPO_URL
    return repo if repo.endswith("/") else repo + "/"


def weights_url(name):
    """Where the zip holding ``name``'s weights is fetched from."""
    if name in PINNED_URLS:
        return PINNED_URLS[name]
    return "%sgluon/models/%s-%s.zip" % (_repo_url(), name, short_hash(name))


def cache_dir(root=None):
    """The weights cache: ``root``, else ``$MXVISION_CACHE/models``, else ``$MXNET_HOME/models``
    (default ``~/.mxnet/models``, the folder Gluon's model zoo uses, so the two share files)."""
    if root is None:
        base = os.environ.get("MXVISION_CACHE") or os.environ.get("MXNET_HOME") or os.path.join("~", ".mxnet")
        root = os.path.join(base, "models")
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def cached_weights_file(name, root=None):
    """The verified cached file for ``name`` if it is already present, else None (never downloads)."""
    if name not in PINNED_SHA1:
        return None
    file_path = os.path.join(cache_dir(root), weights_file_name(name))
    return file_path if os.path.isfile(file_path) and file_digest(file_path, "sha1") == PINNED_SHA1[name] else None


def _find_params(folder, wanted):
    """The extracted file named ``wanted``, else the only .params file in the zip, else None."""
    found = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f == wanted:
                return os.path.join(dirpath, f)
            if f.endswith(".params"):
                found.append(os.path.join(dirpath, f))
    return found[0] if len(found) == 1 else None


def _looks_like_html(path):
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<?xml"))


def get_weights_file(name, root=None, *, retries=5, timeout=30, backoff=0.5, progress=True):
    """Path to the verified weight file for ``name``, downloading it into the cache if needed.

    A cached file is trusted only if its sha1 matches the pinned one; otherwise it is fetched
    again. Raises WeightsError(name, ...) naming the URL and cache path on any failure.
    """
    sha1 = _sha1(name)
    root = cache_dir(root)
    file_path = os.path.join(root, weights_file_name(name))
    if os.path.isfile(file_path) and file_digest(file_path, "sha1") == sha1:
        return file_path
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        raise WeightsError(name, "cannot create the cache folder %s (%s); pass root= or set MXVISION_CACHE"
                           % (root, err.strerror or err)) from None
    # One process fetches and installs; others wait here and then find the verified file.
    lock = os.path.join(root, "." + weights_file_name(name) + ".lock")
    try:
        with locked_file(lock):
            try:
                return _fetch(name, sha1, file_path, retries, timeout, backoff, progress)
            finally:
                os.unlink(lock)  # while still holding it: see locked_file
    except DownloadError as err:  # the lock file itself could not be created
        raise WeightsError(name, "%s; pass root= or set MXVISION_CACHE" % err) from None


def _fetch(name, sha1, file_path, retries, timeout, backoff, progress):
    """Download, verify and install ``file_path`` (called with the cache entry's lock held)."""
    if os.path.isfile(file_path):
        if file_digest(file_path, "sha1") == sha1:
            return file_path  # installed by another process while we waited
        log.warning("%s: cached file %s is corrupt (sha1 mismatch); downloading it again", name, file_path)
    root, file_name = os.path.split(file_path)
    url = weights_url(name)
    zip_path = os.path.join(root, file_name[:-len(".params")] + ".zip")
    try:
        # No checksum for the zip itself (Gluon pins only the .params), so resuming a .part left
        # by an earlier run is verified by the sha1 check of the extracted file below.
        download(url, zip_path, retries=retries, timeout=timeout, backoff=backoff,
                 progress=progress, resume=True)
    except DownloadError as err:
        problem = "could not download %s into %s (%s); %s" % (url, root, err.problem, _FIX)
        raise WeightsError(name, problem) from None
    try:
        return _install_from_zip(name, url, zip_path, file_path, sha1)
    finally:
        for leftover in (zip_path, zip_path + ".part"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _install_from_zip(name, url, zip_path, file_path, sha1):
    """Extract the .params from the zip, verify its sha1, and move it into place atomically."""
    root = os.path.dirname(file_path)
    tmp_dir = tempfile.mkdtemp(dir=root, prefix=".extract-")
    try:
        try:
            safe_extract_zip(zip_path, tmp_dir)
        except DownloadError as err:
            what = "an HTML page, not a zip" if _looks_like_html(zip_path) else err.problem
            raise WeightsError(name, "%s gave %s; %s" % (url, what, _FIX)) from None
        extracted = _find_params(tmp_dir, os.path.basename(file_path))
        if extracted is None:
            raise WeightsError(name, "%s holds no %s; %s" % (url, os.path.basename(file_path), _FIX))
        actual = file_digest(extracted, "sha1")
        if actual != sha1:
            raise WeightsError(name, "weights from %s have sha1 %s, expected %s; nothing was installed in %s "
                               "(corrupt or outdated mirror: %s)" % (url, actual, sha1, root, _FIX))
        os.replace(extracted, file_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("%s: installed %s", name, file_path)
    return file_path


def resolve_weights(spec, name, root=None):
    """Turn a user's weights choice into a file path, or None for random initialisation.

    spec: ``"imagenet"`` (the pinned pretrained weights for ``name``, downloaded if needed),
    ``"none"``/``"random"``/None (random init), or a path to a local ``.params`` file. A local file is
    verified when its name carries a hash -- ``{name}-{8 hex}.params``, the hex must prefix its
    sha1, and the store's own file name must match the pinned sha1 in full -- and refused on
    mismatch; any other file (e.g. fine-tuned weights) is accepted with a warning saying so.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "random", "")):
        return None
    if isinstance(spec, str) and spec.strip().lower() == "imagenet":
        return get_weights_file(name, root)
    path = os.path.abspath(os.path.expanduser(os.fspath(spec)))
    if not os.path.isfile(path):
        raise WeightsError(path, "no such weights file; pass 'imagenet', 'none' or an existing .params file")
    actual = file_digest(path, "sha1")
    match = re.fullmatch(re.escape(name) + r"-([0-9a-fA-F]{8})\.params", os.path.basename(path))
    if match and not actual.startswith(match.group(1).lower()):
        raise WeightsError(path, "sha1 is %s but the file name promises %s...; the file is corrupt or "
                           "misnamed (download it again)" % (actual, match.group(1).lower()))
    pinned = PINNED_SHA1.get(name)
    # The full pinned sha1 applies to the store's own file name only: a user's fine-tuned weights
    # for the same architecture are legitimate and just cannot be verified.
    if pinned is not None and os.path.basename(path) == weights_file_name(name) and actual != pinned:
        raise WeightsError(path, "sha1 is %s, not the %s weights' %s; use the right file, or 'none' "
                           "to start from random weights" % (actual, name, pinned))
    if match:
        log.info("%s: verified local weights %s (sha1 %s)", name, path, actual)
    else:
        log.warning("%s: using local weights %s (sha1 %s) without verification: its name carries "
                    "no hash", name, path, actual)
    return path


# --------------------------------------------------------------------------- checking .params files
# MXNet's NDArray file (src/ndarray/ndarray.cc, 1.x): uint64 0x112, uint64 reserved, uint64 count,
# count arrays, uint64 count of names, each name as uint64 length + bytes. One dense array: uint32
# magic (V2 0xF993FAC9, V3 0xF993FACA; V1 0xF993FAC8 and magic-less files are older), int32 storage
# type, shape (int32 ndim + int64 dims; magic-less: the magic is ndim, dims are uint32), context
# (two int32), int32 dtype code, then the raw data.
PARAMS_MAGIC = 0x112
MAX_PARAMS_BYTES = 4 << 30  # a .params file when the caller does not know the network's size
_ND_V1, _ND_V2, _ND_V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_MX_ITEMSIZE = {0: 4, 1: 8, 2: 2, 3: 1, 4: 4, 5: 1, 6: 8, 7: 1, 8: 2, 9: 2, 10: 4, 11: 8, 12: 2}
_MAX_NDIM = 32
_MAX_NAME = 4096


class _ParamsCursor:
    """Reads the header fields of a .params file, never more than what is left of it."""

    def __init__(self, f, size, source):
        self.f, self.left, self.source = f, size, source

    def take(self, fmt):
        n = struct.calcsize(fmt)
        if n > self.left:
            raise WeightsError(self.source, "not a complete MXNet params file (it ends inside a header; "
                               "truncated?)")
        self.left -= n
        return struct.unpack(fmt, self.f.read(n))

    def skip(self, n, what):
        if n > self.left:
            raise WeightsError(self.source, "%s needs %d bytes but only %d are left in the file "
                               "(truncated or corrupt)" % (what, n, self.left))
        self.left -= n
        self.f.seek(n, os.SEEK_CUR)


def _check_array(cur, index):
    what = "array %d" % index
    magic, = cur.take("<I")
    if magic in (_ND_V2, _ND_V3):
        stype, = cur.take("<i")
        if stype != 0:
            raise WeightsError(cur.source, "%s is sparse (storage type %d); weights files hold dense "
                               "arrays" % (what, stype))
    if magic in (_ND_V1, _ND_V2, _ND_V3):
        ndim, = cur.take("<i")
    else:
        ndim = magic  # the oldest layout: no magic, ndim and uint32 dims
    if ndim == -1 and magic == _ND_V3 or ndim == 0 and magic != _ND_V3:
        return  # an empty (none) array: nothing follows
    if not 0 <= ndim <= _MAX_NDIM:
        raise WeightsError(cur.source, "%s has %d dimensions (corrupt file)" % (what, ndim))
    dims = cur.take("<%d%s" % (ndim, "q" if magic in (_ND_V1, _ND_V2, _ND_V3) else "I"))
    if any(d < 0 for d in dims):
        raise WeightsError(cur.source, "%s has shape %s (corrupt file)" % (what, dims))
    _dev_type, _dev_id, dtype = cur.take("<iii")
    if dtype not in _MX_ITEMSIZE:
        raise WeightsError(cur.source, "%s has unknown dtype code %d (corrupt file)" % (what, dtype))
    numel = 1
    for d in dims:
        numel *= d
    cur.skip(numel * _MX_ITEMSIZE[dtype], "%s of shape %s" % (what, dims))


def check_params_file(path, max_bytes=None, what="params file"):
    """Check that ``path`` is an MXNet ``.params`` file whose every header is consistent, before
    MXNet reads it: a regular file of at most ``max_bytes`` (default :data:`MAX_PARAMS_BYTES`),
    dense arrays of known dtypes whose shapes are non-negative and whose data is in the file.

    ``mx.nd.load`` trusts the headers: a shape of 2**60 elements is allocated before the data is
    read, an ndim of 2**30 reserves gigabytes, and its errors carry MXNet's C++ traceback. Here
    every field is read with :mod:`struct` and data is skipped with ``seek``, so nothing larger
    than a header is ever read. Returns the number of arrays; raises a one-line WeightsError
    (``what``: how it names the file the caller expected, e.g. "feature shard").
    """
    source = os.fspath(path)
    with open_weights_file(source, MAX_PARAMS_BYTES if max_bytes is None else max_bytes, what) as f:
        cur = _ParamsCursor(f, os.fstat(f.fileno()).st_size, source)
        if cur.left < 24 or cur.take("<Q")[0] != PARAMS_MAGIC:
            raise WeightsError(source, "not an MXNet params file (no 0x112 magic number)")
        _reserved, count = cur.take("<QQ")
        if count > cur.left // 12:
            raise WeightsError(source, "claims %d arrays, more than the file can hold (corrupt file)" % count)
        for index in range(count):
            _check_array(cur, index)
        names, = cur.take("<Q")
        if names not in (0, count):
            raise WeightsError(source, "holds %d arrays but %d names (corrupt file)" % (count, names))
        for index in range(names):
            length, = cur.take("<Q")
            if length > _MAX_NAME:
                raise WeightsError(source, "name %d is %d bytes long (corrupt file)" % (index, length))
            cur.skip(length, "name %d" % index)
    return count


def check_weight_values(named_arrays, source):
    """Refuse weights no training produces, naming the file and the parameter: NaN or infinite
    values anywhere, a negative BatchNorm running variance (its square root makes every score
    NaN; MXNet's symbolic API calls it ``moving_var``). ``named_arrays``: name -> NumPy array or NDArray."""
    for name, value in named_arrays.items():
        array = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise WeightsError(source, "parameter %s is not finite (it holds NaN or infinity); "
                               "the weights are corrupt" % name)
        if str(name).endswith(("running_var", "moving_var")) and array.size and array.min() < 0:
            raise WeightsError(source, "parameter %s, a BatchNorm running variance, is negative (%g); "
                               "the weights are corrupt" % (name, array.min()))


def mxnet_error_line(err):
    """What an MXNetError says went wrong, on one line, without MXNet's C++ traceback (the
    ``Traceback``/``File ...``/``[bt]`` lines and the ``[12:00:00] file.cc:42:`` prefix)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = [line[len("MXNetError:"):].strip() for line in lines if line.startswith("MXNetError:")]
    said += [line for line in lines
             if not line.startswith(("Traceback", "File ", "[bt]", "Stack trace", "MXNetError:"))]
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", said[0]) if said else "unreadable"
    return one_line(text.replace(": :", "::"), 200)
