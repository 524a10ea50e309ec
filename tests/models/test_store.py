"""The weights store against a real Gluon-layout repo served over HTTP by tests/httpserver.py.

The weights are a real MXNet .params file written by a tiny Gluon net, pinned by its sha1 and
zipped exactly like the Apache repo (``gluon/models/{name}-{sha1[:8]}.zip``).
"""
import hashlib
import logging
import os
import threading
import zipfile

import mxnet as mx
import pytest
from mxnet.gluon import nn

from support.httpserver import Fault, closed_port_url, serve, wait_until
from mxvision.errors import WeightsError
from mxvision.models import store
from mxvision.utils import file_digest

FAST = dict(retries=2, timeout=2, backoff=0.01, progress=False)


def _tiny_net():
    net = nn.HybridSequential()
    net.add(nn.Dense(8, in_units=16, activation="relu"), nn.Dense(2, in_units=8))
    return net


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    """Two distinct real .params files: (bytes, sha1) each."""
    out = []
    for seed in (1, 2):
        mx.random.seed(seed)
        net = _tiny_net()
        net.initialize(mx.init.Xavier())
        path = tmp_path_factory.mktemp("params") / "tiny.params"
        net.save_parameters(str(path))
        data = path.read_bytes()
        out.append((data, hashlib.sha1(data).hexdigest()))
    assert out[0][1] != out[1][1]
    return out


@pytest.fixture(autouse=True)
def private_table(monkeypatch):
    """Each test registers into its own copy of the sha1 table."""
    monkeypatch.setattr(store, "PINNED_SHA1", dict(store.PINNED_SHA1))
    monkeypatch.setattr(store, "PINNED_URLS", {})
    for var in ("MXNET_GLUON_REPO", "MXVISION_CACHE", "MXNET_HOME"):
        monkeypatch.delenv(var, raising=False)


def _publish(www, name, short, data, member=None):
    """Zip ``data`` as ``{name}-{short}.params`` into the Gluon repo layout under ``www``."""
    folder = www / "gluon" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / ("%s-%s.zip" % (name, short)), "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member or "%s-%s.params" % (name, short), data)
    return "/gluon/models/%s-%s.zip" % (name, short)


@pytest.fixture
def repo(tmp_path, params, monkeypatch):
    """A served repo holding 'tinynet' (registered with its true sha1); yields (server, url path)."""
    data, sha1 = params[0]
    store.register_weights("tinynet", sha1)
    www = tmp_path / "www"
    url_path = _publish(www, "tinynet", sha1[:8], data)
    with serve(www) as server:
        monkeypatch.setenv("MXNET_GLUON_REPO", server.url.rstrip("/"))  # the slash is added
        yield server, url_path


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_download_verify_then_cache_hit_without_a_request(repo, params, tmp_path):
    server, url_path = repo
    cache = tmp_path / "cache"
    path = store.get_weights_file("tinynet", cache, **FAST)
    assert path == str(cache / ("tinynet-%s.params" % params[0][1][:8]))
    assert open(path, "rb").read() == params[0][0]
    net = _tiny_net()
    net.load_parameters(path)  # a real, loadable MXNet parameter file
    assert net[1].weight.data().shape == (2, 8)
    assert store.get_weights_file("tinynet", cache, **FAST) == path
    assert store.cached_weights_file("tinynet", cache) == path
    assert file_digest(path, "sha1") == params[0][1]
    assert server.count(url_path) == 1 and server.count() == 1
    assert _files(cache) == [os.path.basename(path)]  # no zip, .part or temp folder left


def test_corrupt_cache_file_is_fetched_again(repo, params, tmp_path, caplog):
    server, url_path = repo
    cache = tmp_path / "cache"
    path = store.get_weights_file("tinynet", cache, **FAST)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff")
    assert store.cached_weights_file("tinynet", cache) is None  # present but corrupt
    with caplog.at_level(logging.WARNING, logger="mxvision.models.store"):
        assert store.get_weights_file("tinynet", cache, **FAST) == path
    assert "corrupt" in caplog.text
    assert open(path, "rb").read() == params[0][0]
    assert server.count(url_path) == 2


def test_concurrent_first_use_downloads_once(repo, params, tmp_path):
    server, url_path = repo
    server.add_faults(Fault.stall(0.5))  # keep the first fetch in flight while the second starts
    cache = tmp_path / "cache"
    results, errors = [], []

    def run():
        try:
            results.append(store.get_weights_file("tinynet", cache, **FAST))
        except Exception as err:  # surfaced below
            errors.append(err)

    first = threading.Thread(target=run)
    first.start()
    assert wait_until(lambda: server.count() == 1)
    second = threading.Thread(target=run)
    second.start()
    first.join(10)
    second.join(10)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert server.count(url_path) == 1
    assert open(results[0], "rb").read() == params[0][0]
    assert _files(cache) == [os.path.basename(results[0])]  # no lock file left either


def test_wrong_file_on_the_server_is_refused_and_nothing_installed(tmp_path, params, monkeypatch):
    (good, good_sha1), (other, _) = params
    store.register_weights("tinynet", good_sha1)
    www = tmp_path / "www"
    _publish(www, "tinynet", good_sha1[:8], other)  # the mirror holds different bytes
    cache = tmp_path / "cache"
    with serve(www) as server:
        monkeypatch.setenv("MXNET_GLUON_REPO", server.url)
        with pytest.raises(WeightsError) as info:
            store.get_weights_file("tinynet", cache, **FAST)
    message = str(info.value)
    assert message.startswith("tinynet: weights from %sgluon/models/tinynet-" % server.url)
    assert "expected %s" % good_sha1 in message and str(cache) in message
    assert "MXNET_GLUON_REPO" in message and "\n" not in message
    assert _files(cache) == []


def test_unreachable_repo_says_what_was_tried_and_how_to_fix(tmp_path, params, monkeypatch):
    store.register_weights("tinynet", params[0][1])
    repo_url = closed_port_url()
    monkeypatch.setenv("MXNET_GLUON_REPO", repo_url)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as info:
        store.get_weights_file("tinynet", cache, **FAST)
    message = str(info.value)
    assert message.startswith("tinynet: could not download %sgluon/models/tinynet-%s.zip into %s"
                              % (repo_url, params[0][1][:8], cache))
    assert "refused" in message.lower() and "set MXNET_GLUON_REPO" in message
    assert "local .params file" in message and "\n" not in message
    assert _files(cache) == []


def test_missing_on_server_fails_fast(repo, tmp_path, params):
    server, _ = repo
    store.register_weights("absent", params[1][1])
    with pytest.raises(WeightsError, match=r"absent: could not download .*absent-\w{8}\.zip .*HTTP 404"):
        store.get_weights_file("absent", tmp_path / "cache", **FAST)
    assert server.count() == 1


def test_html_instead_of_zip(repo, tmp_path):
    server, url_path = repo
    server.add_faults(Fault.html())
    with pytest.raises(WeightsError, match="HTML page"):
        store.get_weights_file("tinynet", tmp_path / "cache", **FAST)
    # A portal that labels its page application/octet-stream is caught by the download too.
    with open(os.path.join(server.directory, url_path.lstrip("/")), "wb") as f:
        f.write(b"<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(WeightsError, match="HTML page"):
        store.get_weights_file("tinynet", tmp_path / "cache", **FAST)
    assert server.count(url_path) == 2
    assert _files(tmp_path / "cache") == []


def test_dropped_download_resumes(repo, params, tmp_path):
    server, url_path = repo
    server.add_faults(Fault.drop(after=500))
    path = store.get_weights_file("tinynet", tmp_path / "cache", **FAST)
    assert open(path, "rb").read() == params[0][0]
    assert server.requests[1].headers["Range"] == "bytes=500-"


def test_zip_with_traversal_member_is_refused(tmp_path, params, monkeypatch):
    data, sha1 = params[0]
    store.register_weights("tinynet", sha1)
    www = tmp_path / "www"
    _publish(www, "tinynet", sha1[:8], data, member="../../tinynet-%s.params" % sha1[:8])
    with serve(www) as server:
        monkeypatch.setenv("MXNET_GLUON_REPO", server.url)
        with pytest.raises(WeightsError, match=r"refusing to extract member .*'\.\.' in path"):
            store.get_weights_file("tinynet", tmp_path / "a" / "cache", **FAST)
    assert _files(tmp_path / "a" / "cache") == [] and _files(tmp_path / "a") == ["cache"]


def test_explicit_url_and_lenient_member_name(tmp_path, params):
    data, sha1 = params[0]
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / "weights.zip", "w") as zf:
        zf.writestr("model.params", data)
    with serve(www) as server:
        assert store.register_weights("custom", sha1, url=server.url + "weights.zip") == \
            "custom-%s.params" % sha1[:8]
        path = store.get_weights_file("custom", tmp_path / "cache", **FAST)
    assert open(path, "rb").read() == data


def test_table_starts_with_mxnet_entries_and_validates():
    assert store.short_hash("resnet50_v2") == "ecdde353"
    assert store.weights_file_name("resnet50_v1") == "resnet50_v1-0aee57f9.params"
    assert store.weights_url("resnet50_v2") == \
        "https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/gluon/models/resnet50_v2-ecdde353.zip"
    assert "resnet152_v2" in store.known_weights()
    with pytest.raises(WeightsError, match=r"^nosuchnet: no pretrained weights .*known: alexnet"):
        store.get_weights_file("nosuchnet")
    with pytest.raises(ValueError):
        store.register_weights("x", "abc")
    with pytest.raises(ValueError):
        store.register_weights("../x", "a" * 40)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    assert store.cache_dir() == os.path.expanduser(os.path.join("~", ".mxnet", "models"))
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "home"))
    assert store.cache_dir() == str(tmp_path / "home" / "models")
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path / "mxv"))
    assert store.cache_dir() == str(tmp_path / "mxv" / "models")
    assert store.cache_dir(tmp_path / "explicit") == str(tmp_path / "explicit")


def test_resolve_weights_specs(repo, params, tmp_path, caplog):
    (good, sha1), (other, other_sha1) = params
    assert store.resolve_weights(None, "tinynet") is None
    assert store.resolve_weights("none", "tinynet") is None
    assert store.resolve_weights(" None ", "tinynet") is None
    assert store.resolve_weights("random", "tinynet") is None
    assert store.cached_weights_file("tinynet", tmp_path / "cache") is None
    assert store.cached_weights_file("nosuchnet", tmp_path / "cache") is None
    path = store.resolve_weights("imagenet", "tinynet", root=tmp_path / "cache")
    assert open(path, "rb").read() == good

    local = tmp_path / "local"
    local.mkdir()
    named = local / ("tinynet-%s.params" % sha1[:8])
    named.write_bytes(good)
    assert store.resolve_weights(str(named), "tinynet") == str(named)
    named.write_bytes(other)  # right name, wrong bytes
    with pytest.raises(WeightsError, match="file name promises %s" % sha1[:8]):
        store.resolve_weights(named, "tinynet")
    plain = local / "mine.params"
    plain.write_bytes(other)  # e.g. fine-tuned tinynet weights: not verifiable, accepted with a warning
    with caplog.at_level(logging.WARNING, logger="mxvision.models.store"):
        assert store.resolve_weights(plain, "tinynet") == str(plain)
    assert "without verification" in caplog.text
    caplog.clear()

    # 'fresh' has no pinned sha1: a self-describing name is checked, anything else is accepted.
    fresh = local / ("fresh-%s.params" % other_sha1[:8])
    fresh.write_bytes(other)
    assert store.resolve_weights(fresh, "fresh") == str(fresh)
    bad_prefix = local / ("fresh-%s.params" % sha1[:8])
    bad_prefix.write_bytes(other)
    with pytest.raises(WeightsError, match="promises"):
        store.resolve_weights(bad_prefix, "fresh")
    with caplog.at_level(logging.WARNING, logger="mxvision.models.store"):
        assert store.resolve_weights(plain, "fresh") == str(plain)
    assert "without verification" in caplog.text and other_sha1 in caplog.text
    with pytest.raises(WeightsError, match=r"nothere\.params: no such weights file"):
        store.resolve_weights(str(local / "nothere.params"), "fresh")
