"""mxvision.runtime: MXNet gets every core, whichever entry point loads it first."""
import os
import subprocess
import sys

import pytest

# Records OMP_NUM_THREADS at the moment MXNet is first imported (MXNet reads it then, once).
PROBE = r"""
import builtins, os, sys
real_import = builtins.__import__
seen = []
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "mxnet" and "mxnet" not in sys.modules and not seen:
        seen.append(os.environ.get("OMP_NUM_THREADS"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
%s
assert "mxnet" in sys.modules, "the entry point did not load MXNet"
print(seen[0])
"""

ENTRY_POINTS = {
    # the CLI's parser lists the registry's models, which loads MXNet before any command runs
    "cli": "from mxvision.cli import build_parser; build_parser()",
    "api": "import mxvision as mxv; mxv.train_head",
    "train": "from mxvision.train import loop",
    "inference": "import mxvision.inference",
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mxnet_loads_with_every_core(entry):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", PROBE % ENTRY_POINTS[entry]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(os.sched_getaffinity(0)))


def test_a_thread_count_the_user_exported_is_kept():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PROBE % ENTRY_POINTS["cli"]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
