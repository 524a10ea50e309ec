"""A small index of real JSRT films, for tests that need real radiographs but not the whole set."""
import csv


def small_jsrt_index(shared, path, per_class=6):
    """An index CSV of the first ``per_class`` nodule and normal JSRT films of ``shared`` (each its
    own patient), ``per_class - 2`` of each in train, one in val, one in test."""
    images = shared / "data" / "jsrt" / "images"
    splits = ["train"] * (per_class - 2) + ["val", "test"]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "patient_id", "split"])
        for label, stem in (("nodule", "JPCLN"), ("normal", "JPCNN")):
            for film, split in zip(sorted(images.glob(stem + "*.png")), splits):
                out.writerow([film, label, film.stem, split])
    return path
