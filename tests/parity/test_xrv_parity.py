"""Parity with torchxrayvision itself (optional: needs ``torch`` and ``torchxrayvision``).

torchxrayvision builds each network with random weights; BatchNorm statistics are set by a
training-mode pass over the real sample images (so activations have realistic scale) and the
classifier is scaled so logits are O(1) -- otherwise every sigmoid saturates and a comparison
proves nothing. ``torch.save`` writes the weights exactly as the releases are published (whole
model for DenseNets, state dict for the ResNet) under the release file names;
torchxrayvision's own ``get_model(name, cache_dir=...)`` loads them (real loading code: op_threshs,
input resolution), and mxvision loads the same files with its restricted reader. Both then run
on the real samples of ``../shared/data/samples`` preprocessed by torchxrayvision's own code.

Install (into the project's venv)::

    pip install torch==2.13.0                  # the machine's local CPU wheel; nothing from CUDA
    pip install "scikit-image<0.25" imageio    # torchxrayvision's imports (scikit-image 0.25 needs NumPy 1.24)
    pip install --no-deps torchxrayvision==1.5.7 torchvision==0.28.0

``--no-deps`` matters: torchxrayvision requires torchvision, and any torchvision pip would pick
pulls a newer, CUDA torch (several GB) over the CPU one. The torchvision wheel is a CUDA build whose C++ ops cannot load
against the CPU torch; its Python models (all torchxrayvision needs) work once the two operator
*schemas* its fake-tensor registrations refer to exist, so this module defines them (schemas
only: calling ``torchvision.ops.nms`` still fails) when, and only when, the plain import fails.
"""
import os
import shutil
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity suite: torch is not installed (pip install torch==2.13.0)")


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
        return "real"
    except ImportError:
        pytest.skip("parity suite: torchvision is not installed", allow_module_level=True)
    except RuntimeError as err:  # a CUDA wheel without its ops: "operator torchvision::nms does not exist"
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TV_SCHEMAS
    _TV_SCHEMAS = torch.library.Library("torchvision", "DEF")  # kept alive for the process
    _TV_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
    return "schemas defined for the CPU torch"


TORCHVISION = _import_torchvision()
xrv_torch = pytest.importorskip("torchxrayvision", reason="parity suite: torchxrayvision is not installed")

import mxnet as mx  # noqa: E402

from mxvision.data.xrv_transforms import load_xray, preprocess  # noqa: E402
from mxvision.inference import classify  # noqa: E402
from mxvision.models.xrv.common import XRVInputWarning  # noqa: E402
from mxvision.io.torchfile.reader import load_torch_file  # noqa: E402
from mxvision.io.torchfile.writer import save_torch_file  # noqa: E402
from mxvision.models import zoo  # noqa: E402
from mxvision.models.xrv.common import WEIGHTS  # noqa: E402

ATOL = 1e-4
DENSENETS = [n for n, s in WEIGHTS.items() if s.arch == "densenet121"]
RASTER = ["16747_3_1.jpg", "00000001_000.png", "00027426_000.png"]
DICOM = ["Fake_MONOHR1.dcm", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]


def torchxrayvision_input(path, size):
    """The model card's preprocessing, with torchxrayvision's own functions."""
    import skimage.io
    if path.endswith(".dcm"):
        img = xrv_torch.utils.read_xray_dcm(path)
    else:
        img = xrv_torch.datasets.normalize(skimage.io.imread(path), 255)
        if img.ndim == 3:
            img = img.mean(2)
    img = xrv_torch.datasets.XRayCenterCrop()(img[None, ...])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xrv_torch.datasets.XRayResizer(size)(img)


@pytest.fixture(scope="module")
def samples(shared):
    return {n: str(shared / "data" / "samples" / n) for n in RASTER + DICOM}


def _realistic(model, head, batch, seed):
    """BatchNorm statistics from real images, then a classifier giving O(1) logits."""
    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the pass
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
            torch.nn.init.uniform_(mod.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(batch)
        model.eval()
        logits = model(batch)
        head.weight.mul_(2.0 / float(logits.std()))
        torch.nn.init.uniform_(head.bias, -1.0, 1.0)
    return model


@pytest.fixture(scope="module")
def setup(samples, tmp_path_factory):
    torch.set_num_threads(2)
    torch.manual_seed(0)  # the random initialisation, before BatchNorm statistics and scaling
    cache = tmp_path_factory.mktemp("xrv_cache")
    inputs = {}
    for res in (224, 512):
        inputs[res] = np.stack([torchxrayvision_input(samples[n], res) for n in RASTER + DICOM])
    aug = lambda x: torch.from_numpy(np.concatenate([x, x[:, :, :, ::-1].copy()]))  # noqa: E731
    dense = xrv_torch.models.DenseNet()
    _realistic(dense, dense.classifier, aug(inputs[224]), 0)
    first = os.path.join(cache, WEIGHTS[DENSENETS[0]].file)
    torch.save(dense, first)  # the whole model, as the DenseNet releases are published
    for name in DENSENETS[1:]:
        shutil.copy(first, os.path.join(cache, WEIGHTS[name].file))
    import torchvision
    resnet = torchvision.models.resnet50(num_classes=18, weights=None)
    resnet.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    _realistic(resnet, resnet.fc, aug(inputs[512][:3]), 1)
    torch.save(resnet.state_dict(), os.path.join(cache, WEIGHTS["resnet50-res512-all"].file))
    return {"cache": str(cache), "inputs": inputs, "dense": dense}


def _torch_model(name, setup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = xrv_torch.models.get_model(name, cache_dir=setup["cache"])
    return model.eval()


def _compare(name, setup):
    spec = WEIGHTS[name]
    x = setup["inputs"][spec.resolution]
    tm = _torch_model(name, setup)
    nm = zoo.get_model(name, weights=os.path.join(setup["cache"], spec.file))
    with torch.no_grad():
        t_scores = tm(torch.from_numpy(x)).numpy()
    m_scores = nm(mx.nd.array(x)).asnumpy()
    tm.op_threshs = None
    nm.calibrated = False
    with torch.no_grad():
        t_logits = tm(torch.from_numpy(x)).numpy()
    m_logits = nm(mx.nd.array(x)).asnumpy()
    return t_scores, m_scores, t_logits, m_logits, tm, nm


@pytest.mark.parametrize("name", DENSENETS)
def test_densenet_outputs_match_torchxrayvision(name, setup):
    t_scores, m_scores, t_logits, m_logits, tm, nm = _compare(name, setup)
    print("%s: max |diff| scores %.2e logits %.2e (logit std %.2f)" % (
        name, np.abs(t_scores - m_scores).max(), np.abs(t_logits - m_logits).max(), np.std(t_logits)))
    assert 0.5 < np.std(t_logits) < 20  # meaningful logits, not saturated
    assert np.abs(t_logits - m_logits).max() < ATOL
    assert np.abs(t_scores - m_scores).max() < ATOL
    assert 0.05 < np.mean((t_scores > 0.01) & (t_scores < 0.99))  # calibrated scores not all saturated
    assert list(tm.targets) == nm.targets
    x = setup["inputs"][224]
    with torch.no_grad():
        t_feat = tm.features2(torch.from_numpy(x)).numpy()
    assert np.abs(t_feat - nm.features2(mx.nd.array(x)).asnumpy()).max() < ATOL


def test_resnet_outputs_match_torchxrayvision(setup):
    t_scores, m_scores, t_logits, m_logits, tm, nm = _compare("resnet50-res512-all", setup)
    print("resnet50-res512-all: max |diff| scores %.2e logits %.2e (logit std %.2f)" % (
        np.abs(t_scores - m_scores).max(), np.abs(t_logits - m_logits).max(), np.std(t_logits)))
    assert 0.5 < np.std(t_logits) < 20
    assert np.abs(t_logits - m_logits).max() < ATOL
    assert np.abs(t_scores - m_scores).max() < ATOL
    x = setup["inputs"][512][:2]
    with torch.no_grad():
        t_feat = tm.features(torch.from_numpy(x)).numpy()
    assert np.abs(t_feat - nm.features(mx.nd.array(x)).asnumpy()).max() < ATOL


def test_classify_matches_the_model_card_pipeline(samples, setup):
    """End to end from the files: mxvision's reader + preprocessing vs skimage + torchxrayvision."""
    name = "densenet121-res224-mimic_nb"
    tm = _torch_model(name, setup)
    x = np.stack([torchxrayvision_input(samples[n], 224) for n in RASTER])
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    results = classify([samples[n] for n in RASTER], model=name,
                           weights=os.path.join(setup["cache"], WEIGHTS[name].file), batch_size=3)
    got = np.array([r["outputs"] for r in results])
    print("classify vs model card: max |diff| %.2e" % np.abs(got - expected).max())
    assert np.abs(got - expected).max() < ATOL


def test_resizer_and_reader_match_torchxrayvision(samples):
    for n in RASTER:
        for size in (224, 512):
            ours = preprocess(load_xray(samples[n]), size)
            theirs = torchxrayvision_input(samples[n], size)
            assert ours.shape == theirs.shape == (1, size, size)
            assert np.abs(ours - theirs).max() < 1e-3  # of a 2048 range: float rounding only


def test_off_size_input_is_resized_like_torchxrayvision(setup):
    name = "densenet121-res224-all"
    tm = _torch_model(name, setup)
    nm = zoo.get_model(name, weights=os.path.join(setup["cache"], WEIGHTS[name].file))
    big = xrv_torch.datasets.XRayResizer(300)(setup["inputs"][512][:2, ...].reshape(2, 512, 512)[:1])[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = tm(torch.from_numpy(big)).numpy()
    with pytest.warns(XRVInputWarning, match="native resolution"):
        got = nm(mx.nd.array(big)).asnumpy()
    assert np.abs(got - expected).max() < ATOL


def test_legacy_format_release_file(setup, tmp_path):
    """The DenseNet releases predate PyTorch 1.6: the legacy (non-zip) whole-model format."""
    path = tmp_path / "legacy.pt"
    torch.save(setup["dense"], path, _use_new_zipfile_serialization=False)
    ours = load_torch_file(path)
    theirs = setup["dense"].state_dict()
    assert list(ours) == list(theirs)
    assert all(np.array_equal(ours[k], v.numpy()) for k, v in theirs.items())
    nm = zoo.get_model("densenet121-res224-all", weights=path)
    x = setup["inputs"][224][:2]
    setup["dense"].op_threshs = torch.tensor(WEIGHTS["densenet121-res224-all"].op_threshs)
    with torch.no_grad():
        expected = setup["dense"](torch.from_numpy(x)).numpy()
    setup["dense"].op_threshs = None
    assert np.abs(nm(mx.nd.array(x)).asnumpy() - expected).max() < ATOL


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_reads_the_files_mxvision_writes(tmp_path, fmt):
    state = {k: v.numpy() for k, v in torch.nn.BatchNorm2d(3).state_dict().items()}
    state["conv"] = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32)
    path = save_torch_file(state, tmp_path / ("w_%s.pt" % fmt), fmt=fmt)
    # PyTorch itself is the reader under test here, in its restricted (weights-only) unpickler,
    # on a file this test just wrote; mxvision never calls it.
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(state)
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())
