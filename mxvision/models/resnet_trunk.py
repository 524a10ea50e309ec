"""The truncated ResNet backbone Xvision extracts its features from.

Xvision cut MXNet's classic ResNet-50 v2 at ``stage4_unit2_relu1`` (stem, stages 1-3, stage 4
unit 1, and unit 2's first BatchNorm + ReLU): a (N, 2048, 7, 7) map at 224x224 that keeps more
spatial detail than the pooled vector. This module builds the same cut from the Gluon model zoo
so that it can be trained, hybridized and exported like any Gluon block, and so that a model-zoo
params file of the *whole* network (``save_parameters`` format) can be poured into it.

Design choices, and why:

* The trunk re-uses the model-zoo network's own child blocks in the same positions
  (``features.<i>.<unit>.<layer>``), so the structural parameter keys of a full-net params file
  match the trunk's keys one to one and loading is a plain key lookup; everything past the cut
  (later units, the classifier) is simply not part of the trunk.
* The last op is emitted under a plain ``mx.name.NameManager`` so the exported symbol carries the
  *classic* literal name (``stage4_unit2_relu1_output``) instead of Gluon's prefixed
  ``resnettrunk0_...`` name; downstream code (and the classic checkpoint) find the layer by that
  name. Cuts at the end of a unit (``stage{S}_unit{U}``) end in a named ``identity`` op instead.
* BatchNorm epsilon is configurable because the classic checkpoint uses 2e-5 and the model zoo
  1e-5; converting weights between them is only exact with the matching epsilon.
"""
import re
from pathlib import Path

import mxnet as mx
from mxnet.gluon import HybridBlock, nn
from mxnet.gluon.model_zoo.vision import resnet as _zoo

from mxvision.errors import MxvisionError, WeightsError
from mxvision.models import store
from mxvision.models.registry import register_model

DEFAULT_ARCH = "resnet50_v2"
DEFAULT_CUT = "stage4_unit2_relu1"
DEFAULT_OUTPUT = DEFAULT_CUT + "_output"
DEFAULT_CHANNELS = 2048
GLUON_BN_EPS = 1e-5

ARCHS = tuple(f"resnet{d}_v{v}" for v in (2, 1) for d in sorted(_zoo.resnet_spec))
_ARCH_RE = re.compile(r"resnet(\d+)_v([12])")
_UNIT_RE = re.compile(r"stage(\d+)_unit(\d+)(?:_relu(\d+))?")
_STEM_LEN = {1: 4, 2: 5}  # features index of stage 1: v1 conv,bn,relu,pool; v2 adds bn_data


def parse_arch(name):
    """Return (version, depth) for a model-zoo ResNet name, or raise MxvisionError."""
    match = _ARCH_RE.fullmatch(str(name))
    if not match or int(match.group(1)) not in _zoo.resnet_spec:
        raise MxvisionError(name, f"unknown backbone; expected one of {', '.join(ARCHS)}")
    return int(match.group(2)), int(match.group(1))


def _relus_per_unit(version, bottleneck):
    """How many ReLUs a unit has before its residual add (v1's post-add ReLU is the unit end)."""
    if version == 2:
        return 3 if bottleneck else 2
    return 2 if bottleneck else 1


def valid_cuts(name=DEFAULT_ARCH):
    """Every cut point the given model-zoo ResNet supports, in network order."""
    version, depth = parse_arch(name)
    block_type, layers, _ = _zoo.resnet_spec[depth]
    kmax = _relus_per_unit(version, block_type == "bottle_neck")
    cuts = ["relu0"]
    for s, units in enumerate(layers, start=1):
        for u in range(1, units + 1):
            cuts += [f"stage{s}_unit{u}_relu{k}" for k in range(1, kmax + 1)]
            cuts.append(f"stage{s}_unit{u}")
    if version == 2:
        cuts.append("relu1")
    return cuts


def _cut_error(name, cut, version, layers, kmax):
    end = ", relu1 (end of the net)" if version == 2 else ""
    return MxvisionError(
        cut, f"not a cut point of {name}; valid: relu0 (stem){end}, stage{{S}}_unit{{U}} (end of "
        f"unit) or stage{{S}}_unit{{U}}_relu{{K}} with S=1..{len(layers)}, units per stage "
        f"{tuple(layers)}, K=1..{kmax} (default {DEFAULT_CUT}); see valid_cuts()")


def plan_cut(name, cut):
    """Describe where ``cut`` sits in the model-zoo net, validating it.

    Returns a dict: ``keep`` (number of whole ``features`` children), ``stage`` (1-based stage
    truncated next, or None), ``units`` (whole units kept in it), ``partial`` (number of
    BatchNorms kept from the following unit, or None), ``final`` ('relu' or 'identity') and
    ``channels`` (output channel count).
    """
    version, depth = parse_arch(name)
    block_type, layers, channels = _zoo.resnet_spec[depth]
    bottleneck = block_type == "bottle_neck"
    kmax = _relus_per_unit(version, bottleneck)
    stem = _STEM_LEN[version]
    plan = dict(keep=0, stage=None, units=0, partial=None, final="relu", channels=channels[0])
    if cut == "relu0":
        plan["keep"] = stem - 2  # up to the stem BatchNorm
        return plan
    if cut == "relu1" and version == 2:
        plan.update(keep=stem + len(layers) + 1, channels=channels[-1])  # up to the final BN
        return plan
    match = _UNIT_RE.fullmatch(str(cut))
    if not match:
        raise _cut_error(name, cut, version, layers, kmax)
    s, u = int(match.group(1)), int(match.group(2))
    k = int(match.group(3)) if match.group(3) else None
    if not (1 <= s <= len(layers) and 1 <= u <= layers[s - 1] and (k is None or 1 <= k <= kmax)):
        raise _cut_error(name, cut, version, layers, kmax)
    plan.update(keep=stem + s - 1, stage=s)
    if k is None:
        plan.update(units=u, final="identity", channels=channels[s])
        return plan
    plan.update(units=u - 1, partial=k)
    width = channels[s] // 4 if bottleneck else channels[s]
    if version == 2 and k == 1:  # the unit's first BN sees the unit's input
        width = channels[s] if u > 1 else channels[s - 1]
    plan["channels"] = width
    return plan


class _UnitHeadV2(HybridBlock):
    """The start of a pre-activation unit, up to and including its K-th BatchNorm.

    Holds the original unit's ``bn1``/``conv1``/... under the same attribute names, so the
    structural parameter keys equal those of the full net. The residual branch is not needed:
    it only joins at the unit's end.
    """

    def __init__(self, unit, k, **kwargs):
        super().__init__(**kwargs)
        self._k = k
        for i in range(1, k + 1):
            setattr(self, f"bn{i}", getattr(unit, f"bn{i}"))
            if i < k:
                setattr(self, f"conv{i}", getattr(unit, f"conv{i}"))

    def hybrid_forward(self, F, x):
        for i in range(1, self._k + 1):
            x = getattr(self, f"bn{i}")(x)
            if i < self._k:
                x = getattr(self, f"conv{i}")(F.Activation(x, act_type="relu"))
        return x


class _UnitHeadV1(HybridBlock):
    """The start of a post-activation unit's ``body``, up to its K-th BatchNorm."""

    def __init__(self, unit, k, **kwargs):
        super().__init__(**kwargs)
        self.body = nn.HybridSequential(prefix="")
        for layer in list(unit.body._children.values())[: 3 * k - 1]:
            self.body.add(layer)

    def hybrid_forward(self, F, x):
        return self.body(x)


class ResNetTrunk(HybridBlock):
    """A model-zoo ResNet cut at a classic-named layer; output node named literally ``<cut>``.

    Parameters
    ----------
    name : str
        Model-zoo ResNet, ``resnet{18,34,50,101,152}_v{1,2}`` (default ``resnet50_v2``).
    cut : str
        Classic cut point (see :func:`valid_cuts`); default ``stage4_unit2_relu1``.
    epsilon : float
        BatchNorm epsilon for every BN of the trunk (model zoo: 1e-5, classic checkpoint: 2e-5).

    BatchNorm uses its running statistics unless called under ``autograd.record(train_mode=True)``
    (Gluon's rule), so plain calls are inference.
    """

    def __init__(self, name=DEFAULT_ARCH, cut=DEFAULT_CUT, epsilon=GLUON_BN_EPS, **kwargs):
        super().__init__(**kwargs)
        plan = plan_cut(name, cut)
        self.version, self.depth = parse_arch(name)
        self.arch, self.cut, self.epsilon = name, cut, float(epsilon)
        self.out_channels = plan["channels"]
        self._final = plan["final"]
        with self.name_scope():
            full = _zoo.get_resnet(self.version, self.depth)
            children = list(full.features._children.values())
            self.features = nn.HybridSequential(prefix="")
            for block in children[: plan["keep"]]:
                self.features.add(block)
            if plan["stage"] is not None:
                units = list(children[plan["keep"]]._children.values())
                stage = nn.HybridSequential(prefix="")
                for unit in units[: plan["units"]]:
                    stage.add(unit)
                if plan["partial"] is not None:
                    head = _UnitHeadV2 if self.version == 2 else _UnitHeadV1
                    stage.add(head(units[plan["units"]], plan["partial"], prefix=""))
                self.features.add(stage)
        for block in _iter_blocks(self):
            if isinstance(block, nn.BatchNorm):
                block._kwargs["eps"] = self.epsilon  # read by BatchNorm.hybrid_forward

    @property
    def output_name(self):
        """The exported symbol's output name, e.g. ``stage4_unit2_relu1_output``."""
        return self.cut + "_output"

    def hybrid_forward(self, F, x):
        x = self.features(x)
        # A plain NameManager replaces the block's Prefix manager for this one op, so the node is
        # named exactly like the classic layer (the name is ignored in imperative mode).
        with mx.name.NameManager():
            if self._final == "relu":
                return F.Activation(x, act_type="relu", name=self.cut)
            return F.identity(x, name=self.cut)

    def split_stages(self, stages):
        """Split for fine-tuning: ``(frozen_blocks, trainable_blocks, finish)``.

        The trainable part is the last ``stages`` residual stages of the trunk (the partial stage
        at the cut counts as one); ``finish(x)`` applies the trunk's final op (ReLU or identity).
        Calling the blocks in order and then ``finish`` equals calling the trunk.
        """
        blocks = list(self.features._children.values())
        stage_at = [i for i, b in enumerate(blocks) if isinstance(b, nn.HybridSequential)]
        if not 1 <= stages <= len(stage_at):
            raise MxvisionError(f"stages={stages}", f"{self.arch} cut at {self.cut} has "
                                f"{len(stage_at)} stages to fine-tune")
        k = stage_at[-stages]
        finish = (lambda x: mx.nd.relu(x)) if self._final == "relu" else (lambda x: x)
        return blocks[:k], blocks[k:], finish

    def param_keys(self):
        """Structural parameter keys (``features.8.1.bn1.gamma``) -> Parameter, as in a
        model-zoo ``save_parameters`` file of the full network."""
        return self._collect_params_with_prefix()

    def load_imagenet(self, path, ctx=None):
        """Load a full model-zoo params file (``save_parameters`` of the un-truncated net).

        Layers past the cut and the classifier are ignored; a missing key or a shape that does
        not fit raises :class:`WeightsError` naming the file, before anything is changed.
        """
        return load_params_by_key(self, path, self.arch, ctx)


def load_params_by_key(block, path, arch, ctx=None):
    """Load a ``save_parameters`` file into ``block`` by structural key (``features.8.1.bn1.gamma``).

    For a trunk that keeps a whole network's child blocks under their names: a file of the whole
    network loads (what lies past the cut is ignored) as does a saved trunk. A missing key or a
    shape that does not fit raises :class:`WeightsError` naming the file, before anything is
    changed. Returns ``block``.
    """
    loaded = load_nd_dict(path)
    wanted = block._collect_params_with_prefix()
    assign_checked(wanted, loaded, path, ctx, missing=f"{arch} parameters",
                   missing_hint=f"; expected a {arch} file saved with save_parameters",
                   arch=arch, shape_hint=f"; is it a {arch} file?")
    return block


def shape_fits(expected, actual):
    """True when ``actual`` matches ``expected`` where the latter is known (0 = deferred)."""
    return len(expected) == len(actual) and all(e in (0, a) for e, a in zip(expected, actual))


def _iter_blocks(block):
    yield block
    for child in block._children.values():
        yield from _iter_blocks(child)


def ctx_list(ctx):
    """``ctx`` as the list of contexts Gluon's initialisers take (None: the CPU)."""
    if ctx is None:
        return [mx.cpu()]
    return list(ctx) if isinstance(ctx, (list, tuple)) else [ctx]


def mxnet_reason(err):
    """The informative line of an MXNetError, without MXNet's C++ traceback."""
    return store.mxnet_error_line(err)


def load_nd_dict(path, max_bytes=None):
    """``mx.nd.load`` a params file that must hold a name -> NDArray dict, or raise WeightsError.

    The file is checked before MXNet reads it (:func:`~mxvision.models.store.check_params_file`:
    a regular file of at most ``max_bytes``, every header consistent, so MXNet never allocates
    for a shape the file cannot hold) and its values after (no NaN/inf, no negative BatchNorm
    variance); every failure is one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "no such params file")
    store.check_params_file(path, max_bytes)
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as err:
        raise WeightsError(path, f"not an MXNet params file ({store.mxnet_error_line(err)})") from None
    if not isinstance(loaded, dict) or not loaded:
        raise WeightsError(path, "holds no named arrays; expected an MXNet params dict")
    store.check_weight_values(loaded, path)
    return loaded


def get_backbone(name=DEFAULT_ARCH, cut=DEFAULT_CUT, weights_file=None, ctx=None,
                 epsilon=GLUON_BN_EPS, hybridize=True):
    """A ready-to-use :class:`ResNetTrunk` on ``ctx`` (default CPU).

    With ``weights_file`` the weights come from a full model-zoo params file; without, they are
    He-initialised (BN: gamma 1, beta 0, running mean 0, var 1) and a tiny forward pass fixes the
    deferred shapes so the parameters can be read or exported at once. Calls run BatchNorm in
    inference mode (running statistics) unless under ``autograd.record(train_mode=True)``.
    """
    ctx = ctx_list(ctx)
    trunk = ResNetTrunk(name, cut, epsilon=epsilon)
    if weights_file is not None:
        trunk.load_imagenet(weights_file, ctx)
    else:
        trunk.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2),
                         ctx=ctx)
        # 64 px, not smaller: at 32 px stage 4 is 1x1, and MXNet 1.9.1's oneDNN BatchNorm then
        # caches a (1, 512, 1, 1) primitive that a later 2-D BatchNorm on (1, 512) -- the Xvision
        # head's -- reuses and segfaults on (reproduced here; 2x2 and larger are safe).
        trunk(mx.nd.zeros((1, 3, 64, 64), ctx=ctx[0]))
    if hybridize:
        trunk.hybridize()
    return trunk


FAMILY = "resnet_trunk"


def _factory(name):
    def factory(cut=DEFAULT_CUT, weights_file=None, ctx=None, **kwargs):
        return get_backbone(name, cut=cut, weights_file=weights_file, ctx=ctx, **kwargs)
    factory.__name__ = name
    factory.__doc__ = f"MXNet model-zoo {name} cut at ``cut`` (default {DEFAULT_CUT}); see get_backbone."
    return factory


for _name in ARCHS:
    register_model(_name, family=FAMILY, preset="imagenet224", cuts=valid_cuts(_name),
                   default_cut=DEFAULT_CUT,
                   description=f"MXNet model zoo {_name} (ImageNet)")(_factory(_name))


def assign_checked(wanted, loaded, subject, ctx, missing, arch, missing_hint="", shape_hint=""):
    """Set each parameter of ``wanted`` (name -> Parameter) from ``loaded`` (name -> NDArray).

    Everything is checked before anything is changed: a missing name or a shape that does not
    fit raises :class:`WeightsError` naming ``subject``, so a wrong file never half-loads.
    """
    absent = sorted(n for n in wanted if n not in loaded)
    if absent:
        raise WeightsError(subject, f"{len(absent)} of {len(wanted)} {missing} missing "
                           f"(e.g. {absent[0]}){missing_hint}")
    for name, param in wanted.items():
        if not shape_fits(param.shape, loaded[name].shape):
            raise WeightsError(subject, f"{name} has shape {loaded[name].shape}, {arch} "
                               f"needs {param.shape}{shape_hint}")
    for name, param in wanted.items():
        param._load_init(loaded[name], ctx_list(ctx))
