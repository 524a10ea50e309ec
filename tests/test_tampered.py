"""Tampered feature stores, run folders, optimizer state, converted backbones and index files,
each through the real CLI: one ``mxvision: error:`` line naming the file and what is wrong,
exit status 2, no traceback, no hang, no NaN printed.

Every case starts from a copy of the one valid store (``small_store``) or run (``small_run``) and
damages one thing, the way a disk error, a hand edit or a hostile sender would; a "resealed"
shard is rewritten with ``mx.nd.save`` and its size and sha256 updated in the manifest, so the
checksum no longer protects it.
"""
import hashlib
import json
import os
import shutil
import struct
import time

import mxnet as mx
import numpy as np
import pytest

from support.cli import one_line_error, run_cli

EPOCHS = 4  # small_run's
SHARD = "shard-0000000.nd"


# --------------------------------------------------------------------------- copies to damage
def _copy_store(small_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(small_store.path, out, ignore=shutil.ignore_patterns("backbone.params"))
    return out


def _copy_run(small_run, tmp_path, checkpoints=False):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "state.json", "log.csv", "log.json", "best.params"):
        shutil.copyfile(small_run / name, out / name)
    if checkpoints:
        (out / "checkpoints").mkdir()
        for ext in ("params", "states"):
            name = f"epoch-{EPOCHS:04d}.{ext}"
            shutil.copyfile(small_run / "checkpoints" / name, out / "checkpoints" / name)
    return out


def _edit_json(path, change):
    """Apply ``change`` to a JSON file's data: in place (returning None) or returning new data."""
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(json.dumps(data if new is None else new))


def _reseal(store, shard_index, payload):
    """Rewrite a shard (``payload``: {name: array}, a list, or raw bytes) and update its size and
    sha256 in the manifest, as someone who knows the format would."""
    manifest = json.loads((store / "manifest.json").read_text())
    shard = manifest["shards"][shard_index]
    path = store / shard["file"]
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        mx.nd.save(str(path), payload)
    data = path.read_bytes()
    shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (store / "manifest.json").write_text(json.dumps(manifest))


def _shard_array(store):
    return mx.nd.load(str(store / SHARD))["features"]


def _patched_header(data, offset, fmt, value):
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


# Offsets in a one-array NDArray file: 24-byte list header, uint32 magic, int32 storage type,
# uint32 ndim, then the int64 dims; after them 8 bytes of context and the int32 dtype flag.
DIM0 = 36


def _dtype_offset(ndim):
    return DIM0 + 8 * ndim + 8


# --------------------------------------------------------------------------- the cases
# Each case: (what to damage, which command, fragments the one error line must hold).
# ``store`` cases run `train` on the damaged copy; ``run`` cases `evaluate` (or the command
# given); ``resume`` cases rerun `train` into a damaged copy of the run to resume it.

def _manifest(change):
    return lambda store: _edit_json(store / "manifest.json", change)


def _set(*path_and_value):
    *path, value = path_and_value

    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _drop(key):
    def change(data):
        del data[key]
    return change


STORE_CASES = {
    "manifest is []": (_manifest(lambda m: []), ["manifest.json", "holds a list"]),
    "manifest is a list": (_manifest(lambda m: [m]), ["manifest.json", "holds a list"]),
    "manifest is a string": (_manifest(lambda m: "features"), ["manifest.json", "holds a string"]),
    "manifest not JSON": (lambda s: (s / "manifest.json").write_text('{"items": ['),
                          ["manifest.json", "unreadable"]),
    "manifest nested 100,000 deep": (lambda s: (s / "manifest.json").write_text("[" * 100_000),
                                     ["manifest.json", "unreadable"]),
    "manifest is a folder": (lambda s: ((s / "manifest.json").unlink(), (s / "manifest.json").mkdir()),
                             ["manifest.json", "not a regular file"]),
    "no items": (_manifest(_drop("items")), ["manifest.json", "lacks items"]),
    "no shards": (_manifest(_drop("shards")), ["manifest.json", "lacks shards"]),
    "no classes": (_manifest(_drop("classes")), ["manifest.json", "lacks classes"]),
    "format_version as text": (_manifest(_set("format_version", "2")),
                               ["manifest.json", "unsupported format_version"]),
    "feature_shape a string": (_manifest(_set("feature_shape", "512x7x7")),
                               ["manifest.json", "feature_shape is a string"]),
    "feature_shape absurd": (_manifest(_set("feature_shape", [1 << 20, 1 << 20, 7])),
                             ["manifest.json", "feature_shape"]),
    "row id out of range": (_manifest(lambda m: m["shards"][0]["rows"].__setitem__(-1, 999)),
                            ["manifest.json", "shard 0's rows"]),
    "row listed twice": (_manifest(lambda m: m["shards"][1].update(start=0)),
                         ["manifest.json", "shard 1 covers rows 0 to 16"]),
    "label id out of range": (_manifest(lambda m: m["items"][0].update(label_id=7)),
                              ["manifest.json", "item 0's label_id 7"]),
    "label id a string": (_manifest(lambda m: m["items"][3].update(label_id="1")),
                          ["manifest.json", "item 3's label_id is a string"]),
    "item not an object": (_manifest(lambda m: m["items"].__setitem__(2, "a.png")),
                           ["manifest.json", "item 2 is a string"]),
    "shard file outside the store": (_manifest(lambda m: m["shards"][0].update(file="../../etc/passwd")),
                                     ["manifest.json", "not a file name inside the store"]),
    "storage dtype unknown": (_manifest(_set("storage_dtype", "int4")), ["manifest.json", "storage_dtype"]),
    "skipped row out of range": (_manifest(_set("skipped", [{"row": 10 ** 9, "id": "x"}])),
                                 ["manifest.json", "skipped entry 0"]),
    "marked interrupted": (_manifest(_set("complete", False)), ["store", "did not finish"]),
    "extraction failed": (_manifest(lambda m: m.update(complete=False, shards=[], feature_shape=None,
                                                        skipped=[{"row": 0, "id": "x", "problem": "p"}])),
                          ["store", "did not finish"]),
    "finished without features": (_manifest(lambda m: m.update(shards=[], feature_shape=None)),
                                  ["store", "split 'train' has 0 feature row(s)"]),
    "shard truncated": (lambda s: open(s / SHARD, "r+b").truncate(1000),
                        [SHARD, "missing, truncated or corrupt"]),
    "shard is a folder": (lambda s: ((s / SHARD).unlink(), (s / SHARD).mkdir()),
                          [SHARD, "missing, truncated or corrupt"]),
    "resealed without 'features'": (lambda s: _reseal(s, 0, {"other": _shard_array(s)}),
                                    [SHARD, "the manifest records"]),
    "resealed under another name": (lambda s: _reseal(s, 0, {"featurez": _shard_array(s)}),
                                    [SHARD, "holds featurez float32"]),
    "resealed as a list": (lambda s: _reseal(s, 0, [_shard_array(s)]), [SHARD, "the manifest records"]),
    "resealed with fewer rows": (lambda s: _reseal(s, 0, {"features": _shard_array(s)[:7]}),
                                 [SHARD, "the manifest records"]),
    "resealed with another width": (lambda s: _reseal(s, 0, {"features": _shard_array(s)[:, :256]}),
                                    [SHARD, "the manifest records"]),
    "resealed with NaN": (lambda s: _reseal(s, 0, {"features": _shard_array(s) * np.nan}),
                          [SHARD, "non-finite"]),
    "resealed with absurd dims": (
        lambda s: _reseal(s, 0, _patched_header((s / SHARD).read_bytes(), DIM0, "<q", 1 << 40)),
        [SHARD, "array 0 of shape (1099511627776, 512, 7, 7) needs"]),
    "resealed with a negative dim": (
        lambda s: _reseal(s, 0, _patched_header((s / SHARD).read_bytes(), DIM0, "<q", -8)),
        [SHARD, "(-8, 512, 7, 7)"]),
    "resealed as float64 of half the rows": (
        lambda s: _reseal(s, 0, _patched_header(_patched_header((s / SHARD).read_bytes(), DIM0, "<q", 4),
                                                _dtype_offset(4), "<i", 1)),
        [SHARD, "holds features float64 (4, 512, 7, 7)"]),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_a_tampered_feature_store_is_one_line(case, small_store, tmp_path):
    damage, fragments = STORE_CASES[case]
    store = _copy_store(small_store, tmp_path)
    damage(store)
    code, out, err = run_cli("train", "--features", store, "--out", tmp_path / "out", "--epochs", 1,
                             "--batch-size", 8, "--quiet")
    _assert_one_line(code, out, err, fragments)


def _head_params(hidden=512, classes=2, shape=(512, 7, 7)):
    from mxvision.models.head import XvisionHead
    head = XvisionHead(classes=classes, hidden=hidden)
    head.initialize()
    head(mx.nd.zeros((2,) + shape))
    return head


def _save_params(path, change):
    """Apply ``change`` to a parameters file's arrays: in place (returning None) or returning new ones."""
    params = mx.nd.load(str(path))
    new = change(params)
    mx.nd.save(str(path), params if new is None else new)


def _set_all(value):
    return lambda params: {k: v * 0 + value for k, v in params.items()}


def _config(change):
    return lambda run: _edit_json(run / "config.json", change)


def _state(change):
    return lambda run: _edit_json(run / "state.json", change)


def _features(key, value):
    return _config(lambda c: c["features"].__setitem__(key, value))


RUN_CASES = {
    "config not JSON": (lambda r: (r / "config.json").write_text("{"), ["config.json", "unreadable"]),
    "config a list": (_config(lambda c: [c]), ["config.json", "holds a list"]),
    "config without features": (_config(_drop("features")), ["config.json", "lacks features"]),
    "config without hidden": (_config(lambda c: c["hyper"].__delitem__("hidden")),
                              ["config.json", "hyper lacks hidden"]),
    "hidden as text": (_config(lambda c: c["hyper"].update(hidden="512")), ["config.json", "hidden is a string"]),
    "hidden absurd": (_config(lambda c: c["hyper"].update(hidden=10 ** 12)), ["config.json", "hidden"]),
    "one class": (_features("classes", ["normal"]), ["config.json", "classes"]),
    "feature_shape absurd": (_features("feature_shape", [1 << 30, 1 << 30]), ["config.json", "feature_shape"]),
    "feature_shape of another store": (_features("feature_shape", [256, 7, 7]),
                                       ["best.params", "fc1.weight", "(512, 12544)"], "export"),
    "precision not an object": (_features("precision", "int8"), ["config.json", "precision"]),
    "state not JSON": (lambda r: (r / "state.json").write_text("nul"), ["state.json", "unreadable"]),
    "state last epoch 1e9": (_state(lambda s: s.update(last_epoch=10 ** 9)),
                             ["state.json", "last_epoch 1000000000 is not from 0 to 4"]),
    "state best epoch not in history": (_state(lambda s: s.update(best_epoch=99)),
                                        ["state.json", "best_epoch 99"]),
    "state history rows of text": (_state(lambda s: s.update(history=["epoch 1"] * EPOCHS)),
                                   ["state.json", "history rows"]),
    "best.params truncated": (lambda r: open(r / "best.params", "r+b").truncate(4096),
                              ["best.params", "needs 51380224 bytes but only 4032 are left"]),
    "best.params empty": (lambda r: open(r / "best.params", "wb").close(),
                          ["best.params", "not an MXNet params file"]),
    "best.params of another shape": (lambda r: _head_params(hidden=256).save_parameters(str(r / "best.params")),
                                     ["best.params", "fc1.weight is float32 (256, 25088)"]),
    "best.params missing a parameter": (
        lambda r: _save_params(r / "best.params", lambda p: p.__delitem__("output.bias")),
        ["best.params", "missing output.bias"]),
    "best.params with an extra parameter": (
        lambda r: _save_params(r / "best.params", lambda p: p.update(extra=mx.nd.ones(3))),
        ["best.params", "unexpected extra"]),
    "best.params as float16": (
        lambda r: _save_params(r / "best.params", lambda p: {k: v.astype("float16") for k, v in p.items()}),
        ["best.params", "float16"]),
    "best.params all NaN": (lambda r: _save_params(r / "best.params", _set_all(np.nan)),
                            ["best.params", "fc1.weight is not finite"]),
    "best.params negative variance": (
        lambda r: _save_params(r / "best.params",
                               lambda p: p.update({"bn1.running_var": -p["bn1.running_var"] - 1})),
        ["best.params", "bn1.running_var, a BatchNorm running variance, is negative"]),
    "best.params with absurd dims": (
        lambda r: (r / "best.params").write_bytes(
            _patched_header((r / "best.params").read_bytes(), DIM0, "<q", 1 << 50)),
        ["best.params", "array 0 of shape (1125899906842624, 25088) needs"]),
    "best.params is /dev/zero": (
        lambda r: ((r / "best.params").unlink(), (r / "best.params").symlink_to("/dev/zero")),
        ["best.params", "not a regular file"]),
}


def _run_command(command, run, tmp_path, small_store):
    image = small_store.items[0]["path"]
    return {"evaluate": ("evaluate", "--run", run, "--out", tmp_path / "eval", "--no-audit"),
            "predict": ("predict", "--run", run, image),
            "export": ("export", "--run", run, "--out", tmp_path / "exported" / "net"),
            "finetune": ("finetune", "--run", run, "--out", tmp_path / "tuned", "--epochs", 1, "--quiet")}[command]


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_a_tampered_run_is_one_line(case, small_run, small_store, tmp_path):
    damage, fragments, *command = RUN_CASES[case]
    run = _copy_run(small_run, tmp_path)
    damage(run)
    code, out, err = run_cli(*_run_command(command[0] if command else "evaluate", run, tmp_path, small_store))
    _assert_one_line(code, out, err, fragments)


def test_weights_that_overflow_give_no_heatmap(small_run, small_store, tmp_path):
    """1e30 everywhere is finite (loaded), but the scores overflow: `explain` printed a NaN logit
    beside an empty heatmap and exited 0."""
    run = _copy_run(small_run, tmp_path)
    _save_params(run / "best.params", _set_all(1e30))
    image = small_store.items[0]["path"]
    code, out, err = run_cli("explain", image, "--run", run, "--out", tmp_path / "maps", "--ctx", "cpu",
                             "--strict")
    _assert_one_line(code, out, err, [image, "non-finite nodule score", str(run)])
    # without --strict the image gets an ERROR row, like an unreadable one, and the exit code is 1
    code, out, err = run_cli("explain", image, "--run", run, "--out", tmp_path / "maps", "--ctx", "cpu")
    assert code == 1 and "Traceback" not in err
    rows = [line.split("\t") for line in out.splitlines()[1:]]
    assert rows == [[image, "ERROR", rows[0][2]]] and "non-finite nodule score" in rows[0][2]
    assert "nan" not in out.lower().replace("non-finite", "")
    assert not list((tmp_path / "maps").glob("*.png"))


@pytest.mark.parametrize("command, value, problem", [
    ("predict", np.nan, "fc1.weight is not finite"), ("export", np.nan, "fc1.weight is not finite"),
    ("finetune", np.nan, "fc1.weight is not finite"), ("evaluate", 1e30, "non-finite probabilities"),
    ("predict", 1e30, "non-finite probabilities")])
def test_weights_that_give_nan_are_refused_by_every_command_that_loads_a_run(command, value, problem,
                                                                              small_run, small_store, tmp_path):
    run = _copy_run(small_run, tmp_path)
    _save_params(run / "best.params", _set_all(value))  # 1e30 is finite, but overflows
    code, out, err = run_cli(*_run_command(command, run, tmp_path, small_store))
    _assert_one_line(code, out, err, ["best.params", problem])


# --------------------------------------------------------------------------- resuming
def _states_file(run, meta=None, arrays=None, raw=None):
    """Rewrite the last checkpoint's optimizer state: its JSON bookkeeping and arrays."""
    path = run / "checkpoints" / f"epoch-{EPOCHS:04d}.states"
    if raw is not None:
        path.write_bytes(raw)
        return
    saved = mx.nd.load(str(path))
    old = json.loads(bytes(saved.pop("__meta__").asnumpy()).decode())
    new = meta(old) if meta else old
    text = new if isinstance(new, bytes) else json.dumps(new).encode()
    saved = dict(saved, **(arrays or {}), __meta__=mx.nd.array(np.frombuffer(text, np.uint8), dtype="uint8"))
    mx.nd.save(str(path), saved)


def _with_momentum(run):
    """The run as if trained with SGD momentum 0.9 (resumed with --momentum 0.9): its optimizer
    state must then hold one momentum array per parameter."""
    _edit_json(run / "config.json", lambda c: c["hyper"].update(momentum=0.9))


STATES = "epoch-0004.states"
RESUME_CASES = {
    "states not an NDArray file": (lambda r: _states_file(r, raw=b"\x80\x04pickle"),
                                   [STATES, "not an MXNet params file"]),
    "states without bookkeeping": (lambda r: mx.nd.save(str(r / "checkpoints" / STATES), {"s0": mx.nd.ones(2)}),
                                   [STATES, "no __meta__"]),
    "bookkeeping not JSON": (lambda r: _states_file(r, meta=lambda m: b"\xff{"), [STATES, "not JSON"]),
    "bookkeeping a list": (lambda r: _states_file(r, meta=lambda m: [m]), [STATES, "lacks format"]),
    "num_update a string": (lambda r: _states_file(r, meta=lambda m: dict(m, num_update="12")),
                            [STATES, "lacks format"]),
    "update counts negative": (lambda r: _states_file(r, meta=lambda m: dict(m, index_update_count={"0": -1})),
                               [STATES, "whole numbers"]),
    "parameter index out of range": (lambda r: _states_file(r, meta=lambda m: dict(m, states={"99": None})),
                                     [STATES, "names parameter 99"]),
    "another optimizer": (lambda r: _states_file(r, meta=lambda m: dict(m, optimizer="Adam")),
                          [STATES, "optimizer state of 'Adam'"]),
    "momentum arrays missing": (_with_momentum, [STATES, "lacks its array"]),
    "momentum array not in the file": (
        lambda r: (_with_momentum(r), _states_file(r, meta=lambda m: dict(m, states={"0": {"nd": "s0"}}))),
        [STATES, "'s0' is not in the file"]),
    "momentum array of another shape": (
        lambda r: (_with_momentum(r), _states_file(r, meta=lambda m: dict(m, states={"0": {"nd": "s0"}}),
                                                   arrays={"s0": mx.nd.ones((3, 3))})),
        [STATES, "(3, 3)"]),
    "momentum array NaN": (
        lambda r: (_with_momentum(r), _states_file(r, meta=lambda m: dict(m, states={"11": {"nd": "s11"}}),
                                                   arrays={"s11": mx.nd.full((2, 512), np.nan)})),
        [STATES, "non-finite"]),
    "checkpoint NaN": (lambda r: _save_params(r / "checkpoints" / "epoch-0004.params", _set_all(np.nan)),
                       ["epoch-0004.params", "fc1.weight is not finite"]),
    "checkpoint missing": (lambda r: (r / "checkpoints" / "epoch-0004.params").unlink(),
                           ["epoch-0004.params", "no such parameters file"]),
    "state last epoch 1e9": (_state(lambda s: s.update(last_epoch=10 ** 9)),
                             ["state.json", "last_epoch 1000000000"]),
    "config not JSON": (lambda r: (r / "config.json").write_text("{"), ["config.json", "unreadable"]),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resuming_a_tampered_run_is_one_line(case, small_run, small_store, tmp_path):
    damage, fragments = RESUME_CASES[case]
    run = _copy_run(small_run, tmp_path, checkpoints=True)
    damage(run)
    try:
        momentum = json.loads((run / "config.json").read_text())["hyper"]["momentum"]
    except ValueError:  # the case damaged config.json itself
        momentum = 0.0
    started = time.monotonic()
    code, out, err = run_cli("train", "--features", small_store.path, "--out", run, "--epochs", EPOCHS + 1,
                             "--batch-size", 8, "--momentum", momentum, "--keep-checkpoints", 0, "--quiet")
    _assert_one_line(code, out, err, fragments)
    assert time.monotonic() - started < 30


def test_resuming_with_fewer_epochs_than_done_is_refused(small_run, small_store, tmp_path):
    run = _copy_run(small_run, tmp_path, checkpoints=True)
    code, out, err = run_cli("train", "--features", small_store.path, "--out", run, "--epochs", 2,
                             "--batch-size", 8, "--quiet")
    _assert_one_line(code, out, err, [str(run), "4 epochs already, more than the 2 asked for"])
    assert json.loads((run / "config.json").read_text())["hyper"]["epochs"] == EPOCHS  # untouched


# --------------------------------------------------------------------------- converted backbones
def _int8_run(small_run, small_store, tmp_path, precision=None, files=None):
    """A copy of the run whose config says its features were computed by an INT8 backbone kept in
    a store folder of its own (``files``: {name: bytes} there), described by ``precision``."""
    run = _copy_run(small_run, tmp_path)
    folder = tmp_path / "int8-store"
    folder.mkdir()
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    config = json.loads((run / "config.json").read_text())
    sha1 = {name: hashlib.sha1(data).hexdigest() for name, data in (files or {}).items()}
    info = {"key": "k", "dtype": "int8", "weights_sha1": config["features"]["weights"]["sha1"],
            "symbol": "backbone-int8-symbol.json", "params": "backbone-int8.params",
            "symbol_sha1": sha1.get("backbone-int8-symbol.json", "0"),
            "params_sha1": sha1.get("backbone-int8.params", "0")}
    if precision:
        info = precision(info)
    # the random backbone of the store stays where the config says (features_dir)
    shutil.copyfile(small_store.path / "backbone.params", folder / "backbone.params")
    config["features"].update(features_dir=str(folder), dtype="int8", precision=info)
    (run / "config.json").write_text(json.dumps(config))
    return run


def _symbol_bytes():
    """A stand-in converted network: one dense layer (the checks do not depend on its size)."""
    return mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=2, name="fc").tojson().encode()


def _params_bytes(value=1.0, tmp=None):
    """Its parameters, every weight ``value``."""
    path = tmp / "p.params"
    mx.nd.save(str(path), {"arg:fc_weight": mx.nd.full((2, 4), value), "arg:fc_bias": mx.nd.zeros(2)})
    return path.read_bytes()


INT8_CASES = {
    "record lacks its checksums": (dict(precision=lambda i: {k: v for k, v in i.items()
                                                             if k not in ("symbol_sha1", "params_sha1")}),
                                   ["int8-store", "lacks symbol_sha1, params_sha1"]),
    "record names a file outside": (dict(precision=lambda i: dict(i, symbol="../../etc/passwd")),
                                    ["int8-store", "not a file name inside its folder"]),
    "files missing": (dict(), ["backbone-int8-symbol.json", "missing"]),
    "params resealed with absurd dims": (
        dict(files=lambda tmp: {"backbone-int8-symbol.json": _symbol_bytes(),
                                "backbone-int8.params": _patched_header(_params_bytes(tmp=tmp), DIM0, "<q",
                                                                        1 << 45)}),
        ["backbone-int8.params", "array 0 of shape (35184372088832, 4) needs"]),
    "symbol resealed as garbage": (
        dict(files=lambda tmp: {"backbone-int8-symbol.json": b"{not json",
                                "backbone-int8.params": _params_bytes(tmp=tmp)}),
        ["backbone-int8-symbol.json", "does not load"]),
    "params resealed with NaN": (
        dict(files=lambda tmp: {"backbone-int8-symbol.json": _symbol_bytes(),
                                "backbone-int8.params": _params_bytes(np.nan, tmp=tmp)}),
        ["backbone-int8.params", "fc_weight is not finite"]),
}


@pytest.mark.parametrize("case", list(INT8_CASES))
def test_a_tampered_int8_backbone_is_one_line(case, small_run, small_store, tmp_path):
    spec, fragments = INT8_CASES[case]
    files = spec.get("files")
    run = _int8_run(small_run, small_store, tmp_path, spec.get("precision"), files(tmp_path) if files else None)
    code, out, err = run_cli(*_run_command("export", run, tmp_path, small_store))
    _assert_one_line(code, out, err, fragments)


# --------------------------------------------------------------------------- index files
def _extract_argv(index, tmp_path, *extra, out="features"):
    return ("extract", "--index", index, "--out", tmp_path / out, "--backbone", "resnet18_v2",
            "--weights", "none", "--quiet", "--batch-size", 2, "--shard-size", 2, *extra)


def test_dev_zero_and_a_fifo_as_the_index_are_refused_at_once(tmp_path):
    fifo = tmp_path / "index.csv"
    os.mkfifo(fifo)
    for index in ("/dev/zero", fifo):
        started = time.monotonic()
        code, out, err = run_cli(*_extract_argv(index, tmp_path))
        _assert_one_line(code, out, err, [str(index), "not a regular file"])
        assert time.monotonic() - started < 5
    assert not (tmp_path / "features").exists()


def test_an_oversized_index_is_refused_without_being_read(tmp_path):
    from mxvision.data.index import MAX_INDEX_BYTES
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as f:  # sparse: no disk used, and never read
        f.write(b"path,label\n")
        f.truncate(MAX_INDEX_BYTES + 1)
    started = time.monotonic()
    code, out, err = run_cli(*_extract_argv(huge, tmp_path))
    _assert_one_line(code, out, err, [str(huge), f"larger than {MAX_INDEX_BYTES} bytes"])
    assert time.monotonic() - started < 5


def test_100000_missing_images_are_reported_within_seconds(tmp_path):
    index = tmp_path / "index.csv"
    index.write_text("path,label\n" + "".join(f"img/{i:06d}.png,{('normal', 'nodule')[i % 2]}\n"
                                              for i in range(100_000)))
    started = time.monotonic()
    code, out, err = run_cli(*_extract_argv(index, tmp_path))
    _assert_one_line(code, out, err, [str(index), "none of the 100000 image files exist",
                                      str(tmp_path / "img" / "000000.png")])
    assert time.monotonic() - started < 20  # measured ~2 s; minutes before


def test_strict_extraction_stops_at_a_missing_image_in_one_line(synth_index, tmp_path):
    rows = open(synth_index).read().splitlines()
    folder = os.path.dirname(synth_index)
    index = tmp_path / "index.csv"
    index.write_text("\n".join([rows[0]] + [os.path.join(folder, r) for r in rows[1:4]] +
                               ["gone.png" + rows[1][rows[1].index(","):]]) + "\n")
    code, out, err = run_cli(*_extract_argv(index, tmp_path, "--strict"))
    _assert_one_line(code, out, err, [str(tmp_path / "gone.png")])


def test_a_strict_rerun_fails_like_the_first_strict_run(synth_index, tmp_path):
    rows = open(synth_index).read().splitlines()  # path,label,patient_id,split,view,nodule_x,_y,_radius
    folder = os.path.dirname(synth_index)
    good = [os.path.join(folder, r) for r in rows[1:4]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    index = tmp_path / "index.csv"
    index.write_text("\n".join([rows[0]] + good[:2] + [f"{broken},normal,broken,train,PA,,,"] + good[2:]) + "\n")
    first = run_cli(*_extract_argv(index, tmp_path, "--strict", out="strict"))
    _assert_one_line(*first, [str(broken), "corrupt PNG"])
    code, out, err = run_cli(*_extract_argv(index, tmp_path, out="lenient"))  # skips and lists it
    assert code == 0 and "(1 skipped)" in out
    again = run_cli(*_extract_argv(index, tmp_path, "--strict", out="lenient"))
    assert again == first  # the same one line and exit status 2, not exit 1 with a warning
    shutil.copyfile(good[0].split(",")[0], broken)  # mended: the strict rerun now includes it
    code, out, err = run_cli(*_extract_argv(index, tmp_path, "--strict", out="lenient"))
    assert code == 0 and "4 feature maps" in out and "(0 skipped)" in out, (out, err)


# --------------------------------------------------------------------------- the check itself
def _assert_one_line(code, out, err, fragments):
    """Exit 2 with exactly one stderr line, ``mxvision: error: ...`` holding every fragment."""
    one_line_error(code, err, *map(str, fragments))
    assert code == 2, (code, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "nan" not in out.lower()
