"""Lesion insertion with the lungs of the segmentation model (``mxvision synth --lung-masks pspnet``).

The PSPNet has random (seeded) weights here, with its two lung outputs' biases shifted so that
each lung covers about 15% of the film's centred square: partial, film-dependent masks that
differ from lesion.lung_mask's estimate. Every inserted nodule must then lie inside the lungs
the network itself gives (its raw logits, on its own 512 grid), which placing nodules in the
estimate would not do.
"""
import csv

import mxnet as mx
import numpy as np
import pytest

from support.cli import one_line_error, run_cli
from mxvision.audit import lesion
from mxvision.data.index import read_index
from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.io.images import read_image
from mxvision.segmentation import LUNGS, centre_square, load_segmenter, lung_mask_provider

LUNG_SHARE = 0.15  # of the square, per lung


@pytest.fixture(scope="module")
def films(shared):
    # a wide JPEG: its centred square is what the model sees (one film: the lungs' bias shift
    # below is that film's; random weights give logits of very different scales film to film)
    return [str(shared / "data" / "samples" / "16747_3_1.jpg")]


@pytest.fixture(scope="module")
def segmenter(films, tmp_path_factory):
    """(weights file, {film: the lungs' logits (2, 512, 512) on the model's grid})."""
    net = load_segmenter(weights="none")
    lungs = [net.targets.index(n) for n in LUNGS]
    logits = {f: net(mx.nd.array(preprocess(load_xray(f), 512)[None])).asnumpy()[0][lungs] for f in films}
    stacked = np.stack(list(logits.values()))
    shift = [np.quantile(stacked[:, k], 1 - LUNG_SHARE) for k in range(len(lungs))]
    bias = net.classification.bias.data().asnumpy()
    bias[lungs] -= shift
    net.classification.bias.set_data(mx.nd.array(bias))
    path = str(tmp_path_factory.mktemp("seg") / "pspnet-partial-lungs.params")
    net.save_parameters(path)
    # the bias is added before the final (linear, weights summing to 1) resize: the logits move by it
    return path, {f: v - np.array(shift)[:, None, None] for f, v in logits.items()}


@pytest.fixture(scope="module")
def pairs(films, segmenter, tmp_path_factory):
    """``mxvision synth --lung-masks pspnet``: 8 nodule versions of the film."""
    folder = tmp_path_factory.mktemp("pairs")
    with open(folder / "normals.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id", "split", "view"])
        for k, film in enumerate(films):
            writer.writerow([film, "normal", "p%d" % k, "test", "PA"])
    code, out, err = run_cli("synth", "--index", folder / "normals.csv", "--out", folder / "set", "--variants", 8,
                             "--lung-masks", "pspnet", "--segmenter-weights", segmenter[0], "--quiet")
    assert code == 0, err
    return read_index(folder / "set" / "index.csv"), out


def _on_grid(x, y, shape):
    """Film pixel (x, y) -> (row, column) of the model's 512 grid over the centred square."""
    top, left, side = centre_square(shape)
    return min(511, int((y - top) * 512 / side)), min(511, int((x - left) * 512 / side))


def test_nodules_lie_inside_the_models_lungs(films, segmenter, pairs):
    index, out = pairs
    logits = segmenter[1]
    rows = [r for r in index.records() if r["label"] == "nodule"]
    assert len(rows) == 8 and {r["lung_mask"] for r in rows} == {"chestx_det-pspnet"}
    assert "lung masks: chestx_det-pspnet lungs" in out
    for row in rows:
        lungs = logits[row["source"]].max(axis=0) > 0  # inside either lung
        shape = read_image(row["source"]).shape
        x, y, r = (float(row[c]) for c in ("nodule_x", "nodule_y", "nodule_radius"))
        for angle in np.linspace(0, 2 * np.pi, 12, endpoint=False):  # the centre and a ring of the disc
            for reach in (0.0, 0.8 * r):
                assert lungs[_on_grid(x + reach * np.cos(angle), y + reach * np.sin(angle), shape)], row["path"]


def test_the_models_lungs_are_not_the_estimate(films, segmenter):
    """What the previous test checks would not hold by chance: the model's lungs (as the provider
    gives them, at each film's size) cover well under the estimate's area and differ from it."""
    provider = lung_mask_provider(weights=segmenter[0])
    for film in films:
        img = lesion.to_uint8(read_image(film))
        model, estimate = provider(img), lesion.lung_mask(img)
        assert model.shape == img.shape
        top, left, side = centre_square(img.shape)
        assert 0.15 < model.sum() / side ** 2 < 0.4  # each lung ~15%, outside the square nothing
        assert (model & estimate).sum() / (model | estimate).sum() < 0.6


def test_segmenter_options_are_checked_in_one_line(tmp_path, films):
    index = tmp_path / "normals.csv"
    index.write_text("path,label,patient_id,split,view\n%s,normal,p0,test,PA\n" % films[0])
    code, _, err = run_cli("synth", "--index", index, "--out", tmp_path / "a", "--segmenter-weights", "x.pth")
    one_line_error(code, err, "--segmenter-weights", "--lung-masks pspnet")
    code, _, err = run_cli("synth", "--index", index, "--out", tmp_path / "b", "--lung-masks", "pspnet",
                           "--segmenter-weights", tmp_path / "missing.pth")
    one_line_error(code, err, "missing.pth")
    assert not (tmp_path / "b").exists()
