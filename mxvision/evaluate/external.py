"""What both evaluators share: which store is scored, whether that is an external validation, and
the refusal of an "external" store that shares patients or images with the training store."""
import logging
import os
from pathlib import Path

from mxvision.data.overlap import find_overlap, overlap_problem
from mxvision.errors import BadRun, MxvisionError
from mxvision.features.store import MANIFEST, FeatureStore

log = logging.getLogger(__name__)

#: How the AUC intervals of every evaluation are computed (cited in metrics.json).
AUC_INTERVAL_METHODS = {
    "auc_ci_bootstrap": "percentile interval of 2,000 resamples of patients with replacement "
                        "(all images of a drawn patient), seed 0",
    "auc_ci_delong": "DeLong, DeLong & Clarke-Pearson, Biometrics 1988 (fast algorithm of Sun & "
                     "Xu, IEEE SPL 2014)",
}


def same_folder(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:  # the training store moved or is gone: a store given by path is another one
        return False


def scored_store(config, features, split):
    """``(store, trained, trained_dir, external, split)``: the store to score (``features``,
    default the run's own), the training store opened once (``store`` itself when they are the
    same; None when it is gone), its folder, whether the scored store is another one than the run
    was trained on, and the split to score -- ``test`` of the run's own store, all (None) of
    another store, unless ``split`` is given."""
    trained_dir = Path(config["features"]["features_dir"])
    store = FeatureStore(features or trained_dir)
    external = not same_folder(store.path, trained_dir)
    if not external:
        trained = store
    else:
        trained = FeatureStore(trained_dir) if (trained_dir / MANIFEST).is_file() else None
    if split is None and not external:
        split = "test"
    return store, trained, trained_dir, external, split


def check_overlap(store, trained, trained_dir, items, allow_overlap):
    """Refuse (unless ``allow_overlap``) an external ``store`` whose ``items`` share patient ids or
    decoded pixels with the training store ``trained`` (None: gone); return a summary for
    metrics.json."""
    if trained is None:
        if not allow_overlap:
            raise BadRun(trained_dir, "the run's training features are gone, so an external "
                                      "evaluation cannot be checked for shared patients and images; "
                                      "pass --allow-overlap to evaluate without the check")
        return {"training_patients_shared": None, "training_images_shared": None,
                "n_training_images_checked": 0, "allowed": True}
    overlap = find_overlap(trained.items, items, pixels=not allow_overlap)
    problem = overlap_problem(overlap)
    if problem and not allow_overlap:
        raise MxvisionError(store.path, f"shares data with the training store {trained_dir}: "
                                        f"{problem}; pass --allow-overlap to evaluate anyway")
    if problem:
        log.warning("%s shares data with the training store %s: %s", store.path, trained_dir, problem)
    return {"training_patients_shared": len(overlap["patients"]),
            "training_images_shared": len(overlap["images"]) if overlap["pixels_checked"] else None,
            "n_training_images_checked": overlap["n_train"] if overlap["pixels_checked"] else 0,
            "allowed": bool(allow_overlap)}


def provenance(run_dir, config, state, store, trained_dir, external, split_name, epoch=None):
    """Where an evaluation's figures came from: the split, internal or external, the run and
    epoch, both stores, backbone, cut and weights (every metrics.json carries these)."""
    return {
        "split": split_name,
        "validation": "external" if external else "internal",
        "epoch": epoch or state["best_epoch"],
        "run_dir": str(Path(run_dir).resolve()),
        "features_dir": str(store.path.resolve()),
        "training_features_dir": str(trained_dir),
        "backbone": store.manifest["backbone"],
        "cut": store.manifest["cut"],
        # a fine-tuned run's backbone is its own, not the one the stored features came from
        "weights": (config["features"]["weights"] if "finetune" in config
                    else store.manifest["weights"])["description"],
    }
