"""mxvision.segmentation without a network: where masks land on a film, the overlay, the checks.

The model end to end (real films, written files, one-line errors) is tests/cli/test_segment.py;
the lung-mask provider in lesion insertion is tests/audit/test_lesion_lung_masks.py.
"""
import numpy as np
import pytest

from mxvision.errors import MxvisionError
from mxvision.segmentation import PALETTE, centre_square, check_threshold, film_masks, overlay, structure_file


def test_masks_land_on_the_centred_square_torchxrayvision_crops():
    """A probability map with one bright quarter, on a wide and a tall film: the mask is that
    quarter of the centred square (XRayCenterCrop's), nothing outside it."""
    probs = np.zeros((2, 512, 512), np.float32)
    probs[0, :256, :256] = 0.9  # the top-left quarter
    probs[1] = 0.6
    for shape in ((300, 500), (500, 300), (400, 400)):
        top, left, side = centre_square(shape)
        masks = film_masks(probs, shape, threshold=0.5)
        assert masks.shape == (2,) + shape
        expected = np.zeros(shape, bool)
        expected[top:top + side // 2, left:left + side // 2] = True
        assert np.mean(masks[0] != expected) < 2.0 / side  # one row/column at the edge may differ
        assert masks[1].sum() == side * side and masks[1, top:top + side, left:left + side].all()
        assert not film_masks(probs, shape, threshold=0.7)[1].any()  # 0.6 is below 0.7


def test_centre_square_is_xrv_center_crop():
    from mxvision.data.xrv_transforms import XRayCenterCrop
    for shape in ((7, 12), (12, 7), (885, 1036), (5, 5)):
        img = np.arange(np.prod(shape)).reshape((1,) + shape)
        top, left, side = centre_square(shape)
        np.testing.assert_array_equal(XRayCenterCrop()(img)[0], img[0, top:top + side, left:left + side])


def test_overlay_tints_each_structure_in_its_colour():
    film = np.full((200, 300), 100, np.uint8)
    masks = np.zeros((3, 200, 300), bool)
    masks[0, 150:190, 20:80] = True
    masks[2, 150:190, 200:280] = True
    picture = overlay(film, masks, ["A", "B", "C"])
    assert picture.shape == (200, 300, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[10:140, 100:190], 100)  # untouched film (below the legend)
    for k, (y, x) in ((0, (170, 50)), (2, (170, 240))):
        colour = np.array([int(PALETTE[k][i:i + 2], 16) for i in (1, 3, 5)])
        expected = np.round(0.6 * 100 + 0.4 * colour)
        np.testing.assert_allclose(picture[y, x], expected, atol=1)


def test_threshold_must_be_inside_zero_one():
    assert check_threshold("0.25") == 0.25
    for bad in (0, 1, -0.1, 1.5, float("nan"), "abc", None):
        with pytest.raises(MxvisionError, match="above 0 and below 1"):
            check_threshold(bad)


def test_structure_files_are_named_after_the_structures():
    assert structure_file("Left Hilus Pulmonis") == "Left_Hilus_Pulmonis.png"
