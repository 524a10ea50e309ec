"""What torchxrayvision's other models share in MXNet: the base block, input scalings, the refusal.

Each of torchxrayvision's segmentation, autoencoder, baseline and covariate models
(:mod:`.baseline_specs`) takes the same input as its classifiers -- (N, 1, H, W) in
[-1024, 1024] -- resizes it to its own resolution (``fix_resolution``) and warns on a wrong range
(``warn_normalization``), then rescales it its own way: ``(x + 1024) / 2048`` then ImageNet's
mean/std on three repeated channels (PSPNet, the view and race models), ``* 255`` on top
(the sex model), or ``x / 512`` (the CheXpert DenseNets). :class:`BaselineModel` is
:class:`~.common.XRVModel`'s checks and weights loading (the restricted ``.pt`` reader, tensor
by tensor) without the 18 pathologies and their operating points; the scalings below are
functions of ``F`` so they stay inside a hybridized, exported graph.
"""
from mxvision.errors import WeightsError
from mxvision.models.registry import register_model
from mxvision.models.xrv.baseline_specs import BASELINES
from mxvision.models.xrv.common import XRVModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_spec(arch):
    """The (first) table entry of architecture ``arch``."""
    for spec in BASELINES.values():
        if spec.arch == arch:
            return spec
    raise WeightsError(arch, "no torchxrayvision model of this architecture")


def unit_range(F, x):
    """[-1024, 1024] -> [0, 1], as ``(x + 1024) / 2048``."""
    return (x + 1024.0) / 2048.0


def three_channels(F, x):
    """``x.repeat(1, 3, 1, 1)``: the grey channel three times."""
    return F.concat(x, x, x, dim=1)


def imagenet_channels(F, x):
    """``Normalize(IMAGENET_MEAN, IMAGENET_STD)(x.repeat(1, 3, 1, 1))`` of a 1-channel [0, 1] batch.

    Channel by channel with scalars, the same arithmetic as torchvision's ``(x - mean) / std``,
    so no constant tensor has to live in the graph or the weights file.
    """
    return F.concat(*[(x - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dim=1)


class BaselineModel(XRVModel):
    """Base of torchxrayvision's other models: ``prepare`` resizes and checks like torchxrayvision,
    ``hybrid_forward`` (the subclass's) rescales and runs the network; no operating points.

    ``output="scores"`` gives what torchxrayvision's ``forward`` returns (logits, log-probabilities
    or masks as the model defines); a subclass lists other outputs in ``OUTPUTS``.
    """

    ARCH = None
    OUTPUTS = ("scores",)

    def __init__(self, spec=None, output="scores", calibrated=False, apply_sigmoid=False, **kwargs):
        spec = spec if spec is not None else default_spec(self.ARCH)
        super().__init__(spec, output=output, calibrated=False, apply_sigmoid=apply_sigmoid, **kwargs)
        self.targets = list(spec.targets)
        self.pathologies = self.targets
        self.licence, self.source = spec.licence, spec.source

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, self.weights)


def register_refused(name):
    """Register a model whose weights mxvision will not read, so that it is listed (with its
    licence) and ``get_model`` answers with the reason in one line instead of 'unknown model'."""
    spec = BASELINES[name]

    def refuse(**_kwargs):
        raise WeightsError(name, spec.refused)

    register_model(name, family="xrv-other", preset=spec.preset, outputs=spec.targets, licence=spec.licence,
                   source=spec.source, description="torchxrayvision %s: %s (not readable: %s)"
                   % (spec.xrv_class, spec.description, "TorchScript"))(refuse)


register_refused("riken-age")
