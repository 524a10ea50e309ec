"""Grad-CAM and input-gradient saliency: known answers on tiny networks, real runs, the CLI."""
import json

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from mxvision.audit import explain
from mxvision.audit import localization


def run_cli(monkeypatch, *argv):
    import mxvision.cli as cli
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


@pytest.mark.parametrize("hybridize", [False, True])
def test_grad_cam_through_a_max_pooling_head_equals_finite_differences(hybridize):
    # a head may hold a max pool (a cut before the last stage); on oneDNN its gradient after an
    # inference-mode forward read stale memory
    channels, side = 16, 16
    mx.random.seed(0)
    head = nn.HybridSequential()
    head.add(nn.MaxPool2D(2), nn.BatchNorm(in_channels=channels),
             nn.Dense(2, in_units=channels * (side // 2) ** 2))
    head.initialize(mx.init.Xavier())
    _random_running_stats([head], seed=5)
    if hybridize:
        head.hybridize()
    feats = nn.HybridLambda(lambda F, x: x)
    x = mx.nd.array(np.random.RandomState(4).uniform(0.1, 1, (1, channels, side, side)))
    cams = [explain.grad_cam(feats, head, x, target=1)[0] for _ in range(2)]
    np.testing.assert_array_equal(cams[0], cams[1])
    # Grad-CAM's channel weight is the mean gradient over the channel, i.e. the derivative along
    # the channel's all-ones direction / (h * w); moving a whole channel keeps every pooling
    # window's arg-max, so a central difference (float64) is exact
    head.cast("float64")
    a = x.asnumpy().astype(np.float64)
    alpha, eps = np.zeros(channels), 1e-3
    for k in range(channels):
        plus, minus = a.copy(), a.copy()
        plus[0, k] += eps
        minus[0, k] -= eps
        diff = (head(mx.nd.array(plus, dtype="float64")).asnumpy()[0, 1]
                - head(mx.nd.array(minus, dtype="float64")).asnumpy()[0, 1])
        alpha[k] = diff / (2 * eps) / side ** 2
    ref = np.maximum((alpha[:, None, None] * a[0]).sum(0), 0)
    assert ref.max() > 0
    np.testing.assert_allclose(cams[0][0], ref / ref.max(), atol=1e-3)


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
    r = localization.pointing_game(maps, [(40, 35), (20, 20), (10, 10)], [6, 6, 6], [mask] * 3)
    assert (r["hits"], r["n"]) == (1, 3)
    assert [p["hit"] for p in r["per_image"]] == [True, False, False]
    assert r["per_image"][2]["peak"] is None  # all-zero map points nowhere
    disc = np.pi * 36
    assert r["chance_rate"] == pytest.approx(disc / 5000, rel=0.1)
    assert localization.pointing_game(maps, [(20, 20)] * 3, [6] * 3, tolerance=100)["hits"] == 2


@pytest.mark.parametrize("arch", ["resnet", "densenet"])
def test_torchxrayvision_models_split_for_grad_cam(arch):
    from mxvision.models.xrv.densenet import XRVDenseNet
    from mxvision.models.xrv.resnet import XRVResNet

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


# --- input gradients against finite differences (max pooling + BatchNorm, oneDNN) -------------
# MXNet 1.9.1's oneDNN max-pooling backward after an inference-mode forward reads stale memory,
# so the old inference-mode saliency gave gradients unrelated to the true ones (relative error
# ~1 here, and changing between runs). The reference is a central finite difference of the same
# network cast to float64 (which runs MXNet's native kernels): exact up to ~1e-9.

def _random_running_stats(blocks, seed):
    rs = np.random.RandomState(seed)
    for block in blocks:
        def visit(b):
            if isinstance(b, nn.BatchNorm):
                c = b.running_mean.shape[0]
                b.running_mean.set_data(mx.nd.array(rs.uniform(-0.3, 0.3, c)))
                b.running_var.set_data(mx.nd.array(rs.uniform(0.5, 2.0, c)))
        block.apply(visit)


def _aux_state(blocks):
    state = {}
    for block in blocks:
        for name, p in block.collect_params().items():
            if p.grad_req == "null":
                state[name] = p.data().asnumpy().copy()
    return state


def _flags(blocks):
    flags = []
    for block in blocks:
        block.apply(lambda b: flags.append(b._kwargs["use_global_stats"]) if isinstance(b, nn.BatchNorm) else None)
    return flags


def _check_against_finite_differences(features, head, blocks, x, target, h, n_top=4, n_random=4):
    stats, flags = _aux_state(blocks), _flags(blocks)
    grad, logits, _ = explain.input_gradient(features, head, x, target)
    again, _, _ = explain.input_gradient(features, head, x, target)
    grad, again = grad.asnumpy(), again.asnumpy()
    np.testing.assert_array_equal(grad, again)  # deterministic
    after = _aux_state(blocks)
    assert all(np.array_equal(stats[k], after[k]) for k in stats)  # running statistics untouched
    assert _flags(blocks) == flags and not any(flags)  # BatchNorms back to batch statistics
    assert np.isclose(logits[0], head(features(x)).asnumpy()[0, target], rtol=1e-4, atol=1e-4)

    rs = np.random.RandomState(0)
    order = np.argsort(-np.abs(grad[0]).ravel())
    picks = list(order[:n_top]) + list(rs.choice(order[n_top:], n_random, replace=False))
    pixels = [np.unravel_index(int(i), grad.shape[1:]) for i in picks]
    for block in blocks:
        block.cast("float64")
    x64 = x.astype("float64").asnumpy()
    fd = []
    for c, i, j in pixels:
        plus, minus = x64.copy(), x64.copy()
        plus[0, c, i, j] += h
        minus[0, c, i, j] -= h
        up = head(features(mx.nd.array(plus, dtype="float64"))).asnumpy()[0, target]
        down = head(features(mx.nd.array(minus, dtype="float64"))).asnumpy()[0, target]
        fd.append((up - down) / (2 * h))
    fd = np.array(fd)
    auto = np.array([grad[(0,) + p] for p in pixels])
    scale = np.abs(fd).max()
    assert scale > 0
    np.testing.assert_allclose(auto, fd, atol=1e-3 * scale, rtol=0)


@pytest.mark.parametrize("hybridize", [False, True])
def test_input_gradient_equals_finite_differences_through_max_pool_and_batchnorm(hybridize):
    from mxvision.models.head import XvisionHead
    from mxvision.models.resnet_trunk import get_backbone

    mx.random.seed(3)
    trunk = get_backbone("resnet18_v2", hybridize=False)  # max pool in the stem, BN everywhere
    head = XvisionHead(classes=2, hidden=16)
    head.initialize(mx.init.Xavier())
    head(mx.nd.zeros((2, 512, 2, 2)))
    _random_running_stats([trunk, head], seed=0)
    if hybridize:
        trunk.hybridize()
        head.hybridize()
    x = mx.nd.array(np.random.RandomState(1).uniform(-1, 1, (1, 3, 64, 64)))
    _check_against_finite_differences(trunk, head, [trunk, head], x, target=1, h=1e-4)


def test_xrv_densenet_input_gradient_equals_finite_differences():
    from mxvision.models.xrv.densenet import XRVDenseNet

    net = XRVDenseNet(block_config=(1, 1, 1, 1))
    net.init_random(seed=0)
    net(mx.nd.zeros((1, 1, 64, 64)))
    _random_running_stats([net], seed=2)
    net.hybridize()
    features, head = explain.cam_split(net)  # lambdas over net: frozen_train_mode must find it
    x = mx.nd.array(np.random.RandomState(3).uniform(-1024, 1024, (1, 1, 64, 64)))
    _check_against_finite_differences(features, head, [net], x, target=11, h=1e-2)


def test_dropout_is_off_while_differentiating_and_restored():
    feats = nn.HybridSequential()
    feats.add(nn.Conv2D(4, 3, padding=1, in_channels=1), nn.MaxPool2D(2), nn.Dropout(0.5))
    feats.initialize(mx.init.Xavier())
    head = nn.Dense(2, in_units=4 * 8 * 8)
    head.initialize(mx.init.Xavier())
    x = mx.nd.array(np.random.RandomState(0).uniform(0, 1, (1, 1, 16, 16)))
    grads = [explain.input_gradient(feats, head, x, 1)[0].asnumpy() for _ in range(3)]
    assert np.abs(grads[0]).max() > 0
    for g in grads[1:]:
        np.testing.assert_array_equal(g, grads[0])  # no random mask
    assert feats[2]._rate == 0.5


def test_a_batchnorm_it_cannot_reach_is_refused_not_silently_wrong():
    class Hidden:  # not a Block, not a closure: frozen_train_mode cannot see its BatchNorm
        def __init__(self):
            self.bn = nn.BatchNorm(in_channels=1)
            self.bn.initialize()
            self.bn.running_mean.set_data(mx.nd.array([0.5]))

        def __call__(self, x):
            return self.bn(x)

    head = nn.Dense(2, in_units=64)
    head.initialize()
    x = mx.nd.array(np.random.RandomState(0).uniform(0, 1, (2, 1, 8, 8)))
    with pytest.raises(explain.MxvisionError, match="training mode"):
        explain.input_saliency(Hidden(), head, x, target=0)


def test_overlays_never_overwrite_each_other_or_an_input(small_run, small_store, tmp_path):
    """Two img.png from different folders both wrote OUT/img_gradcam.png (the first was lost);
    an input named x_gradcam.png in the output folder was overwritten by x.png's overlay."""
    import hashlib
    import shutil

    source = small_store.items[0]["path"]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "img.png")
    shutil.copy(source, tmp_path / "b" / "x.png")
    shutil.copy(small_store.items[1]["path"], tmp_path / "b" / "x_gradcam.png")
    before = hashlib.sha1((tmp_path / "b" / "x_gradcam.png").read_bytes()).hexdigest()
    explainer = explain.explainer_from_run(small_run, ctx="cpu")
    inputs = [tmp_path / "a" / "img.png", tmp_path / "b" / "img.png", tmp_path / "b" / "x.png",
              tmp_path / "b" / "x_gradcam.png"]
    results = explain.explain_files(explainer, inputs, tmp_path / "b")
    overlays = [r["overlay"] for r in results]
    assert len(set(overlays)) == 4 and not set(overlays) & {str(p) for p in inputs}
    assert hashlib.sha1((tmp_path / "b" / "x_gradcam.png").read_bytes()).hexdigest() == before
    assert all(cv2.imread(o) is not None for o in overlays)
    assert [o.rsplit("/", 1)[1] for o in overlays] == ["img_gradcam.png", "img_gradcam-2.png",
                                                       "x_gradcam-2.png", "x_gradcam_gradcam.png"]
