"""Preprocessing presets shared, byte for byte, by feature extraction and prediction.

A network only works on inputs prepared the way its training inputs were. Keeping the whole
recipe (crop, size, channel count, per-channel normalisation) in one frozen :class:`Preset`,
recorded in every feature manifest via :meth:`Preset.to_dict`, means a prediction can rebuild
exactly the transform its features were made with instead of re-implementing it.

Pipeline, for every preset: ``read_image`` (2-D float32 in [0, 1]) -> :func:`center_crop_resize`
(largest centred square, resized to ``size``) -> :func:`normalize` (replicate to ``channels`` and
compute ``(x - mean[c]) / std[c]``).

The torchxrayvision convention, ``(2x - 1) * 1024`` i.e. values in [-1024, 1024], is the same
affine map with ``mean = 0.5`` and ``std = 1/2048`` (exact in binary floating point), so one
formula serves both ImageNet-style and torchxrayvision-style networks.
"""
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Tuple, Union

import cv2
import numpy as np

from mxvision.errors import MxvisionError
from mxvision.io.images import read_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
XRV_MEAN = (0.5,)
XRV_STD = (1.0 / 2048.0,)


@dataclass(frozen=True)
class Preset:
    """One complete input recipe: square ``size``, ``channels`` (1 or 3), per-channel mean/std.

    ``mean``/``std`` are on the [0, 1] scale of :func:`~mxvision.io.images.read_image` output.
    """

    name: str
    size: int
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __post_init__(self):
        # Lists from JSON become tuples so the preset stays hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("preset name must be a non-empty string")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"preset {self.name!r}: size must be a positive int, got {self.size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"preset {self.name!r}: channels must be 1 or 3, got {self.channels!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"preset {self.name!r}: mean and std need {self.channels} values each")
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"preset {self.name!r}: mean must be finite and std positive")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (lists, not tuples) that :meth:`from_dict` turns back."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Preset":
        """Rebuild a preset recorded by :meth:`to_dict`; ValueError when fields are missing/wrong.

        Callers reading a manifest should turn the ValueError into a ``BadRun`` naming the file.
        """
        try:
            return cls(name=d["name"], size=d["size"], channels=d["channels"],
                       mean=d["mean"], std=d["std"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a preset record ({type(exc).__name__}: {exc})") from None


PRESETS = {
    # Xvision / torchvision-style ImageNet ResNet input.
    "imagenet224": Preset("imagenet224", 224, 3, IMAGENET_MEAN, IMAGENET_STD),
    # torchxrayvision DenseNet (224) and ResNet-50 (512) input: 1 channel in [-1024, 1024].
    "xrv224": Preset("xrv224", 224, 1, XRV_MEAN, XRV_STD),
    "xrv512": Preset("xrv512", 512, 1, XRV_MEAN, XRV_STD),
    # torchxrayvision's other models at their own sizes (the Stanford ensemble, the race model)
    "xrv320": Preset("xrv320", 320, 1, XRV_MEAN, XRV_STD),
}


def get_preset(name_or_preset: Union[str, Preset, Mapping]) -> Preset:
    """Resolve a preset name, a :class:`Preset`, or a ``to_dict()`` record to a :class:`Preset`.

    Raises :class:`MxvisionError` for an unknown name, listing the known ones.
    """
    if isinstance(name_or_preset, Preset):
        return name_or_preset
    if isinstance(name_or_preset, Mapping):
        try:
            return Preset.from_dict(name_or_preset)
        except ValueError as exc:
            raise MxvisionError("preset", str(exc)) from None
    preset = PRESETS.get(name_or_preset) if isinstance(name_or_preset, str) else None
    if preset is None:
        raise MxvisionError(f"preset {name_or_preset!r}",
                            f"unknown; known presets: {', '.join(sorted(PRESETS))}")
    return preset


def center_crop_resize(img2d: np.ndarray, size: int) -> np.ndarray:
    """Crop the largest centred square and resize it to ``(size, size)``; float32 in [0, 1].

    Shrinking uses ``INTER_AREA`` (averages the covered pixels, no aliasing -- a 2048 px film
    scaled to 224 keeps its texture statistics); enlarging uses ``INTER_LINEAR``, which cannot
    overshoot the input range the way cubic interpolation does. The crop keeps the aspect ratio
    (no stretching of the thorax); the centre of a PA chest film is the mediastinum, so only
    the lateral margins or the abdomen/neck are lost.
    """
    img = np.asarray(img2d)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1] (from read_image), got {img.dtype}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty image of shape {img.shape}")
    height, width = img.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(img[top:top + side, left:left + side], dtype=np.float32)
    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        square = cv2.resize(square, (size, size), interpolation=interp)
    return np.clip(square, 0.0, 1.0)


def normalize(img_sq: np.ndarray, preset) -> np.ndarray:
    """Replicate a 2-D [0, 1] image to ``preset.channels`` and standardise: (C, H, W) float32."""
    preset = get_preset(preset)
    img = np.asarray(img_sq, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    mean = np.asarray(preset.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preset.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((img[None, :, :] - mean) / std).astype(np.float32)


def preprocess(img2d: np.ndarray, preset) -> np.ndarray:
    """:func:`center_crop_resize` then :func:`normalize`: (C, size, size) float32."""
    preset = get_preset(preset)
    return normalize(center_crop_resize(img2d, preset.size), preset)


def load_image(path, preset="imagenet224") -> np.ndarray:
    """Read any supported X-ray file and preprocess it: (C, size, size) float32."""
    return preprocess(read_image(path), preset)


def load_batch(paths: Iterable, preset) -> np.ndarray:
    """Load several files into one (N, C, size, size) float32 array (N may be 0).

    The first unreadable file raises its :class:`~mxvision.errors.BadImage`.
    """
    preset = get_preset(preset)
    paths = list(paths)
    batch = np.empty((len(paths), preset.channels, preset.size, preset.size), dtype=np.float32)
    for i, path in enumerate(paths):
        batch[i] = load_image(path, preset)
    return batch


__all__ = ["Preset", "PRESETS", "IMAGENET_MEAN", "IMAGENET_STD", "get_preset",
           "center_crop_resize", "normalize", "preprocess", "load_image", "load_batch"]
