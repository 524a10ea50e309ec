"""What mxvision keeps in the user's cache folders, listed and freed (``mxvision cache list|clear``).

Two kinds of entries:

``quantized``
    calibrated INT8 networks, one folder per key in :func:`mxvision.features.quantize.cache_root`
    (``quantized/`` under ``$MXVISION_CACHE`` or the platform's user cache, ``~/.cache/mxvision``
    on Linux). Made by ``extract --dtype int8``; freeing one costs a calibration (~15-45 s) the
    next time the same data is extracted. A temporary folder a killed writer left is listed too.
``weights``
    weights files in the weights cache, :func:`mxvision.models.store.cache_dir`
    (``$MXVISION_CACHE/models``, else ``~/.mxnet/models``, which Gluon's model zoo shares):
    torchxrayvision conversions (a ``.params`` and its ``NAME.xrv.json`` sidecar, which says what
    it was converted from) and downloaded ``.params`` files. Freeing one costs a download (and a
    conversion) the next time it is needed.

:func:`list_entries` describes them (:class:`CacheEntry`); :func:`clear` deletes them.
Nothing else in those folders (lock files, partial downloads, other files) is listed or touched.
"""
import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mxvision.errors import MxvisionError, one_line
from mxvision.features import quantize
from mxvision.models import store
from mxvision.models.xrv.weights import SIDECAR_SUFFIX

KINDS = ("quantized", "weights")
#: The kind each entry is shown as.
LABELS = {"quantized": "quantized network", "converted": "converted weights",
          "downloaded": "downloaded weights", "incomplete": "incomplete quantized network"}


@dataclass(frozen=True)
class CacheEntry:
    """One cache entry: ``kind`` (a key of :data:`LABELS`), ``name`` (the key of a quantized
    network, the name of weights), the ``paths`` it occupies, ``size`` in bytes, ``created``
    (ISO date and time, or None) and ``made_from`` (one line: what it was made from)."""
    kind: str
    name: str
    paths: tuple
    size: int
    created: str
    made_from: str

    @property
    def label(self):
        return LABELS[self.kind]

    @property
    def group(self):
        """``quantized`` or ``weights``: the ``kinds`` of :func:`list_entries` it belongs to."""
        return "weights" if self.kind in ("converted", "downloaded") else "quantized"


def folders():
    """The folder each kind lives in: ``{"quantized": Path, "weights": Path}``."""
    return {"quantized": quantize.cache_root(), "weights": Path(store.cache_dir())}


def check_kinds(kinds):
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise MxvisionError(f"cache kind {', '.join(bad) or '(none)'}", f"expected some of {', '.join(KINDS)}")
    return kinds


def list_entries(kinds=KINDS):
    """Every entry of these ``kinds``: quantized networks (by key, then incomplete ones), then
    converted and downloaded weights (by name)."""
    kinds = check_kinds(kinds)
    found = []
    if "quantized" in kinds:
        found += _quantized_entries(quantize.cache_root())
    if "weights" in kinds:
        found += _weights_entries(Path(store.cache_dir()))
    return found


@dataclass(frozen=True)
class Cleared:
    """What :func:`clear` did: the entries ``removed`` and those it ``failed`` to remove, each
    with the reason; ``freed`` bytes."""
    removed: list
    failed: list

    @property
    def freed(self):
        return sum(e.size for e in self.removed)


def clear(kinds=KINDS, entries=None):
    """Delete the entries of these ``kinds`` (or exactly ``entries``, from :func:`list_entries`).

    An entry that cannot be deleted (permissions) is reported in ``failed`` and the others are
    still deleted. A quantized network deleted while another extraction copies it makes that
    extraction calibrate again, nothing worse."""
    if entries is None:
        entries = list_entries(kinds)
    removed, failed = [], []
    for entry in entries:
        try:
            for path in entry.paths:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.unlink(path)
            removed.append(entry)
        except OSError as err:
            failed.append((entry, f"{err.filename or entry.paths[0]}: {one_line(err.strerror or err, 120)}"))
    return Cleared(removed, failed)


def human_size(n):
    """``n`` bytes as ``812 B``, ``12.3 kB``, ``45.6 MB``, ``1.2 GB`` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- the two kinds
def _children(folder):
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda d: d.name)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise MxvisionError(folder, f"cannot read the cache folder ({one_line(err.strerror or err)})") from None


def _size(path):
    if os.path.isfile(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def _mtime(path):
    try:
        return datetime.datetime.fromtimestamp(os.lstat(path).st_mtime).isoformat(timespec="seconds")
    except OSError:
        return None


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _quantized_entries(root):
    found, incomplete = [], []
    for child in _children(root):
        if not child.is_dir(follow_symlinks=False):
            continue  # lock files
        path = child.path
        if child.name.startswith("."):
            if child.name.endswith(".tmp"):  # .KEY.RANDOM.tmp: a writer killed before its rename
                key = child.name[1:].split(".")[0]
                incomplete.append(CacheEntry("incomplete", key, (path,), _size(path), _mtime(path),
                                             "left by an interrupted writer (never used)"))
            continue
        infos = [Path(path) / quantize.file_names(d)[2] for d in quantize.DTYPES]
        info = next((_read_json(f) for f in infos if f.is_file()), None)
        made_from = _made_from(info) if isinstance(info, dict) else "no readable record (converted again when needed)"
        created = info.get("converted") if isinstance(info, dict) and isinstance(info.get("converted"), str) \
            else _mtime(path)
        found.append(CacheEntry("quantized", child.name, (path,), _size(path), created, made_from))
    return found + incomplete


def _made_from(info):
    calib = info.get("calibration") if isinstance(info.get("calibration"), dict) else {}
    preset = info.get("preprocessing")
    preset = preset.get("name") if isinstance(preset, dict) else None
    weights = str(info.get("weights_sha1") or "?")[:8]
    mode = str(calib.get("chosen") or calib.get("mode", "?"))
    if calib.get("checked_on"):
        mode += f", chosen by agreement with float32 on {calib['checked_on']} other images"
    unfused = calib.get("relu_unfused")
    unfused = f", {unfused} ReLUs unfused for AVX-512 VNNI without AMX" if isinstance(unfused, int) and unfused else ""
    return (f"{info.get('backbone', '?')} cut {info.get('cut', '?')} (weights sha1 {weights}), "
            f"preset {preset or '?'}, {info.get('dtype', '?')} calibrated ({mode}) on "
            f"{calib.get('calibrated_on', calib.get('n_images', '?'))} images{unfused}, "
            f"MXNet {info.get('mxnet_version', '?')}")


def _weights_entries(folder):
    children = _children(folder)
    found, claimed = [], set()
    for child in children:
        if not child.name.endswith(SIDECAR_SUFFIX) or not child.is_file(follow_symlinks=False):
            continue
        name = child.name[:-len(SIDECAR_SUFFIX)]
        meta = _read_json(child.path)
        params_name = meta.get("params", {}).get("file") if isinstance(meta, dict) and \
            isinstance(meta.get("params"), dict) else None
        paths = [child.path]
        if isinstance(params_name, str) and os.path.basename(params_name) == params_name and \
                os.path.isfile(os.path.join(folder, params_name)):
            paths.insert(0, os.path.join(folder, params_name))
            claimed.add(params_name)
        if isinstance(meta, dict):
            src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
            made_from = (f"torchxrayvision {src.get('file', '?')} ({meta.get('arch', '?')}, "
                         f"{meta.get('resolution', '?')} px), converted by {meta.get('converted_by', 'mxvision')}")
            if len(paths) == 1:
                made_from += "; its .params file is missing"
            created = meta.get("converted_at") if isinstance(meta.get("converted_at"), str) else _mtime(child.path)
        else:
            made_from, created = "unreadable sidecar (converted again when needed)", _mtime(child.path)
        found.append(CacheEntry("converted", name, tuple(paths), sum(_size(p) for p in paths), created,
                                made_from))
    for child in children:
        if child.name.endswith(".params") and child.name not in claimed and child.is_file(follow_symlinks=False):
            stem = child.name[:-len(".params")]
            name, _, short = stem.rpartition("-")
            pinned = store.pinned_sha1(name) if name else None
            made_from = (f"downloaded, sha1 {short} pinned by the weights store" if pinned and pinned.startswith(short)
                         else "a .params file (not named by the weights store)")
            found.append(CacheEntry("downloaded", name or stem, (child.path,), _size(child.path),
                                    _mtime(child.path), made_from))
    return found
