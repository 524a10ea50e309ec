"""The torchvision stand-in against a real torchvision: same modules, same weights from one seed, same outputs.

``torchvision_stand_in`` restates the parts of torchvision that torchxrayvision's models use, so the
parity suite runs without torchvision (as in CI). Where a real torchvision imports (``make
parity-torchvision`` builds such a venv), these tests compare the two for every constructor
torchxrayvision calls, with the arguments it passes: identical module names and block types,
state-dict keys and shapes, bitwise-identical parameters and buffers from ``torch.manual_seed(0)``,
bitwise-identical outputs; and ``Normalize``/``Compose`` give bitwise-identical tensors and raise the
same exception types. reference.py decides which torchvision the process has (the real one when it
imports, else it registers the stand-in), so these tests skip where it chose the stand-in; the
stand-in's own refusals are checked everywhere.
"""
import pytest

from reference import TORCHVISION, torch  # noqa: F401  (first: skips without torch/torchxrayvision)

import sys  # noqa: E402

import torchvision_stand_in as stand_in  # noqa: E402

#: What torchxrayvision 1.5.7 builds: ResNet-50 with its 18 labels (xrv ResNet) and bare
#: (baseline_models/xinario), ResNet-34 (mira, emory_hiti), DenseNet-121 (chexpert).
CONSTRUCTORS = [
    ("resnet34", {"weights": None}),
    ("resnet50", {}),
    ("resnet50", {"num_classes": 18, "weights": None}),
    ("densenet121", {"weights": None}),
]


@pytest.fixture(scope="module")
def torchvision():
    """The real torchvision, as reference.py imported it; skip where it registered the stand-in."""
    module = sys.modules["torchvision"]
    if module.__version__ == stand_in.VERSION:
        pytest.skip("no real torchvision in this environment (reference.py registered the stand-in); "
                    "`make parity-torchvision` runs tests/parity with one")
    return module


def _build(constructor, kwargs, seed=0):
    torch.manual_seed(seed)
    return constructor(**kwargs).eval()


@pytest.mark.parametrize("name,kwargs", CONSTRUCTORS, ids=lambda v: v if isinstance(v, str) else
                         ",".join("%s=%s" % kv for kv in v.items()) or "defaults")
def test_same_modules_weights_and_outputs(torchvision, name, kwargs):
    real = _build(getattr(torchvision.models, name), kwargs)
    ours = _build(getattr(stand_in, name), kwargs)

    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in real.named_modules()]
    real_state, our_state = real.state_dict(), ours.state_dict()
    assert list(our_state) == list(real_state)
    for key, value in real_state.items():
        assert our_state[key].dtype == value.dtype and our_state[key].shape == value.shape, key
        assert torch.equal(our_state[key], value), "%s differs from torchvision's after the same seed" % key

    torch.manual_seed(1)
    batch = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(batch.clone()), real(batch.clone()))


def test_the_stand_in_names_are_torchvisions(torchvision):
    """Every name the stand-in defines exists at the same place in torchvision (none invented)."""
    for module_name, ours in stand_in.modules().items():
        real = torchvision
        for part in module_name.split(".")[1:]:
            real = getattr(real, part)
        for attribute in vars(ours):
            if not attribute.startswith("__"):
                assert hasattr(real, attribute), "%s.%s" % (module_name, attribute)
                if isinstance(getattr(ours, attribute), type(stand_in)):
                    assert isinstance(getattr(real, attribute), type(torchvision)), (module_name, attribute)


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet, as every torchxrayvision call site


@pytest.mark.parametrize("shape,dtype", [((3, 5, 7), torch.float32), ((2, 3, 5, 7), torch.float32),
                                         ((2, 3, 5, 7), torch.float64)])
def test_normalize_and_compose_give_torchvisions_tensors(torchvision, shape, dtype):
    torch.manual_seed(2)
    image = torch.rand(shape, dtype=dtype) * 2 - 0.5
    real = torchvision.transforms.Compose([torchvision.transforms.Normalize(MEAN, STD)])
    ours = stand_in.Compose([stand_in.Normalize(MEAN, STD)])
    expected = real(image)
    got = ours(image)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(stand_in.Normalize(MEAN, STD)(image), torchvision.transforms.Normalize(MEAN, STD)(image))
    assert repr(stand_in.Normalize(MEAN, STD)) == repr(torchvision.transforms.Normalize(MEAN, STD))

    # in place: both write into the tensor they are given
    mine, theirs = image.clone(), image.clone()
    stand_in.Normalize(MEAN, STD, inplace=True)(mine)
    torchvision.transforms.Normalize(MEAN, STD, inplace=True)(theirs)
    assert torch.equal(mine, theirs) and not torch.equal(mine, image)


@pytest.mark.parametrize("bad,mean,std", [
    (torch.zeros(3, 4, 4, dtype=torch.uint8), MEAN, STD),  # not floating point
    (torch.zeros(4, 4), MEAN, STD),  # no channel axis
    (torch.zeros(4), MEAN, STD),  # not an image
    (torch.zeros(3, 4, 4), MEAN, [0.2, 0.0, 0.2]),  # division by zero
    ([[0.0]], MEAN, STD),  # not a tensor
])
def test_normalize_refuses_what_torchvision_refuses(torchvision, bad, mean, std):
    with pytest.raises(Exception) as real:
        torchvision.transforms.Normalize(mean, std)(bad)
    with pytest.raises(type(real.value)):
        stand_in.Normalize(mean, std)(bad)


def test_the_stand_in_refuses_what_it_does_not_restate():
    """Checked everywhere (no real torchvision needed): unknown names and pretrained weights fail loudly."""
    module = stand_in.module_of("torchvision.models", resnet34=stand_in.resnet34)
    with pytest.raises(AttributeError, match="not in the parity suite's torchvision stand-in"):
        module.resnet101
    with pytest.raises(ValueError, match="no pretrained weights"):
        stand_in.densenet121(weights="DEFAULT")
    with pytest.raises(TypeError):
        stand_in.resnet34(weights=None, zero_init_residual=True)  # an option torchxrayvision never passes
