"""Does a heatmap point at the lesion? The pointing game, and lesion positions from an index.

A heatmap (:mod:`mxvision.audit.explain`) *hits* when its maximum lies within the lesion's radius
(plus an optional tolerance) of the lesion's centre. The chance rate is what a point drawn
uniformly over the lungs would score, so a hit rate means something only next to it.
"""
import numpy as np

from mxvision.errors import MxvisionError
from mxvision.audit.explain import peak_of
from mxvision.io.images import read_image


def pointing_game(heatmaps, centres, radii, lung_masks=None, tolerance=0.0):
    """Hit rate of heatmap maxima within ``radius + tolerance`` of known lesion centres.

    ``chance`` is what a point drawn uniformly over the lung (``lung_masks``, each united with the
    lesion's disc) would score: the disc's share of that area, averaged over images. Returns
    ``{"hits", "n", "hit_rate", "chance_rate", "per_image": [...]}``.
    """
    per_image, chance = [], []
    for k, (heat, (cx, cy), r) in enumerate(zip(heatmaps, centres, radii)):
        reach = float(r) + tolerance
        peak = peak_of(heat)
        hit = peak is not None and np.hypot(peak[0] - cx, peak[1] - cy) <= reach
        per_image.append({"peak": peak, "hit": bool(hit),
                          "distance": None if peak is None else float(np.hypot(peak[0] - cx, peak[1] - cy))})
        if lung_masks is not None:
            yy, xx = np.ogrid[:heat.shape[0], :heat.shape[1]]
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= reach ** 2
            chance.append(disc.sum() / max(1, (disc | lung_masks[k]).sum()))
    hits = sum(p["hit"] for p in per_image)
    n = len(per_image)
    return {"hits": int(hits), "n": n, "hit_rate": hits / n if n else float("nan"),
            "chance_rate": float(np.mean(chance)) if chance else None, "tolerance": tolerance,
            "per_image": per_image}


JSRT_MM_PER_PX_512 = 0.7  # JSRT films: 0.175 mm pixels at 2048, so 0.7 mm on the 512 grid


def index_lesions(index, split=None):
    """Rows of ``index`` with a known lesion, as ``(row, x, y, radius, grid)``: ``grid`` None for
    coordinates in the file's pixels, 512 for coordinates on a 512 px grid of the whole film.

    Understands the lesion-insertion set's ``nodule_x, nodule_y, nodule_radius`` (file pixels)
    and JSRT's ``nodule_x_512, nodule_y_512, nodule_size_mm`` (512 grid, diameter in mm; scaled
    to the file's size when it is not 512)."""
    cols = set(index.columns)
    out = []
    for k, rec in enumerate(index.records()):
        if split is not None and rec.get("split") != split:
            continue
        try:
            if {"nodule_x", "nodule_y", "nodule_radius"} <= cols and rec["nodule_x"]:
                out.append((k, float(rec["nodule_x"]), float(rec["nodule_y"]), float(rec["nodule_radius"]),
                            None))
            elif {"nodule_x_512", "nodule_y_512", "nodule_size_mm"} <= cols and rec["nodule_x_512"]:
                out.append((k, float(rec["nodule_x_512"]), float(rec["nodule_y_512"]),
                            float(rec["nodule_size_mm"]) / 2 / JSRT_MM_PER_PX_512, 512))
        except ValueError:
            raise MxvisionError(index.source, f"row {k + 1}: unreadable nodule position or size") from None
    return out


def pointing_game_on_index(explainer, index, split="test", method="gradcam", target=None,
                           tolerance=0.0, batch_size=8):
    """Run :func:`pointing_game` over the lesions of ``index`` (see :func:`index_lesions`) with
    each film's :func:`~mxvision.audit.lesion.lung_mask` (the nominal lungs where it finds none) for the
    chance rate."""
    from mxvision.audit.lesion import lung_mask, nominal_lung_mask

    lesions = index_lesions(index, split)
    if not lesions:
        raise MxvisionError(index.source, f"no rows with nodule coordinates in split {split!r}")
    images = [read_image(index.paths[les[0]]) for les in lesions]
    heat, _, _ = explainer.heatmaps(images, method, target, batch_size)
    centres, radii = [], []
    for les, img in zip(lesions, images):
        scale = 1.0 if les[4] is None else min(img.shape) / les[4]
        centres.append((les[1] * scale, les[2] * scale))
        radii.append(les[3] * scale)
    masks = [lung_mask(img) for img in images]
    masks = [m if m.any() else nominal_lung_mask(m.shape) for m in masks]
    result = pointing_game(heat, centres, radii, masks, tolerance)
    for p, les in zip(result["per_image"], lesions):
        p["id"] = index.ids[les[0]]
    result.update(method=method, split=split)
    return result
