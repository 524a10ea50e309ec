"""The one model registry: every network mxvision can build, by name, with what it needs to know.

A family module (the model-zoo ResNets, the Xvision head, the torchxrayvision ports, the nodule
detector's network, GluonCV's classification networks) registers a factory under each of its
names with :func:`register_model`, timm-style, together with the facts the rest of the package
asks about a model: the preprocessing preset its weights were trained with, its named cut points,
its default cut, its outputs where they are known, and the name its pretrained weights have in the
weights store. Nothing here imports a family (it is a leaf: standard library and
:mod:`mxvision.errors` only), so a family can import it without a cycle; :mod:`mxvision.models.zoo`
imports every family, and so is the place that sees them all registered.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

from mxvision.errors import WeightsError

__all__ = ["ModelConfig", "register_model", "get_model_config", "list_models", "list_families",
           "is_registered"]


@dataclass(frozen=True)
class ModelConfig:
    """What the registry knows about one model.

    ``factory(**kwargs)`` builds it (backbones take ``cut``, ``weights_file`` and ``ctx``).
    ``preset`` names the :mod:`mxvision.data.transforms` preprocessing the weights expect (None
    when the model has no image input of its own, like a head). ``cuts`` are the named layers a
    backbone can be cut at and ``default_cut`` the one used when none is asked for; a model
    without cuts is not a backbone. ``outputs`` names the outputs when they are fixed (the 18
    pathologies of a torchxrayvision model). ``weights`` is the name of its pretrained weights in
    :mod:`mxvision.models.store`; ``weights_sha1``, when given, returns the full sha1 its family's
    own store pins for them -- a callable, so that a slow import waits until weights are needed.
    ``network`` is the network class when several names share one (torchxrayvision: one class
    per architecture, one name per set of weights). ``licence`` and ``source`` say under what
    terms the pretrained weights come and from where (printed once by ``get_model``).
    """

    name: str
    family: str
    factory: Callable[..., Any]
    preset: Optional[str] = None
    cuts: Tuple[str, ...] = ()
    default_cut: Optional[str] = None
    outputs: Tuple[str, ...] = ()
    weights: Optional[str] = None
    weights_sha1: Optional[Callable[[], str]] = field(default=None, compare=False)
    network: Optional[type] = field(default=None, compare=False)
    description: str = ""
    licence: str = ""
    source: str = ""

    @property
    def is_backbone(self):
        """True when the model can be cut into a feature extractor (it has named cut points)."""
        return bool(self.cuts)


_CONFIGS = {}


def register_model(name, *, family, preset=None, cuts=(), default_cut=None, outputs=(), weights=None,
                   weights_sha1=None, network=None, description="", licence="", source=""):
    """Decorator registering ``factory`` under ``name``; returns the factory unchanged.

    ``weights`` defaults to ``name``. Two families claiming one name is a programming error and
    raises ValueError, as does a ``default_cut`` that is not one of ``cuts``; a family
    registering a name again (a reloaded module) replaces its entry.
    """
    cuts = tuple(cuts)
    if default_cut is not None and default_cut not in cuts:
        raise ValueError("default cut %r of %r is not one of its cuts" % (default_cut, name))

    def decorator(factory):
        if name in _CONFIGS and _CONFIGS[name].family != family:
            raise ValueError("model %r is already registered by the %s family"
                             % (name, _CONFIGS[name].family))
        _CONFIGS[name] = ModelConfig(
            name=name, family=family, factory=factory, preset=preset, cuts=cuts,
            default_cut=default_cut, outputs=tuple(outputs), weights=weights or name,
            weights_sha1=weights_sha1, network=network, description=description, licence=licence,
            source=source)
        return factory

    return decorator


def get_model_config(name):
    """The :class:`ModelConfig` registered under ``name``, or WeightsError naming the known ones."""
    try:
        return _CONFIGS[name]
    except (KeyError, TypeError):
        raise WeightsError(name, "unknown model; known: %s" % ", ".join(list_models())) from None


def is_registered(name):
    return name in _CONFIGS


def list_models(family=None, backbones_only=False):
    """Sorted registered names, optionally of one ``family`` and/or only backbones."""
    return sorted(n for n, c in _CONFIGS.items()
                  if (family is None or c.family == family) and (c.is_backbone or not backbones_only))


def list_families():
    return sorted({c.family for c in _CONFIGS.values()})
