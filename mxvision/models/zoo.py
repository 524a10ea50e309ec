"""One registry for every network mxvision builds: ``get_model(name, **kwargs)``.

Backbones (feature extractors) and heads are registered here; each model family lives in its own
module and registers a factory. ``build_backbone`` adds the weight resolution users expect
(``imagenet`` from the verified store, a local file, or random weights only when allowed) and
reports exactly which weights were used, so every figure can say what it came from.
"""
import logging

import mxnet as mx

from mxvision.runtime import parse_ctx
from mxvision.errors import WeightsError
from mxvision.models import resnet_trunk
from mxvision.models import store
from mxvision.models.head import XvisionHead

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "resnet50_v2"
DEFAULT_CUT = "stage4_unit2_relu1"
RANDOM_SEED = 0

_BACKBONES = {}
_MODELS = {}


def register_backbone(name, factory):
    """Register ``factory(cut=..., weights_file=..., ctx=...) -> HybridBlock`` under ``name``."""
    _BACKBONES[name] = factory
    _MODELS[name] = factory


def register_model(name, factory):
    _MODELS[name] = factory


def list_models():
    return sorted(_MODELS)


def list_backbones():
    return sorted(_BACKBONES)


def get_model(name, **kwargs):
    """Build a registered network by name (GluonCV-style)."""
    if name not in _MODELS:
        raise WeightsError(name, f"unknown model; known: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def _resnet_factory(model_name):
    def factory(cut=DEFAULT_CUT, weights_file=None, ctx=None, **kwargs):
        return resnet_trunk.get_backbone(model_name, cut=cut, weights_file=weights_file, ctx=ctx, **kwargs)
    return factory


for _name in resnet_trunk.SUPPORTED_MODELS:
    register_backbone(_name, _resnet_factory(_name))
register_model("xvision_head", lambda classes=2, **kw: XvisionHead(classes=classes, **kw))


def check_backbone(name):
    if name not in _BACKBONES:
        raise WeightsError(name, f"unknown backbone; known: {', '.join(list_backbones())}")


def build_backbone(name=DEFAULT_BACKBONE, cut=DEFAULT_CUT, weights="imagenet", ctx=None,
                   allow_random=False):
    """Return ``(network, weights_info)`` for a backbone, initialised on ``ctx``.

    ``weights`` is ``"imagenet"`` (the verified model-store file), ``"none"`` (random, seeded) or a
    path to a params file. When ImageNet weights cannot be had, the error says so; only with
    ``allow_random=True`` does extraction go on with random weights, and ``weights_info`` records it.
    """
    check_backbone(name)
    ctx = parse_ctx(ctx)
    spec = "none" if weights in (None, "", "none", "random") else str(weights)
    weights_file = None
    if spec != "none":
        try:
            weights_file = store.resolve_weights(spec, name)
        except WeightsError as err:
            if not allow_random:
                raise WeightsError(err.subject, f"{err.problem}; or use random weights "
                                   "(--weights none / --allow-random-weights)") from None
            log.warning("%s — continuing with RANDOM backbone weights as allowed", err)
            spec = "none"
    if weights_file is None:
        mx.random.seed(RANDOM_SEED)  # random weights must be reproducible for export/predict
    net = get_model(name, cut=cut, weights_file=weights_file, ctx=ctx)
    info = {
        "spec": spec,
        "file": str(weights_file) if weights_file else None,
        "sha1": store.file_sha1(weights_file) if weights_file else None,
        "random_seed": None if weights_file else RANDOM_SEED,
        "description": (f"{name} weights from {weights_file}" if weights_file
                        else f"{name} with RANDOM weights (seed {RANDOM_SEED}) — no pretrained weights"),
    }
    return net, info


def load_backbone_file(name, cut, weights_file, ctx=None):
    """Rebuild a backbone from an exact weights file (full model-zoo file or a saved trunk)."""
    check_backbone(name)
    return get_model(name, cut=cut, weights_file=weights_file, ctx=parse_ctx(ctx))

from mxvision.models import nodule_net
from mxvision.models.xrv import densenet as xrv_densenet
from mxvision.models.xrv import resnet as xrv_resnet  # noqa: E402,F401 (registers them)
