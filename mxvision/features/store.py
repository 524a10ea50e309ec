"""A feature store on disk: its layout, its manifest, and read access (:class:`FeatureStore`).

Layout of a feature store directory::

    manifest.json          what the features are (backbone, weights, cut, preprocessing, compute
                           precision, storage dtype, pooling, calibration), the items (id, path,
                           label, patient, split) and each finished shard with its rows, size, sha256
    shard-00000.nd         mx.nd.save({"features": (rows, C, H, W) or (rows, C), float32 or float16})
    backbone.params        only for random weights: the exact backbone, so predict/export reproduce it
    backbone-int8-*        only for --dtype int8/bfloat16: the converted network (mxvision.features.quantize)

A shard is listed in the manifest only after its file is completely written (temp file + rename),
and it carries a checksum, so a reader never sees half a shard and an interrupted extraction
(:mod:`mxvision.features.extract`) resumes by skipping the shards that are listed and intact.

Format version 2 adds ``dtype`` (compute precision: float32, bfloat16, int8), ``storage_dtype``
(float32 or float16), ``pooled`` and ``precision``; a version-1 store reads as float32/unpooled.
"""
import hashlib
from pathlib import Path

from mxvision.runtime import use_every_core

use_every_core()

import mxnet as mx  # noqa: E402  (after use_every_core)
import numpy as np  # noqa: E402

from mxvision.errors import BadRun  # noqa: E402
from mxvision.utils import file_digest, read_json  # noqa: E402

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Defaults of the keys format version 2 added, i.e. what a version-1 store is.
_V1_DEFAULTS = {"dtype": "float32", "storage_dtype": "float32", "pooled": False, "precision": None}


class FeatureStore:
    """Read access to a finished (or partial) feature store directory."""

    def __init__(self, path):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise BadRun(self.path, f"not a feature store (no {MANIFEST}); run `mxvision extract` first")
        try:
            self.manifest = read_json(manifest_file)
        except ValueError as err:
            raise BadRun(manifest_file, f"unreadable manifest ({err})") from None
        version = self.manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise BadRun(manifest_file, f"unsupported format_version {version}" +
                         ("; it was written by a newer mxvision, upgrade to read it" if newer else ""))
        for key, default in _V1_DEFAULTS.items():
            self.manifest.setdefault(key, default)

    @property
    def classes(self):
        return self.manifest["classes"]

    @property
    def items(self):
        return self.manifest["items"]

    @property
    def feature_shape(self):
        return tuple(self.manifest["feature_shape"])

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

        The file is read once: its sha256 is checked on the bytes in memory, then they are parsed,
        so verifying costs no second pass over the disk.
        """
        path = self.shard_path(shard)
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if len(data) != shard["bytes"] or (verify and hashlib.sha256(data).hexdigest() != shard["sha256"]):
            raise BadRun(path, "missing, truncated or corrupt feature shard")
        feats = mx.nd.load_frombuffer(data)["features"]
        del data
        if keep is not None and len(keep) < feats.shape[0]:
            feats = feats.take(mx.nd.array(keep, dtype="int64"))
        return feats.astype("float32", copy=False).asnumpy()

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
