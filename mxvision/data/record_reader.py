"""Reading mxvision's RecordIO packs: record paths, the record format and a thread-safe source.

A pack (written by :func:`mxvision.data.recordio.pack_index`) is ``NAME.rec`` + ``NAME.idx``
(``mx.recordio.MXIndexedRecordIO``, record key = row number), ``NAME.json`` (the manifest,
written last) and ``NAME.csv`` (an index whose paths are ``NAME.rec#<key>``).

:func:`load_image` is a drop-in for :func:`mxvision.data.transforms.load_image`: a path
``FILE.rec#KEY`` is read from the pack, any other path from the file. Every record is checked
before MXNet or a decoder sees it: its RecordIO header must declare one record of at most
:func:`record_limit` bytes, and a PNG/JPEG payload must declare the pack's own grey image size.
"""
import atexit
import json
import os
import re
import struct
import threading

import cv2
import numpy as np

from mxvision.data import transforms
from mxvision.errors import BadImage, BadRun
from mxvision.io.headers import JPEG_MAGIC, PNG_MAGIC, jpeg_header, png_header, png_image_chunks
from mxvision.io.quiet_decode import imdecode

FORMAT = "mxvision-recordio"
VERSION = 1
ENCODINGS = ("png", "raw", "jpg")
_RECORD_PATH = re.compile(r"^(?P<rec>.+\.rec)#(?P<key>\d+)$")
_REC_MAGIC = 0xCED7230A  # dmlc RecordIO: every record starts with it, then cflag:3 | length:29
_MAX_LABELS = 1024  # label values per record (a pathology vector has 18)


def _mx():
    import mxnet as mx  # imported lazily: reading files never needs MXNet
    return mx


def record_path(rec_path, key):
    """The index path of record ``key`` in ``rec_path``: ``'/data/jsrt224.rec#12'``."""
    return f"{os.fspath(rec_path)}#{int(key)}"


def split_record_path(path):
    """``(rec_path, key)`` for a ``FILE.rec#KEY`` path, else None."""
    match = _RECORD_PATH.match(os.fspath(path))
    return (match.group("rec"), int(match.group("key"))) if match else None


def pack_paths(rec_path):
    """The four files of a pack: ``(rec, idx, manifest json, index csv)``."""
    rec_path = os.path.abspath(os.fspath(rec_path))
    if not rec_path.endswith(".rec"):
        raise BadRun(rec_path, "a RecordIO pack must be named NAME.rec")
    stem = rec_path[:-4]
    return rec_path, stem + ".idx", stem + ".json", stem + ".csv"


def decode_record(payload, encoding, size, where):
    """A record's image; a PNG/JPEG header must declare the pack's grey ``size`` px image first
    (a forged record could declare a decompression bomb)."""
    if encoding == "raw":
        if len(payload) != size * size:
            raise BadImage(where, f"record holds {len(payload)} bytes, expected {size * size}")
        return np.frombuffer(payload, dtype=np.uint8).reshape(size, size)
    if not bytes(payload[:3]) == (PNG_MAGIC if encoding == "png" else JPEG_MAGIC)[:3]:
        raise BadImage(where, f"corrupt {encoding} record (not {encoding} data)")
    info = (png_header if encoding == "png" else jpeg_header)(where, payload)
    if (info.width, info.height, info.samples, info.bit_depth) != (size, size, 1, 8):
        raise BadImage(where, f"record declares a {info.width}x{info.height} image of {info.samples} "
                              f"x {info.bit_depth}-bit samples; the pack holds {size}x{size} grey "
                              f"8-bit images (refused before decoding)")
    if encoding == "png":
        payload = png_image_chunks(where, payload)
    img, _ = imdecode(payload, cv2.IMREAD_GRAYSCALE)
    if img is None or img.shape != (size, size):
        raise BadImage(where, f"corrupt {encoding} record")
    return img


def record_limit(size, encoding):
    """Most bytes a record of a ``size`` px pack holds: MXNet's 24-byte header, the labels and
    the image (a PNG/JPEG of noise can be a little larger than its raw pixels)."""
    image = size * size if encoding == "raw" else 2 * size * size + 65536
    return 24 + 4 * _MAX_LABELS + image


def check_record_header(fd, offset, limit, where):
    """Refuse the record at ``offset`` of the ``.rec`` file ``fd`` unless its 8-byte header holds
    one whole record of at most ``limit`` bytes: MXNet's reader allocates the 29-bit length it
    reads, and follows continuation flags to the end of the file."""
    head = os.pread(fd, 8, offset)
    if len(head) < 8:
        raise BadImage(where, "truncated record (its index points past the end of the pack)")
    magic, word = struct.unpack("<II", head)
    if magic != _REC_MAGIC:
        raise BadImage(where, "corrupt record (no RecordIO header where the index points)")
    flag, length = word >> 29, word & ((1 << 29) - 1)
    if flag != 0 or length > limit:
        raise BadImage(where, f"record header declares {length} bytes (continuation flag {flag}); "
                              f"a record of this pack holds at most {limit} in one piece "
                              f"(refused before reading)")


# ----------------------------------------------------------------------------------- reading
class RecordSource:
    """Random access to a finished pack; safe to share between threads (one reader each)."""

    def __init__(self, rec_path):
        self.rec, self.idx, self.manifest_path, self.csv = pack_paths(rec_path)
        if not os.path.isfile(self.manifest_path):
            what = "unfinished pack (no manifest); rerun `mxvision data pack`" if os.path.isfile(
                self.rec) or os.path.isfile(self.rec + ".part") else "no such RecordIO pack"
            raise BadImage(self.rec, what)
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                self.manifest = json.load(f)
            config = self.manifest["config"]
        except (OSError, ValueError, KeyError) as err:
            raise BadImage(self.manifest_path, f"unreadable pack manifest ({err})") from None
        if config.get("format") != FORMAT or config.get("version") != VERSION:
            raise BadImage(self.manifest_path, "not an mxvision RecordIO pack of a known version")
        for f in (self.rec, self.idx):
            if not os.path.isfile(f):
                raise BadImage(f, "missing file of the RecordIO pack")
        self.size = int(config["size"])
        self.encoding = config["encoding"]
        self._limit = record_limit(self.size, self.encoding)
        self._fd = None  # the .rec file, for reading record headers (os.pread: thread-safe)
        self.keys = [it["key"] for it in self.manifest["items"]]
        self._valid = set(self.keys)
        self._local = threading.local()
        self._readers = []
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.keys)

    def _reader(self):
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = _mx().recordio.MXIndexedRecordIO(self.idx, self.rec, "r")
            self._local.reader = reader
            with self._lock:
                self._readers.append(reader)
        return reader

    def read(self, key):
        """``(header, (size, size) uint8 image)`` of record ``key``."""
        where = record_path(self.rec, key)
        if key not in self._valid:
            raise BadImage(where, f"no such record in the pack (it has {len(self)})")
        try:
            reader = self._reader()
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.rec, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            check_record_header(self._fd, reader.idx[key], self._limit, where)
            payload = reader.read_idx(key)
            header, data = _mx().recordio.unpack(payload)
        except BadImage:
            raise
        except Exception as err:  # noqa: BLE001 - MXNetError, KeyError, struct.error
            raise BadImage(where, f"unreadable record ({' '.join(str(err).split())[:200]})") \
                from None
        return header, decode_record(data, self.encoding, self.size, where)

    def image(self, key):
        """Record ``key`` as the [0, 1] float32 square image (what center_crop_resize gave)."""
        return self.read(key)[1].astype(np.float32) / np.float32(255.0)

    def load(self, key, preset="imagenet224"):
        """``(C, S, S)`` float32 like :func:`mxvision.data.transforms.load_image`."""
        preset = transforms.get_preset(preset)
        if preset.size != self.size:
            raise BadImage(record_path(self.rec, key),
                           f"packed at {self.size} px, preset {preset.name} needs {preset.size}; "
                           f"pack again with --preset {preset.name}")
        return transforms.normalize(self.image(key), preset)

    def close(self):
        with self._lock:
            for r in self._readers:
                r.close()
            self._readers = []
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._local = threading.local()


_SOURCES = {}
_SOURCES_LOCK = threading.Lock()


def open_source(rec_path):
    """A shared :class:`RecordSource` per pack (reopened if its manifest changed)."""
    rec = os.path.abspath(os.fspath(rec_path))
    manifest = rec[:-4] + ".json"
    stamp = os.stat(manifest).st_mtime_ns if os.path.isfile(manifest) else None
    with _SOURCES_LOCK:
        cached = _SOURCES.get(rec)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        source = RecordSource(rec)
        if cached is not None:
            cached[1].close()
        _SOURCES[rec] = (stamp, source)
        return source


@atexit.register
def close_sources():
    """Close every shared source: MXNet's readers, left to ``__del__`` at interpreter exit, print
    "Exception ignored" tracebacks once the modules they need are torn down."""
    with _SOURCES_LOCK:
        for _, source in _SOURCES.values():
            source.close()
        _SOURCES.clear()


def load_image(path, preset="imagenet224"):
    """:func:`mxvision.data.transforms.load_image` that also reads ``FILE.rec#KEY`` records."""
    parts = split_record_path(path)
    if parts is None:
        return transforms.load_image(path, preset)
    return open_source(parts[0]).load(parts[1], preset)


__all__ = ["RecordSource", "open_source", "load_image", "record_path", "split_record_path",
           "pack_paths", "decode_record", "close_sources", "record_limit", "check_record_header", "ENCODINGS",
           "FORMAT", "VERSION"]
