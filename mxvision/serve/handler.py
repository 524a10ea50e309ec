"""What an mxvision model archive does inside MXNet Model Server: decode, preprocess, score.

MMS calls :func:`handle` once with ``data=None`` when a worker loads the archive (the network is
loaded and its files checked against the manifest's SHA-256), then with the batch of requests it
gathered (``batch_size`` / ``max_batch_delay``). Each request's image is decoded and preprocessed
by the same functions ``predict`` and ``classify`` use (:func:`mxvision.io.images.decode_image`,
then :func:`mxvision.data.transforms.preprocess` or :func:`mxvision.data.xrv_transforms.preprocess`),
the readable ones are scored in **one** forward pass, and every request gets its own answer, in
order: a JSON result, or an HTTP 4xx with a one-line JSON error naming the problem (the other
requests of the batch are answered normally and the worker stays up). An Xvision run trained with
``--calibrate`` carries its calibrator in the manifest; it is applied after the softmax with the
arithmetic ``predict`` uses (:func:`mxvision.train.calibrators.calibrate_probs`, NumPy only) and
the answer says ``"calibration": "calibrated (platt)"``.

Bodies: the raw bytes of a PNG, JPEG, TIFF or DICOM file (``curl --data-binary @film.png``), or a
multipart form whose first file field holds them (``curl -F data=@film.dcm``; the file name is
used in errors and lets a DICOM stream without preamble be recognised).

Grad-CAM on request: the form field ``gradcam=1`` (``target=NAME`` picks the class or pathology,
default as ``mxvision audit explain``: the positive class, or ``Nodule``; MMS hands form fields to
the handler but not the query string, so ``?gradcam=1`` is not seen) adds a
``gradcam`` object to the answer: the target, its logit, the map at the feature resolution
(``grid``) and an overlay PNG of the film (``overlay``, a data URL, at most 512 px a side), made by
:func:`mxvision.audit.explain.grad_cam` on the archive's own graph (:mod:`mxvision.serve.cam`).
"""
import base64
import json
import logging
import os
import warnings
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
from mxnet import gluon

from mxvision.audit.explain import grad_cam, overlay, to_image_grid
from mxvision.data import transforms, xrv_transforms
from mxvision.errors import BadImage, MxvisionError, one_line
from mxvision.io.images import decode_image
from mxvision.inference import describe_int8_check
from mxvision.models.xrv.common import op_norm_nd
from mxvision.runtime import hybridize_for_inference
from mxvision.serve.archive import MANIFEST, PARAMS, SYMBOL, sha256_file
from mxvision.serve.cam import cam_blocks
from mxvision.train.calibrators import calibrate_probs, check_calibrator, describe

log = logging.getLogger(__name__)

#: Request fields tried first for the image; then any field holding bytes.
IMAGE_FIELDS = ("body", "data", "file", "image")
#: Request options (multipart form fields), never taken for the image.
OPTION_FIELDS = ("gradcam", "target")
#: Longest side of the Grad-CAM overlay PNG returned (a 2048 px film would make a 4 MB answer).
OVERLAY_SIDE = 512
#: Largest image body a worker scores (bytes); ``mxvision serve --max-image-mb`` sets it through
#: this environment variable, which MMS passes on to its workers. Larger ones get a 413 JSON error
#: (bodies beyond MMS's own ``max_request_size``, twice this, get MMS's bare 413).
MAX_BYTES_VARIABLE = "MXVISION_SERVE_MAX_BYTES"
DEFAULT_MAX_BYTES = 64 << 20
#: Answer field: the number of images scored in the same forward pass as this one.
#: The handler sets **no response header, not even the content type** (``context.
#: set_response_content_type`` is one): MMS 1.1.11's frontend reads a worker's response headers
#: with the bytes received so far as their length limit (``CodecUtils.readMap``), so a reply that
#: arrives in pieces fails with "CorruptedFrameException: Message size exceed limit" and the worker
#: is restarted -- 4 of 1,376 requests in bench_serve.py with 4 clients and batching. The answers
#: are JSON all the same, sent without a Content-Type.
BATCH_FIELD = "batch"


class ArchiveModel:
    """The network and manifest of one unpacked archive (``model_dir``), ready to score."""

    def __init__(self, model_dir, ctx=None):
        model_dir = self.model_dir = Path(model_dir)
        self._cam = None
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
        self.int8_port = self.manifest["family"] == "xrv" and self.manifest.get("precision") == "int8"
        # the precision (and an INT8 port's check against float32, with the sentence the page
        # shows) go into every answer, as classify records them per result: a reader of one answer
        # should not need the manifest
        self.precision = {"dtype": self.manifest.get("precision", "float32")}
        if self.int8_port:  # quantized and fused already, as classify --dtype int8 runs it
            check = self.manifest["int8"]
            self.precision.update(int8=check, precision_note="INT8 scores, " + describe_int8_check(check))
            self.net.hybridize(static_alloc=True, static_shape=True)
        elif self.manifest["family"] == "xrv":  # as classify runs it
            hybridize_for_inference(self.net, self.ctx)
        else:
            self.net.hybridize()
        self.family = self.manifest["family"]
        if self.family == "xvision":
            self.preset = transforms.get_preset(self.manifest["preprocessing"]["name"])
            self.labels = self.manifest["classes"]
            # a run trained with --calibrate: applied after the softmax, with predict's arithmetic
            calibration = self.manifest.get("calibration")
            self.calibrator = None if calibration is None else \
                check_calibrator(calibration, f"{model_dir / MANIFEST} calibration")
        else:
            self.resolution = int(self.manifest["preprocessing"]["resolution"])
            self.labels = self.manifest["pathologies"]
            thresholds = self.manifest.get("op_threshs")
            self.op_threshs = None if thresholds is None else np.array(thresholds, dtype=np.float32)

    def prepare(self, data: bytes, name="<upload>") -> np.ndarray:
        """One image's network input, exactly as ``predict``/``classify`` make it from a file."""
        return self.prepare_image(decode_image(data, name))

    def prepare_image(self, img: np.ndarray) -> np.ndarray:
        if self.family == "xvision":
            return transforms.preprocess(img, self.preset)
        return xrv_transforms.preprocess(xrv_transforms.xray_range(img), self.resolution)

    def cam_target(self, target=None) -> int:
        """Output index Grad-CAM explains: ``target`` (a name or index), else the default of
        ``mxvision audit explain`` (the positive class of two, ``Nodule``, else the top class)."""
        if target in (None, ""):
            if self.family == "xrv":
                return self.labels.index("Nodule")
            return 1 if len(self.labels) == 2 else -1
        if str(target).isdigit() and int(target) < len(self.labels):
            return int(target)
        if target in self.labels:
            return self.labels.index(target)
        raise MxvisionError(f"target={target}", "not an output of this model; choose one of "
                                           + ", ".join(self.labels))

    def gradcam(self, inputs, images, target):
        """Grad-CAM of output ``target`` (-1: each image's top class) for prepared ``inputs``
        of the decoded ``images``: one dict per image (target, logit, grid, overlay)."""
        if self.int8_port:  # the answer keeps its scores, with this in place of the map
            raise MxvisionError("gradcam=1", "this archive's network is INT8, which has no gradient; "
                                             "Grad-CAM needs a float32 archive of the model")
        if self._cam is None:  # built on the first request that asks: most never do
            model_dir = self.model_dir
            self._cam = cam_blocks(model_dir / SYMBOL, model_dir / PARAMS,
                                   layer=self.manifest.get("cam_layer"), ctx=self.ctx)[:2]
        x = mx.nd.array(np.stack(inputs), ctx=self.ctx)
        heat, logits, chosen = grad_cam(*self._cam, x, None if target < 0 else target)
        return [{"target": self.labels[int(c)], "logit": float(v),
                 "grid": np.round(h, 4).tolist(), "overlay": _overlay_url(img, h)}
                for h, v, c, img in zip(heat, logits, chosen, images)]

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
        if self.family == "xvision":
            rows = calibrate_probs(self.calibrator, rows)
        return [self._result(row) for row in rows]

    def _result(self, row):
        m = self.manifest
        base = {"model": m["name"], "family": self.family, "weights": _weights_text(m),
                "random_weights": bool(m.get("random_weights")), **self.precision}
        if self.family == "xvision":
            probs = {c: float(p) for c, p in zip(self.labels, row)}
            return {**base, "probabilities": probs, "predicted": self.labels[int(row.argmax())],
                    "calibration": describe(self.calibrator)}
        unavailable = m.get("unavailable") or {}
        scores = {p: (None if p in unavailable else float(v)) for p, v in zip(self.labels, row)}
        return {**base, "scores": scores, "unavailable": unavailable,
                "calibrated": self.op_threshs is not None}


def _weights_text(manifest):
    weights = manifest.get("weights") or {}
    return weights.get("description") or weights.get("backbone") or "unknown"


def request_image(request: dict):
    """``(name, bytes)`` of the image in one MMS request (raw body or multipart), or BadImage."""
    others = tuple(k for k in request if k not in IMAGE_FIELDS + OPTION_FIELDS)
    for key in IMAGE_FIELDS + others:
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
        answers, inputs, slots, cams = [None] * len(data), [], [], {}
        for i, request in enumerate(data):
            try:
                name, body = request_image(request or {})
                if len(body) > self.max_bytes:
                    answers[i] = _error(context, i, 413, "too large",
                                        f"{name}: {len(body)} bytes, over this server's limit of "
                                        f"{self.max_bytes} bytes per image")
                    continue
                wants_cam, target = request_options(request or {})
                target = self.model.cam_target(target) if wants_cam else None
                img = decode_image(body, name)
                inputs.append(self.model.prepare_image(img))
                if wants_cam:
                    cams.setdefault(target, []).append((len(slots), img))
                slots.append(i)
            except BadImage as err:
                answers[i] = _error(context, i, 400, "bad image", str(err))
            except (MemoryError, ValueError) as err:  # a decoder's own refusal
                answers[i] = _error(context, i, 400, "bad image", one_line(err, limit=200))
            except MxvisionError as err:  # an option it cannot follow (gradcam=, target=)
                answers[i] = _error(context, i, 400, "bad request", str(err))
            except Exception as err:  # noqa: BLE001 -- an exception escaping a batch kills the worker
                answers[i] = _error(context, i, 500, "internal error", one_line(err, limit=200))
        if inputs:
            try:
                results = self.model.score(inputs)
                for target, wanted in cams.items():  # one Grad-CAM pass per target asked for
                    try:
                        maps = self.model.gradcam([inputs[k] for k, _ in wanted],
                                                  [img for _, img in wanted], target)
                    except Exception as err:  # noqa: BLE001 -- the scores still stand
                        maps = [{"error": one_line(err, limit=200)}] * len(wanted)
                    for (k, _), cam in zip(wanted, maps):
                        results[k]["gradcam"] = cam
                for i, result in zip(slots, results):
                    # how many images shared this forward pass (server-side batching at work)
                    answers[i] = json.dumps({**result, BATCH_FIELD: len(inputs)})
            except Exception as err:  # noqa: BLE001 -- MxvisionError, or MXNet's own; never raised to MMS
                for i in slots:
                    answers[i] = _error(context, i, 500, "model failure", one_line(err, limit=200))
        return answers


def _text(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return None if value is None else str(value)


def request_options(request: dict):
    """``(gradcam wanted, target or None)`` from a request's form fields."""
    flag = (_text(request.get("gradcam")) or "").strip().lower()
    if flag not in ("", "0", "false", "no", "1", "true", "yes"):
        raise MxvisionError(f"gradcam={flag}", "give gradcam=1 (or true) to ask for a Grad-CAM overlay")
    target = _text(request.get("target"))
    return flag in ("1", "true", "yes"), (target.strip() if target else None)


def _overlay_url(img, heat):
    """A PNG data URL of the film with its heatmap blended in, at most OVERLAY_SIDE px a side."""
    pic = overlay(img, to_image_grid(heat, img.shape))
    scale = OVERLAY_SIDE / max(pic.shape[:2])
    if scale < 1:
        pic = cv2.resize(pic, (max(1, round(pic.shape[1] * scale)), max(1, round(pic.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", pic)
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


def _error(context, idx, code, phrase, message):
    context.set_response_status(code, phrase, idx)
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


__all__ = ["ArchiveModel", "Service", "handle", "request_image", "request_options"]
