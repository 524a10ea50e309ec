"""Distributed extraction and training on a real MXNet parameter-server cluster on 127.0.0.1.

Every cluster here is a scheduler, one server and two workers, each a separate process started by
:func:`mxvision.distributed.cluster.run_local` with MXNet's DMLC_* variables; the workers run the real CLI
(``python -m mxvision.cli.distributed``, i.e. ``mxvision cluster``). Results are compared with
single-process runs: extraction with the ``small_store`` fixture (same index and options),
training with ``simulate=2`` (the same arithmetic in one process), which is itself checked against
an independent re-implementation of data-parallel SGD, as is distributed fine-tuning. Every
cluster run has a timeout, so a hang fails the test instead of stalling CI.
"""
import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from mxvision.distributed import kvstore as distributed
from mxvision.distributed import train as distributed_train
from mxvision.cli import distributed as cluster_cli
from mxvision.distributed.cluster import TERM_GRACE, ClusterError, live_members, resolve_command, run_local
from mxvision.data.index import read_index
from mxvision.errors import BadRun, MxvisionError
from mxvision.features.extract import FeatureStore
from mxvision.train.loop import load_head

CLI = [sys.executable, "-m", "mxvision.cli.distributed"]
# The options of the small_store fixture (tests/conftest.py), so the stores can be compared.
EXTRACT = ["--backbone", "resnet18_v2", "--weights", "none", "--ctx", "cpu", "--batch-size", "8",
           "--shard-size", "8", "--quiet"]
TIMEOUT = 120  # seconds per cluster run: a hang fails the test, never CI
SHARD_KEYS = ("file", "start", "stop", "rows")


def _cli(argv):
    """Run ``mxvision cluster ARGV`` in this process (as the registered CLI group would)."""
    parser = argparse.ArgumentParser()
    cluster_cli.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["cluster"] + [str(a) for a in argv])
    return args.func(args)


def _assert_workers_ok(result):
    """Every worker exited 0. A scheduler/server that crashes in MXNet's teardown after the job is
    done (not seen here, but it would not be mxvision's doing) only warns."""
    workers = {n: c for n, c in result.codes.items() if n.startswith("worker")}
    assert len(workers) == 2 and all(c == 0 for c in workers.values()), result.codes
    if any(result.codes.values()) or result.leftovers:
        warnings.warn(f"cluster roles ended with {result.codes}, leftovers {result.leftovers}")


def _processes_mentioning(text):
    """PIDs (other than ours) whose command line contains ``text``: leftovers of a job."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmdline and state != b"Z":
                found.append(int(entry.name))
    return found


def _assert_same_store(store, reference, same_paths=True):
    a, b = store.manifest, reference.manifest
    keys = ["classes", "feature_shape", "weights", "preprocessing", "n_features", "n_skipped",
            "dtype", "storage_dtype", "pooled", "shard_size", "complete"]
    for key in keys:
        assert a[key] == b[key], key
    items = [{k: v for k, v in it.items() if same_paths or k != "path"} for it in a["items"]]
    assert items == [{k: v for k, v in it.items() if same_paths or k != "path"} for it in b["items"]]
    assert [[s[k] for k in SHARD_KEYS] for s in a["shards"]] == \
        [[s[k] for k in SHARD_KEYS] for s in b["shards"]]
    for sa, sb in zip(a["shards"], b["shards"]):
        assert store.check_shard(sa)  # size and sha256 recorded in the merged manifest
        np.testing.assert_allclose(store.read_shard(sa), reference.read_shard(sb), rtol=1e-5, atol=1e-5)
    _, ya, ids_a = store.load()
    _, yb, ids_b = reference.load()
    assert ids_a == ids_b and (ya == yb).all()
    assert not (store.path / distributed.SHARES).exists()
    assert not [p for p in os.listdir(store.path) if p.endswith(".tmp")]


# --- no cluster needed ---------------------------------------------------------------------------

def test_share_helpers_and_one_line_errors(tmp_path, monkeypatch):
    assert distributed.parse_share("1/2") == (1, 2)
    for bad in ("2/2", "x/2", "1", "-1/2"):
        with pytest.raises(MxvisionError, match="--share"):
            distributed.parse_share(bad)
    # shard k (rows k*size ...) goes to worker k mod N: deterministic and disjoint
    owners = [distributed.owner(start, 8, 3) for start in range(0, 80, 8)]
    assert owners == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert resolve_command(["--", "mxvision", "models"])[:3] == [sys.executable, "-m", "mxvision"]
    with pytest.raises(BadRun, match="share.s. 0/2, 1/2 missing or unfinished") as err:
        distributed.merge_shares(tmp_path, 2)
    assert "\n" not in str(err.value)
    monkeypatch.delenv("DMLC_ROLE", raising=False)
    with pytest.raises(MxvisionError, match="not started as a worker"):
        _cli(["extract", "--index", tmp_path / "none.csv", "--out", tmp_path / "f"])
    with pytest.raises(MxvisionError, match="dist_async"):
        distributed.worker_kvstore("dist_async")


def test_simulated_training_checks_the_batch(small_store, tmp_path):
    with pytest.raises(BadRun, match="multiple of the 2 workers"):
        distributed_train.train_distributed(small_store, tmp_path / "run", simulate=2, batch_size=5,
                                      ctx="cpu", progress=False)
    with pytest.raises(BadRun, match="cannot fill a sub-batch"):
        distributed_train.train_distributed(small_store, tmp_path / "run", simulate=2, batch_size=64,
                                      ctx="cpu", progress=False)


def test_simulation_is_data_parallel_sgd(small_store, tmp_path):
    """An independent re-implementation of one epoch: each worker's sub-batch through its own
    forward/backward, gradients summed, one SGD step on the sum / global batch."""
    from mxnet import autograd, gluon
    from mxvision.models.head import XvisionHead

    lr, batch = 0.1, 4
    state = distributed_train.train_distributed(small_store, tmp_path / "sim", simulate=2, epochs=1,
                                          batch_size=batch, lr=lr, ctx="cpu", progress=False)
    plan = json.loads((tmp_path / "sim" / "config.json").read_text())["distributed"]
    assert plan["sub_batch"] == 2 and state["last_epoch"] == 1
    mx.random.seed(0)
    head = XvisionHead(classes=2)
    head.initialize(mx.init.Xavier(), ctx=mx.cpu())
    head(mx.nd.zeros((2,) + small_store.feature_shape))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    params = {n: p for n, p in head._collect_params_with_prefix().items() if p.grad_req != "null"}
    workers = [distributed_train.WorkerData(small_store, ("train", "val"), r, 2, 2,
                                            plan["steps_per_epoch"], 0, False, 0) for r in range(2)]
    for parts in zip(*[w.batches(1) for w in workers]):
        total = {n: 0 for n in params}
        for x, y in parts:
            with autograd.record():
                loss = loss_fn(head(mx.nd.array(x)), mx.nd.array(y))
            loss.backward()
            for n, p in params.items():
                total[n] = total[n] + p.grad().asnumpy()
        for n, p in params.items():
            p.set_data(p.data() - lr * mx.nd.array(total[n]) / batch)
    trained = mx.nd.load(str(tmp_path / "sim" / "checkpoints" / "epoch-0001.params"))
    for n, p in params.items():
        np.testing.assert_allclose(trained[n].asnumpy(), p.data().asnumpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=n)


def test_killed_worker_or_timeout_stops_every_process(tmp_path):
    # Worker 0 starts a grandchild (like a decode process) then waits forever; worker 1 is killed.
    script = (
        "import os, signal, subprocess, sys, time\n"
        "if os.environ['MXVISION_WORKER_INDEX'] == '0':\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"    open({str(tmp_path / 'grandchild')!r}, 'w').write(str(child.pid))\n"
        "else:\n"
        "    time.sleep(1.5)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(300)\n")
    tic = time.monotonic()
    with pytest.raises(ClusterError, match="worker-1 was killed by signal 9") as err:
        run_local([sys.executable, "-c", script], workers=2, servers=1, timeout=60,
                  log_dir=tmp_path / "logs")
    assert time.monotonic() - tic < 40  # the other worker, scheduler and server did not hang on
    assert live_members(err.value.pgid) == []
    grandchild = int((tmp_path / "grandchild").read_text())
    assert not Path(f"/proc/{grandchild}").exists() or \
        Path(f"/proc/{grandchild}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"

    tic = time.monotonic()
    # the command names this test's folder: another session running this test at the same time
    # has processes that sleep too, and they are not leftovers of this job
    sleeper = f"import time; time.sleep(300)  # {tmp_path}"
    with pytest.raises(ClusterError, match="timed out after 4 s") as err:
        run_local([sys.executable, "-c", sleeper], workers=2, servers=1,
                  timeout=4, log_dir=tmp_path / "logs2")
    assert time.monotonic() - tic < 4 + TERM_GRACE + 10
    assert live_members(err.value.pgid) == []
    assert _processes_mentioning(sleeper) == []


# --- real clusters -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist_store(synth_index, tmp_path_factory):
    """Features of the synthetic index extracted by two workers (shards 0, 2 and 1)."""
    out = tmp_path_factory.mktemp("dist") / "features"
    result = run_local(CLI + ["extract", "--index", synth_index, "--out", out] + EXTRACT,
                       workers=2, servers=1, timeout=TIMEOUT, log_dir=out.parent / "logs")
    _assert_workers_ok(result)
    assert live_members(result.pgid) == []
    return FeatureStore(out)


def test_sharded_extraction_matches_single_process(dist_store, small_store):
    assert dist_store.manifest["distributed"]["workers"] == 2
    assert len(dist_store.manifest["timing"]["shares"]) == 2  # both workers extracted
    _assert_same_store(dist_store, small_store)


def test_distributed_training_matches_the_simulation(dist_store, tmp_path):
    hyper = dict(epochs=3, batch_size=4, lr=0.01, seed=0)
    run = tmp_path / "dist"
    argv = ["train", "--features", dist_store.path, "--out", run, "--ctx", "cpu", "--quiet"] + \
        [a for k, v in hyper.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    result = run_local(CLI + [str(a) for a in argv], workers=2, servers=1, timeout=TIMEOUT,
                       log_dir=tmp_path / "logs")
    _assert_workers_ok(result)
    sim = distributed_train.train_distributed(dist_store, tmp_path / "sim", simulate=2, ctx="cpu",
                                        progress=False, keep_checkpoints=0, **hyper)
    dist_log = json.loads((run / "state.json").read_text())
    assert [r["epoch"] for r in dist_log["history"]] == [1, 2, 3]
    for a, b in zip(dist_log["history"], sim["history"]):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    dist_params = mx.nd.load(str(run / "checkpoints" / "epoch-0003.params"))
    sim_params = mx.nd.load(str(tmp_path / "sim" / "checkpoints" / "epoch-0003.params"))
    assert sorted(dist_params) == sorted(sim_params)
    for name in dist_params:
        np.testing.assert_allclose(dist_params[name].asnumpy(), sim_params[name].asnumpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    first = mx.nd.load(str(tmp_path / "sim" / "checkpoints" / "epoch-0001.params"))
    assert not np.allclose(first["fc2.weight"].asnumpy(), sim_params["fc2.weight"].asnumpy())
    head, config = load_head(run, ctx="cpu")  # evaluate/predict/export read it like any run
    assert config["distributed"]["workers"] == 2 and config["distributed"]["kvstore"] == "dist_sync"
    assert config["distributed"]["sub_batch"] == 2


def test_distributed_finetuning_is_data_parallel_sgd(small_run, tmp_path):
    """Two workers fine-tune the last stage + head; compared with an independent re-implementation:
    every global batch split into the two workers' slices, gradients summed, SGD on sum / batch."""
    from mxnet import autograd, gluon
    from mxvision.train import finetune
    from mxvision.train.loop import epoch_batches
    from mxvision.data import transforms
    from mxvision.train.loop import load_classifier

    lr, batch = 0.01, 4
    out = tmp_path / "ft"
    result = run_local(CLI + [str(a) for a in ["finetune", "--run", small_run, "--out", out, "--epochs", 1,
                                                "--batch-size", batch, "--lr", lr, "--momentum", 0,
                                                "--ctx", "cpu", "--quiet"]],
                       workers=2, servers=1, timeout=TIMEOUT, log_dir=tmp_path / "logs")
    _assert_workers_ok(result)
    assert json.loads((out / "state.json").read_text())["last_epoch"] == 1

    net, config = load_classifier(small_run, ctx="cpu", softmax=False)
    frozen, trainable, finish = net.backbone.split_stages(1)
    preset = transforms.get_preset(config["features"]["preprocessing"]["name"])
    items = finetune.split_items(config, "train")
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    params = {f"backbone.{k}": p for k, p in net.backbone._collect_params_with_prefix().items()}
    params.update({f"head.{k}": p for k, p in net.head._collect_params_with_prefix().items()})
    trained_ids = {id(p) for block in trainable for p in block.collect_params().values()}
    live = {k: p for k, p in params.items()
            if p.grad_req != "null" and (k.startswith("head.") or id(p) in trained_ids)}
    for rows in epoch_batches(len(items), batch, 0, 1):
        if len(rows) < 4:
            continue
        total = {k: 0 for k in live}
        for part in (rows[0::2], rows[1::2]):
            x = mx.nd.array(np.stack([transforms.load_image(items[i]["path"], preset) for i in part]))
            y = mx.nd.array([items[i]["label_id"] for i in part])
            for block in frozen:
                x = block(x)
            with autograd.record():
                z = x
                for block in trainable:
                    z = block(z)
                loss = loss_fn(net.head(finish(z)), y)
            loss.backward()
            for k, p in live.items():
                total[k] = total[k] + p.grad().asnumpy()
        for k, p in live.items():
            p.set_data(p.data() - lr * mx.nd.array(total[k]) / len(rows))
    saved = {f"head.{k}": v for k, v in mx.nd.load(str(out / "checkpoints/epoch-0001.params")).items()}
    saved.update({f"backbone.{k}": v for k, v in
                  mx.nd.load(str(out / "checkpoints/epoch-0001.backbone")).items()})
    assert len(live) > 10
    for k, p in live.items():
        np.testing.assert_allclose(saved[k].asnumpy(), p.data().asnumpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=k)


def test_failed_worker_stops_the_job_and_its_share_reruns_alone(synth_index, small_store, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(synth_index).parent, data)
    index = data / "index.csv"
    victim = Path(read_index(index).paths[9])  # row 9: shard 1 (rows 8-15), i.e. rank 1's share
    original = victim.read_bytes()
    victim.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "features"
    tic = time.monotonic()
    with pytest.raises(ClusterError, match="exited with status 2") as err:
        run_local(CLI + ["extract", "--index", index, "--out", out, "--strict"] + EXTRACT,
                  workers=2, servers=1, timeout=TIMEOUT, log_dir=tmp_path / "logs")
    assert time.monotonic() - tic < TIMEOUT / 2
    assert live_members(err.value.pgid) == [] and _processes_mentioning(str(out)) == []
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("worker-*.log"))
    assert f"mxvision: error: worker: {victim}" in logs and "Traceback" not in logs
    assert not (out / "manifest.json").exists()  # no merged store from a failed job
    with pytest.raises(BadRun, match="missing or unfinished"):
        _cli(["merge", "--out", out, "--workers", 2])

    victim.write_bytes(original)  # the input is fixed: re-run the shares alone, no cluster
    for share in ("0/2", "1/2"):
        _cli(["extract", "--index", index, "--out", out, "--share", share] + EXTRACT)
    _cli(["merge", "--out", out, "--workers", 2])
    _assert_same_store(FeatureStore(out), small_store, same_paths=False)
