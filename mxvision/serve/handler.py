"""What an mxvision model archive does inside MXNet Model Server: decode, preprocess, score.

MMS calls :func:`handle` once with ``data=None`` when a worker loads the archive (the network is
loaded and its files checked against the manifest's SHA-256), then with the batch of requests it
gathered (``batch_size`` / ``max_batch_delay``). Each request's image is decoded and preprocessed
by the same functions ``predict`` and ``classify`` use (:func:`mxvision.io.images.decode_image`,
then :func:`mxvision.data.transforms.preprocess` or :func:`mxvision.data.xrv_transforms.preprocess`),
the readable ones are scored in **one** forward pass, and every request gets its own answer, in
order: a JSON result, or an HTTP 4xx with a one-line JSON error naming the problem (the other
requests of the batch are answered normally and the worker stays up).

Bodies: the raw bytes of a PNG, JPEG, TIFF or DICOM file (``curl --data-binary @film.png``), or a
multipart form whose first file field holds them (``curl -F data=@film.dcm``; the file name is
used in errors and lets a DICOM stream without preamble be recognised).
"""
import json
import logging
import os
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon

from mxvision.data import transforms, xrv_transforms
from mxvision.errors import BadImage, MxvisionError, one_line
from mxvision.io.images import decode_image
from mxvision.models.xrv.common import op_norm_nd
from mxvision.serve.archive import MANIFEST, PARAMS, SYMBOL, sha256_file

log = logging.getLogger(__name__)

#: Request fields tried first for the image; then any field holding bytes.
IMAGE_FIELDS = ("body", "data", "file", "image")
#: Largest image body a worker scores (bytes); ``mxvision serve --max-image-mb`` sets it through
#: this environment variable, which MMS passes on to its workers. Larger ones get a 413 JSON error
#: (bodies beyond MMS's own ``max_request_size``, twice this, get MMS's bare 413).
MAX_BYTES_VARIABLE = "MXVISION_SERVE_MAX_BYTES"
DEFAULT_MAX_BYTES = 64 << 20
#: Response header: the number of images scored in the same forward pass as this one.
BATCH_HEADER = "X-Mxvision-Batch"


class ArchiveModel:
    """The network and manifest of one unpacked archive (``model_dir``), ready to score."""

    def __init__(self, model_dir, ctx=None):
        model_dir = Path(model_dir)
        self.manifest = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))
        for name, digest in self.manifest["files"].items():
            if sha256_file(model_dir / name) != digest:
                raise MxvisionError(str(model_dir / name), "does not match the SHA-256 in the "
                                                           "archive's manifest (damaged or replaced)")
        self.ctx = ctx or mx.cpu()
        with warnings.catch_warnings():  # "Cannot decide type for ... data": it is float32
            warnings.simplefilter("ignore", UserWarning)
            self.net = gluon.SymbolBlock.imports(str(model_dir / SYMBOL), ["data"],
                                                 str(model_dir / PARAMS), ctx=self.ctx)
        self.net.hybridize()
        self.family = self.manifest["family"]
        if self.family == "xvision":
            self.preset = transforms.get_preset(self.manifest["preprocessing"]["name"])
            self.labels = self.manifest["classes"]
        else:
            self.resolution = int(self.manifest["preprocessing"]["resolution"])
            self.labels = self.manifest["pathologies"]
            thresholds = self.manifest.get("op_threshs")
            self.op_threshs = None if thresholds is None else np.array(thresholds, dtype=np.float32)

    def prepare(self, data: bytes, name="<upload>") -> np.ndarray:
        """One image's network input, exactly as ``predict``/``classify`` make it from a file."""
        img = decode_image(data, name)
        if self.family == "xvision":
            return transforms.preprocess(img, self.preset)
        return xrv_transforms.preprocess(xrv_transforms.xray_range(img), self.resolution)

    def score(self, inputs):
        """One forward pass over the prepared inputs; one result dict per input."""
        out = self.net(mx.nd.array(np.stack(inputs), ctx=self.ctx))
        if self.family == "xrv":
            if self.op_threshs is not None:
                out = op_norm_nd(mx.nd.sigmoid(out), self.op_threshs)
            else:
                out = mx.nd.sigmoid(out)
        rows = out.asnumpy()
        if not np.isfinite(rows).all():
            raise MxvisionError(self.manifest["name"], "the network gives non-finite outputs "
                                                       "(NaN or infinity); its parameters are corrupt")
        return [self._result(row) for row in rows]

    def _result(self, row):
        m = self.manifest
        base = {"model": m["name"], "family": self.family, "weights": _weights_text(m),
                "random_weights": bool(m.get("random_weights"))}
        if self.family == "xvision":
            probs = {c: float(p) for c, p in zip(self.labels, row)}
            return {**base, "probabilities": probs, "predicted": self.labels[int(row.argmax())]}
        unavailable = m.get("unavailable") or {}
        scores = {p: (None if p in unavailable else float(v)) for p, v in zip(self.labels, row)}
        return {**base, "scores": scores, "unavailable": unavailable,
                "calibrated": self.op_threshs is not None}


def _weights_text(manifest):
    weights = manifest.get("weights") or {}
    return weights.get("description") or weights.get("backbone") or "unknown"


def request_image(request: dict):
    """``(name, bytes)`` of the image in one MMS request (raw body or multipart), or BadImage."""
    for key in IMAGE_FIELDS + tuple(k for k in request if k not in IMAGE_FIELDS):
        value = request.get(key)
        if isinstance(value, (bytes, bytearray)):
            return ("<upload>" if key in ("body", "data") else key), bytes(value)
        if isinstance(value, str) and key == "body":
            return "<upload>", value.encode("latin-1", "replace")
    raise BadImage("<upload>", "file is empty (0 bytes)")


class Service:
    """The loaded archive of this worker, and the batch loop MMS drives."""

    def __init__(self, context):
        self.model = ArchiveModel(context.system_properties["model_dir"])
        self.max_bytes = int(os.environ.get(MAX_BYTES_VARIABLE) or DEFAULT_MAX_BYTES)

    def handle(self, data, context):
        answers, inputs, slots = [None] * len(data), [], []
        for i, request in enumerate(data):
            try:
                name, body = request_image(request or {})
                if len(body) > self.max_bytes:
                    answers[i] = _error(context, i, 413, "too large",
                                        f"{name}: {len(body)} bytes, over this server's limit of "
                                        f"{self.max_bytes} bytes per image")
                    continue
                inputs.append(self.model.prepare(body, name))
                slots.append(i)
            except BadImage as err:
                answers[i] = _error(context, i, 400, "bad image", str(err))
            except (MemoryError, ValueError) as err:  # a decoder's own refusal
                answers[i] = _error(context, i, 400, "bad image", one_line(err, limit=200))
            except Exception as err:  # noqa: BLE001 -- an exception escaping a batch kills the worker
                answers[i] = _error(context, i, 500, "internal error", one_line(err, limit=200))
        if inputs:
            try:
                for i, result in zip(slots, self.model.score(inputs)):
                    answers[i] = json.dumps(result)
                    context.set_response_content_type(i, "application/json")
                    # how many images shared this forward pass (server-side batching at work)
                    context.set_response_header(i, BATCH_HEADER, str(len(inputs)))
            except Exception as err:  # noqa: BLE001 -- MxvisionError, or MXNet's own; never raised to MMS
                for i in slots:
                    answers[i] = _error(context, i, 500, "model failure", one_line(err, limit=200))
        return answers


def _error(context, idx, code, phrase, message):
    context.set_response_status(code, phrase, idx)
    context.set_response_content_type(idx, "application/json")
    return json.dumps({"code": code, "error": " ".join(str(message).split())})


_service = None


def handle(data, context):
    """MMS's entry point: ``data=None`` loads the archive, a list of requests is scored."""
    global _service
    if _service is None:
        _service = Service(context)
    if data is None:
        return None
    return _service.handle(data, context)


__all__ = ["ArchiveModel", "Service", "handle", "request_image"]
