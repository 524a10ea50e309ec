"""What torchxrayvision's classifiers share: pathologies, weights table, calibration, input checks, model base.

torchxrayvision (Cohen et al., https://github.com/mlmed/torchxrayvision) publishes chest X-ray
classifiers that all predict the same 18 pathologies in the same order (``default_pathologies``),
whatever data they were trained on. Each set of weights says which of the 18 outputs were trained
(``targets``: the others are an empty string) and carries per-output *operating-point thresholds*
(``op_threshs``) that torchxrayvision applies by default: ``sigmoid`` then a piecewise-linear map
sending the threshold to 0.5 (:func:`op_norm`); an output without a threshold (NaN) comes out as a
constant 0.5. The tables below are copied from torchxrayvision 1.5.7's ``models.py``
(``model_urls``), numbers unchanged.

The weights themselves are fetched, converted and cached by :mod:`mxvision.models.xrv.weights`.
"""
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

from mxvision.errors import MxvisionError, WeightsError, one_line
from mxvision.io.torchfile.reader import PICKLE_ALLOWANCE, byte_limit_for, load_torch_file, open_weights_file
from mxvision.models import store
from mxvision.utils import file_digest

log = logging.getLogger(__name__)

DEFAULT_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass",
    "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
NUM_CLASSES = len(DEFAULT_PATHOLOGIES)

RELEASE_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
BASE_URL_ENV = "MXVISION_XRV_BASE_URL"

# The input range torchxrayvision's models are trained on: normalize(img, maxval) gives [-1024, 1024].
XRV_RANGE = 1024.0
_NAN = float("nan")
_ALL = DEFAULT_PATHOLOGIES
_CHEX = ("Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "", "Effusion", "Pneumonia", "",
         "Cardiomegaly", "", "", "", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")


@dataclass(frozen=True)
class XRVWeights:
    """One entry of torchxrayvision's weights table."""

    name: str
    arch: str          # "densenet121" or "resnet50"
    resolution: int    # the input size the weights were trained at (square)
    file: str          # the release file's name
    labels: Tuple[str, ...]
    op_threshs: Tuple[float, ...]
    ppv80_thres: Optional[Tuple[float, ...]] = None
    description: str = ""

    @property
    def url(self):
        """The release address (``$MXVISION_XRV_BASE_URL`` replaces the folder part)."""
        base = os.environ.get(BASE_URL_ENV) or RELEASE_URL
        return (base if base.endswith("/") else base + "/") + self.file

    @property
    def targets(self):
        return list(self.labels)

    @property
    def untrained(self):
        """Indices of outputs the weights were not trained on (empty target)."""
        return [i for i, t in enumerate(self.labels) if not t]

    @property
    def no_threshold(self):
        """Indices of trained outputs without an operating point (calibrated output is 0.5)."""
        return [i for i, (t, th) in enumerate(zip(self.labels, self.op_threshs)) if t and math.isnan(th)]

    @property
    def preset(self):
        """The preprocessing preset of :mod:`mxvision.data.transforms` for this resolution."""
        return "xrv%d" % self.resolution


def _entry(name, arch, resolution, file, labels, op_threshs, ppv80=None, description=""):
    assert len(labels) == NUM_CLASSES and len(op_threshs) == NUM_CLASSES
    return XRVWeights(name, arch, resolution, file, tuple(labels), tuple(float(v) for v in op_threshs),
                      tuple(float(v) for v in ppv80) if ppv80 else None, description)


_D121 = "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
WEIGHTS = {w.name: w for w in (
    _entry("densenet121-res224-all", "densenet121", 224, "nih-pc-chex-mimic_ch-google-openi-kaggle-" + _D121, _ALL,
           [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724,
            0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766,
            0.053369623, 0.035975814, 0.20204692, 0.05015312],
           [0.72715247, 0.8885005, 0.92493945, 0.6527224, 0.68707734, 0.46127197, 0.7272054, 0.6127343,
            0.9878492, 0.61979693, 0.66309816, 0.7853459, 0.930661, 0.93645346, 0.6788558, 0.6547198,
            0.61614525, 0.8489876],
           "trained on nih-pc-chex-mimic_ch-google-openi-rsna (https://arxiv.org/abs/2002.02497)"),
    _entry("densenet121-res224-nih", "densenet121", 224, "nih-" + _D121, _ALL[:14] + ("",) * 4,
           [0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932,
            0.012037827, 0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864,
            0.0004403434, _NAN, _NAN, _NAN, _NAN], description="NIH ChestX-ray14"),
    _entry("densenet121-res224-pc", "densenet121", 224, "pc-" + _D121, _ALL[:14] + ("", "Fracture", "", ""),
           [0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071,
            0.055412333, 0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895,
            _NAN, 0.026507627, _NAN, _NAN], description="PadChest (University of Alicante)"),
    _entry("densenet121-res224-chex", "densenet121", 224, "chex-" + _D121, _CHEX,
           [0.1988969, 0.05710573, _NAN, 0.0531293, 0.1435217, _NAN, _NAN, 0.27212676, 0.07749717, _NAN,
            0.19712369, _NAN, _NAN, _NAN, 0.09932402, 0.09273402, 0.3270967, 0.10888247],
           description="CheXpert (Stanford)"),
    _entry("densenet121-res224-rsna", "densenet121", 224, "kaggle-" + _D121,
           ("",) * 8 + ("Pneumonia",) + ("",) * 7 + ("Lung Opacity", ""),
           [_NAN] * 8 + [0.13486601] + [_NAN] * 7 + [0.13511065, _NAN],
           description="RSNA Pneumonia Challenge"),
    _entry("densenet121-res224-mimic_nb", "densenet121", 224, "mimic_nb-" + _D121, _CHEX,
           [0.08558747, 0.011884617, _NAN, 0.0040595434, 0.010733786, _NAN, _NAN, 0.118761964, 0.022924708,
            _NAN, 0.06358637, _NAN, _NAN, _NAN, 0.022143636, 0.017476924, 0.1258702, 0.014020768],
           description="MIMIC-CXR (MIT), NegBio labels"),
    _entry("densenet121-res224-mimic_ch", "densenet121", 224, "mimic_ch-" + _D121, _CHEX,
           [0.09121389, 0.010573786, _NAN, 0.005023008, 0.003698257, _NAN, _NAN, 0.08001232, 0.037242252,
            _NAN, 0.05006329, _NAN, _NAN, _NAN, 0.019866971, 0.03823637, 0.11303808, 0.0069147074],
           description="MIMIC-CXR (MIT), CheXpert labels"),
    _entry("resnet50-res512-all", "resnet50", 512, "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt", _ALL,
           [0.51570356, 0.50444704, 0.53787947, 0.50723547, 0.5025118, 0.5035252, 0.5038076, 0.51862943,
            0.5078151, 0.50724894, 0.5056339, 0.510706, 0.5053923, 0.5020846, _NAN, 0.5080557, 0.5138526, _NAN],
           [0.690908, 0.720028, 0.7303882, 0.7235838, 0.6787441, 0.7304924, 0.73105824, 0.6839408, 0.7241559,
            0.7219969, 0.6346738, 0.72764945, 0.7285066, 0.5735704, _NAN, 0.69684714, 0.7135549, _NAN],
           "trained on pc-nih-rsna-siim-vin at 512x512"),
)}

#: the terms of the training data that bind a user of weights trained on it (as the datasets state them)
DATASET_TERMS = {
    "chex": "Stanford research use agreement, non-commercial",
    "mimic": "PhysioNet credentialed licence",
}
_TRAINED_ON = {
    "densenet121-res224-all": "NIH, PadChest, CheXpert (%s), MIMIC-CXR (%s), Google, OpenI and RSNA"
                              % (DATASET_TERMS["chex"], DATASET_TERMS["mimic"]),
    "densenet121-res224-nih": "NIH ChestX-ray14",
    "densenet121-res224-pc": "PadChest",
    "densenet121-res224-chex": "CheXpert (%s)" % DATASET_TERMS["chex"],
    "densenet121-res224-rsna": "the RSNA Pneumonia Challenge data",
    "densenet121-res224-mimic_nb": "MIMIC-CXR (%s)" % DATASET_TERMS["mimic"],
    "densenet121-res224-mimic_ch": "MIMIC-CXR (%s)" % DATASET_TERMS["mimic"],
    "resnet50-res512-all": "PadChest, NIH, RSNA, SIIM and VinDr-CXR",
}


def weights_licence(name):
    """What torchxrayvision documents about the licence of weights ``name``: nothing beyond its
    Apache-2.0 code licence, so the training data (whose terms bind a user) is named instead."""
    return ("not stated by torchxrayvision (its code is Apache-2.0); trained on %s -- see each dataset's terms"
            % _TRAINED_ON[name])


def get_weights_spec(name):
    """The :class:`XRVWeights` for a name like ``densenet121-res224-mimic_nb``."""
    try:
        return WEIGHTS[name]
    except KeyError:
        raise WeightsError(name, "unknown torchxrayvision weights; known: %s" % ", ".join(sorted(WEIGHTS))) from None


def list_weights():
    return sorted(WEIGHTS)


# --------------------------------------------------------------------------- calibration
def op_norm(probs, op_threshs):
    """torchxrayvision's ``op_norm`` in NumPy: ``probs`` (N, 18) sigmoid outputs -> calibrated.

    ``p < t``: ``p / (2t)``; otherwise ``1 - (1 - p) / (2 (1 - t))``; NaN threshold: 0.5.
    """
    probs = np.asarray(probs, dtype=np.float32)
    t = np.broadcast_to(np.asarray(op_threshs, dtype=np.float32), probs.shape)
    valid = ~np.isnan(t)
    safe = np.where(valid, t, np.float32(0.5))
    low = probs / (safe * 2)
    high = 1.0 - (1.0 - probs) / ((1 - safe) * 2)
    out = np.where(probs < safe, low, high)
    return np.where(valid, out, np.float32(0.5)).astype(np.float32)


def op_norm_nd(probs, op_threshs):
    """:func:`op_norm` on NDArrays (``op_threshs``: an (18,) float32 NumPy array with NaNs)."""
    valid_np = ~np.isnan(op_threshs)
    ctx = probs.context
    t = mx.nd.array(np.where(valid_np, op_threshs, 0.5)[None, :], ctx=ctx)
    valid = mx.nd.array(valid_np.astype(np.float32)[None, :], ctx=ctx)
    low = mx.nd.broadcast_div(probs, t * 2)
    high = 1.0 - mx.nd.broadcast_div(1.0 - probs, (1.0 - t) * 2)
    below = mx.nd.broadcast_lesser(probs, t)
    out = mx.nd.where(below, low, high)
    half = mx.nd.ones_like(out) * 0.5
    return mx.nd.where(mx.nd.broadcast_like(valid, out), out, half)


# --------------------------------------------------------------------------- input checks and resizing
class XRVInputWarning(UserWarning):
    """An input that does not look like torchxrayvision's [-1024, 1024] single-channel image."""


def normalization_problem(x_min, x_max):
    """A hint when an input range does not look like [-1024, 1024], else None.

    The test is torchxrayvision's ``warn_normalization`` heuristic (suspicious when the minimum is
    above -255 or the maximum below 255, or anything beyond +-1025); the hint names the usual cause.
    """
    if not (-255 < x_min or x_max < 255 or x_min < -1025 or 1025 < x_max):
        return None
    if x_min >= 0 and x_max <= 1.0:
        cause = "it looks like a [0, 1] image: use normalize(img, 1) (or normalize(img * 255, 255))"
    elif x_min >= 0 and x_max <= 255:
        cause = "it looks like raw 8-bit pixels: use normalize(img, 255)"
    elif x_min >= 0 and x_max <= 65535 and x_max > 1025:
        cause = "it looks like raw 12/16-bit pixels: use normalize(img, 4095 or 65535)"
    elif -1.0 <= x_min and x_max <= 1.0:
        cause = "it looks like a [-1, 1] image: multiply by 1024"
    elif x_min < -1025 or x_max > 1025:
        cause = "values beyond +-1024: normalize() was given too small a maxval"
    else:
        cause = "the image may be nearly uniform, or normalized another way (e.g. ImageNet mean/std)"
    return ("input range [%.2f, %.2f] does not look like torchxrayvision's [-1024, 1024]; %s. "
            "Wrongly normalized inputs give identical or meaningless scores." % (x_min, x_max, cause))


def aa_bilinear_matrix(in_size, out_size):
    """(out, in) resampling matrix of ``torch.nn.functional.interpolate(mode="bilinear",
    antialias=True, align_corners=False)`` along one axis (the PIL-style triangle filter)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax)
        w = np.clip(1.0 - np.abs((j - center + 0.5) * invscale), 0.0, None)
        total = w.sum()
        m[i, xmin:xmax] = w / total if total > 0 else w
    return m


def resize_batch(x, size):
    """Resize a (N, C, H, W) NumPy batch to (N, C, size, size) like torchxrayvision's fix_resolution."""
    wy = aa_bilinear_matrix(x.shape[2], size)
    wx = aa_bilinear_matrix(x.shape[3], size)
    return np.einsum("rh,nchw,sw->ncrs", wy, x.astype(np.float64), wx, optimize=True).astype(np.float32)


# --------------------------------------------------------------------------- the shared model behaviour
def _torch_key(gluon_name):
    """Gluon structural parameter name -> PyTorch state-dict key (BatchNorm gamma/beta names)."""
    if gluon_name.endswith(".gamma"):
        return gluon_name[:-len("gamma")] + "weight"
    if gluon_name.endswith(".beta"):
        return gluon_name[:-len("beta")] + "bias"
    return gluon_name


_IGNORED_KEYS = ("num_batches_tracked", "op_threshs")
_MX_PARAMS_MAGIC = (0x112).to_bytes(8, "little")


class FusedOnCPU:
    """A block with a fused oneDNN operator that exists on the CPU only (DenseNet's BatchNorm +
    ReLU, :class:`~.densenet.BatchNormReLU`): ``on_cpu`` says whether to use it, and
    :meth:`XRVModel.for_context` sets it in every such block of a model, wherever it sits."""

    on_cpu = True


class XRVModel(HybridBlock):
    """Behaviour shared by the torchxrayvision ports (subclasses define the layers).

    Called on an NDArray (N, 1, H, W) in [-1024, 1024], a model with ``output="scores"`` does what
    torchxrayvision's ``forward`` does: resize to its native resolution if needed (with a warning),
    warn once when the input looks wrongly normalized, run the network, then apply the weights'
    ``op_threshs`` (``calibrated=True``, the default when the weights have them) or, with
    ``apply_sigmoid=True``, a plain sigmoid, else return logits. In a symbolic (hybridized,
    exported) graph the model computes the network only: logits for ``"scores"``.
    """

    def __init__(self, spec=None, output="scores", calibrated=True, apply_sigmoid=False, **kwargs):
        super().__init__(**kwargs)
        if output not in self.OUTPUTS:
            raise WeightsError(self.ARCH, "unknown output %r; choose one of %s" % (output, ", ".join(self.OUTPUTS)))
        self.spec = spec
        self.output = output
        self.weights = spec.name if spec is not None else None
        self.targets = spec.targets if spec is not None else list(DEFAULT_PATHOLOGIES)
        self.pathologies = self.targets
        self.op_threshs = (np.array(spec.op_threshs, dtype=np.float32)
                           if spec is not None and spec.op_threshs is not None else None)
        self.thresholds_info = None  # set when a thresholds file replaces op_threshs (thresholds.py)
        self.resolution = spec.resolution if spec is not None else None
        self.calibrated = calibrated
        self.apply_sigmoid = apply_sigmoid
        self.weights_info = {"spec": "none", "file": None, "description": "not initialised"}
        self._warned = set()

    # -- calling
    def forward(self, x, *args):
        if not isinstance(x, mx.nd.NDArray):
            return super().forward(x, *args)
        x = self.prepare(x)
        out = super().forward(x, *args)
        return self.postprocess(out) if self.output == "scores" else out

    def prepare(self, x):
        """torchxrayvision's ``fix_resolution`` + ``warn_normalization`` for an NDArray batch."""
        if x.ndim == 3:
            x = x.expand_dims(0)
        if x.ndim != 4 or x.shape[1] != 1:
            raise MxvisionError("input %s" % (tuple(x.shape),),
                                "expected (N, 1, H, W): one grey channel in [-1024, 1024] "
                                "(mxvision.data.xrv_transforms.normalize; preprocessing preset xrv224/xrv512)")
        if x.shape[2] != x.shape[3]:
            raise MxvisionError("input %s" % (tuple(x.shape),),
                                "height and width must be equal; center-crop first (XRayCenterCrop)")
        if self.resolution and x.shape[2] != self.resolution:
            self._warn_once("size", "input size %dx%d is not the native resolution %dx%d of %s; resizing "
                            "(bilinear, antialiased, as torchxrayvision does) -- this can affect the scores"
                            % (x.shape[2], x.shape[3], self.resolution, self.resolution, self.weights))
            x = mx.nd.array(resize_batch(x.asnumpy(), self.resolution), ctx=x.context)
        if "range" not in self._warned:
            lo, hi = float(x.min().asscalar()), float(x.max().asscalar())
            # A constant input (a warm-up batch of zeros, a blank film) says nothing about the
            # convention; judging it would spend the one warning and hide a real mistake later.
            problem = normalization_problem(lo, hi) if hi > lo else None
            if problem:
                self._warn_once("range", problem)
        return x

    def postprocess(self, logits):
        if self.calibrated and self.op_threshs is not None:
            return op_norm_nd(mx.nd.sigmoid(logits), self.op_threshs)
        if self.apply_sigmoid:
            return mx.nd.sigmoid(logits)
        return logits

    def _warn_once(self, kind, message):
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(message, XRVInputWarning, stacklevel=5)  # the caller of model(x)

    def for_context(self, ctx):
        """Choose the operators for ``ctx``: the fused ones of :class:`FusedOnCPU` blocks on a CPU,
        the plain ones elsewhere. Loading weights and :meth:`init_random` call it with their
        context, so every block is covered, also those a model builds late (the CheXpert
        ensemble's members, rebuilt for a checkpoint's number of tasks)."""
        return self.fuse_bn_relu(ctx.device_type == "cpu")

    def fuse_bn_relu(self, on=True):
        """Fused operators (where the dtype allows them) or the plain ones, in every
        :class:`FusedOnCPU` block of this model; a graph built with the other choice is dropped."""
        def choose(block):
            if isinstance(block, FusedOnCPU):
                block.on_cpu = on
            if isinstance(block, HybridBlock):
                block._clear_cached_op()
        self.apply(choose)
        return self

    # -- weights
    def init_random(self, ctx=None, seed=0):
        """He-normal convolutions, BatchNorm (1, 0, 0, 1), zero biases: like torchvision's init."""
        if seed is not None:
            mx.random.seed(seed)
        self.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2),
                        ctx=ctx or mx.cpu(), force_reinit=True)
        self.weights_info = {"spec": "none", "file": None, "random_seed": seed,
                             "description": "%s with RANDOM weights (seed %s)" % (self.ARCH, seed)}
        return self.for_context(ctx or mx.cpu())

    def expected_torch_keys(self):
        """{PyTorch state-dict key: Gluon structural name} for every parameter of this network."""
        return {_torch_key(name): name for name in self._collect_params_with_prefix()}

    def expected_weights_bytes(self):
        """Bytes this network's parameters take as float32: what bounds a weights file for it."""
        return 4 * sum(int(np.prod(p.shape)) for p in self._collect_params_with_prefix().values())

    def load_torch_state_dict(self, state, source="weights", ctx=None):
        """Copy a PyTorch state dict (``{key: ndarray}``) into the network, exactly.

        Every parameter must be present with its shape and finite values (BatchNorm variances not
        negative: NaN scores otherwise); anything else in the file (besides BatchNorm's
        ``num_batches_tracked`` and xrv's ``op_threshs``) is refused. Keys prefixed ``model.``
        (torchxrayvision's ResNet wrapper) or ``module.`` (DataParallel) are accepted.
        """
        state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_KEYS)}
        for prefix in ("module.", "model."):
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        if self.output != "scores":  # a backbone takes a full file and leaves the classifier out
            state = {k: v for k, v in state.items() if not k.startswith(self.head_name + ".")}
        expected = self.expected_torch_keys()
        params = self._collect_params_with_prefix()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise WeightsError(source, "does not fit %s: %d tensors missing (%s), %d unexpected (%s)"
                               % (self.ARCH, len(missing), ", ".join(missing[:3]) or "-",
                                  len(extra), ", ".join(extra[:3]) or "-"))
        ctx = ctx or mx.cpu()
        arrays = {}
        for key, gname in expected.items():
            value = np.asarray(state[key])
            shape = params[gname].shape
            if tuple(value.shape) != tuple(shape):
                raise WeightsError(source, "tensor %s has shape %s, %s needs %s"
                                   % (key, tuple(value.shape), self.ARCH, tuple(shape)))
            if not np.issubdtype(value.dtype, np.floating):
                raise WeightsError(source, "tensor %s is %s, not floating point" % (key, value.dtype))
            arrays[gname] = value.astype(np.float32)
        store.check_weight_values({key: arrays[gname] for key, gname in expected.items()}, source)
        if any(p._data is None for p in params.values()):
            self.initialize(ctx=ctx, force_reinit=True)  # allocate; every value is overwritten next
        for gname, value in arrays.items():
            params[gname].set_data(mx.nd.array(value))
        return self.for_context(ctx)

    def load_weights_file(self, path, ctx=None):
        """Load a torchxrayvision ``.pt`` (converted on the fly) or a Gluon ``.params`` file, checked
        before reading (bounded by this network's size) and after (shapes, values): one-line errors."""
        path = os.fspath(path)
        ctx = ctx or mx.cpu()
        limit = byte_limit_for(self.expected_weights_bytes())
        with open_weights_file(path, limit + PICKLE_ALLOWANCE) as f:
            head = f.read(8)
        if head == _MX_PARAMS_MAGIC:
            store.check_params_file(path, limit + PICKLE_ALLOWANCE)
            try:
                # a backbone has no classifier: a full model's file carries one it leaves out
                self.load_parameters(path, ctx=ctx, ignore_extra=self.output != "scores")
            except mx.base.MXNetError as err:
                raise WeightsError(path, "does not fit %s (%s)" % (self.ARCH, store.mxnet_error_line(err))) from None
            except (AssertionError, ValueError) as err:
                raise WeightsError(path, "does not fit %s (%s)" % (self.ARCH, one_line(err, 300))) from None
            store.check_weight_values({name: p.data() for name, p in self._collect_params_with_prefix().items()},
                                      path)
            self.for_context(ctx)  # (the .pt branch's load_torch_state_dict does this itself)
            kind = "Gluon params"
        else:
            self.load_torch_state_dict(load_torch_file(path, max_bytes=limit), source=path, ctx=ctx)
            kind = "torchxrayvision .pt"
        self.weights_info = {"spec": path, "file": path, "sha1": file_digest(path, "sha1"),
                             "description": "%s weights from %s (%s)" % (self.ARCH, path, kind)}
        return self
