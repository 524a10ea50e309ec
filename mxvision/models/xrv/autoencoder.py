"""torchxrayvision's ResNet autoencoder (``autoencoders.ResNetAE("101-elastic")``) as a Gluon HybridBlock.

torchxrayvision's ``_ResNetAE`` (``ResNetAE101``: blocks ``[3, 4, 23, 2]``) encodes a (N, 1, 224,
224) film in [-1024, 1024] -- taken as it is: unlike the classifiers, its ``forward`` does not
rescale the input -- into a (N, 512, 3, 3) latent ``z`` and decodes ``z`` back into a (N, 1, 224,
224) image. Its blocks differ from torchvision's ResNet: each bottleneck applies a ReLU after its
third BatchNorm *before* adding the shortcut; ``layer4`` has stride 6 (14 -> 3) and 128 planes;
the decoder's strided blocks are 3x3 ``ConvTranspose2d`` with ``padding=1, output_padding=1``
and their shortcuts 1x1 ``ConvTranspose2d`` with ``output_padding=1``. Every layer here is
restated with those settings (``Conv2DTranspose`` takes the same ``output_padding``; BatchNorm
epsilon 1e-5, PyTorch's) and carries the torch name, so the Gluon structural parameter names are
the release file's state-dict keys (``uplayer1.1.upsample.0.weight``, ``conv1_1.weight``...),
BatchNorm's ``weight``/``bias`` called ``gamma``/``beta``. The release file is a plain state dict
(torchxrayvision: ``torch.load(weights_only=True)`` then ``load_state_dict``).

Outputs: torchxrayvision's ``forward`` returns ``{"z": z, "out": reconstruction}``; ``output``
chooses what calling this model gives (N = batch):

* ``"scores"`` (``get_model``'s default: "what torchxrayvision's forward returns"): the pair
  ``(z, reconstruction)``, in the dict's order;
* ``"reconstruction"``: ``ret["out"]``, (N, 1, 224, 224), in the input's [-1024, 1024] scale;
* ``"z"`` or ``"features"``: ``ret["z"]`` = torchxrayvision's ``encode(x)`` = ``features(x)``,
  the (N, 512, 3, 3) latent (two names because torchxrayvision has both). Built with either, the
  model is the encoder only (no decoder weights: a backbone of the feature pipeline, cut
  ``"features"`` or ``"z"``; its release file's decoder tensors are left out when loading). The
  feature store of ``mxvision extract --backbone resnet_ae-101-elastic`` (or ``mxvision xrv
  features``) holds this map; the Xvision head flattens it (``--pooled``: its 512 channel means).

The methods ``encode(x)``, ``features(x)`` and ``decode(z)`` are torchxrayvision's, on NDArrays.
``encode``/``features`` resize an off-size input (antialiased, with a warning) as the classifiers
do, where torchxrayvision's ``encode`` raises unless ``check_resolution=False``.
"""
import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from mxvision.errors import MxvisionError
from mxvision.models.xrv import weights as xrv_weights
from mxvision.models.xrv.baseline import BaselineModel
from mxvision.models.xrv.resnet import Bottleneck, batch_norm, shortcut

LAYERS_101 = (3, 4, 23, 2)  # torchxrayvision's ResNetAE101
LATENT_CHANNELS = 512
#: the torch names of the decoder's modules: what an encoder-only model leaves out of a release file
DECODER_MODULES = ("uplayer1", "uplayer2", "uplayer3", "uplayer4", "uplayer_top", "conv1_1")


def _module_of(key):
    """The top module of a state-dict key, past a ``module.``/``model.`` wrapper prefix."""
    parts = key.split(".")
    return parts[1] if len(parts) > 2 and parts[0] in ("module", "model") else parts[0]


class _Bottleneck(Bottleneck):
    """torchxrayvision's encoder ``Bottleneck``: torchvision's layers and names, but the ReLU after
    bn3 comes before the shortcut is added."""

    def hybrid_forward(self, F, x):
        out = F.Activation(self.bn1(self.conv1(x)), act_type="relu")
        out = F.Activation(self.bn2(self.conv2(out)), act_type="relu")
        out = F.Activation(self.bn3(self.conv3(out)), act_type="relu")
        identity = self.downsample(x) if self.downsample is not None else x
        return F.Activation(out + identity, act_type="relu")


class _DeconvBottleneck(HybridBlock):
    """torchxrayvision's ``DeconvBottleneck``: a strided block's 3x3 is a transposed convolution
    (``padding=1, output_padding=1``: the size times ``stride``), its shortcut a 1x1 one."""

    def __init__(self, in_channels, planes, expansion=2, stride=1, upsample=False, **kwargs):
        super().__init__(**kwargs)
        out = planes * expansion
        with self.name_scope():
            self.conv1 = nn.Conv2D(planes, 1, use_bias=False, in_channels=in_channels)
            self.bn1 = batch_norm(planes)
            if stride == 1:
                self.conv2 = nn.Conv2D(planes, 3, strides=1, padding=1, use_bias=False, in_channels=planes)
            else:
                self.conv2 = nn.Conv2DTranspose(planes, 3, strides=stride, padding=1, output_padding=1,
                                                use_bias=False, in_channels=planes)
            self.bn2 = batch_norm(planes)
            self.conv3 = nn.Conv2D(out, 1, use_bias=False, in_channels=planes)
            self.bn3 = batch_norm(out)
            # torchxrayvision builds every upsample with output_padding=1 (and only strided ones here)
            self.upsample = (shortcut("upsample", nn.Conv2DTranspose(
                out, 1, strides=stride, output_padding=1, use_bias=False, in_channels=in_channels), out)
                if upsample else None)

    def hybrid_forward(self, F, x):
        out = F.Activation(self.bn1(self.conv1(x)), act_type="relu")
        out = F.Activation(self.bn2(self.conv2(out)), act_type="relu")
        out = F.Activation(self.bn3(self.conv3(out)), act_type="relu")
        shortcut = self.upsample(x) if self.upsample is not None else x
        return F.Activation(out + shortcut, act_type="relu")


class XRVResNetAE(BaselineModel):
    """torchxrayvision's ``ResNetAE101``. ``output``: ``"scores"`` (the pair (z, reconstruction),
    torchxrayvision's forward), ``"reconstruction"``, ``"z"`` or ``"features"`` (the latent; the
    encoder only). See the module's documentation for the mapping."""

    ARCH = "resnet_ae101"
    OUTPUTS = ("scores", "reconstruction", "z", "features")
    ENCODER_OUTPUTS = ("z", "features")
    #: no classifier for XRVModel to drop from a backbone's file: the decoder is dropped instead
    #: (``load_torch_state_dict``), and an empty name matches no key
    head_name = ""

    def __init__(self, spec=None, output="scores", calibrated=False, apply_sigmoid=False, layers=LAYERS_101,
                 **kwargs):
        if apply_sigmoid:
            raise MxvisionError("apply_sigmoid", "an autoencoder gives a latent and an image, not scores")
        super().__init__(spec, output=output, **kwargs)
        self.has_decoder = output not in self.ENCODER_OUTPUTS
        self.in_channels = 64
        with self.name_scope():
            self.conv1 = nn.Conv2D(64, 7, strides=2, padding=3, use_bias=False, in_channels=1)
            self.bn1 = batch_norm(64)
            self.maxpool = nn.MaxPool2D(3, 2, 1)
            for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 128), layers, (1, 2, 2, 6))):
                setattr(self, "layer%d" % (i + 1), self._make_downlayer("layer%d_" % (i + 1), planes, blocks, stride))
            if self.has_decoder:
                for i, (planes, blocks, stride) in enumerate(zip((128, 64, 32, 16), layers[::-1], (6, 2, 2, 2))):
                    setattr(self, "uplayer%d" % (i + 1),
                            self._make_up_block("uplayer%d_" % (i + 1), planes, blocks, stride))
                self.uplayer_top = _DeconvBottleneck(self.in_channels, 64, 1, 2, upsample=True,
                                                     prefix="uplayer_top_")
                # ConvTranspose2d(64, 1, 1) with output_size = the input's size: for the 224 input
                # that size is the natural one, so output_padding is 0
                self.conv1_1 = nn.Conv2DTranspose(1, 1, strides=1, use_bias=False, in_channels=64)
        self.num_features = LATENT_CHANNELS

    def _make_downlayer(self, prefix, planes, blocks, stride):
        layer = nn.HybridSequential(prefix=prefix)
        with layer.name_scope():
            downsample = stride != 1 or self.in_channels != planes * _Bottleneck.expansion
            layer.add(_Bottleneck(self.in_channels, planes, stride, downsample))
            self.in_channels = planes * _Bottleneck.expansion
            for _ in range(1, blocks):
                layer.add(_Bottleneck(self.in_channels, planes))
        return layer

    def _make_up_block(self, prefix, planes, blocks, stride):
        layer = nn.HybridSequential(prefix=prefix)
        with layer.name_scope():
            upsample = stride != 1 or self.in_channels != planes * 2
            for _ in range(1, blocks):
                layer.add(_DeconvBottleneck(self.in_channels, planes, 4))
            layer.add(_DeconvBottleneck(self.in_channels, planes, 2, stride, upsample))
            self.in_channels = planes * 2
        return layer

    # -- the network
    def _encode(self, F, x):
        x = self.maxpool(F.Activation(self.bn1(self.conv1(x)), act_type="relu"))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _decode(self, F, z):
        x = self.uplayer4(self.uplayer3(self.uplayer2(self.uplayer1(z))))
        return self.conv1_1(self.uplayer_top(x))

    def hybrid_forward(self, F, x):
        z = self._encode(F, x)
        if not self.has_decoder:
            return z
        out = self._decode(F, z)
        return out if self.output == "reconstruction" else (z, out)

    def postprocess(self, out):
        return out  # no sigmoid or operating points: "scores" is the pair (z, reconstruction)

    # -- torchxrayvision's methods, on NDArrays
    def encode(self, x):
        """torchxrayvision's ``encode``: (N, 1, 224, 224) in [-1024, 1024] -> the (N, 512, 3, 3) latent
        (an off-size input is resized, with a warning)."""
        return self._encode(mx.nd, self.prepare(x))

    def features(self, x):
        """torchxrayvision's ``features``: the same as :meth:`encode`."""
        return self.encode(x)

    def decode(self, z):
        """torchxrayvision's ``decode``: a (N, 512, 3, 3) latent -> the (N, 1, 224, 224) image."""
        if not self.has_decoder:
            raise MxvisionError("decode", "this model was built with output=%r: the encoder only; build it "
                                "with output='scores' or 'reconstruction' to decode" % self.output)
        if z.ndim != 4 or tuple(z.shape[1:]) != (LATENT_CHANNELS, 3, 3):
            raise MxvisionError("latent %s" % (tuple(z.shape),), "expected (N, %d, 3, 3), what encode gives "
                                "(torchxrayvision's decode makes a 224x224 image of no other size)"
                                % LATENT_CHANNELS)
        return self._decode(mx.nd, z)

    # -- weights
    def load_torch_state_dict(self, state, source="weights", ctx=None):
        """As :meth:`XRVModel.load_torch_state_dict`; an encoder-only model leaves the file's decoder out."""
        if not self.has_decoder:
            state = {k: v for k, v in state.items() if _module_of(k) not in DECODER_MODULES}
        return super().load_torch_state_dict(state, source=source, ctx=ctx)

    def __repr__(self):
        return "XRV-ResNetAE-%s" % self.weights if self.weights else "XRV-ResNetAE"


#: backbone cuts for the feature pipeline: the latent under both torchxrayvision names, and under
#: the pipeline's default ``--cut`` (Xvision's layer name), as the classifiers' ports map it, so
#: ``mxvision extract --backbone resnet_ae-101-elastic`` needs no ``--cut``
BACKBONE_CUTS = {"features": "features", "z": "z", "stage4_unit2_relu1": "features"}

xrv_weights.register_baselines_of(XRVResNetAE, backbone_cuts=BACKBONE_CUTS)
