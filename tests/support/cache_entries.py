"""A user cache folder holding one entry of every kind mxvision lists, written the way mxvision
writes them (quantize.save for the quantized network, the sidecar format of torchxrayvision
conversions, the weights store's file name for a downloaded file), plus files that are no entry."""
import json
import os

import mxnet as mx

from mxvision.features import quantize
from mxvision.models import store

KEY = "ab" * 20
XRV_NAME = "densenet121-res224-all"


def tiny_network():
    data = mx.sym.Variable("data")
    sym = mx.sym.FullyConnected(data, num_hidden=2, name="fc")
    return sym, {"fc_weight": mx.nd.ones((2, 3)), "fc_bias": mx.nd.zeros(2)}, {}


def fill_cache(cache):
    """Entries in ``cache`` (what MXVISION_CACHE names); returns their paths by kind."""
    quantized = os.path.join(cache, "quantized")
    entry = os.path.join(quantized, KEY)
    record = {"key": KEY, "backbone": "resnet50_v2", "cut": "stage4_unit2_relu1", "weights_sha1": "c0ffee" * 6 + "beef",
              "preprocessing": {"name": "imagenet224", "size": 224}, "mxnet_version": mx.__version__,
              "calibration": {"n_images": 64, "mode": "entropy", "source": "seeded sample"},
              "converted": "2026-12-06T01:02:03"}
    quantize.save(entry, "int8", *tiny_network(), record)
    incomplete = os.path.join(quantized, f".{'cd' * 20}.x1y2z3.tmp")  # a killed writer's folder
    os.makedirs(incomplete)
    with open(os.path.join(incomplete, "backbone-int8.params"), "wb") as f:
        f.write(b"\0" * 1000)
    lock = os.path.join(quantized, f".{KEY}.lock")
    open(lock, "w").close()

    models = os.path.join(cache, "models")
    os.makedirs(models)
    converted = os.path.join(models, f"{XRV_NAME}-12345678.params")
    mx.nd.save(converted, {"w": mx.nd.ones((10, 10))})
    sidecar = os.path.join(models, XRV_NAME + ".xrv.json")
    with open(sidecar, "w") as f:
        json.dump({"format": 1, "name": XRV_NAME, "arch": "densenet121", "resolution": 224,
                   "source": {"url": "https://example.org/nih-pc-chex-mimic_ch-google-openi-rsna-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
                              "file": "nih-pc-chex-mimic_ch-google-openi-rsna-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"},
                   "params": {"file": os.path.basename(converted), "sha1": "1" * 40, "sha256": "2" * 64},
                   "converted_by": "mxvision 0.1.0", "converted_at": "2026-12-05T10:00:00"}, f)
    downloaded = os.path.join(models, f"resnet18_v2-{store.short_hash('resnet18_v2')}.params")
    with open(downloaded, "wb") as f:
        f.write(b"\1" * 5000)
    other = os.path.join(models, "notes.txt")  # not an entry: never listed nor deleted
    with open(other, "w") as f:
        f.write("mine")
    return {"quantized": entry, "incomplete": incomplete, "lock": lock, "converted": (converted, sidecar),
            "downloaded": downloaded, "other": other}
