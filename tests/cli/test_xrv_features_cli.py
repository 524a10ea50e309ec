"""``mxvision xrv features`` end to end on real films (random realistic autoencoder weights made here)."""
import csv

import numpy as np
import pytest
from support.cli import one_line_error, run_cli
from support.xrv_autoencoder import NAME, RELEASE_FILE, write_autoencoder_release

from mxvision.features.store import FeatureStore

SAMPLES = ["00000001_000.png", "16747_3_1.jpg", "Fake_MONOHR1.dcm"]


@pytest.fixture(scope="module")
def weights(shared, tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / RELEASE_FILE
    write_autoencoder_release(path, [shared / "data" / "samples" / n for n in SAMPLES])
    return str(path)


@pytest.fixture
def films(shared):
    return [str(shared / "data" / "samples" / n) for n in SAMPLES]


def test_image_files_give_an_npz(films, weights, tmp_path):
    code, out, err = run_cli("xrv", "features", *films, "--weights", weights, "--out", tmp_path / "ae.npz",
                             "--quiet")
    assert code == 0, err
    assert out.startswith("3 films' features (512, 3, 3) of %s (0 unreadable)" % NAME) and "ae.npz" in out
    with np.load(tmp_path / "ae.npz", allow_pickle=False) as npz:
        assert npz["features"].shape == (3, 4608) and list(npz["paths"]) == films


def test_an_index_gives_a_store_the_training_command_reads(shared, weights, tmp_path):
    index = tmp_path / "jsrt.csv"
    images = shared / "data" / "jsrt" / "images"
    with open(index, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "label", "split"])
        for label, stem in (("nodule", "JPCLN"), ("normal", "JPCNN")):
            for film, split in zip(sorted(images.glob(stem + "*.png")), ("train", "train", "val")):
                rows.writerow([film, label, split])
    code, out, err = run_cli("xrv", "features", "--index", index, "--weights", weights, "--out", tmp_path / "store",
                             "--batch-size", 2, "--quiet")
    assert code == 0, err
    assert "6 feature maps (512, 3, 3) of %s" % NAME in out and "mxvision train --features" in out
    assert FeatureStore(tmp_path / "store").manifest["backbone"] == NAME
    code, out, err = run_cli("train", "--features", tmp_path / "store", "--out", tmp_path / "run", "--epochs", 1,
                             "--batch-size", 2, "--quiet")
    assert code == 0, err


def test_bad_inputs_are_one_line(films, weights, tmp_path):
    one_line_error(*run_cli("xrv", "features", "--out", tmp_path / "x.npz")[::2], "give IMAGE files")
    one_line_error(*run_cli("xrv", "features", films[0], "--index", "a.csv", "--out", tmp_path / "x.npz")[::2],
                   "one of the two")
    one_line_error(*run_cli("xrv", "features", films[0], "--model", "riken-age", "--out", tmp_path / "x.npz")[::2],
                   "--model riken-age", NAME)
    one_line_error(*run_cli("xrv", "features", films[0], "--weights", tmp_path / "absent.pt",
                            "--out", tmp_path / "x.npz")[::2], "no such weights file")
    one_line_error(*run_cli("xrv", "features", films[0], "--weights", weights, "--out", tmp_path / "x.csv")[::2],
                   "name the .npz file")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    code, out, err = run_cli("xrv", "features", broken, "--weights", weights, "--out", tmp_path / "x.npz", "--quiet")
    one_line_error(code, err, "no film could be read")
    assert out.startswith("ERROR\t") and "broken.png" in out and not (tmp_path / "x.npz").exists()
