"""Choosing the MXNet device: a GPU when one is usable, the CPU otherwise."""
import mxnet as mx

from .errors import MxvisionError


def num_gpus():
    """How many GPUs this MXNet build can use (0 for the CPU wheel, or when CUDA is absent)."""
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:  # CUDA build on a host without a driver
        return 0


def parse_ctx(spec=None):
    """Turn ``None``/``"auto"``/``"cpu"``/``"gpu"``/``"gpu:1"`` (or an mx.Context) into a Context.

    ``auto`` picks ``gpu(0)`` when MXNet sees a GPU, so feature extraction runs there by default.
    """
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
