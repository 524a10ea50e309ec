"""Grad-CAM and input-gradient saliency: known answers on tiny networks, real runs, the CLI."""
import json

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from mxvision import explain
from mxvision.cli import explain as cli_explain


def run_cli(monkeypatch, *argv):
    import mxvision.cli as cli
    if cli_explain not in cli.COMMAND_GROUPS:
        monkeypatch.setattr(cli, "COMMAND_GROUPS", cli.COMMAND_GROUPS + [cli_explain])
    return cli.main([str(a) for a in argv])


class Features(nn.HybridBlock):
    """Two channels: a bright-blob detector (+x) and its negative (-x), through a BatchNorm whose
    running statistics are not the identity (so a wrong BatchNorm gradient would show)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(2, 3, padding=1, use_bias=False, in_channels=1)
        self.bn = nn.BatchNorm(in_channels=2)

    def hybrid_forward(self, F, x):
        return F.relu(self.bn(self.conv(x)))


def tiny_net(hybridize):
    mx.random.seed(1)
    feats = Features()
    feats.initialize()
    kernel = np.zeros((2, 1, 3, 3), np.float32)
    kernel[0, 0, 1, 1], kernel[1, 0, 1, 1] = 1.0, -1.0
    feats.conv.weight.set_data(mx.nd.array(kernel))
    feats.bn.running_mean.set_data(mx.nd.array([0.1, -0.2]))
    feats.bn.running_var.set_data(mx.nd.array([4.0, 0.25]))
    head = nn.HybridSequential()
    head.add(nn.Dense(8, in_units=2 * 16 * 16), nn.BatchNorm(in_channels=8), nn.Dense(2, in_units=8))
    head.initialize(mx.init.Xavier())
    head[1].running_mean.set_data(mx.nd.array(np.linspace(-1, 1, 8)))
    head[1].running_var.set_data(mx.nd.array(np.linspace(0.5, 3, 8)))
    if hybridize:
        feats.hybridize()
        head.hybridize()
    return feats, head


def blob_image(cx, cy, size=16):
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4.0).astype(np.float32)[None, None]


@pytest.mark.parametrize("hybridize", [False, True])
def test_grad_cam_equals_finite_difference_reference(hybridize):
    feats, head = tiny_net(hybridize)
    x = mx.nd.array(blob_image(11, 4))
    cam, logits, targets = explain.grad_cam(feats, head, x, target=1)
    a = feats(x).asnumpy()
    # the head is affine in A in inference mode, so central differences are exact up to rounding
    alpha = np.zeros(2)
    eps = 1e-2
    for k in range(2):
        for i in range(16):
            for j in range(16):
                plus, minus = a.copy(), a.copy()
                plus[0, k, i, j] += eps
                minus[0, k, i, j] -= eps
                diff = head(mx.nd.array(plus)).asnumpy()[0, 1] - head(mx.nd.array(minus)).asnumpy()[0, 1]
                alpha[k] += diff / (2 * eps)
    alpha /= 256
    ref = np.maximum((alpha[:, None, None] * a[0]).sum(0), 0)
    assert targets.tolist() == [1]
    assert np.isclose(logits[0], head(mx.nd.array(a)).asnumpy()[0, 1], atol=1e-4)
    assert ref.max() > 0
    np.testing.assert_allclose(cam[0], ref / ref.max(), atol=2e-3)


def test_grad_cam_points_at_the_evidence_and_is_empty_against_it():
    feats = nn.HybridLambda(lambda F, x: F.relu(F.concat(x, -x, dim=1)))
    head = nn.HybridLambda(lambda F, a: F.concat(-a.sum(axis=(1, 2, 3)).reshape((-1, 1)),
                                                 a.slice_axis(axis=1, begin=0, end=1).sum(axis=(1, 2, 3)).reshape((-1, 1)),
                                                 dim=1))
    x = mx.nd.array(blob_image(12, 3))
    cam, _, _ = explain.grad_cam(feats, head, x, target=1)
    assert explain.peak_of(cam[0]) == (12, 3)
    cam0, _, _ = explain.grad_cam(feats, head, x, target=0)  # every channel lowers class 0
    assert explain.peak_of(cam0[0]) is None


def test_input_saliency_is_where_the_score_depends_on_the_input():
    feats = nn.HybridLambda(lambda F, x: x)
    head = nn.HybridLambda(lambda F, a: F.concat(a.sum(axis=(1, 2, 3)).reshape((-1, 1)),
                                                 (a.slice(begin=(None, None, 40, 8), end=(None, None, 48, 16)) ** 2)
                                                 .sum(axis=(1, 2, 3)).reshape((-1, 1)), dim=1))
    x = mx.nd.array(np.random.RandomState(0).uniform(0.5, 1, (2, 1, 64, 64)))
    sal, _, targets = explain.input_saliency(feats, head, x, target=1, sigma=1.0)
    assert sal.shape == (2, 64, 64) and targets.tolist() == [1, 1]
    for s in sal:
        px, py = explain.peak_of(s)
        assert 38 <= py <= 49 and 6 <= px <= 17
        assert s[:30].max() < 1e-3  # far from the region the gradient is zero
    flat, _, _ = explain.input_saliency(feats, head, x, target=0, sigma=1.0)
    assert flat.min() > 0.5  # the sum depends on every pixel equally


def test_heatmap_goes_back_to_the_cropped_square_of_the_original():
    heat = np.zeros((7, 7), np.float32)
    heat[3, 3] = 1.0
    out = explain.to_image_grid(heat, (300, 200))  # portrait: square = rows 50..249
    assert out.shape == (300, 200)
    assert out[:50].max() == 0 and out[250:].max() == 0
    px, py = explain.peak_of(out)
    assert abs(px - 100) <= 15 and abs(py - 150) <= 15


def test_pointing_game_hits_misses_and_chance():
    maps = [np.zeros((100, 100), np.float32) for _ in range(3)]
    maps[0][30, 40] = 1  # hit: 5 px from (40, 35)
    maps[1][80, 80] = 1  # miss
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # lung: half the image
    r = explain.pointing_game(maps, [(40, 35), (20, 20), (10, 10)], [6, 6, 6], [mask] * 3)
    assert (r["hits"], r["n"]) == (1, 3)
    assert [p["hit"] for p in r["per_image"]] == [True, False, False]
    assert r["per_image"][2]["peak"] is None  # all-zero map points nowhere
    disc = np.pi * 36
    assert r["chance_rate"] == pytest.approx(disc / 5000, rel=0.1)
    assert explain.pointing_game(maps, [(20, 20)] * 3, [6] * 3, tolerance=100)["hits"] == 2


@pytest.mark.parametrize("arch", ["resnet", "densenet"])
def test_torchxrayvision_models_split_for_grad_cam(arch):
    from mxvision.models.xrv_densenet import XRVDenseNet
    from mxvision.models.xrv_resnet import XRVResNet

    net = XRVResNet(layers=(1, 1, 1, 1)) if arch == "resnet" else XRVDenseNet(block_config=(1, 1, 1, 1))
    net.init_random(seed=0)
    features, head = explain.cam_split(net)
    x = mx.nd.array(np.random.RandomState(0).uniform(-1024, 1024, (1, 1, 64, 64)))
    a = features(x)
    assert a.ndim == 4 and a.shape[2:] == (2, 2)
    np.testing.assert_allclose(head(a).asnumpy(), net.hybrid_forward(mx.nd, x).asnumpy(), rtol=1e-4)
    cam, logit, _ = explain.grad_cam(features, head, x, target=11)
    assert cam.shape == (1, 2, 2) and np.isfinite(cam).all()
    sal, _, _ = explain.input_saliency(features, head, x, target=11)
    assert sal.shape == (1, 64, 64) and np.isfinite(sal).all() and sal.max() == pytest.approx(1.0)


def test_unsupported_network_is_a_clear_error():
    with pytest.raises(explain.MxvisionError, match="cam_split"):
        explain.cam_split(nn.Dense(2))


def test_explain_a_trained_run_writes_overlays(small_run, synth_index, tmp_path):
    from mxvision.data.index import read_index

    index = read_index(synth_index)
    paths = [p for p, lab in zip(index.paths, index.labels) if lab == "nodule"][:2]
    ex = explain.explainer_from_run(small_run, ctx="cpu")
    assert ex.classes == ["normal", "nodule"] and ex.default_target == 1
    for method in explain.METHODS:
        results = explain.explain_files(ex, paths, tmp_path, method=method)
        for path, r in zip(paths, results):
            pic = cv2.imread(r["overlay"])
            assert pic.shape == cv2.imread(path).shape[:2] + (3,)
            assert r["target"] == "nodule" and np.isfinite(r["logit"])
            assert r["overlay"].endswith(f"_{method}.png")
    with pytest.raises(explain.MxvisionError, match="choose one of normal, nodule"):
        ex.target_index("cardiomegaly")


def test_cli_explain_lists_bad_files_and_strict_fails(small_run, synth_index, tmp_path, monkeypatch,
                                                     capsys):
    from mxvision.data.index import read_index

    good = read_index(synth_index).paths[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "maps"
    code = run_cli(monkeypatch, "explain", good, bad, "--run", small_run, "--out", out, "--ctx", "cpu",
                   "--method", "saliency", "--target", "normal", "--json")
    assert code == 1
    results = json.loads(capsys.readouterr().out)
    assert results[0]["target"] == "normal" and (out / results[0]["overlay"].split("/")[-1]).is_file()
    assert "error" in results[1] and "broken.png" in results[1]["error"]
    code = run_cli(monkeypatch, "explain", bad, "--run", small_run, "--out", out, "--strict", "--ctx", "cpu")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "broken.png" in err
    assert run_cli(monkeypatch, "explain", good, "--out", out) == 2
    assert "exactly one of --run" in capsys.readouterr().err
