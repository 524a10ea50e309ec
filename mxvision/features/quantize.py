"""Reduced-precision backbones for CPU feature extraction: INT8 (oneDNN, calibrated) and bfloat16.

``int8``
    The fp32 backbone is exported to a symbol, fused and quantized with MXNet's oneDNN flow
    (:func:`mxnet.contrib.quantization.quantize_model_mkldnn`, ``smart`` mode: every convolution,
    BatchNorm, ReLU and pooling runs in INT8/UINT8 with VNNI, only the final BatchNorm + ReLU of
    the cut stay fp32 so the features keep their fp32 range). Graphs the pass would leave partly
    float32 -- the torchxrayvision ports' ``relu`` and fused BatchNorm + ReLU, DenseNet's BatchNorm
    after each concatenation -- are first re-expressed with operators it quantizes, and ResNet
    v2's pre-activation BatchNorms folded into their neighbours (:mod:`mxvision.features.int8_graph`;
    same float32 function). On a CPU with AVX-512 VNNI and no AMX, the ReLUs before a convolution
    with a residual sum are then taken back out of their fused convolutions, for oneDNN's faster
    kernel on s8 inputs (:func:`unfuse_relu_pays`). Activation ranges come from a
    *calibration set* of real images, split in two (:func:`calibrate`): one forward pass over the
    even-numbered films collects each layer's histogram, from which four calibrations are made --
    MXNet's ``entropy`` (cut where the KL divergence to the fp32 distribution is least) and
    ``naive`` (the layer's min/max), and the 99.99th and 99.999th percentiles of |output| -- and
    the one whose features on the odd-numbered films are closer to float32 (relative L1) is kept.
    None wins everywhere: on the Xvision trunk with identity BatchNorms entropy beat naive (feature
    error 0.069 against 0.076), with BatchNorm statistics of real films naive beat entropy by far
    (cosine to float32 0.78 against 0.35), and a percentile beat both on each
    (docs/BENCHMARKS.md). The choice and every candidate's error are recorded in ``calibration``.
    Calibrating is the slow part (a forward pass per image, MXNet's graph passes, and the
    candidates run on the held-out films: ~25 s for the Xvision trunk on 2 cores), so
    the result is cached, keyed by everything it depends on (:func:`model_key`).
``bfloat16``
    MXNet AMP (:func:`mxnet.contrib.amp.convert_hybrid_block`) runs the network in bfloat16 with
    oneDNN. No calibration; converted in memory from the float32 weights each time (see
    :func:`to_bfloat16` for why). Measured: no faster than float32 on this MXNet build.

Both run on the CPU only (oneDNN operators). The INT8 network is kept as a plain symbol + params
pair (``backbone-int8-symbol.json`` / ``backbone-int8.params``) in the feature store, so
``predict`` and ``export`` rebuild exactly the network the features came from. It is also cached
for every other store in the user cache, ``quantized/<key>/`` under ``$MXVISION_CACHE`` or the
platform's cache folder (``~/.cache/mxvision`` on Linux): a second extraction of the same data
copies it (a second or so) instead of calibrating again. Concurrent extractions of one key
calibrate once (a lock file beside the entry; the entry is renamed into place whole); an entry
whose files no longer match their recorded sha1s is converted again; an unwritable cache is
warned about once and extraction goes on without it. ``mxvision cache list|clear`` shows and
frees it (:mod:`mxvision.features.cache`).

:func:`load_extractor` rebuilds, for ``predict`` and ``export``, the network a store's features
came from: float32, bfloat16 or INT8 backbone, plus :class:`Pooled` when the features were pooled.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import HybridBlock

from mxvision.data import transforms
from mxvision.data.folder import IMAGE_SUFFIXES
from mxvision.features.int8_graph import int8_ready, unfuse_relu
from mxvision.io.download import locked_file
from mxvision.runtime import cpu_flags, parse_ctx, user_cache_dir
from mxvision.errors import BadRun, MxvisionError, one_line
from mxvision.models import zoo
from mxvision.models.store import check_params_file, check_weight_values, mxnet_error_line
from mxvision.utils import atomic_path, file_digest, write_json

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "int8")
# Bumped whenever the conversion itself changes, so cached networks of older code are not reused.
CONVERSION_VERSION = 9
#: How INT8 activation ranges are chosen: by agreement with float32 on held-out calibration films,
#: between the ``CALIB_MODES`` (:func:`calibrate`).
CALIB_MODE = "agreement"
#: The calibrations tried, in order of preference on a tie: MXNet's two, ``entropy`` (the KL-optimal
#: thresholds of each layer's histogram) and ``naive`` (its min and max), and two percentiles of
#: each layer's |output| (:func:`percentile_range`), which clip a fixed small share of every
#: layer's outputs: on the bench's realistic trunk the 99.99th gave 0.81 relative L1 on the held-out films
#: where naive gave 0.92 and entropy 1.04 (docs/BENCHMARKS.md, conversion version 8).
CALIB_MODES = ("entropy", "naive", "p99.99", "p99.999")
#: Fewer calibration films than this are all calibrated on, with entropy: none held out to choose.
MIN_FILMS_TO_CHOOSE = 4
#: Above this relative L1 between INT8 and float32 features on the held-out films, a warning.
WARN_FEATURE_ERROR = 0.25
QUANTIZE_MODE = "smart"
DEFAULT_CALIBRATION_SIZE = 64
CALIBRATION_SEED = 0


def check_dtype(dtype):
    """The normalised compute precision name, or a one-line error listing the valid ones."""
    text = {"fp32": "float32", "bf16": "bfloat16", "uint8": "int8"}.get(str(dtype).lower(),
                                                                       str(dtype).lower())
    if text not in DTYPES:
        raise MxvisionError(f"--dtype {dtype}", f"expected one of {', '.join(DTYPES)}")
    return text


#: The CPU flags oneDNN 2.4 (MXNet 1.9.1's) needs for its bfloat16 kernels: ``avx512_core``. On an
#: AVX2-only CPU (an AMD EPYC of the Zen 3 kind) MXNet fails in the first convolution with "could
#: not create a primitive descriptor iterator"; INT8 and float32 have AVX2 kernels.
BFLOAT16_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


def check_cpu(dtype, ctx, flags=None):
    """Refuse in one line a ``dtype`` this context cannot run: reduced precision off the CPU, and
    bfloat16 on a CPU without AVX-512 (``flags``: the CPU's, from /proc/cpuinfo by default; an
    empty set, as off Linux, is not judged)."""
    if dtype != "float32" and ctx.device_type != "cpu":
        raise MxvisionError(f"--dtype {dtype}", "runs on the CPU only (oneDNN operators); "
                                                "use --ctx cpu, or float32 on a GPU")
    if dtype != "bfloat16":
        return
    flags = cpu_flags() if flags is None else set(flags)
    missing = sorted(BFLOAT16_CPU_FLAGS - flags)
    if flags and missing:
        raise MxvisionError("--dtype bfloat16", "this CPU has no AVX-512 (%s missing from its flags), which "
                                                "MXNet 1.9.1's bfloat16 kernels need; use float32 or int8"
                            % ", ".join(missing))


#: ``DNNL_MAX_CPU_ISA`` caps below AVX-512 VNNI: oneDNN then has no ``brgconv`` INT8 kernels to avoid.
#: (oneDNN 2.4 compares the value as it is: ``avx2`` is no cap to it, nor here.)
ISA_CAPS_BELOW_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_MIC", "AVX512_MIC_4OPS", "AVX512_CORE"})


def unfuse_relu_pays(flags=None, isa_cap=None):
    """Whether this process's oneDNN runs INT8 convolutions with AVX-512 VNNI and without AMX: there
    a convolution with a residual sum ran faster with an s8 input than with a u8 one (its
    ``jit_int8`` kernels against ``brgconv``), so the conversion leaves the ReLUs before such
    convolutions unfused (:func:`mxvision.features.int8_graph.unfuse_relu`; the Xvision trunk
    1.1x faster on an AMD EPYC Zen 5, its feature error 0.063 against 0.059: docs/BENCHMARKS.md,
    conversion version 9).
    With AMX (mxvision's default where the CPU has it: a cap naming AMX; oneDNN 2.4's ``ALL``
    leaves AMX out) or without VNNI, the fused graph is kept: not measured there. ``flags``: the
    CPU's (/proc/cpuinfo by default); ``isa_cap``: ``DNNL_MAX_CPU_ISA`` (the environment's by
    default)."""
    flags = cpu_flags() if flags is None else set(flags)
    cap = (os.environ.get("DNNL_MAX_CPU_ISA", "") if isa_cap is None else isa_cap).strip()
    if "avx512_vnni" not in flags or cap in ISA_CAPS_BELOW_VNNI:
        return False
    return not ("AMX" in cap and {"amx_tile", "amx_int8"} <= flags)


def file_names(dtype):
    """Symbol, params and info file of the ``dtype`` backbone (in a store or a cache folder)."""
    return (f"backbone-{dtype}-symbol.json", f"backbone-{dtype}.params",
            f"backbone-{dtype}.json")


# --------------------------------------------------------------------------- calibration set
def calibration_paths(calibration, items, n=DEFAULT_CALIBRATION_SIZE, seed=CALIBRATION_SEED):
    """The calibration images and where they came from: ``(paths, source)``.

    ``calibration`` is None (a seeded sample of ``n`` of the extracted ``items``, from their train
    split when there is one), an index CSV, a folder (its image files, recursively, sorted), an
    object with ``paths`` (an Index) or a list of image paths.
    """
    if calibration is None:
        pool = [it for it in items if it.get("split") == "train"] or list(items)
        pick = np.random.RandomState(seed).permutation(len(pool))[:n]
        paths = [pool[k]["path"] for k in sorted(pick)]
        return paths, f"seeded sample (seed {seed}) of {len(paths)} of the extracted images" + \
            (" (train split)" if pool is not items and len(pool) < len(items) else "")
    if hasattr(calibration, "paths"):
        return [str(p) for p in calibration.paths], f"index {getattr(calibration, 'source', '')}"
    if isinstance(calibration, (list, tuple)):
        return [str(p) for p in calibration], "list of images given by the user"
    path = Path(calibration)
    if path.is_dir():
        paths = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise MxvisionError(f"--calibration {path}", "folder holds no image files")
        return paths, f"folder {path.resolve()}"
    if path.is_file():
        from mxvision.data.index import read_index
        return [str(p) for p in read_index(path).paths], f"index {path.resolve()}"
    raise MxvisionError(f"--calibration {calibration}", "no such index CSV or folder of images")


def calibration_hash(paths, preset):
    """sha1 over the preprocessing and the *content* of every calibration image, in order."""
    digest = hashlib.sha1(json.dumps(transforms.get_preset(preset).to_dict(), sort_keys=True).encode())
    for p in paths:
        digest.update((content_sha1(p) or "unreadable").encode())
    return digest.hexdigest()


def content_sha1(path):
    """sha1 of an image file's bytes or of a packed record's pixels (``FILE.rec#KEY``); None when
    it cannot be read (:func:`load_calibration` then skips it, with a warning)."""
    from mxvision.data import record_reader

    try:
        parts = record_reader.split_record_path(path)
        if parts is None:
            return file_digest(path, "sha1")
        pixels = record_reader.open_source(parts[0]).read(parts[1])[1]
        return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    except (OSError, MxvisionError):
        return None


def load_calibration(paths, preset):
    """The preprocessed calibration images as one (N, C, S, S) float32 array (unreadable: skipped).

    Files or records of a RecordIO pack (``FILE.rec#KEY``, what a pack's index lists)."""
    from mxvision.data import record_reader

    images = []
    for p in paths:
        try:
            images.append(record_reader.load_image(p, preset))
        except MxvisionError as err:
            log.warning("calibration image skipped: %s", err)
    if not images:
        raise MxvisionError("--calibration", "none of the calibration images could be read")
    return np.stack(images)


# --------------------------------------------------------------------------- the converted network
def model_key(features_info, dtype, calib_sha1=None, unfuse=None):
    """Everything the converted network depends on, hashed: backbone, cut, weights, preprocessing,
    precision, calibration set and method, whether ReLUs are unfused (``unfuse``; by default
    :func:`unfuse_relu_pays`), and the MXNet version that converted it."""
    parts = {"backbone": features_info["backbone"], "cut": features_info["cut"],
             "weights_sha1": features_info["weights"]["sha1"],
             "preprocessing": features_info["preprocessing"], "dtype": dtype,
             "calibration_sha1": calib_sha1, "calib_mode": CALIB_MODE if dtype == "int8" else None,
             "calib_modes": list(CALIB_MODES) if dtype == "int8" else None,
             "quantize_mode": QUANTIZE_MODE if dtype == "int8" else None,
             "unfuse_relus": (unfuse_relu_pays() if unfuse is None else bool(unfuse)) if dtype == "int8" else None,
             "mxnet": mx.__version__, "conversion_version": CONVERSION_VERSION}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _export_fp32(net, ctx, preset, folder):
    """Hybridize and run ``net`` once; export it to ``folder`` and load it back (if a folder)."""
    preset = transforms.get_preset(preset)
    net.hybridize()
    net(mx.nd.zeros((1, preset.channels, preset.size, preset.size), ctx=ctx)).wait_to_read()
    if folder is None:
        return None
    prefix = os.path.join(folder, "net")
    net.export(prefix, epoch=0)
    return mx.model.load_checkpoint(prefix, 0)


def to_bfloat16(net, ctx, preset):
    """The bfloat16 version of a float32 backbone block, converted in memory with MXNet AMP.

    Why in memory: ``amp.convert_model`` on the exported symbol leaves this graph float32, and
    the block ``amp.convert_hybrid_block`` returns computes in bfloat16 (features ~1% from
    float32) but its *exported* graph reloads as float32 (MXNet 1.9.1, checked). Converting the
    float32 weights again is instant and deterministic, so nothing is stored.
    """
    from mxnet.contrib import amp
    _export_fp32(net, ctx, preset, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return amp.convert_hybrid_block(net, target_dtype="bfloat16", ctx=ctx)


def convert(net, dtype, ctx, preset, calib_images=None, unfuse=None, **options):
    """Convert a float32 backbone block to the INT8 ``(symbol, arg_params, aux_params, calibration)``.

    ``calibration`` says how the activation ranges were chosen (:func:`calibrate`, which ``unfuse``
    goes to).
    ``options`` override what is passed to ``quantize_model_mkldnn`` (``calib_mode``,
    ``quantize_granularity``, ``excluded_sym_names``...): for benches that try other settings
    (bench/bench_xrv_int8_accuracy.py), which then calibrate on all ``calib_images``; mxvision's
    own conversions, and their cache key, use the defaults."""
    with tempfile.TemporaryDirectory(prefix="mxvision-quantize-") as tmp:
        sym, arg, aux = _export_fp32(net, ctx, preset, tmp)
    if dtype != "int8":
        raise ValueError(dtype)
    sym, arg, aux, rewritten = int8_ready(sym, arg, aux)
    if any(rewritten.values()):
        log.info("graph re-expressed for the INT8 pass: %s", rewritten)
    tic = time.time()
    if not options:
        qsym, qarg, qaux, calibration = calibrate(sym, arg, aux, calib_images, unfuse=unfuse)
    else:
        qsym, qarg, qaux, calibration = quantize_with(sym, arg, aux, calib_images, **options)
    # (tests look for "INT8 calibration on": the one line each conversion logs)
    log.info("INT8 calibration on %d images took %.1f s", calibration["calibrated_on"], time.time() - tic)
    return qsym, qarg, qaux, calibration


def quantize_with(sym, arg, aux, calib_images, **options):
    """``quantize_model_mkldnn`` on the float32 graph ``sym`` with ``options`` over mxvision's
    defaults (entropy calibration on all ``calib_images``, ``quantize_mode`` :data:`QUANTIZE_MODE`):
    ``(qsym, qarg, qaux, calibration)``, for benches that try one setting rather than choose. MXNet's
    own flow: every ReLU stays fused (no :func:`~mxvision.features.int8_graph.unfuse_relu`), so on a
    CPU where :func:`unfuse_relu_pays`, such a network differs from mxvision's by that too."""
    from mxnet.contrib.quantization import quantize_model_mkldnn
    settings = {"calib_mode": "entropy", "quantized_dtype": "auto", "quantize_mode": QUANTIZE_MODE, **options}
    qsym, qarg, qaux = quantize_model_mkldnn(sym, arg, aux, ctx=mx.cpu(), calib_data=_batches(calib_images),
                                             num_calib_examples=len(calib_images), label_names=None, logger=None,
                                             **settings)
    return qsym, qarg, qaux, {"chosen": settings["calib_mode"], "calibrated_on": len(calib_images)}


def _batches(images):
    """``images`` in batches of up to 16, the last one padded (``batch.pad`` says by how many)."""
    return mx.io.NDArrayIter(data=images, batch_size=min(16, len(images)), last_batch_handle="pad")


def _module(sym, arg, aux, images):
    """A CPU inference Module of ``sym`` with its parameters, bound for :func:`_batches` of ``images``."""
    from mxnet.module import Module
    mod = Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(for_training=False, data_shapes=[("data", (min(16, len(images)),) + images.shape[1:])])
    mod.set_params(arg, aux)
    return mod


def graph_outputs(sym, arg, aux, images):
    """``sym``'s output for ``images`` (batches of up to 16), as one float32 array: a converted
    network's features, to compare with float32's (:func:`feature_error`)."""
    mod = _module(sym, arg, aux, images)
    outputs = []
    for batch_data in _batches(images):
        mod.forward(batch_data, is_train=False)
        # to NumPy before slicing: a oneDNN-layout output cannot be viewed (Module.predict slices it)
        out = mod.get_outputs()[0].asnumpy()
        outputs.append(out[:len(out) - batch_data.pad])
    return np.concatenate(outputs).reshape(len(images), -1).astype(np.float32)


def feature_error(want, got):
    """Relative L1 of ``got`` against ``want``: sum |got - want| / sum |want| (inf if not finite)."""
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).sum() / max(np.abs(want).sum(), 1e-12))


def calibrate(sym, arg, aux, images, modes=CALIB_MODES, unfuse=None):
    """Quantize the float32 graph ``sym`` with MXNet's oneDNN flow, choosing the calibration by
    agreement with float32: ``(qsym, qarg, qaux, calibration)``.

    The even-numbered ``images`` go once through the float32 graph, collecting every quantized
    layer's output histogram; from it come the :data:`CALIB_MODES`' ranges: MXNet's ``entropy``
    (the histogram's KL-optimal thresholds) and ``naive`` (its min and max), and percentiles
    (:func:`percentile_range`). Every INT8 graph then runs on the odd-numbered images, and the one
    whose outputs are closest to float32 (:func:`feature_error`) is returned: the recorded errors
    are those of the returned network, on films it was not calibrated on (the chosen one's, as the
    least of several, is slightly optimistic: it was also chosen on those films). With fewer than
    :data:`MIN_FILMS_TO_CHOOSE` images, entropy on all of them. ``modes``: the candidates (one,
    for a bench or a test that wants that mode). ``unfuse``: leave ReLUs out of the fused
    convolutions before quantizing (:func:`mxvision.features.int8_graph.unfuse_relu`); by default
    where that pays (:func:`unfuse_relu_pays`). The record's ``relu_unfused`` counts them.

    The sequence is ``quantize_model_mkldnn``'s (backend passes around MXNet's ``quantize_graph``
    and ``calib_graph``), with one statistics pass shared by every mode; the pass itself is
    MXNet's ``_collect_layer_statistics`` (mxnet 1.9.1, the last release: it will not move).
    """
    from mxnet.contrib.quantization import _collect_layer_statistics, calib_graph, quantize_graph
    images = np.asarray(images, dtype=np.float32)
    fit, check = (images[0::2], images[1::2]) if len(images) >= MIN_FILMS_TO_CHOOSE else (images, images[:0])
    fused = sym.get_backend_symbol("MKLDNN_QUANTIZE")
    fused, unfused = unfuse_relu(fused) if (unfuse_relu_pays() if unfuse is None else unfuse) else (fused, 0)
    qsym, _, _, collector = quantize_graph(fused, arg, aux, ctx=mx.cpu(), calib_mode="entropy",
                                           quantized_dtype="auto", quantize_mode=QUANTIZE_MODE)
    _collect_layer_statistics(_module(fused, arg, aux, fit), _batches(fit), collector, len(fit))
    modes = tuple(modes) if len(check) else ("entropy",)
    # every range is taken before calib_graph's entropy consumes the histograms (a histogram entry
    # keeps its layer's exact min and max: naive calibration's range)
    ranges = {mode: SimpleNamespace(min_max_dict={name: _range(h, mode) for name, h in collector.hist_dict.items()})
              for mode in modes if mode != "entropy"}
    candidates = {}
    for mode in modes:
        q, qarg, qaux = calib_graph(qsym, arg, aux, collector if mode == "entropy" else ranges[mode],
                                    calib_mode="entropy" if mode == "entropy" else "naive",
                                    quantized_dtype="auto", logger=None)
        # calib_graph writes the ranges into qsym's graph in place; get_backend_symbol copies it
        # (MXGenBackendSubgraph), so this candidate keeps its own before the next one is written
        candidates[mode] = (q.get_backend_symbol("MKLDNN_QUANTIZE"), qarg, qaux)
    calibration = {"chosen": modes[0], "calibrated_on": len(fit), "checked_on": len(check), "relu_unfused": unfused}
    if len(check):
        want = graph_outputs(sym, arg, aux, check)
        errors = {mode: feature_error(want, graph_outputs(*candidates[mode], check)) for mode in modes}
        calibration.update(chosen=min(modes, key=lambda m: (errors[m], modes.index(m))),
                           feature_error={m: round(e, 6) for m, e in errors.items()})
        log.info("INT8 calibration: %s", describe_calibration(calibration))
        if errors[calibration["chosen"]] > WARN_FEATURE_ERROR:
            log.warning("INT8 output differs from float32 by %.3f (relative L1) on %d held-out calibration "
                        "films: check it on your task, or use float32", errors[calibration["chosen"]], len(check))
    return candidates[calibration["chosen"]] + (calibration,)


def _range(hist_entry, mode):
    """The (min, max) a ``naive`` or ``pNN.NN`` calibration gives one layer's histogram entry."""
    if mode == "naive":
        return hist_entry[2], hist_entry[3]
    if not mode.startswith("p"):
        raise ValueError(f"unknown calibration {mode!r}")
    return percentile_range(hist_entry, float(mode[1:]) / 100)


def percentile_range(hist_entry, fraction):
    """The range that keeps ``fraction`` of a layer's outputs unclipped: ``(-t, t)``, or ``(0, t)``
    for a layer with no negative output (as MXNet's entropy calibration gives them), where ``t`` is
    the upper edge of the first histogram bin at which ``fraction`` of the |outputs| lie at or
    below it (never beyond the histogram's range ``th``).

    ``hist_entry`` is MXNet's ``_LayerHistogramCollector`` entry ``(hist, edges, min, max, th)``:
    an odd number of equal bins over ``(-th, th)``, the middle one centred on 0."""
    hist, _, low, _, th = hist_entry
    n = len(hist)
    mid = n // 2
    width = 2.0 * th / n
    folded = hist[mid:].astype(np.float64)  # |x| in bins of the same width, the first centred on 0
    folded[1:] += hist[:mid][::-1]
    total = folded.sum()
    if total <= 0:
        return (0.0, float(th)) if low >= 0 else (-float(th), float(th))
    k = int(np.searchsorted(np.cumsum(folded) / total, fraction))
    t = min(float(th), (k + 0.5) * width)
    return (0.0, t) if low >= 0 else (-t, t)


def describe_calibration(calibration):
    """One phrase for a converted network's ``calibration`` record (manifest, archive, logs)."""
    if not calibration or "chosen" not in calibration:
        return "calibration not recorded"
    text = f"{calibration['chosen']} calibration on {calibration.get('calibrated_on', '?')} films"
    errors = calibration.get("feature_error")
    if errors:
        text += ", chosen on %d held-out films (error vs float32: %s)" % (
            calibration.get("checked_on", 0), ", ".join(f"{m} {e:.3f}" for m, e in errors.items()))
    if calibration.get("relu_unfused"):
        text += f"; {calibration['relu_unfused']} ReLUs left out of their convolutions for this CPU's kernels"
    return text


def save(folder, dtype, sym, arg, aux, info):
    """Write the symbol/params pair and its ``precision.json`` (key, provenance) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sym_name, params_name, info_name = file_names(dtype)
    with atomic_path(folder / sym_name) as tmp:
        sym.save(tmp)
    with atomic_path(folder / params_name) as tmp:
        mx.nd.save(tmp, {**{f"arg:{k}": v for k, v in arg.items()},
                         **{f"aux:{k}": v for k, v in aux.items()}})
    info = dict(info, dtype=dtype, symbol=sym_name, params=params_name,
                symbol_sha1=file_digest(folder / sym_name, "sha1"),
                params_sha1=file_digest(folder / params_name, "sha1"))
    write_json(folder / info_name, info)
    return info


_INFO_KEYS = ("dtype", "symbol", "params", "symbol_sha1", "params_sha1")


def info_problem(info):
    """Why a converted network's record (``backbone-int8.json``, or the ``precision`` a manifest
    or a run's config copies from it) cannot be used, or None: it must be an object whose
    file names are plain names inside its folder and whose checksums are strings."""
    if not isinstance(info, dict):
        return "is not a JSON object"
    bad = [k for k in _INFO_KEYS if not isinstance(info.get(k), str)]
    if bad:
        return f"lacks {', '.join(bad)} (or holds another type)"
    for key in ("symbol", "params"):
        if os.path.basename(info[key]) != info[key] or info[key] in ("", ".", ".."):
            return f"its {key} {info[key][:60]!r} is not a file name inside its folder"
    return None


def find(folder, dtype, key):
    """The recorded info of a converted network in ``folder`` with this ``key`` and intact files.

    A cache entry is only a cache: one that is unreadable, malformed (warned about, naming the
    file), of another key or whose files changed is passed over, and the caller converts again
    (and overwrites it)."""
    folder = Path(folder)
    info_file = folder / file_names(dtype)[2]
    if not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text())
    except (ValueError, RecursionError, OSError) as err:
        log.warning("%s: unreadable (%s); converting again", info_file, one_line(err, 80))
        return None
    problem = info_problem(info)
    if problem:
        log.warning("%s: %s; converting again", info_file, problem)
        return None
    if info.get("key") != key:
        return None
    for name, sha in ((info["symbol"], info["symbol_sha1"]), (info["params"], info["params_sha1"])):
        if not (folder / name).is_file() or file_digest(folder / name, "sha1") != sha:
            return None
    return info


def load_block(folder, info, ctx):
    """The converted network as a Gluon SymbolBlock (input ``data``), hybridized.

    ``info`` comes from a manifest or a run's config: it is checked (:func:`info_problem`), its
    files against their sha1, the params file's headers before MXNet reads it, and the loaded
    values must be finite; one line naming the file otherwise."""
    folder = Path(folder)
    problem = info_problem(info)
    if problem:
        raise BadRun(folder, f"the record of its converted backbone (precision) {problem}")
    if ctx.device_type != "cpu":
        raise MxvisionError(f"{info['dtype']} backbone", "runs on the CPU only; use --ctx cpu")
    for name, sha in ((info["symbol"], info["symbol_sha1"]), (info["params"], info["params_sha1"])):
        path = folder / name
        if not path.is_file():
            raise BadRun(path, f"the {info['dtype']} backbone of these features is missing")
        if file_digest(path, "sha1") != sha:
            raise BadRun(path, f"the {info['dtype']} backbone changed since the features were extracted")
    check_params_file(folder / info["params"])  # every array inside the file, before MXNet reads it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Cannot decide type for ... data": it is float32
            block = gluon.SymbolBlock.imports(str(folder / info["symbol"]), ["data"],
                                              str(folder / info["params"]), ctx=ctx)
    except (mx.base.MXNetError, ValueError, AssertionError, KeyError) as err:
        reason = mxnet_error_line(err) if isinstance(err, mx.base.MXNetError) else one_line(err, 160)
        raise BadRun(folder / info["symbol"], f"does not load with its parameters ({reason})") from None
    check_weight_values({name: param.data().astype("float32") for name, param in
                         block.collect_params().items()}, str(folder / info["params"]))
    return block


def cache_root():
    """Where calibrated networks are kept for every feature store: ``quantized/`` in the user cache
    (:func:`mxvision.runtime.user_cache_dir`: ``$MXVISION_CACHE``, else e.g. ``~/.cache/mxvision``)."""
    return user_cache_dir() / "quantized"


def entry_folder(key):
    """The cache entry of the converted network with this :func:`model_key`."""
    return cache_root() / key


#: Cache roots already warned about as unwritable in this process (warned once each).
_UNWRITABLE = set()
#: How the manifest's ``precision["cache"]`` says where the converted network came from.
CACHE_STATES = {"hit": "copied from the user cache (converted earlier, by this or another process)",
                "stored": "converted here and kept in the user cache",
                "store": "already in this feature store (an earlier or interrupted run)",
                "off": "converted here; the user cache could not be written"}


def _reason(err):
    return one_line(getattr(err, "problem", None) or getattr(err, "strerror", None) or err, 120)


def warn_unwritable(root, reason):
    """Warn that the cache folder ``root`` cannot be written, once per folder and process (a
    long job extracting many stores hears it once)."""
    if str(root) not in _UNWRITABLE:
        _UNWRITABLE.add(str(root))
        log.warning("cannot write the cache folder %s (%s): the converted network is kept in the "
                    "feature store only, and the next store converts it again; set MXVISION_CACHE "
                    "to a writable folder", root, reason)


def _copy_files(src, dst, dtype):
    for name in file_names(dtype):
        with atomic_path(Path(dst) / name) as tmp:
            shutil.copyfile(Path(src) / name, tmp)


def _from_cache(entry, store_dir, dtype, key):
    """Copy the intact cache entry ``entry`` into the store; the store's info, or None (no
    entry, a damaged one, or one that went away while being copied)."""
    if find(entry, dtype, key) is None:
        return None
    try:
        _copy_files(entry, store_dir, dtype)
    except FileNotFoundError:  # removed meanwhile (mxvision cache clear)
        return None
    log.info("using the cached %s backbone %s", dtype, entry)
    return find(store_dir, dtype, key)  # checked again: the copy is what the features come from


def _install(store_dir, entry, dtype):
    """Put the store's converted network into the cache as ``entry``, atomically: written into a
    temporary folder beside it, then renamed (called with the entry's lock held)."""
    root = entry.parent
    for stale in root.glob(f".{entry.name}.*.tmp"):  # left by a killed writer of this key
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, 0o755)
        _copy_files(store_dir, tmp, dtype)
        if entry.exists():  # a damaged entry (find refused it): replaced
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_into(store_dir, net, dtype, ctx, preset, features_info, key, calib, unfuse=None):
    images = load_calibration(calib["paths"], preset) if calib else None
    if calib:
        calib["n_images"] = len(images)
    sym, arg, aux, calibration = convert(net, dtype, ctx, preset, images, unfuse=unfuse)
    if calib:
        calib.update(calibration)
    record = {"key": key, "backbone": features_info["backbone"], "cut": features_info["cut"],
              "weights_sha1": features_info["weights"]["sha1"],
              "preprocessing": features_info["preprocessing"], "calibration": calib,
              "mxnet_version": mx.__version__, "converted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return save(store_dir, dtype, sym, arg, aux, record)


def _cached_or_converted(store_dir, net, dtype, ctx, preset, features_info, key, calib, unfuse=None):
    """``(info, state)``: the network in the store, taken from the user cache or converted (and
    then cached). One process converts a key at a time (a lock file beside the entry); another
    waits for it and copies its result. An entry whose files do not match the sha1s its record
    gives is converted again and replaced; an unwritable cache is warned about once, then
    left out."""
    entry = entry_folder(key)
    info = _from_cache(entry, store_dir, dtype, key)
    if info is not None:
        return info, "hit"
    with ExitStack() as held:
        lock = entry.parent / f".{key}.lock"
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(locked_file(lock, holder=f"another process converting the {dtype} backbone"))
        except (OSError, MxvisionError) as err:
            warn_unwritable(entry.parent, _reason(err))
            return _convert_into(store_dir, net, dtype, ctx, preset, features_info, key, calib, unfuse), "off"
        held.callback(_unlink_quietly, lock)  # while still holding it (see locked_file)
        info = _from_cache(entry, store_dir, dtype, key)  # converted by another process meanwhile?
        if info is not None:
            return info, "hit"
        if entry.exists():
            log.warning("the cached %s backbone %s is damaged (its files do not match the sha1s its "
                        "record gives, or are missing); converting again and replacing it", dtype, entry)
        info = _convert_into(store_dir, net, dtype, ctx, preset, features_info, key, calib, unfuse)
        try:
            _install(store_dir, entry, dtype)
        except OSError as err:  # e.g. a full disk: the store has the network, the cache does not
            warn_unwritable(entry.parent, _reason(err))
            return info, "off"
        return info, "stored"


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:  # removed by `mxvision cache clear` meanwhile
        pass


def prepare(net, dtype, ctx, preset, features_info, store_dir, calibration=None, items=(),
            calibration_size=DEFAULT_CALIBRATION_SIZE, resume_key=None):
    """The ``dtype`` version of ``net`` for extraction, converted once and cached.

    Looks for a converted network with the same key in ``store_dir`` (an earlier or interrupted
    run), then in the user cache (:func:`entry_folder`); otherwise converts (calibrating INT8 on
    ``calibration``) and writes it to both. Returns ``(block, info)``: ``info`` is the provenance
    the manifest records (key, files and their sha1, calibration set and method, and ``cache``:
    one of :data:`CACHE_STATES`, with ``cache_entry`` the cache folder). ``resume_key``: the key of
    the features already in ``store_dir``; another key is refused in one line before anything in
    the store is replaced.
    """
    dtype = check_dtype(dtype)
    check_cpu(dtype, ctx)
    store_dir = Path(store_dir)
    calib = None
    if dtype == "int8":
        paths, source = calibration_paths(calibration, items, n=calibration_size)
        if not paths:
            raise MxvisionError("--calibration", "no calibration images")
        calib = {"source": source, "n_images": len(paths), "sha1": calibration_hash(paths, preset),
                 "mode": CALIB_MODE, "quantize_mode": QUANTIZE_MODE, "paths": paths}
    unfuse = unfuse_relu_pays() if dtype == "int8" else None  # decided once: the key says what is built
    key = model_key(features_info, dtype, calib and calib["sha1"], unfuse)
    if resume_key is not None and resume_key != key:
        raise BadRun(store_dir, f"holds features of another {dtype} conversion (another calibration set, or "
                                f"MXNet, or a CPU kind that gets another INT8 graph); choose a new --out or pass "
                                f"--overwrite")
    if dtype == "bfloat16":
        info = {"key": key, "dtype": dtype, "method": "mxnet.contrib.amp.convert_hybrid_block, in memory",
                "backbone": features_info["backbone"], "cut": features_info["cut"],
                "weights_sha1": features_info["weights"]["sha1"], "calibration": None,
                "mxnet_version": mx.__version__}
        return to_bfloat16(net, ctx, preset), info
    info, state = find(store_dir, dtype, key), "store"
    if info is None:
        info, state = _cached_or_converted(store_dir, net, dtype, ctx, preset, features_info, key, calib, unfuse)
    info = dict(info, cache=state, cache_entry=str(entry_folder(key)))
    return load_block(store_dir, info, ctx), info


class Pooled(HybridBlock):
    """A backbone followed by global average pooling: (N, C, H, W) -> (N, C) features."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def hybrid_forward(self, F, x):
        return F.Flatten(F.Pooling(self.backbone(x), global_pool=True, pool_type="avg", kernel=(1, 1)))


def load_extractor(features_info, ctx=None, fp32_weights_file=None):
    """The network that turns an image batch into this store's features, for predict/export.

    ``features_info`` is a run's ``config["features"]`` (or a manifest plus ``features_dir``). It
    is the float32 backbone from ``fp32_weights_file``; for INT8 features the converted network
    kept in the store; for bfloat16 features the float32 backbone converted again (in memory);
    plus pooling when the features were pooled.
    Returns ``(block, dtype)``: the precision actually used.
    """
    ctx = parse_ctx(ctx)
    dtype = features_info.get("dtype", "float32")
    precision = features_info.get("precision") or {}
    if dtype != "float32" and precision.get("weights_sha1") != features_info["weights"]["sha1"]:
        # e.g. a fine-tuned backbone: only its float32 weights exist
        log.warning("features were computed in %s from other backbone weights: using float32", dtype)
        dtype = "float32"
    if dtype == "int8":
        net = load_block(features_info["features_dir"], precision, ctx)
    else:
        check_cpu(dtype, ctx)
        net = zoo.load_backbone_file(features_info["backbone"], features_info["cut"],
                                     fp32_weights_file, ctx=ctx)
        if dtype == "bfloat16":
            net = to_bfloat16(net, ctx, features_info["preprocessing"])
    if features_info.get("pooled"):
        net = Pooled(net)
    return net, dtype
