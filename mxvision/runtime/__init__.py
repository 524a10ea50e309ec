"""Where mxvision runs: the MXNet device, the CPU threads, the real-data folder and the user cache.

Imports no MXNet at module level: ``use_every_core`` must run before MXNet is first imported,
and ``import mxvision`` must stay light.
"""
import os
import sys
from pathlib import Path

from mxvision.errors import MxvisionError

_REPO_ROOT = Path(__file__).resolve().parents[2]  # mxvision/runtime/__init__.py -> the checkout


#: names MXNet reads once, when it loads, that mxvision sets unless the user did
THREAD_VARS = ("OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS")
#: what mxvision set of them, e.g. "OMP_NUM_THREADS=2": child processes inherit the values and this,
#: so they tell mxvision's choice (made afresh, for their own MXVISION_STREAMS) from the user's (kept)
THREADS_MARK = "MXVISION_SET_THREADS"


def set_by_mxvision(name):
    """Whether the environment's ``name`` was set by mxvision (in this process or a parent), not the user."""
    mark = dict(item.partition("=")[::2] for item in os.environ.get(THREADS_MARK, "").split())
    return name in os.environ and mark.get(name) == os.environ[name]


def use_every_core():
    """Let MXNet's OpenMP operators use every core this process may run on.

    MXNet 1.9 halves the CPU count when OMP_NUM_THREADS is unset (it assumes hyper-threading),
    so on a 2-core machine without SMT every oneDNN convolution ran on ONE core; measured here,
    fp32 and INT8 extraction run ~1.6-2x faster with both. MXNet reads the variable once, when it
    is first imported, so ``mxvision/__init__.py`` calls this before any module can import MXNet
    (tests/test_runtime.py checks the CLI, the API and the training and inference modules); a
    value the user set, or an MXNet already imported, is left alone. The thread count also sets
    the float rounding of oneDNN's reductions, so figures are quoted with it. With
    ``MXVISION_STREAMS=N`` (:func:`streams`) the engine gets N CPU workers of cores / N threads.
    Values a parent mxvision process set (:data:`THREADS_MARK`) are decided afresh.
    """
    if "mxnet" in sys.modules:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        n = streams()
    except MxvisionError:  # said in one line by whatever runs the network (extract_features)
        n = 1
    want = {"OMP_NUM_THREADS": str(max(1, cores // n))}
    if n > 1:  # the engine runs n networks side by side, each on its share of the cores
        want["MXNET_CPU_WORKER_NTHREADS"] = str(n)
    ours = {}
    for name in THREAD_VARS:
        if name in os.environ and not set_by_mxvision(name):
            continue  # the user's
        if name in want:
            os.environ[name] = ours[name] = want[name]
        else:  # a parent's streams, not asked for here
            os.environ.pop(name, None)
    os.environ[THREADS_MARK] = " ".join(f"{k}={v}" for k, v in ours.items())


#: how many copies of the network extraction runs side by side (``streams()``)
STREAMS_VAR = "MXVISION_STREAMS"


def streams(value=None):
    """The network streams: ``value``, or ``MXVISION_STREAMS`` when it is None (1 when unset).

    With N > 1, :func:`use_every_core` gives MXNet's engine N CPU workers of cores / N OpenMP
    threads each (unless the user set ``MXNET_CPU_WORKER_NTHREADS`` / ``OMP_NUM_THREADS``), and
    ``extract_features`` runs N copies of the network, which share its weights, on alternate
    batches. One network's oneDNN primitives then never wait for the other core at a barrier:
    on a shared 2-core host whose cores are taken away now and then, INT8 ran 1.36-1.60x as fast
    with 2 streams; a quiet host may gain nothing (docs/BENCHMARKS.md, "Two streams"). MXNet reads
    both settings once, when it loads, so the variable must be set before the process starts.
    """
    subject = "streams" if value is not None else STREAMS_VAR
    if value is None:
        text = os.environ.get(STREAMS_VAR, "").strip()
        if not text:
            return 1
        value = int(text) if text.isascii() and text.isdigit() else text  # "²".isdigit() is True
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise MxvisionError(subject, f"expected a whole number of streams from 1 to 64, got {value!r}")
    return value


def engine_workers():
    """The CPU workers MXNet's engine was given (``MXNET_CPU_WORKER_NTHREADS``, read when it
    loaded; 1 by default), or None when the variable is not a number."""
    text = os.environ.get("MXNET_CPU_WORKER_NTHREADS", "1").strip()
    return int(text) if text.isascii() and text.isdigit() else None


#: oneDNN's ISA cap that lets MXNet 1.9.1's oneDNN 2.4 use AMX (off by default in that release)
AMX_ISA = "AVX512_CORE_AMX"
#: set beside DNNL_MAX_CPU_ISA when mxvision raised the cap, so child processes tell it from the user's
AMX_MARK = "MXVISION_SET_DNNL_MAX_CPU_ISA"


def cpu_info():
    """The first CPU's ``model name`` and ``flags`` as Linux lists them in /proc/cpuinfo, as
    ``(model, set of flags)``; elsewhere ``platform.processor()`` and no flags."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if model is None:
        import platform

        model = platform.processor() or platform.machine()
    return model, flags


def cpu_flags():
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    return cpu_info()[1]


def request_amx_state():
    """Ask Linux for the AMX tile state: ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``.

    Since Linux 5.16 a process must ask before its first AMX instruction, and oneDNN 2.4 in MXNet
    1.9.1 does not: with AMX enabled and no request, the first INT8 convolution dies of SIGILL
    (measured: exit 132). True when granted (the permission holds for the process and its forks).
    """
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA


def use_amx():
    """Let oneDNN use AMX on CPUs that have it (INT8 1.4-1.6x faster; docs/BENCHMARKS.md).

    MXNet 1.9.1's oneDNN 2.4 stops at AVX-512 VNNI unless ``DNNL_MAX_CPU_ISA`` names AMX, and then
    needs the process to have asked Linux for the AMX state (:func:`request_amx_state`). Here,
    before MXNet is imported: on a CPU with ``amx_tile`` and ``amx_int8`` whose kernel grants the
    request, the cap is raised. ``MXVISION_AMX=0`` keeps oneDNN's default. A ``DNNL_MAX_CPU_ISA``
    the user set is kept, and the request is made whenever it names AMX; one that an mxvision
    parent process set (it says so in ``MXVISION_SET_DNNL_MAX_CPU_ISA``) is decided afresh, so a
    child process can opt out, and can never meet AMX without the permission. fp32 has no AMX
    path: fp32 results are unchanged (README's demo gives the same figures with and without).
    Returns whether AMX is enabled for this process.
    """
    wanted = os.environ.get("DNNL_MAX_CPU_ISA")
    if wanted is not None and os.environ.get(AMX_MARK) == wanted and "mxnet" not in sys.modules:
        del os.environ["DNNL_MAX_CPU_ISA"], os.environ[AMX_MARK]  # inherited: decide afresh
        wanted = None
    if wanted is not None:
        return "AMX" in wanted.upper() and request_amx_state()
    if os.environ.get("MXVISION_AMX", "1").strip() == "0" or "mxnet" in sys.modules:
        return False
    if not {"amx_tile", "amx_int8"} <= cpu_flags() or not request_amx_state():
        return False
    os.environ["DNNL_MAX_CPU_ISA"] = os.environ[AMX_MARK] = AMX_ISA
    return True


def num_gpus():
    """How many GPUs this MXNet build can use (0 for the CPU wheel, or when CUDA is absent)."""
    import mxnet as mx

    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:  # CUDA build on a host without a driver
        return 0


def parse_ctx(spec=None):
    """Turn ``None``/``"auto"``/``"cpu"``/``"gpu"``/``"gpu:1"`` (or an mx.Context) into a Context.

    ``auto`` picks ``gpu(0)`` when MXNet sees a GPU, so feature extraction runs there by default.
    """
    import mxnet as mx

    if isinstance(spec, mx.Context):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return mx.gpu(0) if num_gpus() > 0 else mx.cpu()
    if text == "cpu":
        return mx.cpu()
    if text == "gpu" or text.startswith("gpu:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise MxvisionError(f"--ctx {spec}", "expected cpu, gpu or gpu:N")
        index = int(index_text)
        available = num_gpus()
        if index >= available:
            raise MxvisionError(f"--ctx {spec}", f"MXNet sees {available} GPU(s) here; use --ctx cpu")
        return mx.gpu(index)
    raise MxvisionError(f"--ctx {spec}", "expected auto, cpu, gpu or gpu:N")


def hybridize_for_inference(block, ctx):
    """Hybridize ``block`` for inference: one static graph and, on a CPU with oneDNN, MXNet's
    oneDNN graph fusion (``backend="MKLDNN"``), which runs a convolution with the BatchNorm,
    ``Activation(relu)`` and residual sum after it as one operator (torchxrayvision's ResNet-50
    at 512 px, batch 1: 1.2x PyTorch without, 1.3-2.2x with; docs/BENCHMARKS_XRV.md). The fused
    operators have no backward, so blocks that gradients are taken through (Grad-CAM,
    fine-tuning) are hybridized plainly instead. So is the Xvision pipeline (extract, predict, its
    archives): fusing reorders float sums (~3e-6 relative on its features), which is enough to
    move the random-weight demo's figures, pinned in README.md. Returns ``block``."""
    import mxnet as mx

    fuse = ctx.device_type == "cpu" and mx.runtime.Features().is_enabled("MKLDNN")
    block.hybridize(static_alloc=True, static_shape=True, **({"backend": "MKLDNN"} if fuse else {}))
    return block


def shared_dir():
    """The real-data folder ``shared/`` (never part of the repository) as a Path, or None.

    ``MXVISION_SHARED`` overrides; the default is ``../shared`` beside the project checkout.
    """
    path = Path(os.environ.get("MXVISION_SHARED", _REPO_ROOT.parent / "shared"))
    return path if path.is_dir() else None


def user_cache_dir():
    """mxvision's cache folder as a Path: ``$MXVISION_CACHE`` when set, else the platform's user
    cache folder from ``platformdirs`` -- ``$XDG_CACHE_HOME/mxvision`` or ``~/.cache/mxvision`` on
    Linux, ``~/Library/Caches/mxvision`` on macOS, ``%LOCALAPPDATA%\\mxvision\\Cache`` on Windows.
    Nothing is created here; callers make the subfolder they write (e.g. ``quantized/``)."""
    base = os.environ.get("MXVISION_CACHE")
    if base:
        return Path(base).expanduser().absolute()
    import platformdirs
    return Path(platformdirs.user_cache_dir("mxvision", appauthor=False)).absolute()
