"""The films and weights the INT8 classify and archive tests share: the same weights and
calibration films give the same conversion key, so a session converts once (its user cache)."""
from support.xrv_labelled import soft_weights


def int8_setup(shared, folder):
    """``{"weights", "calibration" (a folder of 8 JSRT films), "films" (their paths, sorted),
    "samples" (two sample films to score)}``."""
    calibration = folder / "calibration"
    calibration.mkdir()
    for film in sorted((shared / "data" / "jsrt" / "images").glob("*.png"))[:8]:
        (calibration / film.name).symlink_to(film)
    samples = [str(shared / "data" / "samples" / n) for n in ("16747_3_1.jpg", "00000001_000.png")]
    return {"weights": soft_weights(folder), "calibration": calibration, "samples": samples,
            "films": sorted(str(p) for p in calibration.iterdir())}
