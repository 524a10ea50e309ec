"""INT8 calibration chosen by agreement with float32 (mxvision.features.quantize.calibrate).

A small DenseNet port with random BatchNorm statistics: the entropy and naive candidates are exactly
what MXNet's own ``quantize_model_mkldnn`` makes in each mode from the same films, the percentile
ones keep their share of a layer's outputs, the returned candidate is the one closest to float32
on the held-out films, and the recorded errors are that network's."""
import json

import mxnet as mx
import numpy as np
import pytest

from mxvision.features import quantize
from mxvision.features.int8_graph import int8_ready
from mxvision.models.xrv.densenet import XRVDenseNet
from support.graphs import random_batchnorm


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """The float32 graph the quantizer sees, and 12 inputs: (sym, arg, aux, images)."""
    net = XRVDenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2)
    net.init_random(mx.cpu())
    rs = np.random.RandomState(0)
    random_batchnorm(net, rs)
    images = rs.uniform(-1024, 1024, (12, 1, 64, 64)).astype(np.float32)
    net.hybridize()
    net(mx.nd.array(images[:2])).wait_to_read()
    prefix = str(tmp_path_factory.mktemp("calib") / "net")
    net.export(prefix, 0)
    sym, arg, aux, _ = int8_ready(*mx.model.load_checkpoint(prefix, 0))
    return sym, arg, aux, images


def _mxnet_own(sym, arg, aux, images, mode):
    from mxnet.contrib.quantization import quantize_model_mkldnn
    data = mx.io.NDArrayIter(data=images, batch_size=min(16, len(images)), last_batch_handle="pad")
    return quantize_model_mkldnn(sym, arg, aux, ctx=mx.cpu(), calib_mode=mode, calib_data=data,
                                 num_calib_examples=len(images), quantized_dtype="auto",
                                 quantize_mode=quantize.QUANTIZE_MODE, label_names=None, logger=None)


def _thresholds(qsym):
    """Every calibrated range in the graph (oneDNN's fused nodes carry them as attributes)."""
    return sorted((n["name"], k, v) for n in json.loads(qsym.tojson())["nodes"]
                  for k, v in n.get("attrs", {}).items() if "calib" in k)


def _output(qsym, qarg, qaux, images):
    exe = qsym.bind(mx.cpu(), {**qarg, "data": mx.nd.array(images)}, aux_states=qaux, grad_req="null")
    return exe.forward(is_train=False)[0].asnumpy().reshape(len(images), -1)


@pytest.mark.parametrize("mode", ["entropy", "naive"])
def test_mxnets_two_calibrations_are_its_own(graph, mode):
    sym, arg, aux, images = graph
    fit = images[0::2]
    # (unfuse=False: MXNet's own flow keeps every ReLU fused; unfuse_relu is tested in test_int8_graph)
    qsym, qarg, qaux, record = quantize.calibrate(sym, arg, aux, images, modes=(mode,), unfuse=False)
    assert record["chosen"] == mode and record["calibrated_on"] == len(fit) == 6
    want_sym, want_arg, _ = _mxnet_own(sym, arg, aux, fit, mode)
    assert _thresholds(qsym) == _thresholds(want_sym) and len(_thresholds(qsym)) > 5
    assert set(qarg) == set(want_arg)
    for name in qarg:
        assert np.array_equal(qarg[name].asnumpy(), want_arg[name].asnumpy()), name


def test_the_candidate_closer_to_float32_is_returned_and_its_error_recorded(graph):
    sym, arg, aux, images = graph
    qsym, qarg, qaux, record = quantize.calibrate(sym, arg, aux, images)
    errors = record["feature_error"]
    assert set(errors) == set(quantize.CALIB_MODES) and len(errors) == 4 and record["checked_on"] == 6
    assert errors[record["chosen"]] == min(errors.values())
    # the two modes really differ here, so the choice matters
    assert abs(errors["entropy"] - errors["naive"]) > 1e-3, errors
    # the recorded error is the returned network's, on the films it was not calibrated on
    check = images[1::2]
    want = _output(sym, arg, aux, check)
    got = _output(qsym, qarg, qaux, check)
    assert quantize.feature_error(want, got) == pytest.approx(errors[record["chosen"]], rel=1e-4, abs=1e-6)
    assert record["chosen"] in quantize.describe_calibration(record)


def test_each_candidate_keeps_its_own_ranges(graph, monkeypatch):
    """MXNet writes each candidate's ranges into one shared graph: the first candidate, returned
    after the others were written, must still hold its own (as calibrated alone)."""
    sym, arg, aux, images = graph
    alone = _thresholds(quantize.calibrate(sym, arg, aux, images, modes=("entropy",))[0])
    scores = iter(range(10))  # the first candidate scored is the closest: entropy is returned
    monkeypatch.setattr(quantize, "feature_error", lambda want, got: float(next(scores)))
    qsym, _, _, record = quantize.calibrate(sym, arg, aux, images)
    assert record["chosen"] == "entropy" and record["feature_error"]["p99.999"] == 3.0
    assert _thresholds(qsym) == alone


def test_too_few_films_to_hold_any_out_calibrate_with_entropy_on_all(graph):
    sym, arg, aux, images = graph
    few = images[:quantize.MIN_FILMS_TO_CHOOSE - 1]
    qsym, _, _, record = quantize.calibrate(sym, arg, aux, few, unfuse=False)
    assert record == {"chosen": "entropy", "calibrated_on": len(few), "checked_on": 0, "relu_unfused": 0}
    assert _thresholds(qsym) == _thresholds(_mxnet_own(sym, arg, aux, few, "entropy")[0])


def _histogram_entry(x, bins=8001):
    """What MXNet's ``_LayerHistogramCollector`` keeps for one layer output ``x``."""
    th = float(np.abs(x).max())
    hist, edges = np.histogram(x, bins=bins, range=(-th, th))
    return hist, edges, float(x.min()), float(x.max()), th


@pytest.mark.parametrize("fraction", [0.9, 0.999, 0.99999])
def test_percentile_range_keeps_that_fraction_unclipped(fraction):
    x = np.random.RandomState(0).standard_cauchy(200_000)  # heavy tails: the percentile matters
    entry = _histogram_entry(x)
    low, high = quantize.percentile_range(entry, fraction)
    width = 2 * entry[4] / len(entry[0])
    assert low == -high and 0 < high < entry[4]
    kept = np.mean(np.abs(x) <= high)
    assert kept >= fraction - 1e-9 and np.mean(np.abs(x) <= high - width) < fraction
    # a layer with no negative output (after a ReLU) gets (0, t), as MXNet's entropy gives it
    relu = np.maximum(x, 0)
    low, high = quantize.percentile_range(_histogram_entry(relu), fraction)
    assert low == 0 and np.mean(relu <= high) >= fraction - 1e-9


def test_percentile_range_of_a_histogram_mxnet_grew():
    """MXNet's collector widens a layer's histogram when a later batch reaches further
    (``combine_histogram``): the range is still the percentile of all the outputs."""
    from mxnet.contrib.quantization import combine_histogram
    rs = np.random.RandomState(1)
    first, second = rs.normal(0, 1, 100_000), rs.normal(0, 4, 100_000)
    entry = _histogram_entry(first)
    entry = combine_histogram(entry, second, float(second.min()), float(second.max()),
                              float(np.abs(second).max()))
    assert len(entry[0]) % 2 == 1 and len(entry[0]) > 8001  # grown, still centred on 0
    both = np.abs(np.concatenate([first, second]))
    high = quantize.percentile_range(entry, 0.999)[1]
    width = 2 * entry[4] / len(entry[0])
    assert np.mean(both <= high) >= 0.999 and np.mean(both <= high - width) < 0.999


def test_feature_error():
    want = np.array([[1.0, -2.0], [3.0, 4.0]])
    assert quantize.feature_error(want, want) == 0.0
    assert quantize.feature_error(want, want * 1.1) == pytest.approx(0.1)
    assert quantize.feature_error(want, np.full_like(want, np.nan)) == float("inf")


@pytest.mark.parametrize("flags, cap, pays", [
    ({"avx2", "avx512f", "avx512_vnni"}, "", True),  # AVX-512 VNNI, no AMX: AMD EPYC Zen 4 and 5
    ({"avx2", "avx512f", "avx512_vnni"}, "AVX512_CORE_VNNI", True),
    ({"avx2", "avx512f", "avx512_vnni"}, "AVX2", False),  # capped below VNNI by the user
    ({"avx2", "avx512f", "avx512_vnni"}, "AVX512_CORE_AMX", True),  # a cap naming AMX, on a CPU without it
    ({"avx2", "avx512f", "avx512_vnni"}, "AVX512_CORE", False),
    ({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, "AVX512_CORE_AMX", False),  # mxvision's AMX default
    ({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, "ALL", True),  # oneDNN 2.4's ALL leaves AMX out
    ({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, "", True),  # MXVISION_AMX=0: VNNI kernels
    ({"avx2", "fma"}, "", False),  # AVX2 only (AMD EPYC Zen 3): no brgconv kernels to avoid
    (set(), "", False),  # flags unknown (not Linux)
])
def test_relus_are_unfused_only_where_onednn_runs_vnni_without_amx(flags, cap, pays):
    assert quantize.unfuse_relu_pays(flags, cap) is pays


def test_the_cache_key_holds_whether_relus_are_unfused(monkeypatch):
    """A network converted on one CPU kind is not taken for the other kind's from a shared cache."""
    info = {"backbone": "b", "cut": "c", "weights": {"sha1": "0" * 40}, "preprocessing": {}}
    monkeypatch.setattr(quantize, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})  # this CPU's, as read
    keys = {}
    for cap in ("AVX2", "AVX512_CORE_VNNI"):
        monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)
        keys[cap] = (quantize.model_key(info, "int8", "1" * 40), quantize.model_key(info, "float32"))
    assert keys["AVX2"][0] != keys["AVX512_CORE_VNNI"][0]
    assert keys["AVX2"][1] == keys["AVX512_CORE_VNNI"][1]  # float32 has no ReLUs to unfuse
