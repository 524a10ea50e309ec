"""mxvision.runtime: MXNet gets every core, whichever entry point loads it first."""
import os
import subprocess
import sys

import pytest

# Records OMP_NUM_THREADS at the moment MXNet is first imported (MXNet reads it then, once).
PROBE = r"""
import builtins, os, sys
real_import = builtins.__import__
seen = []
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "mxnet" and "mxnet" not in sys.modules and not seen:
        seen.append(os.environ.get("OMP_NUM_THREADS"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
%s
assert "mxnet" in sys.modules, "the entry point did not load MXNet"
print(seen[0])
"""

ENTRY_POINTS = {
    # the CLI's parser lists the registry's models, which loads MXNet before any command runs
    "cli": "from mxvision.cli import build_parser; build_parser()",
    "api": "import mxvision as mxv; mxv.train_head",
    "train": "from mxvision.train import loop",
    "inference": "import mxvision.inference",
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mxnet_loads_with_every_core(entry):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", PROBE % ENTRY_POINTS[entry]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(os.sched_getaffinity(0)))


def test_a_thread_count_the_user_exported_is_kept():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PROBE % ENTRY_POINTS["cli"]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


STREAMS_PROBE = PROBE.replace('os.environ.get("OMP_NUM_THREADS")',
                              '(os.environ.get("OMP_NUM_THREADS"), os.environ.get("MXNET_CPU_WORKER_NTHREADS"))')


CORES = len(os.sched_getaffinity(0))
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXVISION_SET_THREADS")


def _threads_at_mxnet_import(streams, inherited):
    """(OMP_NUM_THREADS, MXNET_CPU_WORKER_NTHREADS) when the CLI's parser loads MXNet in a child with
    ``MXVISION_STREAMS=streams`` and ``inherited`` as its only thread settings."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}
    env.update(inherited, MXVISION_STREAMS=streams)
    done = subprocess.run([sys.executable, "-c", STREAMS_PROBE % ENTRY_POINTS["cli"]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("streams, user, expected", [
    ("2", {}, (str(max(1, CORES // 2)), "2")),
    ("1", {}, (str(CORES), None)),
    ("2", {"OMP_NUM_THREADS": "3", "MXNET_CPU_WORKER_NTHREADS": "4"}, ("3", "4")),  # the user's, kept
    ("x", {}, (str(CORES), None)),  # said by extract, in one line
])
def test_streams_split_the_cores_before_mxnet_loads(streams, user, expected):
    assert _threads_at_mxnet_import(streams, user) == str(expected)


@pytest.mark.parametrize("inherited, streams, expected", [
    # a child of an mxvision process (which set every core, and said so) asks for 2 streams
    ({"OMP_NUM_THREADS": str(CORES), "MXVISION_SET_THREADS": f"OMP_NUM_THREADS={CORES}"}, "2",
     (str(max(1, CORES // 2)), "2")),
    # a child of an mxvision process that ran 2 streams asks for none: every core, one worker
    ({"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "2",
      "MXVISION_SET_THREADS": "OMP_NUM_THREADS=1 MXNET_CPU_WORKER_NTHREADS=2"}, "", (str(CORES), None)),
    # the same values, not marked as mxvision's: the user's, kept
    ({"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "2"}, "", ("1", "2")),
])
def test_thread_settings_a_parent_mxvision_made_are_decided_afresh(inherited, streams, expected):
    assert _threads_at_mxnet_import(streams, inherited) == str(expected)


# --- AMX: oneDNN's ISA cap raised before MXNet loads, on CPUs that have it ------------------------
from mxvision.runtime import AMX_ISA, AMX_MARK, cpu_flags  # noqa: E402

HAS_AMX = {"amx_tile", "amx_int8"} <= cpu_flags()
ISA_PROBE = PROBE.replace('os.environ.get("OMP_NUM_THREADS")', 'os.environ.get("DNNL_MAX_CPU_ISA")')


def _isa_at_mxnet_import(entry, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("DNNL_MAX_CPU_ISA", "MXVISION_AMX", AMX_MARK)}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", ISA_PROBE % ENTRY_POINTS[entry]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("entry", ["api", "cli"])
def test_amx_is_enabled_before_mxnet_loads_exactly_where_the_cpu_has_it(entry):
    assert _isa_at_mxnet_import(entry) == (AMX_ISA if HAS_AMX else "None")


def test_mxvision_amx_0_keeps_onednns_default_and_a_users_isa_is_kept():
    assert _isa_at_mxnet_import("api", MXVISION_AMX="0") == "None"
    assert _isa_at_mxnet_import("api", DNNL_MAX_CPU_ISA="AVX512_CORE") == "AVX512_CORE"
    assert _isa_at_mxnet_import("api", DNNL_MAX_CPU_ISA=AMX_ISA) == AMX_ISA


def test_a_cap_inherited_from_an_mxvision_parent_is_decided_afresh():
    inherited = {"DNNL_MAX_CPU_ISA": AMX_ISA, AMX_MARK: AMX_ISA}
    assert _isa_at_mxnet_import("api", MXVISION_AMX="0", **inherited) == "None"
    assert _isa_at_mxnet_import("api", **inherited) == (AMX_ISA if HAS_AMX else "None")


# A small INT8 network, calibrated and run; prints the oneDNN convolution kernels it ran and the output.
INT8_PROBE = r"""
import os, sys
if sys.argv[1] == "mxvision":
    import mxvision  # noqa: F401
import mxnet as mx, numpy as np
from mxnet.contrib.quantization import quantize_model_mkldnn
data = mx.sym.var("data")
sym = mx.sym.Activation(mx.sym.Convolution(data, num_filter=32, kernel=(3, 3), pad=(1, 1), name="conv"), act_type="relu")
rng = np.random.RandomState(0)
x = mx.nd.array(rng.rand(8, 64, 16, 16).astype("float32"))
arg = {"conv_weight": mx.nd.array(rng.randn(32, 64, 3, 3).astype("float32")), "conv_bias": mx.nd.zeros(32)}
calib = mx.io.NDArrayIter(data=x, batch_size=8)
qsym, qarg, qaux = quantize_model_mkldnn(sym, arg, {}, ctx=mx.cpu(), calib_mode="naive", calib_data=calib,
                                         num_calib_examples=8, quantized_dtype="auto", label_names=None)
exe = qsym.bind(mx.cpu(), dict(qarg, data=x), aux_states=qaux)
np.save(sys.argv[2], exe.forward()[0].asnumpy())
"""


def _run_int8(tmp_path, first_import, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("DNNL_MAX_CPU_ISA", "MXVISION_AMX", AMX_MARK)}
    env.update(env_changes, DNNL_VERBOSE="1")
    out = tmp_path / f"{first_import}-{len(env_changes)}.npy"
    done = subprocess.run([sys.executable, "-c", INT8_PROBE, first_import, str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    return done, out


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (amx_tile, amx_int8 in /proc/cpuinfo)")
def test_int8_convolutions_run_on_amx_with_the_same_outputs(tmp_path):
    import numpy as np

    amx, amx_out = _run_int8(tmp_path, "mxvision")
    assert amx.returncode == 0, amx.stderr[-2000:]
    assert "avx512_core_amx" in amx.stdout  # oneDNN's verbose names the kernel it ran
    vnni, vnni_out = _run_int8(tmp_path, "mxvision", MXVISION_AMX="0")
    assert vnni.returncode == 0, vnni.stderr[-2000:]
    assert "amx" not in vnni.stdout
    a, b = np.load(amx_out), np.load(vnni_out)
    assert a.std() > 0 and np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (amx_tile, amx_int8 in /proc/cpuinfo)")
def test_a_child_that_inherits_the_amx_cap_is_granted_the_amx_state(tmp_path):
    # a process started by mxvision inherits DNNL_MAX_CPU_ISA; importing mxvision asks Linux for
    # the AMX state, without which the first AMX convolution dies of SIGILL (shown with bare MXNet,
    # which imports by itself only on NumPy < 1.24)
    child, _ = _run_int8(tmp_path, "mxvision", DNNL_MAX_CPU_ISA=AMX_ISA)
    assert child.returncode == 0, child.stderr[-2000:]
    import numpy

    if int(numpy.__version__.split(".")[0]) == 1 and int(numpy.__version__.split(".")[1]) < 24:
        bare, _ = _run_int8(tmp_path, "mxnet", DNNL_MAX_CPU_ISA=AMX_ISA)
        assert bare.returncode in (-4, 132), (bare.returncode, bare.stderr[-2000:])  # SIGILL


def test_hybridize_for_inference_fuses_convolution_batchnorm_relu_and_sum_on_a_cpu():
    """oneDNN's graph fusion: a residual block's convolutions, BatchNorms, ReLUs and sum become
    fused convolutions, with the plain graph's outputs; on a GPU context nothing is fused (the
    graph is only traced here, so no GPU is needed)."""
    import mxnet as mx
    import numpy as np
    from mxnet.gluon import nn

    from mxvision.runtime import hybridize_for_inference
    from support.graphs import cached_ops, random_batchnorm

    class Residual(nn.HybridBlock):
        def __init__(self):
            super().__init__()
            with self.name_scope():
                self.conv1, self.bn1 = nn.Conv2D(8, 3, padding=1, in_channels=8), nn.BatchNorm(in_channels=8)
                self.conv2, self.bn2 = nn.Conv2D(8, 3, padding=1, in_channels=8), nn.BatchNorm(in_channels=8)

        def hybrid_forward(self, F, x):
            out = F.Activation(self.bn1(self.conv1(x)), act_type="relu")
            return F.Activation(self.bn2(self.conv2(out)) + x, act_type="relu")

    mx.random.seed(0)
    net = Residual()
    net.initialize(mx.init.Xavier())
    random_batchnorm(net, np.random.RandomState(0))
    x = mx.nd.random.uniform(-1, 1, (2, 8, 16, 16))
    net.hybridize()
    expected = net(x).asnumpy()
    assert {"BatchNorm", "Activation", "elemwise_add"} <= set(cached_ops(net))

    assert hybridize_for_inference(net, mx.cpu()) is net
    out = net(x).asnumpy()
    ops = [op for op in cached_ops(net) if op != "null"]
    assert ops == ["_sg_mkldnn_conv", "_sg_mkldnn_conv"], ops  # BatchNorm, ReLU and sum folded in
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    net.hybridize(active=False)
    hybridize_for_inference(net, mx.gpu(0))
    net._build_cache(x)  # traced, not run
    assert "BatchNorm" in cached_ops(net)
