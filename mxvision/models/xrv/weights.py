"""Download, convert, cache and verify torchxrayvision's published weights; build ready models.

Weights: torchxrayvision's own release files (``.pt``) are downloaded from their original
addresses (``RELEASE_URL``; override with ``$MXVISION_XRV_BASE_URL`` for a mirror), read with the
restricted reader of :mod:`~mxvision.io.torchfile.reader` (no PyTorch, no code execution), checked
tensor by tensor against the network, and saved as Gluon ``.params`` in the weights cache
(:func:`mxvision.models.store.cache_dir`) as ``{name}-{sha1[:8]}.params`` with a sidecar
``{name}.xrv.json``. What is verified, and what cannot be:

* torchxrayvision publishes **no checksums**, so the downloaded ``.pt`` cannot be checked against
  a known hash. Its sha256 as downloaded is recorded in the sidecar (trust on first use), and its
  *content* must match the architecture exactly: every expected tensor present with the right
  shape, nothing unexpected, all values finite, no negative BatchNorm variance.
* the converted ``.params`` is verified against the sha256 recorded in its sidecar every time it
  is loaded; a mismatch (corruption, a changed file) means it is converted again from a fresh
  download. Its sha1 is also registered with the weights store, so the pipeline's ``--weights
  imagenet`` finds the cached, verified file for an xrv backbone.
"""
import datetime
import glob
import logging
import os
import tempfile

import mxnet as mx

from mxvision import __version__
from mxvision.errors import DownloadError, WeightsError
from mxvision.io.download import download, locked_file
from mxvision.utils import file_digest, read_json, write_json
from mxvision.models import store
from mxvision.io.torchfile.reader import byte_limit_for, load_torch_file
from mxvision.models.registry import get_model_config, is_registered, register_model
from mxvision.models.xrv.baseline_specs import BASELINES, BaselineWeights
from mxvision.models.xrv.common import BASE_URL_ENV, WEIGHTS, XRVWeights
from mxvision.runtime import parse_ctx

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".xrv.json"
SIDECAR_FORMAT = 1


# --------------------------------------------------------------------------- building
def get_any_spec(name):
    """The weights entry of ``name``: an 18-pathology classifier (:class:`XRVWeights`) or one of the
    other torchxrayvision models (:class:`BaselineWeights`); WeightsError naming all known ones."""
    spec = WEIGHTS.get(name) or BASELINES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise WeightsError(name, "unknown torchxrayvision weights; known: %s"
                           % ", ".join(sorted(list(WEIGHTS) + list(BASELINES))))
    return spec


def build_model(name_or_spec, output="scores", calibrated=True, apply_sigmoid=None):
    """An uninitialised network for a weights name (architecture, targets, op_threshs from the table).

    The architecture is the network class the name's registry entry holds: :mod:`.densenet` and
    :mod:`.resnet` register their weights names (:mod:`mxvision.models.zoo` imports both).
    """
    spec = (name_or_spec if isinstance(name_or_spec, (XRVWeights, BaselineWeights))
            else get_any_spec(name_or_spec))
    if getattr(spec, "refused", None):
        raise WeightsError(spec.name, spec.refused)
    if not is_registered(spec.name):
        raise WeightsError(spec.name, "no network is registered for these weights yet; build it "
                           "through mxvision.models.zoo.get_model")
    network = get_model_config(spec.name).network
    if apply_sigmoid is None:  # the network's own default: torchxrayvision's baseline classes differ
        apply_sigmoid = getattr(network, "APPLY_SIGMOID", False)
    return network(spec, output=output, calibrated=calibrated, apply_sigmoid=apply_sigmoid)


def load_model(name, weights="pretrained", output="scores", calibrated=True, apply_sigmoid=None,
               ctx=None, root=None, progress=True, thresholds=None):
    """A ready network: ``weights`` is ``"pretrained"`` (download + convert + cache
    torchxrayvision's release file), ``"none"`` (random, seeded), or a path (``.pt`` or ``.params``);
    ``thresholds``: a file of ``mxvision xrv calibrate`` whose op_threshs replace the published ones
    (:func:`mxvision.models.xrv.thresholds.apply_thresholds`)."""
    ctx = ctx or mx.cpu()
    net = build_model(name, output=output, calibrated=calibrated, apply_sigmoid=apply_sigmoid).for_context(ctx)
    spec_text = "pretrained" if weights is None else str(weights)
    if spec_text.lower() in ("pretrained", "default", "xrv"):
        supplied = getattr(net.spec, "supplied_by_user", None)
        if supplied:
            raise WeightsError(name, supplied)
        path, info = fetch_weights(name, root=root, progress=progress)
        net.load_parameters(path, ctx=ctx, ignore_extra=output != "scores")
        net.weights_info = info
    elif spec_text.lower() in ("none", "random"):
        net.init_random(ctx=ctx)
    else:
        net.load_weights_file(spec_text, ctx=ctx)
    if thresholds is not None:
        from mxvision.models.xrv.thresholds import apply_thresholds
        apply_thresholds(net, thresholds)
    return net


def make_factory(name, cuts):
    """The model-registry factory for one weights name (``cuts``: backbone cut name -> model output).

    * classifier: ``get_model(name)`` downloads/converts/caches the release weights (like
      torchxrayvision's ``get_model``); ``weights``: None (those published weights), ``"none"``
      (random, seeded) or the path of a ``.pt``/``.params`` file (``weights_file=PATH`` and
      ``pretrained=False`` say the same); ``calibrated``, ``apply_sigmoid`` (None: the network's
      ``APPLY_SIGMOID``, False unless its torchxrayvision class applies one by default); ``output``:
      ``"scores"`` or one of the architecture's feature outputs; ``ctx`` as ``--ctx`` takes it;
      ``thresholds``: a thresholds JSON of ``mxvision xrv calibrate`` (recalibrated op_threshs).
    * backbone (``cut`` given, as :func:`~mxvision.models.zoo.build_backbone` does): weights only
      from ``weights_file`` (else random, seeded by the caller), hybridized, on ``ctx``.
    """
    def factory(cut=None, weights_file=None, ctx=None, pretrained=True, weights=None, calibrated=True,
                apply_sigmoid=None, root=None, progress=True, output="scores", thresholds=None):
        if cut is not None:
            ctx = mx.cpu() if ctx is None else ctx
            if cut not in cuts:
                raise WeightsError(name, "unknown cut %r for a torchxrayvision backbone; use one of %s"
                                   % (cut, ", ".join(sorted(k for k in cuts if not k.startswith("stage")))))
            net = build_model(name, output=cuts[cut]).for_context(ctx)
            if weights_file is not None:
                net.load_weights_file(weights_file, ctx=ctx)
            else:
                net.init_random(ctx=ctx, seed=None)
            net.hybridize()
            return net
        if weights is None:
            weights = weights_file if weights_file is not None else ("pretrained" if pretrained else "none")
        return load_model(name, weights=weights, output=output, calibrated=calibrated,
                          apply_sigmoid=apply_sigmoid, ctx=parse_ctx(ctx), root=root, progress=progress,
                          thresholds=thresholds)
    factory.__name__ = "xrv_" + name.replace("-", "_")
    return factory


# --------------------------------------------------------------------------- download, convert, cache
def sidecar_path(name, root=None):
    return os.path.join(store.cache_dir(root), name + SIDECAR_SUFFIX)


def _verified_cached(name, root=None):
    """(params path, sidecar dict) when a converted file is cached and matches its sidecar, else None."""
    side = sidecar_path(name, root)
    if not os.path.isfile(side):
        return None
    try:
        meta = read_json(side)
        path = os.path.join(os.path.dirname(side), meta["params"]["file"])
        expected = meta["params"]["sha256"]
    except (ValueError, KeyError, TypeError, OSError):
        log.warning("%s: unreadable sidecar %s; converting the weights again", name, side)
        return None
    if not os.path.isfile(path):
        return None
    if file_digest(path, "sha256") != expected:
        log.warning("%s: cached weights %s do not match the sha256 in %s (corrupt or changed); "
                    "downloading and converting them again", name, path, side)
        return None
    return path, meta


def _info(meta, path):
    src = meta.get("source", {})
    return {"spec": "pretrained", "file": path, "sha1": meta["params"]["sha1"],
            "sha256": meta["params"]["sha256"], "source_url": src.get("url"),
            "source_sha256": src.get("sha256"),
            "description": "torchxrayvision %s weights (from %s, converted by mxvision; sha256 %s)"
                           % (meta["name"], src.get("file"), meta["params"]["sha256"][:12])}


def register_cached(root=None):
    """Register every verified converted file in the cache with the weights store (cheap: stats
    the sidecars; hashes only files that exist). Returns the names registered."""
    done = []
    folder = store.cache_dir(root)
    for side in glob.glob(os.path.join(folder, "*" + SIDECAR_SUFFIX)):
        name = os.path.basename(side)[:-len(SIDECAR_SUFFIX)]
        if name not in WEIGHTS and name not in BASELINES:
            continue
        try:
            meta = read_json(side)
            sha1 = meta["params"]["sha1"]
            if os.path.isfile(os.path.join(folder, meta["params"]["file"])):
                store.register_weights(name, sha1)
                done.append(name)
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return done


def fetch_weights(name, root=None, progress=True, retries=5, timeout=30, backoff=0.5):
    """``(path, info)`` of the verified Gluon ``.params`` for torchxrayvision weights ``name``.

    Downloads the release ``.pt`` (resuming, retrying) only when no verified conversion is cached,
    converts it with the restricted reader, and installs ``{name}-{sha1[:8]}.params`` plus its
    sidecar atomically. Concurrent first uses download once. Raises WeightsError naming the URL.
    """
    spec = get_any_spec(name)
    cached = _verified_cached(name, root)
    if cached is not None:
        store.register_weights(name, cached[1]["params"]["sha1"])
        return cached[0], _info(cached[1], cached[0])
    folder = store.cache_dir(root)
    try:
        os.makedirs(os.path.join(folder, "xrv-src"), exist_ok=True)
    except OSError as err:
        raise WeightsError(name, "cannot create the cache folder %s (%s); set MXVISION_CACHE"
                           % (folder, err.strerror or err)) from None
    lock = os.path.join(folder, "." + name + ".xrv.lock")
    try:
        with locked_file(lock):
            try:
                cached = _verified_cached(name, root)  # converted by another process meanwhile?
                if cached is None:
                    cached = _download_and_convert(spec, folder, progress, retries, timeout, backoff)
            finally:
                os.unlink(lock)
    except DownloadError as err:  # the lock file could not be created
        raise WeightsError(name, "%s; set MXVISION_CACHE to a writable folder" % err) from None
    path, meta = cached
    store.register_weights(name, meta["params"]["sha1"])
    return path, _info(meta, path)


def _download_and_convert(spec, folder, progress, retries, timeout, backoff):
    url = spec.url
    src = os.path.join(folder, "xrv-src", spec.file)
    try:
        download(url, src, retries=retries, timeout=timeout, backoff=backoff, progress=progress, resume=False)
    except DownloadError as err:
        raise WeightsError(spec.name, "could not download %s (%s); set %s to a mirror of torchxrayvision's "
                           "release files, or pass a local .pt file (weights=PATH, --weights PATH)"
                           % (url, err.problem, BASE_URL_ENV)) from None
    try:
        src_sha256 = file_digest(src, "sha256")
        src_bytes = os.path.getsize(src)
        net = build_model(spec)
        try:
            limit = byte_limit_for(net.expected_weights_bytes())
            net.load_torch_state_dict(load_torch_file(src, max_bytes=limit), source=url)
        except WeightsError as err:
            raise WeightsError(spec.name, "the file from %s is not usable: %s" % (url, err.problem)) from None
        fd, tmp = tempfile.mkstemp(prefix=".%s." % spec.name, suffix=".params.tmp", dir=folder)
        os.close(fd)
        try:
            net.save_parameters(tmp)
            sha1, sha256 = file_digest(tmp, "sha1"), file_digest(tmp, "sha256")
            final = os.path.join(folder, "%s-%s.params" % (spec.name, sha1[:8]))
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = {
            "format": SIDECAR_FORMAT, "name": spec.name, "arch": spec.arch, "resolution": spec.resolution,
            "source": {"url": url, "file": spec.file, "bytes": src_bytes, "sha256": src_sha256,
                       "verified": False,
                       "note": "torchxrayvision publishes no checksums: this is the sha256 of the file as "
                               "downloaded (trust on first use); its tensors were checked against the "
                               "architecture one by one"},
            "params": {"file": os.path.basename(final), "sha1": sha1, "sha256": sha256},
            "tensors": len(net.expected_torch_keys()),
            "converted_by": "mxvision %s" % __version__,
            "converted_at": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        old = _old_params(spec.name, folder, keep=os.path.basename(final))
        write_json(os.path.join(folder, spec.name + SIDECAR_SUFFIX), meta)
        for stale in old:
            os.unlink(stale)
        log.info("%s: converted %s into %s", spec.name, url, final)
        return final, meta
    finally:
        if os.path.exists(src):
            os.unlink(src)  # the .params is what is kept; the .pt is fetched again if ever needed


def _old_params(name, folder, keep):
    return [p for p in glob.glob(os.path.join(folder, glob.escape(name) + "-????????.params"))
            if os.path.basename(p) != keep]


try:  # make cached conversions known to the store (for the pipeline's `--weights imagenet`)
    register_cached()
except Exception:  # pragma: no cover - a broken cache must never break importing mxvision
    log.debug("could not scan the weights cache for torchxrayvision conversions", exc_info=True)


def register_weights_of(network, backbone_cuts):
    """Register one model per torchxrayvision weights name whose architecture is ``network``'s:
    the same network class, each with its own preset and outputs (``backbone_cuts``: cut name ->
    model output; the pipeline's default ResNet cut name maps to ``features``)."""
    from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, weights_licence

    for name, spec in WEIGHTS.items():
        if spec.arch == network.ARCH:
            register_model(
                name, family="xrv", preset=spec.preset, network=network, outputs=DEFAULT_PATHOLOGIES,
                cuts=tuple(k for k in backbone_cuts if not k.startswith("stage")), default_cut="features",
                licence=weights_licence(name), source="https://github.com/mlmed/torchxrayvision",
                description="torchxrayvision %s: %s" % (name, spec.description))(make_factory(name, backbone_cuts))


def register_baselines_of(network, backbone_cuts=None):
    """Register each of torchxrayvision's other models (:data:`.baseline_specs.BASELINES`) whose
    architecture is ``network``'s, with its own preset, outputs, licence and source. ``backbone_cuts``
    (cut name -> model output) makes it a backbone of the feature pipeline, as for the classifiers."""
    cuts = dict(backbone_cuts or {})
    listed = tuple(k for k in cuts if not k.startswith("stage"))  # the pipeline's default-cut alias stays hidden
    for name, spec in BASELINES.items():
        if spec.arch == network.ARCH:
            register_model(
                name, family="xrv-other", preset=spec.preset, network=network, outputs=spec.targets,
                cuts=listed, default_cut=next(iter(listed), None), licence=spec.licence, source=spec.source,
                description="torchxrayvision %s: %s" % (spec.xrv_class, spec.description))(make_factory(name, cuts))
