"""The ``mxvision`` command line: a thin layer that parses arguments and calls the Python API.

Each group of commands lives in its own module with an ``add_parsers(subparsers)`` function:
``pipeline`` (demo, extract, train, evaluate, predict, export, models), ``results`` (compare),
``finetune``, ``data``,
``xrv`` (classify), ``audit`` (explain, audit, synth), ``detector`` and ``distributed``
(``mxvision cluster``); options two groups share are in ``common``. A bad option value is refused
while parsing, by the checked argparse types of ``common`` (every number, path and checksum
option takes one; ``tests/cli/test_arguments.py`` tries bad values on every option it finds).
User mistakes found later (bad files, missing runs, unreachable weights) arrive as
``MxvisionError``. Either way the user sees one ``mxvision: error:`` line and exit status 2; a
traceback means a bug in mxvision.
"""
import importlib

from mxvision.cli import common

#: The command-group modules, in the order ``mxvision --help`` lists their commands.
GROUP_MODULES = ("pipeline", "results", "finetune", "data", "xrv", "segment", "audit", "detector", "distributed", "serve", "cache")


def _command_groups():
    # Imported on first use, not with this package: `python -m mxvision.cli.distributed` then runs
    # a single copy of that module (runpy warns when the package has imported it already).
    return [importlib.import_module(f"{__name__}.{name}") for name in GROUP_MODULES]


def __getattr__(name):
    if name == "COMMAND_GROUPS":  # the group modules, as a list
        return _command_groups()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser():
    return common.build_parser(_command_groups())


def main(argv=None):
    return common.run_command_line(_command_groups(), argv)
