"""Preprocessed images packed into MXNet RecordIO, and a loader that reads them back.

Decoding a 2048x2048 PNG and resizing it takes far longer than the network needs for a 224 px
input, and every extraction run repeats it. :func:`pack_index` does the image work once: each
image of an index is read (:func:`~mxvision.io.images.read_image`), centre-cropped and resized to
the preset's size (:func:`~mxvision.data.transforms.center_crop_resize`), quantised to uint8 and
written with its label into ``NAME.rec`` + ``NAME.idx`` (``mx.recordio.MXIndexedRecordIO``,
record key = row number). Beside them:

* ``NAME.json`` -- the manifest: size, encoding, classes, and per record the source path, id,
  label, patient, split and view; written last, so a pack without it is unfinished;
* ``NAME.csv`` -- an index CSV whose paths are ``NAME.rec#<key>`` and which keeps every column
  of the source index (plus ``source_path``), so the pipeline can read the pack like any index.

:func:`load_image` is a drop-in for :func:`mxvision.data.transforms.load_image`: a path
``FILE.rec#KEY`` is read from the pack, any other path from the file. The result has the same
shape and normalisation; it differs from the file route only by the uint8 quantisation of the
[0, 1] image (at most 0.5/255 before normalisation, <= 0.0088 after ImageNet normalisation).
A pack serves presets of its own size only; another size needs another pack.

Records are PNG-encoded by default (lossless for uint8; ``raw`` skips even that decode, at a
little more disk). Packing resumes: records of an interrupted run are copied, not recomputed.
"""
import datetime
import json
import logging
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from tqdm import tqdm

from mxvision.data import transforms
from mxvision.errors import BadImage, BadIndex, BadRun
from mxvision.io.headers import JPEG_MAGIC, PNG_MAGIC, jpeg_header, png_header, png_image_chunks
from mxvision.io.quiet_decode import imdecode
from mxvision.utils import write_json

log = logging.getLogger(__name__)

FORMAT = "mxvision-recordio"
VERSION = 1
ENCODINGS = ("png", "raw", "jpg")
_RECORD_PATH = re.compile(r"^(?P<rec>.+\.rec)#(?P<key>\d+)$")
_CHUNK = 64
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


# ----------------------------------------------------------------------------------- encoding
def _encode(img_u8, encoding):
    if encoding == "raw":
        return img_u8.tobytes()
    if encoding == "png":
        ok, buf = cv2.imencode(".png", img_u8, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buf = cv2.imencode(".jpg", img_u8, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {img_u8.shape} image as {encoding}")
    return buf.tobytes()


def _decode(payload, encoding, size, where):
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


def quantize(img01):
    """[0, 1] float image -> uint8 (round to nearest)."""
    return np.rint(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)


def prepare_record(path, size, encoding):
    """Read + crop/resize + quantise + encode one image; (payload, None) or (None, BadImage).

    The per-image work of :func:`pack_index` (run on its worker threads): the one step a resumed
    pack skips for the records it copies.
    """
    try:
        from mxvision.io.images import read_image
        img = transforms.center_crop_resize(read_image(path), size)
        return _encode(quantize(img), encoding), None
    except BadImage as err:
        return None, err


# ----------------------------------------------------------------------------------- packing
def _label_vectors(index):
    """Per row the record label: the pathology vector when the index has pathology columns,
    else the class id. Returns (labels, description)."""
    from mxvision.data.labels import PATHOLOGIES, parse_value

    patho = [c for c in index.columns if c in PATHOLOGIES]
    if patho:
        rows = [[parse_value(v) for v in vals] for vals in zip(*(index.column(c) for c in patho))]
        return [np.asarray(r, dtype=np.float32) for r in rows], {"pathologies": patho}
    return [float(i) for i in index.label_ids], {"class_id": list(index.classes)}


def _config(index, size, encoding, preset):
    return {"format": FORMAT, "version": VERSION, "size": size, "dtype": "uint8",
            "channels": 1, "crop": "center_crop_resize", "encoding": encoding,
            "preset": preset.name, "classes": list(index.classes),
            "sources": [[i, p, lab] for i, p, lab in zip(index.ids, index.paths, index.labels)]}


def _copy_resumable(part_rec, part_idx, state_path, config, writer, size, encoding):
    """Copy the intact records of an interrupted pack with the same config into ``writer``
    (MXNet's writer cannot append); return the set of keys copied."""
    mx = _mx()
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return set()
    if state.get("config") != config or not (os.path.isfile(part_rec)
                                             and os.path.isfile(part_idx)):
        return set()
    try:
        old = mx.recordio.MXIndexedRecordIO(part_idx, part_rec, "r")
    except Exception:  # noqa: BLE001 - unreadable leftovers: start over
        return set()
    done, fd = set(), os.open(part_rec, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for k in list(old.keys):
            try:
                check_record_header(fd, old.idx[k], record_limit(size, encoding), part_rec)
                payload = old.read_idx(k)
                _decode(mx.recordio.unpack(payload)[1], encoding, size, part_rec)
            except Exception:  # noqa: BLE001 - a torn record (the last one, usually)
                continue
            writer.write_idx(k, payload)
            done.add(k)
    finally:
        old.close()
        os.close(fd)
    return done


def _same_file(a, b):
    try:
        return a is not None and os.path.samefile(a, b)
    except (OSError, TypeError):  # either missing, or not a path
        return False


def pack_index(index, out_rec, preset="imagenet224", encoding="png", workers=2, strict=False,
               progress=True, overwrite=False):
    """Pack every image of ``index`` (an :class:`~mxvision.data.index.Index` or CSV path) into
    ``out_rec`` (+ .idx, .json, .csv); return the manifest dict.

    Unreadable images are skipped and listed in the manifest (``strict`` raises instead). An
    existing finished pack of the same index and settings is kept as is (nothing is redone)
    unless ``overwrite``; an interrupted one is resumed.
    """
    from mxvision.data.index import Index, read_index, write_index

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if not isinstance(index, Index):
        index = read_index(index)
    if len(index) == 0:
        raise BadIndex(index.source, "no images to pack")
    preset = transforms.get_preset(preset)
    rec, idx, manifest_path, csv_path = pack_paths(out_rec)
    source = getattr(index, "source", None)
    if _same_file(source, csv_path):  # the pack writes its index of records as NAME.csv
        raise BadRun(csv_path, "is the index being packed, and the pack would overwrite it with its "
                               f"index of records; choose another --out (e.g. {rec[:-4]}-pack.rec)")
    size = preset.size
    config = _config(index, size, encoding, preset)
    if not overwrite and os.path.isfile(manifest_path) and os.path.isfile(rec):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old.get("config") == config:
            log.info("%s already holds this pack; nothing to do", rec)
            return old
        raise BadRun(rec, "holds another pack (other images or settings); choose another --out "
                          "or pass --overwrite")
    part_rec, part_idx, state_path = rec + ".part", idx + ".part", rec + ".part.json"
    try:
        os.makedirs(os.path.dirname(rec), exist_ok=True)
    except OSError as err:
        raise BadRun(os.path.dirname(rec), f"cannot create the folder ({err.strerror})") from None
    labels, label_kind = _label_vectors(index)
    paths = index.paths
    mx = _mx()
    writer = mx.recordio.MXIndexedRecordIO(part_idx + ".new", part_rec + ".new", "w")
    skipped = []
    try:
        done = set() if overwrite else _copy_resumable(part_rec, part_idx, state_path, config,
                                                       writer, size, encoding)
        if done:
            log.info("resuming %s: %d of %d records already packed", rec, len(done), len(index))
        writer.fidx.flush()
        os.replace(part_rec + ".new", part_rec)  # the open writer keeps writing to the same file
        os.replace(part_idx + ".new", part_idx)
        write_json(state_path, {"config": config})
        rows = [r for r in range(len(index)) if r not in done]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                tqdm(total=len(index), initial=len(done), unit="img", desc="pack",
                     disable=not progress) as bar:
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start:start + _CHUNK]
                results = pool.map(lambda r: prepare_record(paths[r], size, encoding), chunk)
                for r, (payload, err) in zip(chunk, results):
                    if err is not None:
                        if strict:
                            raise err
                        skipped.append({"row": r, "id": index.ids[r], "problem": str(err)})
                    else:
                        label = labels[r]
                        flag = label.size if isinstance(label, np.ndarray) else 0
                        header = mx.recordio.IRHeader(flag, label, r, 0)
                        writer.write_idx(r, mx.recordio.pack(header, payload))
                    bar.update(1)
                writer.fidx.flush()
    finally:
        writer.close()

    bad = {s["row"] for s in skipped}
    if len(bad) == len(index):
        raise BadIndex(index.source, f"none of the {len(index)} images could be read, first: "
                                     f"{skipped[0]['problem']}")
    items = [{"key": k, "id": i, "source": p, "label": lab, "patient_id": pid, "split": s,
              "view": v}
             for k, (i, p, lab, pid, s, v) in enumerate(zip(
                 index.ids, paths, index.labels, index.patient_ids, index.splits, index.views))
             if k not in bad]
    manifest = {"config": config, "label_kind": label_kind, "count": len(items),
                "skipped": skipped, "items": items, "source_index": index.source,
                "created": datetime.datetime.now().isoformat(timespec="seconds")}
    for stale in (manifest_path, csv_path):
        if os.path.exists(stale):
            os.remove(stale)
    os.replace(part_rec, rec)
    os.replace(part_idx, idx)
    name = os.path.basename(rec)
    records = []
    for k, r in enumerate(index.records()):
        if k in bad:
            continue
        r["source_path"] = r["path"]
        r["path"] = os.path.join(os.path.dirname(rec), f"{name}#{k}")
        records.append(r)
    packed = Index(records, os.path.dirname(rec), columns=index.columns + ("source_path",),
                   classes=index.classes, source=csv_path)
    write_index(packed, csv_path)
    write_json(manifest_path, manifest)  # last: its presence marks a finished pack
    os.remove(state_path)
    if skipped:
        log.warning("skipped %d unreadable image(s); they are listed in %s", len(skipped),
                    manifest_path)
    return manifest


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
        return header, _decode(data, self.encoding, self.size, where)

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


def load_image(path, preset="imagenet224"):
    """:func:`mxvision.data.transforms.load_image` that also reads ``FILE.rec#KEY`` records."""
    parts = split_record_path(path)
    if parts is None:
        return transforms.load_image(path, preset)
    return open_source(parts[0]).load(parts[1], preset)


__all__ = ["pack_index", "RecordSource", "open_source", "load_image", "record_path",
           "split_record_path", "pack_paths", "quantize", "prepare_record", "record_limit",
           "check_record_header", "ENCODINGS"]
