"""Every network mxvision builds, by name: ``get_model(name, **kwargs)``.

The model families register themselves in :mod:`mxvision.models.registry` (a leaf module); this
module imports all of them on first use (so ``import mxvision`` and ``mxv.get_model`` stay free of
MXNet until a network is built or listed), and adds what
users of a backbone need: ``build_backbone`` resolves the weights (``imagenet`` from the verified
store, a local file, or random weights only when allowed) and reports exactly which weights were
used, so every figure can say what it came from.

The families: MXNet's model-zoo ResNets (:mod:`.resnet_trunk`, the default backbone), GluonCV's
classification networks (:mod:`.gluoncv_zoo`), the torchxrayvision ports (:mod:`.xrv`), the
Xvision head (:mod:`.head`) and the nodule detector's network (:mod:`.nodule_net`).
"""
import functools
import importlib
import logging
import sys

from mxvision.errors import WeightsError
from mxvision.models import registry
from mxvision.models.registry import ModelConfig, register_model
from mxvision.runtime import parse_ctx
from mxvision.utils import file_digest

__all__ = ["get_model", "list_models", "list_backbones", "list_families", "get_model_config",
           "register_model", "ModelConfig", "build_backbone", "load_backbone_file", "check_backbone",
           "default_preset", "DEFAULT_BACKBONE", "DEFAULT_CUT", "DEFAULT_PRESET", "RANDOM_SEED"]

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "resnet50_v2"  # Xvision's network: MXNet model-zoo ResNet-50 v2 (resnet_trunk)
DEFAULT_CUT = "stage4_unit2_relu1"  # ... cut where Xvision took its CNN codes
DEFAULT_PRESET = "imagenet224"
RANDOM_SEED = 0


@functools.lru_cache(maxsize=None)
def family_modules():
    """Import every model family once, for what it registers; returns the modules.

    Deferred to the first lookup because the families import MXNet (about a second), which a
    lookup of ``mxv.get_model`` or the CLI's ``--help`` should not pay for.
    """
    return tuple(importlib.import_module(module) for module in FAMILY_MODULES)


#: every module that registers models, one per line (a new family adds its line here)
FAMILY_MODULES = (
    "mxvision.models.resnet_trunk",
    "mxvision.models.gluoncv_zoo",
    "mxvision.models.xrv.densenet",
    "mxvision.models.xrv.resnet",
    "mxvision.models.xrv.baseline",
    "mxvision.models.xrv.jfhealthcare",
    "mxvision.models.xrv.chexpert_ensemble",
    "mxvision.models.xrv.pspnet",
    "mxvision.models.xrv.autoencoder",
    "mxvision.models.xrv.covariates",
    "mxvision.models.head",
    "mxvision.models.nodule_net",
)


def get_model_config(name):
    """The registry entry of ``name`` (its family, input preset, cut points, weights naming)."""
    family_modules()
    return registry.get_model_config(name)


def list_families():
    """Sorted names of the model families."""
    family_modules()
    return registry.list_families()


def list_models(family=None):
    """Sorted names of every registered model (optionally of one family: see list_families())."""
    family_modules()
    return registry.list_models(family)


def list_backbones(family=None):
    """Sorted names of the models that can be cut into a feature extractor."""
    family_modules()
    return registry.list_models(family, backbones_only=True)


def get_model(name, **kwargs):
    """Build a registered network by name (GluonCV-style); ``kwargs`` go to its factory.

    Backbones take ``cut``, ``weights_file`` and ``ctx``; a torchxrayvision name without ``cut``
    gives the ready classifier (``weights``, ``calibrated``, ``apply_sigmoid``, ``output``,
    ``ctx``, ``root``, ``progress``: see :func:`mxvision.models.xrv.weights.make_factory`).
    The first build of a model whose weights carry licence terms prints them once (stderr), so
    nobody deploys non-commercial weights without having been told.
    """
    config = get_model_config(name)
    _tell_licence(config)
    return config.factory(**kwargs)


_LICENCES_TOLD = set()


def _tell_licence(config):
    if config.licence and config.name not in _LICENCES_TOLD:
        _LICENCES_TOLD.add(config.name)
        print("mxvision: %s weights -- licence: %s; source: %s" % (config.name, config.licence, config.source),
              file=sys.stderr)


def check_backbone(name):
    """The registry entry of backbone ``name``, or WeightsError listing the backbones."""
    try:
        config = get_model_config(name)
    except WeightsError:
        config = None
    if config is None or not config.is_backbone:
        raise WeightsError(name, f"unknown backbone; known: {', '.join(list_backbones())}")
    return config


def default_preset(name):
    """The preprocessing preset ``name``'s weights were trained with (its registry entry says);
    ImageNet's for a name the registry does not know or that has no image input of its own."""
    try:
        return get_model_config(name).preset or DEFAULT_PRESET
    except WeightsError:
        return DEFAULT_PRESET


def _pin_family_weights(config):
    """Let the store know the sha1 a family's own store pins (GluonCV), unless already pinned
    (a mirror's or a test's own registration wins)."""
    from mxvision.models import store

    if config.weights_sha1 is not None and store.pinned_sha1(config.weights) is None:
        store.register_weights(config.weights, config.weights_sha1())


def build_backbone(name=DEFAULT_BACKBONE, cut=DEFAULT_CUT, weights="imagenet", ctx=None,
                   allow_random=False):
    """Return ``(network, weights_info)`` for a backbone, initialised on ``ctx``.

    ``weights`` is ``"imagenet"`` (the verified model-store file), ``"none"`` (random, seeded) or a
    path to a params file. When ImageNet weights cannot be had, the error says so; only with
    ``allow_random=True`` does extraction go on with random weights, and ``weights_info`` records it.
    """
    import mxnet as mx

    from mxvision.models import store

    config = check_backbone(name)
    ctx = parse_ctx(ctx)
    spec = "none" if weights in (None, "", "none", "random") else str(weights)
    weights_file = None
    if spec != "none":
        try:
            _pin_family_weights(config)
            weights_file = store.resolve_weights(spec, config.weights)
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
        "sha1": file_digest(weights_file, "sha1") if weights_file else None,
        "random_seed": None if weights_file else RANDOM_SEED,
        "description": (f"{name} weights from {weights_file}" if weights_file
                        else f"{name} with RANDOM weights (seed {RANDOM_SEED}) — no pretrained weights"),
    }
    return net, info


def load_backbone_file(name, cut, weights_file, ctx=None):
    """Rebuild a backbone from an exact weights file (full model-zoo file or a saved trunk)."""
    check_backbone(name)
    return get_model(name, cut=cut, weights_file=weights_file, ctx=parse_ctx(ctx))
