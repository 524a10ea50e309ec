"""GluonCV's model-zoo classification networks as backbones, by their GluonCV names.

GluonCV publishes ImageNet-trained networks that MXNet's own model zoo lacks: ResNet v1b/v1d (the
stride on the 3x3 convolution; v1d also a deep stem and average-pool shortcuts), MobileNetV3, ...
Registering them here lets every step of the pipeline use them exactly like the model-zoo
ResNets: ``extract_features(backbone="resnet50_v1d", cut="stage3")``, ``--backbone
mobilenetv3_large``. The default backbone stays MXNet's ResNet-50 v2 (:mod:`.resnet_trunk`).

How a network is cut: GluonCV builds the whole network (``gluoncv.model_zoo.get_model(name,
pretrained=False)``; gluoncv is imported only then, it is slow to import) and the trunk keeps its
child blocks up to the cut *under the same attribute names*, so the structural parameter keys of
the trunk are those of the whole network (``layer3.0.conv1.weight``, ``features.8.0.bn.gamma``).
A params file of the whole network (GluonCV's ImageNet file) and a saved trunk therefore both
load by key lookup; what lies past the cut (and the classifier) is not part of the trunk.

Cut points, the same names for every network (shapes at 224x224, measured by
``tests/models/test_gluoncv_zoo.py``): ``stage1``..``stage4`` end the stride-4, 8, 16 and 32
parts of the network (``stage4`` is its final map, after the last BatchNorm and activation:
ResNet-50 (2048, 7, 7), DenseNet-121 (1024, 7, 7), MobileNetV3-Large (960, 7, 7)); ``pool`` is the
vector the classifier sees ((2048,), (1024,), (1280,)). The default is ``stage4``; the pipeline's
default cut name (``stage4_unit2_relu1``, a model-zoo ResNet layer) stands for it, as for the
torchxrayvision backbones.

ImageNet weights (``weights="imagenet"``) come from GluonCV's own store: its repository layout
(``$MXNET_GLUON_REPO/gluon/models/{name}-{sha1[:8]}.zip``), its file names and its sha1 table,
fetched and verified by :mod:`mxvision.models.store` (the same mechanism as MXNet's model zoo:
resumable download, a wrong file never installed, one-line errors), into the cache folder GluonCV
uses (``$MXNET_HOME/models``, unless ``$MXVISION_CACHE`` says otherwise), so a file either of
them fetched serves both.
"""
import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from mxvision.errors import MxvisionError
from mxvision.runtime import compat
from mxvision.models.registry import register_model
from mxvision.models import resnet_trunk
from mxvision.models.resnet_trunk import ctx_list, load_params_by_key

FAMILY = "gluoncv"
PRESET = "imagenet224"
DEFAULT_CUT = "stage4"
PIPELINE_DEFAULT_CUT = resnet_trunk.DEFAULT_CUT  # the pipeline's default: means DEFAULT_CUT here
CUTS = ("stage1", "stage2", "stage3", "stage4", "pool")
_RESNET_PIECES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class Layout:
    """Where a GluonCV network's cut points are.

    ``container``: None when the pieces are the network's own attributes (``_RESNET_PIECES``),
    else the attribute whose sequential children they are (``"features"``). ``ends``: cut ->
    number of pieces kept. ``stem``: pieces before stage 1. ``pool``: what ``pool`` adds after
    its pieces (``"avg"``: global average then flatten; ``"flatten"``: the network pools itself).
    """

    container: Optional[str]
    ends: Dict[str, int]
    stem: int
    pool: str

    def stage_starts(self):
        """Index of the first piece of stage 1..4 (fine-tuning splits there)."""
        return [self.stem] + [self.ends["stage%d" % s] for s in (1, 2, 3)]


_RESNET = Layout(None, {"stage1": 5, "stage2": 6, "stage3": 7, "stage4": 8, "pool": 8}, 4, "avg")
# features children (see the test): DenseNet: conv, bn, relu, pool, block1, trans1, ..., block4,
# bn, relu, AvgPool2D(7), flatten -- its fixed 7x7 pool is replaced by a global one;
# MobileNetV3: conv, bn, hswish, units..., 1x1 conv, bn, hswish, global pool, 1x1 conv, hswish, dropout.
LAYOUTS = {
    "resnet18_v1b": _RESNET,
    "resnet50_v1b": _RESNET,
    "resnet50_v1d": _RESNET,
    "densenet121": Layout("features", {"stage1": 5, "stage2": 7, "stage3": 9, "stage4": 13, "pool": 13},
                          4, "avg"),
    "mobilenetv3_large": Layout("features", {"stage1": 6, "stage2": 9, "stage3": 15, "stage4": 21,
                                             "pool": 24}, 3, "flatten"),
    "mobilenetv3_small": Layout("features", {"stage1": 4, "stage2": 6, "stage3": 11, "stage4": 17,
                                             "pool": 20}, 3, "flatten"),
}
# (C, H, W) of each cut at 224x224 (``pool``: (C,)); the test checks every entry.
SHAPES_224: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "resnet18_v1b": {"stage1": (64, 56, 56), "stage2": (128, 28, 28), "stage3": (256, 14, 14),
                     "stage4": (512, 7, 7), "pool": (512,)},
    "resnet50_v1b": {"stage1": (256, 56, 56), "stage2": (512, 28, 28), "stage3": (1024, 14, 14),
                     "stage4": (2048, 7, 7), "pool": (2048,)},
    "densenet121": {"stage1": (256, 56, 56), "stage2": (512, 28, 28), "stage3": (1024, 14, 14),
                    "stage4": (1024, 7, 7), "pool": (1024,)},
    "mobilenetv3_large": {"stage1": (24, 56, 56), "stage2": (40, 28, 28), "stage3": (112, 14, 14),
                          "stage4": (960, 7, 7), "pool": (1280,)},
    "mobilenetv3_small": {"stage1": (16, 56, 56), "stage2": (24, 28, 28), "stage3": (48, 14, 14),
                          "stage4": (576, 7, 7), "pool": (1280,)},
}
SHAPES_224["resnet50_v1d"] = SHAPES_224["resnet50_v1b"]


def resolve_cut(name, cut):
    """The cut point ``cut`` names for GluonCV network ``name`` (None and the pipeline's default
    mean :data:`DEFAULT_CUT`), or MxvisionError listing the valid ones."""
    if cut is None or cut == PIPELINE_DEFAULT_CUT:
        return DEFAULT_CUT
    if cut not in CUTS:
        raise MxvisionError(cut, "not a cut point of %s; valid: %s (default %s)"
                            % (name, ", ".join(CUTS), DEFAULT_CUT))
    return cut


def build_network(name):
    """GluonCV's whole classification network ``name``, uninitialised (random layers, no download)."""
    compat.import_gluoncv()  # slow import: only when used; works beside torch >= 2
    from gluoncv.model_zoo import get_model as gluoncv_get_model

    return gluoncv_get_model(name, pretrained=False)


def gluoncv_sha1(name):
    """The full sha1 GluonCV's model store pins for ``name``'s ImageNet weights."""
    compat.import_gluoncv()
    from gluoncv.model_zoo import model_store

    return model_store._model_sha1[name]  # GluonCV's table; only its short form is public


class GluonCVTrunk(HybridBlock):
    """A GluonCV classification network cut at a named point (see the module docstring).

    BatchNorm uses its running statistics unless called under ``autograd.record(train_mode=True)``.
    """

    def __init__(self, name, cut=DEFAULT_CUT, **kwargs):
        super().__init__(**kwargs)
        if name not in LAYOUTS:
            raise MxvisionError(name, "not a registered GluonCV network; known: %s" % ", ".join(sorted(LAYOUTS)))
        self.arch, self.cut = name, resolve_cut(name, cut)
        self.layout = LAYOUTS[name]
        self.out_shape_224 = SHAPES_224[name][self.cut]
        keep = self.layout.ends[self.cut]
        with self.name_scope():
            full = build_network(name)
        if self.layout.container is None:
            self._pieces = list(_RESNET_PIECES[:keep])
            for attr in self._pieces:
                setattr(self, attr, getattr(full, attr))  # same attribute: same parameter keys
        else:
            children = list(getattr(full, self.layout.container)._children.values())
            container = nn.HybridSequential(prefix="")
            for block in children[:keep]:
                container.add(block)
            setattr(self, self.layout.container, container)
            self._pieces = [self.layout.container]

    def blocks(self):
        """The kept pieces of the network, in order (calling them in turn gives the map)."""
        if self.layout.container is None:
            return [getattr(self, attr) for attr in self._pieces]
        return list(getattr(self, self.layout.container)._children.values())

    def finish(self, F, x):
        """What the cut adds after the pieces: pooling/flattening for ``pool``, else nothing."""
        if self.cut != "pool":
            return x
        if self.layout.pool == "avg":
            x = F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg")
        return F.flatten(x)

    def hybrid_forward(self, F, x):
        for attr in self._pieces:
            x = getattr(self, attr)(x)
        return self.finish(F, x)

    def split_stages(self, stages):
        """Split for fine-tuning, like :meth:`ResNetTrunk.split_stages`: ``(frozen_blocks,
        trainable_blocks, finish)`` where the trainable part is the last ``stages`` stages kept."""
        blocks = self.blocks()
        starts = [s for s in self.layout.stage_starts() if s < len(blocks)]
        if not 1 <= stages <= len(starts):
            raise MxvisionError("stages=%s" % stages, "%s cut at %s has %d stages to fine-tune"
                                % (self.arch, self.cut, len(starts)))
        k = starts[-stages]
        return blocks[:k], blocks[k:], lambda x: self.finish(mx.nd, x)

    def param_keys(self):
        """Structural parameter keys -> Parameter, as in a ``save_parameters`` file of the whole net."""
        return self._collect_params_with_prefix()


def get_backbone(name, cut=DEFAULT_CUT, weights_file=None, ctx=None, hybridize=True):
    """A ready :class:`GluonCVTrunk` on ``ctx`` (default CPU).

    ``weights_file``: a ``save_parameters`` file of the whole network (GluonCV's ImageNet file) or
    of a saved trunk; without it the weights are He-initialised (BatchNorm 1/0/0/1) and a small
    forward pass fixes the deferred shapes, so the parameters can be saved at once.
    """
    ctx = ctx_list(ctx)
    trunk = GluonCVTrunk(name, cut)
    if weights_file is not None:
        load_params_by_key(trunk, weights_file, name, ctx)
    else:
        trunk.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx)
        trunk(mx.nd.zeros((1, 3, 64, 64), ctx=ctx[0]))  # 64 px, not less: see resnet_trunk.get_backbone
    if hybridize:
        trunk.hybridize()
    return trunk


def _factory(name):
    def factory(cut=DEFAULT_CUT, weights_file=None, ctx=None, hybridize=True):
        return get_backbone(name, cut=cut, weights_file=weights_file, ctx=ctx, hybridize=hybridize)
    factory.__name__ = "gluoncv_" + name.replace(".", "_")
    factory.__doc__ = "GluonCV's %s cut at ``cut`` (%s; default %s)." % (name, ", ".join(CUTS), DEFAULT_CUT)
    return factory


for _name in LAYOUTS:
    register_model(_name, family=FAMILY, preset=PRESET, cuts=CUTS, default_cut=DEFAULT_CUT,
                   weights_sha1=functools.partial(gluoncv_sha1, _name),
                   description="GluonCV model zoo %s (ImageNet)" % _name)(_factory(_name))
