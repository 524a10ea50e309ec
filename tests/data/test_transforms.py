"""Presets and preprocessing: the exact recipe feature extraction and prediction both apply."""
import json

import cv2
import numpy as np
import pytest

from mxvision.errors import BadImage, MxvisionError
from mxvision.io.images import read_image
from mxvision.data.transforms import (
    PRESETS, Preset, center_crop_resize, get_preset, load_batch, load_image, normalize, preprocess)


def write_png(path, img_u8):
    assert cv2.imwrite(str(path), img_u8)
    return path


# --------------------------------------------------------------------------- presets
def test_builtin_presets():
    imagenet = PRESETS["imagenet224"]
    assert (imagenet.size, imagenet.channels) == (224, 3)
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    for name, size in (("xrv224", 224), ("xrv512", 512)):
        preset = PRESETS[name]
        assert (preset.name, preset.size, preset.channels) == (name, size, 1)
        # torchxrayvision: (2x - 1) * 1024 maps 0 -> -1024, 0.5 -> 0, 1 -> 1024 exactly.
        out = normalize(np.array([[0.0, 0.5, 1.0, 0.25]], np.float32), preset)
        assert out.shape == (1, 1, 4)
        np.testing.assert_array_equal(out[0, 0], [-1024.0, 0.0, 1024.0, -512.0])


def test_preset_json_round_trip_and_get_preset():
    for preset in PRESETS.values():
        record = json.loads(json.dumps(preset.to_dict()))
        assert isinstance(record["mean"], list)
        assert Preset.from_dict(record) == preset
        assert get_preset(record) == preset
        assert get_preset(preset.name) is preset
        assert get_preset(preset) is preset
    custom = Preset("tiny64", 64, 1, [0.5], [0.25])
    assert custom.mean == (0.5,) and hash(custom) == hash(Preset("tiny64", 64, 1, (0.5,), (0.25,)))


def test_unknown_or_broken_presets():
    with pytest.raises(MxvisionError) as info:
        get_preset("imagenet999")
    message = str(info.value)
    assert "imagenet999" in message and all(name in message for name in PRESETS)
    with pytest.raises(MxvisionError, match="preset"):
        get_preset({"name": "x", "size": 224})  # fields missing
    with pytest.raises(MxvisionError):
        get_preset(224)
    for bad in [dict(channels=2, mean=(0, 0), std=(1, 1)), dict(channels=3, mean=(0,), std=(1,)),
                dict(channels=1, mean=(0,), std=(0,)), dict(channels=1, mean=(0,), std=(-1,))]:
        with pytest.raises(ValueError):
            Preset("bad", 224, **bad)
    with pytest.raises(ValueError):
        Preset("bad", 0, 1, (0,), (1,))


# --------------------------------------------------------------------------- crop and resize
@pytest.mark.parametrize("transpose", [False, True])
def test_center_crop_keeps_the_middle_square(transpose):
    img = np.zeros((100, 300), np.float32)  # left band 0, middle square 0.6, right band 1
    img[:, 100:200] = 0.6
    img[:, 200:] = 1.0
    if transpose:  # portrait: top/bottom bands are cropped instead
        img = np.ascontiguousarray(img.T)
    for size in (50, 100, 160):
        out = center_crop_resize(img, size)
        assert out.shape == (size, size) and out.dtype == np.float32
        np.testing.assert_allclose(out, 0.6, atol=1e-6)


def test_shrinking_averages_instead_of_aliasing():
    # A one-pixel checkerboard shrunk 3x: area averaging gives 4/9 or 5/9 everywhere, while
    # point sampling (nearest, or linear at a 3x step) would give pure 0s and 1s.
    yy, xx = np.mgrid[:672, :672]
    checker = ((yy + xx) % 2).astype(np.float32)
    out = center_crop_resize(checker, 224)
    assert out.shape == (224, 224)
    assert np.abs(out - 0.5).max() < 0.06


def test_enlarging_stays_in_range_and_off_centre_crop():
    rng = np.random.RandomState(3)
    img = (rng.rand(41, 58) > 0.5).astype(np.float32)  # uneven margins (17 px), sharp edges
    out = center_crop_resize(img, 224)
    assert out.shape == (224, 224) and out.min() >= 0.0 and out.max() <= 1.0
    same = center_crop_resize(img[:, 8:49], 224)  # the crop center_crop_resize should take
    np.testing.assert_array_equal(out, same)


def test_center_crop_resize_rejects_wrong_input():
    with pytest.raises(ValueError):
        center_crop_resize(np.zeros((64, 64), np.uint8), 32)
    with pytest.raises(ValueError):
        center_crop_resize(np.zeros((64, 64, 3), np.float32), 32)


# --------------------------------------------------------------------------- normalise / preprocess
def test_imagenet_normalize_replicates_and_standardises():
    img = np.full((8, 8), 0.7, np.float32)
    img[0, 0] = 0.1
    out = normalize(img, "imagenet224")
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert out[c, 3, 3] == pytest.approx((0.7 - m) / s, rel=1e-6)
        assert out[c, 0, 0] == pytest.approx((0.1 - m) / s, rel=1e-6)


def test_preprocess_is_crop_then_normalize():
    img = np.random.RandomState(4).rand(300, 240).astype(np.float32)
    for name in PRESETS:
        preset = PRESETS[name]
        out = preprocess(img, name)
        assert out.shape == (preset.channels, preset.size, preset.size)
        np.testing.assert_array_equal(out, normalize(center_crop_resize(img, preset.size), preset))


def test_load_image_and_batch(tmp_path):
    rng = np.random.RandomState(5)
    paths = [write_png(tmp_path / f"img{i}.png", rng.randint(0, 256, (90 + 10 * i, 120), np.uint8))
             for i in range(3)]
    single = load_image(paths[0])
    assert single.shape == (3, 224, 224)
    np.testing.assert_array_equal(single, preprocess(read_image(paths[0]), "imagenet224"))
    batch = load_batch(paths, "xrv512")
    assert batch.shape == (3, 1, 512, 512) and batch.dtype == np.float32
    assert batch.min() >= -1024 and batch.max() <= 1024
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(batch[i], load_image(path, "xrv512"))
    assert not np.array_equal(batch[0], batch[1])
    assert load_batch([], "imagenet224").shape == (0, 3, 224, 224)
    with pytest.raises(BadImage, match="missing.png"):
        load_batch([paths[0], tmp_path / "missing.png"], "imagenet224")
