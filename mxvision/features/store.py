"""A feature store on disk: its layout, its manifest, and read access (:class:`FeatureStore`).

Layout of a feature store directory::

    manifest.json          what the features are (backbone, weights, cut, preprocessing, compute
                           precision, storage dtype, pooling, calibration), the items (id, path,
                           label, patient, split; ``targets`` for the index's pathology columns,
                           named in ``pathologies``) and each finished shard with its rows, size, sha256
    shard-00000.nd         mx.nd.save({"features": (rows, C, H, W) or (rows, C), float32 or float16})
    backbone.params        only for random weights: the exact backbone, so predict/export reproduce it
    backbone-int8-*        only for --dtype int8/bfloat16: the converted network (mxvision.features.quantize)

A shard is listed in the manifest only after its file is completely written (temp file + rename),
and it carries a checksum, so a reader never sees half a shard and an interrupted extraction
(:mod:`mxvision.features.extract`) resumes by skipping the shards that are listed and intact.

Format version 2 adds ``dtype`` (compute precision: float32, bfloat16, int8), ``storage_dtype``
(float32 or float16), ``pooled`` and ``precision``; a version-1 store reads as float32/unpooled.

A store may come from someone else's disk, so nothing in it is trusted: the manifest is checked
whole when the store is opened (:func:`check_manifest`: types, keys, ranges, and every shard's
size against its rows and the feature shape) and each shard when it is read (its headers before
MXNet parses it, then its array against the manifest, then finite values). Anything wrong is one
line naming the file (:class:`~mxvision.errors.BadRun`), never a traceback or a NaN result.
"""
import hashlib
import math
import os
from pathlib import Path

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from mxvision.errors import BadRun, MxvisionError, one_line  # noqa: E402
from mxvision.models.store import check_params_file, mxnet_error_line  # noqa: E402
from mxvision.utils import file_digest, read_json  # noqa: E402

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Compute precisions (mxvision.features.quantize.DTYPES) and storage dtypes a manifest may name.
COMPUTE_DTYPES = ("float32", "bfloat16", "int8")
STORAGE_ITEMSIZE = {"float32": 4, "float16": 2}
#: Largest manifest read (a million images take ~300 MB of JSON).
MAX_MANIFEST_BYTES = 1 << 30
#: Most values in one feature row (2048x7x7 is 100,352; the largest map of a 448 px ResNet ~400k).
MAX_ROW_VALUES = 1 << 24
#: The manifest's keys and their JSON types (``int`` never accepts a bool); the optional ones with
#: their defaults, which are also what a version-1 store (without dtype, pooled, ...) is.
_REQUIRED = {"backbone": str, "cut": str, "weights": dict, "preprocessing": dict, "shard_size": int,
             "classes": list, "items": list, "shards": list}
_OPTIONAL = {"skipped": (list, []), "feature_shape": ((list, type(None)), None),
             "complete": (bool, False), "pooled": (bool, False), "precision": ((dict, type(None)), None),
             "dtype": (str, "float32"), "storage_dtype": (str, "float32"), "pathologies": (list, [])}
_ITEM_KEYS = {"id": str, "path": str, "label": str, "label_id": int, "patient_id": str, "split": str}
_SHARD_KEYS = {"file": str, "start": int, "stop": int, "rows": list, "bytes": int, "sha256": str}


def json_is(value, kind):
    """isinstance for JSON values, where a bool is not an int (nor a number)."""
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        return False
    return isinstance(value, kind)


def json_type_name(kind):
    """How a message names a JSON type (or a tuple of them): ``an object``, ``a list``, ..."""
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true/false", type(None): "null"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_json_keys(obj, keys, what):
    """The problem with a JSON object read from a file (``obj`` should be a dict holding ``keys``,
    {name: type or tuple of types}), as a short phrase naming ``what`` it is, or None. Shared by
    the manifest and the run folder's files (:mod:`mxvision.train.runs`)."""
    if not isinstance(obj, dict):
        return f"{what} is {json_type_name(type(obj))}, expected an object"
    missing = [k for k in keys if k not in obj]
    if missing:
        return f"{what} lacks {', '.join(missing)}"
    for key, kind in keys.items():
        if not json_is(obj[key], kind):
            return f"{what}'s {key} is {json_type_name(type(obj[key]))}, expected {json_type_name(kind)}"
    return None


def valid_feature_shape(shape):
    """A feature row's shape as JSON: 1 to 3 positive sizes, at most :data:`MAX_ROW_VALUES` values."""
    return isinstance(shape, list) and 1 <= len(shape) <= 3 and \
        all(json_is(d, int) and d >= 1 for d in shape) and math.prod(shape) <= MAX_ROW_VALUES


def valid_classes(classes):
    """Class names as JSON: a non-empty list of distinct non-empty strings."""
    return isinstance(classes, list) and bool(classes) and \
        all(json_is(c, str) and c for c in classes) and len(set(classes)) == len(classes)


def shard_file_bytes(n_rows, feature_shape, storage_dtype):
    """The exact size of a shard file ``mx.nd.save`` writes for ``n_rows`` rows: the list header
    (24 bytes), the array header (24 + 8 per dimension), the data and the name "features" (24)."""
    ndim = 1 + len(feature_shape)
    return 72 + 8 * ndim + n_rows * math.prod(feature_shape) * STORAGE_ITEMSIZE[storage_dtype]


def _targets_problem(item, n_pathologies):
    """What is wrong with an item's ``targets`` (one 1, 0 or null per pathology of the manifest;
    absent when it has none), as a phrase, or None."""
    if not n_pathologies:
        return "targets are listed, but the manifest names no pathologies" if "targets" in item else None
    targets = item.get("targets")
    if not isinstance(targets, list) or len(targets) != n_pathologies:
        return f"targets are not a list of {n_pathologies} values (one per pathology)"
    if not all(t is None or (json_is(t, int) and t in (0, 1)) for t in targets):
        return "targets hold a value other than 1, 0 or null"
    return None


def check_manifest(manifest, where):
    """Check a manifest's structure before anything is read through it; return it with the
    defaults of a version-1 store filled in, or raise BadRun naming ``where`` (the file) and the
    first problem.

    Checked: the JSON types of every key the readers use; the format version; classes (distinct
    strings); pathologies (distinct strings, optional); every item (label id within the classes
    and matching its label; ``targets``, when the manifest names pathologies, one 1, 0 or null
    for each); every shard (a
    plain file name inside the store, rows within its start/stop, shards in order without
    overlap, a size that is exactly what its rows of ``feature_shape`` take in ``storage_dtype``);
    skipped rows within the items. A shard's file is checked against this when it is read
    (:meth:`FeatureStore.read_shard`).
    """
    def bad(problem):
        return BadRun(where, f"{problem}; not a valid feature-store manifest")

    if not isinstance(manifest, dict):
        raise bad(f"holds {json_type_name(type(manifest))}, expected an object")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        newer = json_is(version, int) and version > FORMAT_VERSION
        raise BadRun(where, f"unsupported format_version {one_line(version, 40)}" +
                     ("; it was written by a newer mxvision, upgrade to read it" if newer else ""))
    problem = check_json_keys(manifest, _REQUIRED, "the manifest")
    if problem:
        raise bad(problem)
    for key, (kind, default) in _OPTIONAL.items():
        manifest.setdefault(key, default)
        if not json_is(manifest[key], kind):
            raise bad(f"{key} is {json_type_name(type(manifest[key]))}, expected {json_type_name(kind)}")
    m = manifest
    for key, allowed in (("dtype", COMPUTE_DTYPES), ("storage_dtype", tuple(STORAGE_ITEMSIZE))):
        if m[key] not in allowed:
            raise bad(f"{key} {one_line(m[key], 40)!r} is not one of {', '.join(allowed)}")
    problem = check_json_keys(m["weights"], {"sha1": str, "description": str}, "weights") or \
        check_json_keys(m["preprocessing"], {"name": str}, "preprocessing")
    if problem:
        raise bad(problem)
    if m["weights"].get("file") is not None and not json_is(m["weights"]["file"], str):
        raise bad("weights' file is not a string")
    if m["shard_size"] < 1:
        raise bad(f"shard_size {m['shard_size']} is below 1")
    classes = m["classes"]
    if not valid_classes(classes):
        raise bad("classes must be a non-empty list of distinct names")
    if m["pathologies"] and not valid_classes(m["pathologies"]):
        raise bad("pathologies must be a list of distinct names")
    shape = m["feature_shape"]
    if shape is not None and not valid_feature_shape(shape):
        raise bad(f"feature_shape {one_line(shape, 60)} is not 1 to 3 positive sizes of at most "
                  f"{MAX_ROW_VALUES} values")
    n_items = len(m["items"])
    for k, item in enumerate(m["items"]):
        problem = check_json_keys(item, _ITEM_KEYS, f"item {k}")
        if problem:
            raise bad(problem)
        if not 0 <= item["label_id"] < len(classes):
            raise bad(f"item {k}'s label_id {item['label_id']} is not a class number (0 to {len(classes) - 1})")
        if classes[item["label_id"]] != item["label"]:
            raise bad(f"item {k}'s label {one_line(item['label'], 40)!r} is not class {item['label_id']} "
                      f"({classes[item['label_id']]!r})")
        problem = _targets_problem(item, len(m["pathologies"]))
        if problem:
            raise bad(f"item {k}'s {problem}")
    previous_stop = 0
    for k, shard in enumerate(m["shards"]):
        problem = check_json_keys(shard, _SHARD_KEYS, f"shard {k}")
        if problem:
            raise bad(problem)
        name, start, stop, rows = shard["file"], shard["start"], shard["stop"], shard["rows"]
        if name in ("", ".", "..") or os.path.basename(name) != name or "\x00" in name or "/" in name:
            raise bad(f"shard {k}'s file {one_line(name, 60)!r} is not a file name inside the store")
        if not previous_stop <= start < stop <= n_items or stop - start > m["shard_size"]:
            raise bad(f"shard {k} covers rows {start} to {stop}: out of order, overlapping, longer than "
                      f"shard_size or beyond the {n_items} items")
        previous_stop = stop
        if not rows or not all(json_is(r, int) for r in rows) or rows != sorted(set(rows)) or \
                not start <= rows[0] <= rows[-1] < stop:
            raise bad(f"shard {k}'s rows are not increasing row numbers from {start} to {stop - 1}")
        if shape is None:
            raise bad("lists shards but no feature_shape")
        expected = shard_file_bytes(len(rows), shape, m["storage_dtype"])
        if shard["bytes"] != expected:
            raise BadRun(os.path.join(os.path.dirname(os.fspath(where)), name),
                         f"the manifest records {shard['bytes']} bytes, but {len(rows)} rows of "
                         f"{'x'.join(map(str, shape))} {m['storage_dtype']} features take {expected}")
    for k, skip in enumerate(m["skipped"]):
        if not isinstance(skip, dict) or not json_is(skip.get("row"), int) or not 0 <= skip["row"] < n_items:
            raise bad(f"skipped entry {k} does not name a row of the items")
    return manifest


class FeatureStore:
    """Read access to a finished (or partial) feature store directory."""

    def __init__(self, path):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.exists():
            raise BadRun(self.path, f"not a feature store (no {MANIFEST}); run `mxvision extract` first")
        if not manifest_file.is_file() or manifest_file.stat().st_size > MAX_MANIFEST_BYTES:
            raise BadRun(manifest_file, f"not a regular file of at most {MAX_MANIFEST_BYTES} bytes; "
                                        "not a manifest")
        try:
            manifest = read_json(manifest_file)
        except (ValueError, RecursionError) as err:
            raise BadRun(manifest_file, f"unreadable manifest ({one_line(err, 120)})") from None
        self.manifest = check_manifest(manifest, manifest_file)

    @property
    def classes(self):
        return self.manifest["classes"]

    @property
    def items(self):
        return self.manifest["items"]

    @property
    def pathologies(self):
        """The pathology targets the items carry (``targets``, in this order); [] for none."""
        return self.manifest["pathologies"]

    @property
    def feature_shape(self):
        """The shape of one row, or None while no shard is written."""
        shape = self.manifest["feature_shape"]
        return None if shape is None else tuple(shape)

    @property
    def dtype(self):
        """The precision the features were computed in: float32, bfloat16 or int8."""
        return self.manifest["dtype"]

    @property
    def storage_dtype(self):
        return self.manifest["storage_dtype"]

    @property
    def pooled(self):
        return bool(self.manifest["pooled"])

    @property
    def complete(self):
        return self.manifest.get("complete", False)

    def shard_path(self, shard):
        return self.path / shard["file"]

    def check_shard(self, shard, verify=True):
        """True when a listed shard's file is there with the recorded size (and checksum)."""
        path = self.shard_path(shard)
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return False
        return not verify or file_digest(path) == shard["sha256"]

    def check_complete(self):
        if not self.complete:
            raise BadRun(self.path, "feature extraction did not finish; rerun `mxvision extract` to resume")

    def split_rows(self, split=None):
        """Per shard, the positions (within the shard) of the rows of ``split`` (all if None)."""
        wanted = [split is None or it["split"] == split for it in self.items]
        return [[k for k, r in enumerate(shard["rows"]) if wanted[r]] for shard in self.manifest["shards"]]

    def count(self, split=None):
        return sum(len(k) for k in self.split_rows(split))

    def row_bytes(self):
        """Bytes of one feature row once loaded (float32)."""
        return 4 * int(np.prod(self.feature_shape))

    def read_shard(self, shard, keep=None, verify=True):
        """The float32 features of one shard (only positions ``keep`` if given).

        The file's headers are checked before MXNet reads it (a regular file of the listed size
        whose arrays lie inside it: :func:`mxvision.models.store.check_params_file`), so a shard
        resealed with absurd dimensions cannot make MXNet allocate what it claims. It is then read
        once: its sha256 is checked on the bytes in memory, then they are parsed, and the array
        must be the manifest's (``features``, the listed rows x ``feature_shape``, in
        ``storage_dtype``) and finite.
        """
        path = self.shard_path(shard)
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise BadRun(path, "missing, truncated or corrupt feature shard")
        try:
            check_params_file(path, max_bytes=shard["bytes"])
            with open(path, "rb") as f:
                data = f.read(shard["bytes"] + 1)
        except MxvisionError as err:
            raise BadRun(path, f"corrupt feature shard ({err.problem})") from None
        if len(data) != shard["bytes"] or (verify and hashlib.sha256(data).hexdigest() != shard["sha256"]):
            raise BadRun(path, "missing, truncated or corrupt feature shard")
        try:
            arrays = mx.nd.load_frombuffer(data)
        except mx.base.MXNetError as err:
            raise BadRun(path, f"not a feature shard ({mxnet_error_line(err)})") from None
        del data
        expected = ("features", self.storage_dtype, (len(shard["rows"]),) + self.feature_shape)
        found = [(name, np.dtype(a.dtype).name, a.shape) for name, a in arrays.items()] \
            if isinstance(arrays, dict) else [("(unnamed)", np.dtype(a.dtype).name, a.shape) for a in arrays]
        if found != [expected]:
            shown = ", ".join(f"{n} {d} {s}" for n, d, s in found[:3]) or "no arrays"
            raise BadRun(path, f"holds {shown}; the manifest expects {expected[0]} {expected[1]} {expected[2]}")
        feats = arrays["features"]
        if keep is not None and len(keep) < feats.shape[0]:
            feats = feats.take(mx.nd.array(keep, dtype="int64"))
        feats = feats.astype("float32", copy=False).asnumpy()
        if not np.isfinite(feats).all():
            raise BadRun(path, "holds non-finite features (NaN or infinity)")
        return feats

    def iter_shards(self, split=None, verify=True, order=None):
        """Yield ``(features, label_ids, row_numbers)`` per shard holding rows of ``split``,
        in manifest order or in the shard order ``order``; one shard in memory at a time."""
        self.check_complete()
        shards = self.manifest["shards"]
        keeps = self.split_rows(split)
        for s in (range(len(shards)) if order is None else order):
            if not keeps[s]:
                continue
            rows = [shards[s]["rows"][k] for k in keeps[s]]
            feats = self.read_shard(shards[s], keeps[s], verify=verify)
            yield feats, np.array([self.items[r]["label_id"] for r in rows], dtype=np.int64), rows

    def load(self, split=None, verify=True):
        """Return ``(features, label_ids, ids)`` for the rows of ``split`` (all rows if None)."""
        self.check_complete()
        chunks, labels, rows = [], [], []
        for feats, y, r in self.iter_shards(split, verify=verify):
            chunks.append(feats)
            labels.append(y)
            rows.extend(r)
        if not rows:
            raise BadRun(self.path, f"no features for split {split!r}")
        ids = [self.items[r]["id"] for r in rows]
        return np.concatenate(chunks), np.concatenate(labels), ids
