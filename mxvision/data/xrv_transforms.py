"""torchxrayvision's preprocessing, for its chest X-ray classifiers ported to MXNet.

The model card's steps are ``normalize``, ``XRayCenterCrop`` and ``XRayResizer``; :func:`preprocess`
does the last two and :func:`load_xray` reads any file into the first one's convention.

Reading files (:func:`load_xray`) goes through :func:`mxvision.io.images.read_image`, so every
format mxvision reads works; how that compares with torchxrayvision:

* 8-bit PNG/JPEG: identical values. ``read_image`` gives ``v / 255`` in float32 and
  ``(2 x - 1) * 1024`` is then bit-for-bit ``normalize(v, 255)``. Colour files are reduced to
  luminance (0.299 R + 0.587 G + 0.114 B) where the model card averages the channels
  (``img.mean(2)``); for radiographs stored as RGB with equal channels -- like the model card's
  own example ``16747_3_1.jpg`` -- both give the grey value exactly. For a truly coloured image
  (an annotated screenshot) they differ.
* 16-bit PNG: scaled by 65535 (the PNG full scale); torchxrayvision's model card would call
  ``normalize(img, 255)`` and refuse it (max above maxval).
* DICOM: ``read_image`` applies the modality and VOI LUTs and min-max scales to the full range;
  torchxrayvision's ``read_xray_dcm`` divides the stored values by ``2**BitsStored - 1`` without
  the VOI LUT. Both invert MONOCHROME1. The contrast therefore differs for DICOMs whose values do
  not span their bit depth.
"""
import numpy as np

from mxvision.errors import MxvisionError
from mxvision.io.images import read_image

__all__ = ["NormalizationError", "normalize", "XRayCenterCrop", "XRayResizer", "load_xray", "xray_range", "preprocess"]


class NormalizationError(MxvisionError, ValueError):
    """An image whose values exceed the ``maxval`` given to :func:`normalize`."""


# --------------------------------------------------------------------------- preprocessing
def normalize(img, maxval, reshape=False):
    """torchxrayvision's ``normalize``: scale ``[0, maxval]`` to ``[-1024, 1024]`` (float32).

    Like torchxrayvision it refuses an image whose maximum exceeds ``maxval`` (the usual sign of
    a 16-bit image normalized as 8-bit). ``reshape=True`` keeps the first channel of a colour
    image and adds the channel axis: (H, W[, C]) -> (1, H, W).
    """
    img = np.asarray(img)
    if img.max() > maxval:
        raise NormalizationError("image", "max image value (%s) higher than expected bound (%s)"
                                 % (img.max(), maxval))
    img = (2 * (img.astype(np.float32) / maxval) - 1.0) * 1024
    if reshape:
        if img.ndim > 2:
            img = img[:, :, 0]
        if img.ndim < 2:
            raise NormalizationError("image", "has fewer than 2 dimensions (shape %s)" % (img.shape,))
        img = img[None, :, :]
    return img


class XRayCenterCrop:
    """torchxrayvision's ``XRayCenterCrop``: the centred square of a (C, H, W) image."""

    def __call__(self, img):
        _, y, x = img.shape
        crop = min(y, x)
        startx = x // 2 - crop // 2
        starty = y // 2 - crop // 2
        return img[:, starty:starty + crop, startx:startx + crop]


class XRayResizer:
    """torchxrayvision's ``XRayResizer``: (C, H, W) -> (1, size, size) float32.

    ``engine="skimage"`` (the default, as in torchxrayvision) reproduces
    ``skimage.transform.resize(img, (1, size, size), mode="constant", preserve_range=True)``
    with SciPy directly (Gaussian anti-aliasing with sigma ``(factor - 1) / 2`` when shrinking,
    then linear interpolation on the pixel grid, zero outside the image, clipped to the input
    range), so scikit-image is not needed; ``engine="cv2"`` is OpenCV's ``INTER_AREA``.
    """

    def __init__(self, size, engine="skimage"):
        if engine not in ("skimage", "cv2"):
            raise ValueError("Unknown engine, Must be skimage (default) or cv2.")
        self.size = int(size)
        self.engine = engine

    def __call__(self, img):
        img = np.asarray(img)
        if self.engine == "cv2":
            import cv2
            return cv2.resize(img[0], (self.size, self.size),
                              interpolation=cv2.INTER_AREA).reshape(1, self.size, self.size).astype(np.float32)
        return _skimage_resize(img, (1, self.size, self.size)).astype(np.float32)


def _skimage_resize(image, output_shape):
    """``skimage.transform.resize(image, output_shape, order=1, mode="constant", cval=0, clip=True,
    preserve_range=True, anti_aliasing=None)`` for a float or integer array of the same ndim."""
    from scipy import ndimage as ndi

    if image.ndim != len(output_shape):
        raise ValueError("XRayResizer expects a (C, H, W) image, got shape %s" % (image.shape,))
    if image.dtype == np.float16:
        image = image.astype(np.float32)
    elif image.dtype.char not in "df":
        image = image.astype(np.float64)
    input_shape = image.shape
    factors = np.divide(input_shape, output_shape)
    if any(o < i for o, i in zip(output_shape, input_shape)):
        sigma = np.maximum(0, (factors - 1) / 2)
        filtered = ndi.gaussian_filter(image, sigma, cval=0, mode="grid-constant")
    else:
        filtered = image
    out = ndi.zoom(filtered, [1 / f for f in factors], order=1, mode="grid-constant", cval=0, grid_mode=True)
    low, high = image.min(), image.max()
    if not low <= 0 <= high and out.min() <= 0 <= out.max():  # the zero border widened the range
        low, high = min(low, image.dtype.type(0)), max(high, image.dtype.type(0))
    np.clip(out, low, high, out=out)
    return out


def load_xray(path):
    """Read any X-ray file mxvision reads into torchxrayvision's convention: (1, H, W) float32 in
    [-1024, 1024] (see the module notes for how this compares with torchxrayvision's readers)."""
    return xray_range(read_image(path))


def xray_range(img):
    """A decoded image (2-D float32 in [0, 1], :func:`~mxvision.io.images.read_image`) in
    torchxrayvision's convention, (1, H, W) in [-1024, 1024]: for 8-bit files this equals
    ``normalize(v, 255)``."""
    return ((np.float32(2) * img - np.float32(1.0)) * np.float32(1024))[None, :, :]


def preprocess(img, size):
    """The model card's transform: ``XRayCenterCrop`` then ``XRayResizer(size)`` on (1, H, W)."""
    return XRayResizer(size)(XRayCenterCrop()(img))
