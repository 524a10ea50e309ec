"""Hostile weights files through the real ``mxvision classify --weights FILE``: one line, exit 2.

Every file is generated here -- by the project's own writer, by hand-assembled pickle opcodes
where an honest writer cannot express the attack (memo references that make cycles and
exponential sharing), and by forging zip headers -- and none is ever loaded with :mod:`pickle`.
They run in one child process through the real command line, under an address-space limit of
its warmed-up size + 1 GB, with a 30 s timeout: a blow-up, a hang, a crash or a traceback in any
case fails that case's test, and a good file must still classify after all of them.
"""
import json
import os
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
from support.archive_builders import flip_byte, patch_zip
from support.xrv_files import DENSE, random_state_dict, write_release_file

from mxvision.errors import WeightsError
from mxvision.io.torchfile import writer as tw
from mxvision.io.torchfile.reader import LEGACY_MAGIC, LEGACY_PROTOCOL, load_torch_file

OD = tw.Reduce(tw.GlobalRef("collections", "OrderedDict"), ())


# --------------------------------------------------------------------------- pickle assembly
def ops(obj):
    """The opcodes of ``obj`` as the project's writer emits them, without PROTO and STOP."""
    w = tw.PickleWriter()
    w.save(obj)
    return bytes(w.out[2:])


def put(i):
    return b"r" + struct.pack("<I", i)  # LONG_BINPUT


def get(i):
    return b"j" + struct.pack("<I", i)  # LONG_BINGET


def new_module(cls="torch.nn.modules.container.Sequential"):
    module, _, name = cls.rpartition(".")
    return ops(tw.GlobalRef(module, name)) + b")\x81"  # EMPTY_TUPLE, NEWOBJ


def storage_ref(key="0", numel=4, legacy=False):
    return tw.PersistentId(("storage", tw.GlobalRef("torch", "FloatStorage"), key, "cpu", numel)
                           + ((None,) if legacy else ()))


def tensor(key="0", numel=4, offset=0, size=(4,), stride=(1,), legacy=False):
    return tw.Reduce(tw.GlobalRef("torch._utils", "_rebuild_tensor_v2"),
                     (storage_ref(key, numel, legacy), offset, size, stride, False, OD))


def dict_ops(pairs):
    """``{k: v}`` whose values are ready opcodes (bytes)."""
    return b"}(" + b"".join(ops(k) + v for k, v in pairs) + b"u"


def pt(path, payload, storages=None, first=None):
    """A zip-format .pt whose data.pkl is ``payload``; ``first`` names the member written first
    (the one ``patch_zip`` forges)."""
    members = {"archive/data.pkl": payload}
    members.update({"archive/data/" + k: v for k, v in (storages or {}).items()})
    order = sorted(members, key=lambda n: n != first)
    with zipfile.ZipFile(path, "w") as zf:
        for name in order:
            zf.writestr(name, members[name])
    return path


def legacy(path, main, keys, data=b""):
    w = tw.PickleWriter
    path.write_bytes(w().dump(LEGACY_MAGIC) + w().dump(LEGACY_PROTOCOL)
                     + w().dump({"protocol_version": LEGACY_PROTOCOL, "little_endian": True})
                     + main + w().dump(keys) + data)
    return path


FOUR = {"0": np.arange(4, dtype="<f4").tobytes()}


# --------------------------------------------------------------------------- the hostile files
def build_pt_cases(d):
    """name -> (path, what the one error line must say)."""
    c = {}
    self_list = b"]" + put(1) + get(1) + b"a"
    c["list_containing_itself"] = (pt(d / "selflist.pt", b"\x80\x02" + dict_ops([("w", self_list)]) + b"."),
                                   "not all tensors")
    c["top_level_list_containing_itself"] = (pt(d / "toplist.pt", b"\x80\x02" + self_list + b"."), "holds a list")
    c["lists_10000_deep"] = (pt(d / "deeplist.pt", b"\x80\x02" + b"]" * 10000 + b"a" * 9999 + b"."),
                             "nested more than")
    c["tuples_100000_deep"] = (pt(d / "deeptuple.pt", b"\x80\x02N" + b"\x85" * 100000 + b"."), "nested more than")
    cycle = new_module() + put(0) + dict_ops([("_modules", dict_ops([("me", get(0))]))]) + b"b"
    c["module_whose_children_cycle"] = (pt(d / "cycle.pt", b"\x80\x02" + cycle + b"."), "contains itself")
    chain = b"".join(new_module() + put(i) + b"0" for i in range(10000))
    chain += b"".join(get(i) + dict_ops([("_modules", dict_ops([("c", get(i + 1))]))]) + b"b0" for i in range(9999))
    c["modules_10000_deep"] = (pt(d / "chain.pt", b"\x80\x02" + chain + get(0) + b"."), "nested more than 100")
    leaf = new_module("torch.nn.modules.linear.Linear") + dict_ops([("_parameters", ops({"w": tensor()}))]) + b"b"
    share = leaf + put(0) + b"0" + b"".join(
        new_module() + dict_ops([("_modules", dict_ops([("a", get(i - 1)), ("b", get(i - 1))]))]) + b"b" + put(i)
        + b"0" for i in range(1, 61))
    c["modules_shared_2**60_ways"] = (pt(d / "share.pt", b"\x80\x02" + share + get(60) + b".", FOUR), "visited more")
    shadow = ops(OD) + b"(" + ops("t") + ops(tensor()) + b"u" + dict_ops(
        [(k, b"K\x01") for k in ("items", "keys", "values", "get")]) + b"b"
    c["ordered_dict_with_shadowed_items"] = (pt(d / "shadow.pt", b"\x80\x02" + shadow + b".", FOUR), "does not fit")
    c["integer_parameter_names"] = (pt(d / "intnames.pt", tw.PickleWriter().dump({1: tensor()}), FOUR),
                                    "name that is 1")
    mod = tw.TorchModule
    c["integer_names_in_a_module"] = (tw.save_torch_file(mod("torch.nn.modules.linear.Linear",
                                                             parameters={7: np.ones(2, np.float32)}),
                                                         d / "intmod.pt"), "name that is 7")
    c["non_iterable_set_of_names"] = (tw.save_torch_file(mod("torch.nn.modules.linear.Linear",
                                                              attrs={"_non_persistent_buffers_set": 5}),
                                                          d / "skip.pt"), "not a set of names")
    c["parameters_that_are_a_list"] = (tw.save_torch_file(mod("torch.nn.modules.linear.Linear",
                                                              attrs={"_parameters": [1, 2]}),
                                                          d / "plist.pt"), "not a dict")
    c["zero_strides_claiming_a_TiB"] = (pt(d / "stride0.pt", tw.PickleWriter().dump(
        {"t": tensor(numel=1, size=(1 << 20, 1 << 20), stride=(0, 0))}), {"0": b"\0" * 4}), "would take more than")
    c["size_past_2**60"] = (pt(d / "size60.pt", tw.PickleWriter().dump(
        {"t": tensor(numel=1 << 61, size=(1 << 61,))}), FOUR), "impossible size")
    c["storage_claiming_4TB"] = (pt(d / "storage4tb.pt", tw.PickleWriter().dump(
        {"t": tensor(numel=1 << 40, size=(4,))}), FOUR), "declares")
    c["negative_stride"] = (pt(d / "negstride.pt", tw.PickleWriter().dump(
        {"t": tensor(size=(4,), stride=(-1,))}), FOUR), "impossible size/stride/offset")
    c["binbytes8_length_2**50"] = (pt(d / "bytes8.pt", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 50) + b"abc."),
                                   "corrupt or hostile pickle")
    c["memo_index_2**32"] = (pt(d / "memo.pt", b"\x80\x02]r\xff\xff\xff\xff."), "memo index")
    grow = (ops(tw.GlobalRef("torch._utils", "_rebuild_tensor_v2")) + b"(" + ops(storage_ref(numel=1))
            + dict_ops([("numel", ops(10 ** 6))]) + b"b" + ops(0) + ops((10 ** 6,)) + ops((1,)) + b"\x89" + ops(OD)
            + b"tR")
    c["storage_resized_after_its_check"] = (pt(d / "grow.pt", b"\x80\x02" + dict_ops([("t", grow)]) + b".",
                                               {"0": b"\0" * 4}), "set attributes of a Storage")
    c["storage_declared_twice"] = (pt(d / "twice.pt", tw.PickleWriter().dump(
        {"a": tensor(numel=4), "b": tensor(numel=2, size=(2,))}), FOUR), "declared twice")
    p61 = 2 ** 61 - 1  # ints k * p61 + 5 all hash to 5: building a dict of them is quadratic
    same_hash = b"".join(ops(k * p61 + 5) + b"K\x00" for k in range(1, 100001))
    c["dict_keys_sharing_one_hash"] = (pt(d / "collide.pt", b"\x80\x02}(" + same_hash + b"u."), "big integer")
    c["tuple_dict_keys"] = (pt(d / "tuplekey.pt", tw.PickleWriter().dump({(0, 1): tensor()}), FOUR), "a dict key")
    c["set_of_tuples"] = (tw.save_torch_file(mod("torch.nn.modules.linear.Linear", attrs={
        "_non_persistent_buffers_set": tw.Reduce(tw.GlobalRef("builtins", "set"), ([(1, 2), (3, 4)],))}),
        d / "settuples.pt"), "a set member")
    c["legacy_storage_without_data"] = (legacy(d / "nodata.pt", tw.PickleWriter().dump(
        {"t": tensor(legacy=True)}), []), "has no data in the file")
    c["legacy_truncated_inside_a_storage"] = (legacy(d / "cutlegacy.pt", tw.PickleWriter().dump(
        {"t": tensor(legacy=True)}), ["0"], struct.pack("<q", 4) + b"\0" * 7), "ends inside storage")
    return c


def build_zip_cases(d):
    c = {}
    good_state = tw.PickleWriter().dump({"t": tensor()})
    storage_first = pt(d / "storage_first.pt", good_state, FOUR, first="archive/data/0")
    pkl_first = pt(d / "pkl_first.pt", good_state, FOUR, first="archive/data.pkl")
    c["member_declaring_3GB"] = (patch_zip(storage_first, d / "z3gb.pt", file_size=3 * 10 ** 9), "would be 3000.0 MB")
    bomb = d / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data/0", b"\0" * (16 << 20))  # inflates to 16 MB, will claim 16 bytes
        zf.writestr("archive/data.pkl", good_state)
    c["member_inflating_past_its_size"] = (patch_zip(bomb, d / "zbomb.pt", file_size=16), "corrupt zip")
    c["encrypted_member"] = (patch_zip(pkl_first, d / "zenc.pt", flags=1), "encrypted")
    c["unsupported_compression"] = (patch_zip(pkl_first, d / "zmethod.pt", method=99), "compression method 99")
    deflated = d / "deflated.pt"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", good_state)
        zf.writestr("archive/data/0", FOUR["0"])
    c["corrupt_deflate_stream"] = (flip_byte(deflated, 30 + len("archive/data.pkl") + 3, d / "zdefl.pt"),
                                   "corrupt zip")
    c["sizes_past_end_of_file"] = (patch_zip(storage_first, d / "zpast.pt", compressed_size=10 ** 6, file_size=10 ** 6),
                                   "corrupt zip")
    c["bad_crc"] = (flip_byte(storage_first, 30 + len("archive/data/0") + 1, d / "zcrc.pt"), "Bad CRC")
    raw = bytearray(pkl_first.read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    raw[end + 12:end + 16] = struct.pack("<I", 0x7FFFFFFF)
    (d / "zdir.pt").write_bytes(bytes(raw))
    c["zip_directory_claiming_2GB"] = (d / "zdir.pt", "zip directory claims")
    return c


def mx_array(shape, dtype=0, data=b"", ndim=None):
    ndim = len(shape) if ndim is None else ndim
    return (struct.pack("<Iii", 0xF993FAC9, 0, ndim) + b"".join(struct.pack("<q", n) for n in shape)
            + struct.pack("<iii", 1, 0, dtype) + data)


def mx_params(arrays, names):
    return (struct.pack("<QQQ", 0x112, 0, len(arrays)) + b"".join(arrays) + struct.pack("<Q", len(names))
            + b"".join(struct.pack("<Q", len(n)) + n.encode() for n in names))


def build_params_cases(d, good_params):
    import mxnet as mx

    c = {}
    for name, body, says in [
            ("huge_dimensions", mx_params([mx_array((1 << 40, 1 << 20))], ["x"]), "needs 4611686018427387904 bytes"),
            ("negative_dimensions", mx_params([mx_array((-5, 3))], ["x"]), "has shape (-5, 3)"),
            ("bad_dtype", mx_params([mx_array((2,), 99, b"\0" * 8)], ["x"]), "unknown dtype code 99"),
            ("truncated", mx_params([mx_array((1000,), 0, b"\0" * 100)], ["x"]), "only 117 are left"),
            ("ndim_2**30", mx_params([mx_array((2,), ndim=1 << 30)], ["x"]), "1073741824 dimensions"),
            ("name_of_2**60_bytes", mx_params([mx_array((2,), 0, b"\0" * 8)], [])[:-8] + struct.pack("<QQ", 1, 1 << 60),
             "bytes long"),
            ("array_count_2**60", struct.pack("<QQQ", 0x112, 0, 1 << 60), "claims 1152921504606846976 arrays")]:
        (d / (name + ".params")).write_bytes(body)
        c["params_" + name] = (d / (name + ".params"), says)
    with mx.util.np_shape(True):  # a valid file MXNet refuses to read without NumPy shape semantics
        mx.nd.save(str(d / "npshape.params"), {"x": mx.nd.ones((2,))})
    c["params_saved_with_numpy_shapes"] = (d / "npshape.params", "does not fit densenet121 (Check failed: ")
    loaded = mx.nd.load(str(good_params))
    var = next(k for k in loaded if k.endswith("running_var"))
    for name, key, value, says in [("nan", next(iter(loaded)), np.nan, "not finite"),
                                   ("negative_running_var", var, -1.0, "is negative")]:
        arrays = dict(loaded)
        arrays[key] = arrays[key].copy()
        arrays[key][0] = value
        mx.nd.save(str(d / (name + ".params")), arrays)
        c["params_" + name] = (d / (name + ".params"), says)
    return c


def build_special_cases(d, good_pt):
    c = {"directory": (d, "is a directory")}
    if os.path.exists("/dev/zero"):
        c["dev_zero"] = (Path("/dev/zero"), "is a device")
    fifo = d / "fifo.pt"
    os.mkfifo(fifo)
    c["fifo"] = (fifo, "named pipe")
    big = d / "big.pt"
    with open(big, "wb") as f:
        f.write(b"PK\x03\x04")
        f.truncate(2 * 10 ** 9)  # sparse: no disk used
    c["file_of_2GB"] = (big, "the file is 2000.0 MB")
    state = random_state_dict(DENSE)
    var = next(k for k in state if k.endswith("running_var"))
    for name, key, value, says in [("pt_nan", "features.conv0.weight", np.inf, "not finite"),
                                   ("pt_negative_running_var", var, -0.5, "is negative")]:
        edited = OrderedDict((k, v.copy()) for k, v in state.items())
        edited[key].flat[0] = value
        c[name] = (tw.save_torch_file(edited, d / (name + ".pt")), says)
    return c


# --------------------------------------------------------------------------- running them
DRIVER = r"""
import contextlib, io, json, resource, sys, time, traceback
from mxvision import cli

spec = json.load(open(sys.argv[1]))

def run(argv):
    out, err = io.StringIO(), io.StringIO()
    rss, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code = "raised"
            err.write(traceback.format_exc())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "seconds": time.time() - start,
            "rss_growth_mb": grown / 1024}

def report(case, record):
    print(json.dumps(dict(record, case=case)), flush=True)

report("good (warm-up)", run(spec["good"]))
with open("/proc/self/status") as status:  # Linux: the warmed-up address space, then 1 GB more
    vm_kb = int(status.read().split("VmSize:")[1].split()[0])
resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
for case, argv in spec["cases"]:
    report(case, {"started": True})
    report(case, run(argv))
report("good (after all)", run(spec["good"]))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """case -> (path, expected fragment, what the CLI did); one child process runs every case."""
    if not os.path.exists("/proc/self/status") or not hasattr(os, "mkfifo"):
        pytest.skip("needs Linux (/proc for the child's address-space limit, mkfifo)")
    from mxvision.models import zoo

    d = tmp_path_factory.mktemp("hostile")
    image = d / "film.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).uniform(0, 255, (256, 256))).astype(np.uint8))
    good_pt = write_release_file(DENSE, d / "good.pt")[0]
    good_params = d / "good.params"
    zoo.get_model(DENSE, weights=str(good_pt)).save_parameters(str(good_params))
    cases = {}
    cases.update(build_pt_cases(d))
    cases.update(build_zip_cases(d))
    cases.update(build_params_cases(d, good_params))
    cases.update(build_special_cases(d, good_pt))

    def argv(path):
        return ["classify", str(image), "--model", DENSE, "--weights", str(path), "--quiet"]

    spec = d / "spec.json"
    spec.write_text(json.dumps({"good": argv(good_pt), "cases": [[k, argv(p)] for k, (p, _) in cases.items()]}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2", MXNET_CPU_WORKER_NTHREADS="1")
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER, str(spec)], capture_output=True,
                              text=True, timeout=30, env=env)
        stdout, failure = done.stdout, (done.stderr[-2000:] if done.returncode else "")
    except subprocess.TimeoutExpired as exc:
        stdout, failure = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or "", \
            "the child process timed out after 30 s"
    records = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            records.setdefault(record.pop("case"), {}).update(record)
    return {"cases": cases, "records": records, "failure": failure}


def test_good_weights_still_classify_under_the_limits(outcomes):
    for case in ("good (warm-up)", "good (after all)"):
        record = outcomes["records"].get(case)
        assert record is not None, "child process died: %s" % outcomes["failure"]
        assert record["code"] == 0, record["err"]
        assert "Atelectasis" in record["out"]


CASE_NAMES = [
    "list_containing_itself", "top_level_list_containing_itself", "lists_10000_deep", "tuples_100000_deep",
    "module_whose_children_cycle", "modules_10000_deep", "modules_shared_2**60_ways",
    "ordered_dict_with_shadowed_items", "integer_parameter_names", "integer_names_in_a_module",
    "non_iterable_set_of_names", "parameters_that_are_a_list", "zero_strides_claiming_a_TiB", "size_past_2**60",
    "storage_claiming_4TB", "negative_stride", "binbytes8_length_2**50", "memo_index_2**32",
    "storage_resized_after_its_check", "storage_declared_twice", "dict_keys_sharing_one_hash", "tuple_dict_keys",
    "set_of_tuples", "legacy_storage_without_data",
    "legacy_truncated_inside_a_storage",
    "member_declaring_3GB", "member_inflating_past_its_size", "encrypted_member", "unsupported_compression",
    "corrupt_deflate_stream", "sizes_past_end_of_file", "bad_crc", "zip_directory_claiming_2GB",
    "params_huge_dimensions", "params_negative_dimensions", "params_bad_dtype", "params_truncated",
    "params_ndim_2**30", "params_name_of_2**60_bytes", "params_array_count_2**60", "params_saved_with_numpy_shapes",
    "params_nan",
    "params_negative_running_var",
    "directory", "dev_zero", "fifo", "file_of_2GB", "pt_nan", "pt_negative_running_var",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_weights_file_is_one_line(outcomes, case):
    if case not in outcomes["cases"]:
        pytest.skip("%s does not exist on this system" % case)
    path, says = outcomes["cases"][case]
    record = outcomes["records"].get(case)
    assert record is not None and "code" in record, \
        "%s: the child process hung or died on it (%s)" % (case, outcomes["failure"] or "no result")
    assert "Traceback" not in record["err"], record["err"]
    assert record["code"] == 2, record
    lines = record["err"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("mxvision: error: %s: " % path), record["err"]
    assert says in lines[0] and 'File "' not in lines[0], lines[0]  # no C++ traceback quoted either
    assert record["out"] == ""  # nothing printed as if it were a result (no NaN scores, no half JSON)
    assert record["seconds"] < 10, record
    assert record["rss_growth_mb"] < 400, record


def test_every_built_case_is_checked(outcomes):
    assert len(set(CASE_NAMES)) == len(CASE_NAMES)
    assert set(outcomes["cases"]) <= set(CASE_NAMES)


# --------------------------------------------------------------------------- the reader on its own
def test_shadowed_ordered_dict_still_gives_its_tensors(tmp_path):
    shadow = ops(OD) + b"(" + ops("t") + ops(tensor()) + b"u" + dict_ops([("items", b"K\x01")]) + b"b"
    back = load_torch_file(pt(tmp_path / "s.pt", b"\x80\x02" + shadow + b".", FOUR))
    assert list(back) == ["t"] and np.array_equal(back["t"], np.arange(4, dtype=np.float32))


def test_budget_refuses_what_the_model_cannot_hold(tmp_path):
    path = tw.save_torch_file({"w": np.zeros(1000, np.float32)}, tmp_path / "w.pt")
    assert load_torch_file(path, max_bytes=4000)["w"].shape == (1000,)
    with pytest.raises(WeightsError, match="more than the 0.0 MB") as err:
        load_torch_file(path, max_bytes=3999)
    assert str(err.value).startswith(str(path) + ": ")


def test_a_tensor_view_of_one_storage_many_times_counts_every_copy(tmp_path):
    obj = OrderedDict(("t%d" % i, tensor(numel=1000, size=(1000,))) for i in range(10))
    path = pt(tmp_path / "views.pt", tw.PickleWriter().dump(obj), {"0": b"\0" * 4000})
    assert len(load_torch_file(path, max_bytes=40000)) == 10
    with pytest.raises(WeightsError, match="would take more than"):
        load_torch_file(path, max_bytes=39999)


def test_params_loader_checks_the_file_before_and_the_values_after(tmp_path):
    """``load_nd_dict`` (ImageNet trunks, classic checkpoints): the same checks as classify's."""
    import mxnet as mx

    from mxvision.models.resnet_trunk import load_nd_dict

    huge = tmp_path / "huge.params"
    huge.write_bytes(mx_params([mx_array((1 << 40, 1 << 20))], ["x"]))
    mx.nd.save(str(tmp_path / "nan.params"), {"conv0_weight": mx.nd.array([1.0, np.nan])})
    mx.nd.save(str(tmp_path / "var.params"), {"bn0_moving_var": mx.nd.array([1.0, -2.0])})
    with mx.util.np_shape(True):
        mx.nd.save(str(tmp_path / "np.params"), {"x": mx.nd.ones((2,))})
    for name, says in [("huge", "needs 4611686018427387904 bytes"), ("nan", "conv0_weight is not finite"),
                       ("var", "bn0_moving_var, a BatchNorm running variance, is negative"),
                       ("np", "not an MXNet params file (Check failed: ")]:
        with pytest.raises(WeightsError) as err:
            load_nd_dict(tmp_path / (name + ".params"))
        message = str(err.value)
        assert message.startswith(str(tmp_path / name)) and says in message, message
        assert "\n" not in message and "Traceback" not in message and 'File "' not in message, message
    mx.nd.save(str(tmp_path / "ok.params"), {"bn0_moving_var": mx.nd.array([1.0, 2.0])})
    assert load_nd_dict(tmp_path / "ok.params")["bn0_moving_var"].shape == (2,)


def test_conversion_of_published_weights_refuses_impossible_ones(http_server, tmp_path, monkeypatch):
    """The download-and-convert path (models/xrv/weights.py) applies the same bounds and checks."""
    from mxvision.models import zoo
    from mxvision.models.xrv.common import BASE_URL_ENV, WEIGHTS

    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(BASE_URL_ENV, http_server.url)
    release = os.path.join(http_server.directory, WEIGHTS[DENSE].file)
    state = random_state_dict(DENSE)
    var = next(k for k in state if k.endswith("running_var"))
    state[var][1] = -3.0
    tw.save_torch_file(state, release)
    with pytest.raises(WeightsError, match="not usable: parameter %s, a BatchNorm running variance, is negative"
                       % var.replace(".", r"\.")):
        zoo.get_model(DENSE, progress=False)
    pt(Path(release), tw.PickleWriter().dump({"t": tensor(numel=1 << 40, size=(4,))}), FOUR)
    with pytest.raises(WeightsError, match="not usable: storage archive/data/0 declares 4.4 TB; .* more than "
                                           "the 179.9 MB") as err:
        zoo.get_model(DENSE, progress=False)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "models").glob("*.params"))
