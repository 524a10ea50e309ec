"""What the command groups share (mxvision/cli/common.py): the runner's exit codes, the options of
the plain commands and their ``cluster`` twins, ``--ctx``, and the ``python -m`` cluster entry."""
import argparse
import subprocess
import sys
import types

import pytest

from mxvision import cli
from mxvision.cli import common
from mxvision.errors import BadRun

EXTRACT = ["--index", "i.csv", "--out", "f", "--backbone", "resnet18_v2", "--cut", "stage3", "--weights",
           "none", "--allow-random-weights", "--preset", "xrv224", "--batch-size", "4", "--shard-size",
           "9", "--strict", "--overwrite", "--dtype", "int8", "--calibration", "c.csv",
           "--storage-dtype", "float16", "--pooled", "--quiet", "--ctx", "cpu"]
TRAIN = ["--features", "f", "--out", "r", "--epochs", "2", "--lr", "0.5", "--batch-size", "6",
         "--momentum", "0.9", "--seed", "3", "--no-resume", "--keep-checkpoints", "1", "--ctx", "cpu"]
FINETUNE = ["--run", "r", "--out", "ft", "--stages", "2", "--epochs", "1", "--lr", "0.1", "--batch-size",
            "2", "--momentum", "0.5", "--seed", "7", "--quiet", "--ctx", "cpu"]


def parse(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


@pytest.mark.parametrize("command, argv, options", [("extract", EXTRACT, common.extract_options),
                                                    ("train", TRAIN, common.train_options),
                                                    ("finetune", FINETUNE, common.finetune_options)])
def test_cluster_twins_hand_the_api_the_same_options(command, argv, options):
    plain, twin = parse(command, *argv), parse("cluster", command, *argv)
    assert options(plain) == options(twin)
    assert options(parse(command, *argv[:4])) == options(parse("cluster", command, *argv[:4]))  # defaults
    assert options(plain)["ctx"] == "cpu"


def test_extract_options_name_every_extract_features_argument():
    import inspect
    from mxvision.features.extract import extract_features

    wanted = set(inspect.signature(extract_features).parameters) - {"index", "out_dir"}
    got = set(common.extract_options(parse("extract", *EXTRACT)))
    assert got <= wanted, got - wanted


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_ctx_option_is_the_same():
    found = []
    for name, sub in _subparsers(cli.build_parser()):
        for action in sub._actions:
            if "--ctx" in action.option_strings:
                found.append(name)
                assert (action.default, action.help) == ("auto", common.CTX_HELP), name
    assert {"extract", "train", "finetune", "classify", "explain", "detector score",
            "cluster extract", "cluster finetune"} <= set(found)


def test_command_groups_are_the_group_modules_in_order():
    from mxvision.cli import (audit, cache, data, detector, distributed, finetune, pipeline, results, segment,
                              serve, xrv)

    assert cli.COMMAND_GROUPS == [pipeline, results, finetune, data, xrv, segment, audit, detector, distributed,
                                  serve, cache]


def _group(func):
    """A command group with one command, ``boom``, that runs ``func``."""
    def add_parsers(sub):
        sub.add_parser("boom").set_defaults(func=lambda args: func())
    return types.SimpleNamespace(add_parsers=add_parsers)


def _raise(exc):
    def run():
        raise exc
    return run


@pytest.mark.parametrize("func, code, line", [
    (lambda: None, 0, None), (lambda: 1, 1, None),
    (_raise(BadRun("run7", "not a training run")), 2, "mxvision: error: run7: not a training run"),
    (_raise(PermissionError(13, "Permission denied", "/out")), 2, "mxvision: error: /out: Permission denied"),
    (_raise(KeyboardInterrupt()), 130, "mxvision: interrupted; rerun the same command to resume")])
def test_runner_turns_outcomes_into_exit_codes_and_one_line(func, code, line, capsys):
    assert common.run_command_line([_group(func)], ["boom"]) == code
    err = capsys.readouterr().err
    assert err == ("" if line is None else line + "\n")


def test_cluster_module_runs_as_a_script_without_a_second_copy():
    r = subprocess.run([sys.executable, "-m", "mxvision.cli.distributed", "merge", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("usage: mxvision cluster merge")
    assert "RuntimeWarning" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "mxvision.cli.distributed", "merge", "--out", "/nonexistent/f",
                        "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("mxvision: error: /nonexistent/f")
    assert len(r.stderr.splitlines()) == 1, r.stderr
