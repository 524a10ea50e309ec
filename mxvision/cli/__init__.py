"""The ``mxvision`` command line: a thin layer that parses arguments and calls the Python API.

Each group of commands lives in its own module with an ``add_parsers(subparsers)`` function.
User mistakes (bad files, missing runs, unreachable weights) arrive as ``MxvisionError`` and are
printed as one line with a non-zero exit code; a traceback means a bug in mxvision.
"""
import argparse
import logging
import sys

from mxvision.errors import MxvisionError
from mxvision.cli import distributed as cluster
from mxvision.cli import data
from mxvision.cli import audit as explain
from mxvision.cli import finetune
from mxvision.cli import detector as lesion
from mxvision.cli import pipeline
from mxvision.cli import xrv

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
COMMAND_GROUPS = [pipeline, finetune, data, xrv, explain, lesion, cluster]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mxvision",
        description="Chest X-ray transfer learning (Xvision) and torchxrayvision-style models in MXNet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="mxvision: %(message)s")
    try:
        return args.func(args) or 0
    except MxvisionError as err:
        print(f"mxvision: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("mxvision: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # disk full, permission denied on an output folder, ...
        where = err.filename or "mxvision"
        print(f"mxvision: error: {where}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR
