"""``mxvision cache list|clear``: what mxvision keeps in the user's cache folders, and freeing it.

See :mod:`mxvision.features.cache`: calibrated INT8 networks (``quantized/`` in ``$MXVISION_CACHE``
or ``~/.cache/mxvision``) and weights files (``$MXVISION_CACHE/models`` or ``~/.mxnet/models``).
"""
import sys

from mxvision.cli.output import TSV_HELP, print_tsv, safe_text
from mxvision.errors import MxvisionError

_KIND_OPTIONS = (("--quantized", ("quantized",), "calibrated INT8 networks"),
                 ("--weights", ("weights",), "converted and downloaded weights files"),
                 ("--all", ("quantized", "weights"), "both"))


def _entry_line(entry, human_size):
    print_tsv(entry.label, entry.name, human_size(entry.size), entry.created or "?", entry.made_from)


def _folders_line(cache, kinds):
    where = cache.folders()
    return "; ".join(f"{kind} in {safe_text(where[kind])}" for kind in kinds)


def _cmd_list(args):
    from mxvision.features import cache

    kinds = args.kinds or cache.KINDS
    entries = cache.list_entries(kinds)
    for entry in entries:
        _entry_line(entry, cache.human_size)
    print(f"{len(entries)} entries, {cache.human_size(sum(e.size for e in entries))} "
          f"({_folders_line(cache, kinds)})")


def _confirmed(n, size, folders):
    if not sys.stdin.isatty():
        raise MxvisionError("cache clear", f"would delete {n} entries ({size}; {folders}); pass --yes "
                                           "to delete them (there is no terminal to ask on)")
    try:
        answer = input(f"delete {n} entries ({size}; {folders})? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _cmd_clear(args):
    from mxvision.features import cache

    kinds = args.kinds or ("quantized",)
    entries = cache.list_entries(kinds)
    size = cache.human_size(sum(e.size for e in entries))
    if not entries:
        print(f"nothing to delete ({_folders_line(cache, kinds)})")
        return 0
    if not args.yes and not _confirmed(len(entries), size, _folders_line(cache, kinds)):
        print("nothing deleted")
        return 0
    done = cache.clear(entries=entries)
    for entry in done.removed:
        _entry_line(entry, cache.human_size)
    print(f"freed {cache.human_size(done.freed)}: {len(done.removed)} entries deleted "
          f"({_folders_line(cache, kinds)})")
    if done.failed:
        entry, reason = done.failed[0]
        more = f" (and {len(done.failed) - 1} more)" if len(done.failed) > 1 else ""
        raise MxvisionError(f"cache clear: {entry.label} {entry.name}", f"not deleted{more}: {reason}")
    return 0


def _add_kinds(p, options, default):
    group = p.add_mutually_exclusive_group()
    for option, kinds, text in options:
        group.add_argument(option, dest="kinds", action="store_const", const=kinds, help=text)
    p.set_defaults(kinds=None)
    p.epilog = f"default: {default}"


def add_parsers(sub):
    """The ``cache`` command with its actions list and clear."""
    cache = sub.add_parser("cache", help="list or free what mxvision keeps in its cache folders "
                                         "(calibrated INT8 networks, weights)",
                           description="mxvision keeps calibrated INT8 networks in quantized/ of its "
                                       "cache folder ($MXVISION_CACHE, else ~/.cache/mxvision on Linux) "
                                       "and weights files in $MXVISION_CACHE/models (else ~/.mxnet/models).")
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    csub.required = True
    p = csub.add_parser("list", help="one line per cache entry",
                        description="One line per entry: kind (quantized network, converted weights, "
                                    "downloaded weights...), key or name, size, when it was made, what it was made from (backbone, cut, "
                                    "weights, preset and calibration images of a quantized network; the "
                                    f"source of converted weights); then a total line; {TSV_HELP}.")
    _add_kinds(p, _KIND_OPTIONS[:2], "both kinds")
    p.set_defaults(func=_cmd_list)
    p = csub.add_parser("clear", help="delete cache entries (default: the quantized networks)",
                        description="Delete cache entries and print each one deleted and the space freed. "
                                    "A quantized network costs a calibration to make again, weights a "
                                    "download (impossible offline). Asks first on a terminal; elsewhere "
                                    "--yes is needed.")
    _add_kinds(p, _KIND_OPTIONS, "--quantized")
    p.add_argument("--yes", action="store_true", help="delete without asking")
    p.set_defaults(func=_cmd_clear)
