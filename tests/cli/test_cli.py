"""The command line, run as a user would: real subprocesses, real files."""
import json
import os
import subprocess
import sys

import pytest

SUBCOMMANDS = ["demo", "extract", "train", "finetune", "evaluate", "predict", "export", "models"]


def run(*args, env=None, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mxvision", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=full_env, cwd=cwd)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("mxvision: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: mxvision " + command)


def test_user_mistakes_give_one_line_and_non_zero_exit(tmp_path, small_store):
    assert_one_line_error(run("extract", "--index", tmp_path / "missing.csv", "--out", tmp_path / "f"),
                          "missing.csv")
    assert_one_line_error(run("train", "--features", tmp_path, "--out", tmp_path / "r"),
                          str(tmp_path), "not a feature store")
    assert_one_line_error(run("evaluate", "--run", tmp_path, "--out", tmp_path / "e"), "not a training run")
    assert_one_line_error(run("predict", "--run", tmp_path, tmp_path / "x.png"), "not a training run")
    assert_one_line_error(run("export", "--run", tmp_path, "--out", tmp_path / "m"), "not a training run")
    assert_one_line_error(run("extract", "--index", tmp_path / "x.csv", "--out", tmp_path / "f",
                              "--ctx", "gpu:7"), "gpu:7")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("filename,diagnosis\na.png,nodule\n")
    assert_one_line_error(run("extract", "--index", bad_csv, "--out", tmp_path / "f"), "bad.csv")
    assert_one_line_error(run("extract", "--index", bad_csv, "--out", tmp_path / "f",
                              "--backbone", "vgg99"), "vgg99")


def test_unreachable_imagenet_weights_are_said_and_random_only_when_allowed(tmp_path, synth_index,
                                                                          http_server):
    env = {"MXNET_GLUON_REPO": http_server.url, "MXVISION_CACHE": str(tmp_path / "cache"),
           "MXNET_HOME": str(tmp_path / "mxhome")}
    refused = run("extract", "--index", synth_index, "--out", tmp_path / "f", "--backbone",
                  "resnet18_v2", "--quiet", env=env)
    assert_one_line_error(refused, "resnet18_v2")
    assert http_server.count() >= 1  # it really asked the (local) mirror
    assert not (tmp_path / "f" / "manifest.json").exists()
    allowed = run("extract", "--index", synth_index, "--out", tmp_path / "f", "--backbone",
                  "resnet18_v2", "--allow-random-weights", "--quiet", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "RANDOM" in allowed.stdout and "RANDOM" in allowed.stderr


def test_pipeline_through_the_cli(tmp_path, synth_index):
    feats, run_dir, ev, model = tmp_path / "f", tmp_path / "run", tmp_path / "eval", tmp_path / "m" / "x"
    r = run("extract", "--index", synth_index, "--out", feats, "--backbone", "resnet18_v2",
            "--weights", "none", "--ctx", "cpu", "--batch-size", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "(512, 7, 7)" in r.stdout
    r = run("train", "--features", feats, "--out", run_dir, "--epochs", "3", "--batch-size", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (run_dir / "checkpoints" / "epoch-0003.params").is_file()
    r = run("evaluate", "--run", run_dir, "--features", feats, "--out", ev)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((ev / "metrics.json").read_text())
    assert f"AUC {metrics['auc']:.4f}" in r.stdout
    images = [it["path"] for it in json.loads((feats / "manifest.json").read_text())["items"][:2]]
    r = run("predict", "--run", run_dir, "--json", *images)
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    assert [p["path"] for p in preds] == images
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    r = run("export", "--run", run_dir, "--out", model)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "x-symbol.json").is_file() and (tmp_path / "m" / "x-0000.params").is_file()
    r = run("predict", "--run", run_dir, tmp_path / "missing.png")
    assert r.returncode == 1 and "missing.png" in r.stdout and "Traceback" not in r.stderr
