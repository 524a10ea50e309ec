"""Opening weights files (``.pt`` or ``.params``) and reading zip members, within stated bounds.

A weights path comes from a user or a download, so it may name a FIFO (opening it blocks until
someone writes), ``/dev/zero`` (reading never ends), a directory, or a file far larger than any
weights the model can take. :func:`open_weights_file` opens without blocking, checks the open
descriptor with ``fstat`` (no race between check and read), and refuses anything but a regular
file of at most the given size, in one line naming the file.

A zip member's header says how large it will be; :func:`read_zip_member` checks that size (and
that the member is neither encrypted nor compressed by a method zipfile cannot read) *before*
reserving memory, reads in bounded chunks, and lets zipfile verify the CRC at the end.
:func:`zip_directory_size` finds how large the central directory claims to be, before zipfile
turns every entry of it into an object.
"""
import contextlib
import errno
import lzma
import os
import stat
import struct
import zipfile
import zlib

from mxvision.errors import WeightsError, one_line
from mxvision.io.torchfile.unpickler import size_text
from mxvision.utils import READ_FLAGS, file_kind

_CHUNK = 1 << 20
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError,
                   NotImplementedError, RuntimeError, struct.error, OverflowError)


def _cannot_open(source, err, what):
    if isinstance(err, FileNotFoundError):
        return WeightsError(source, "no such %s" % what)
    if isinstance(err, IsADirectoryError):
        return WeightsError(source, "is a directory, not a %s" % what)
    if getattr(err, "errno", None) == errno.ENXIO:  # a socket
        return WeightsError(source, "is a socket, not a %s" % what)
    return WeightsError(source, "cannot read the %s (%s)" % (what, getattr(err, "strerror", None) or err))


@contextlib.contextmanager
def open_weights_file(path, max_file_bytes, what="weights file"):
    """The open binary file at ``path`` (a regular file of at most ``max_file_bytes`` bytes).

    Anything else -- missing, unreadable, a directory, FIFO, device or socket, or too large --
    raises :class:`~mxvision.errors.WeightsError` naming the file (as ``what`` it should have
    been), without blocking or reading.
    """
    source = os.fspath(path)
    try:
        fd = os.open(source, READ_FLAGS)
    except ValueError:  # a NUL byte in the name
        raise WeightsError(one_line(repr(source), 200), "invalid file name") from None
    except OSError as err:
        raise _cannot_open(source, err, what) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise WeightsError(source, "is %s, not a %s" % (file_kind(info.st_mode), what))
        if info.st_size > max_file_bytes:
            raise WeightsError(source, "the file is %.1f MB, more than the %.1f MB expected of this %s "
                               "(the wrong file, or a hostile one)" % (info.st_size / 1e6, max_file_bytes / 1e6, what))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_exactly(f, size, source):
    """``size`` bytes from ``f`` (its ``fstat`` size), refusing a file that shrank meanwhile."""
    data = f.read(size)
    if len(data) != size:
        raise WeightsError(source, "the file changed while it was read")
    return data


def zip_directory_size(f, size):
    """The size in bytes the zip's end record gives its central directory (the larger of the
    classic and the zip64 record), or None when there is no end record (zipfile will say so)."""
    tail_len = min(size, 22 + 0xFFFF + 20 + 56)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    f.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    found = struct.unpack_from("<I", tail, at + 12)[0]
    locator = at - 20
    if locator >= 56 and tail[locator:locator + 4] == b"PK\x06\x07" \
            and tail[locator - 56:locator - 52] == b"PK\x06\x06":
        found = max(found, struct.unpack_from("<Q", tail, locator - 56 + 40)[0])
    return found


def open_zip(f, size, source, max_directory, usual="a weights file's takes a few kB"):
    """The ``zipfile.ZipFile`` of the open file ``f`` (``size`` bytes), once its central directory
    is known to be at most ``max_directory`` bytes (``usual`` says what such a file's takes); a
    corrupt or hostile zip is one :class:`WeightsError` line naming ``source``."""
    directory = zip_directory_size(f, size)
    if directory is not None and directory > max_directory:
        raise WeightsError(source, "its zip directory claims %s; %s (corrupt or hostile file)"
                           % (size_text(directory), usual))
    try:
        return zipfile.ZipFile(f)
    except ZIP_READ_ERRORS as err:
        raise WeightsError(source, "corrupt zip file (%s)" % one_line(err, 160)) from None


def read_zip_member(zf, info, source, max_bytes):
    """The bytes of zip member ``info``: at most ``max_bytes``, CRC-checked, read in chunks.

    Its declared size, encryption flag and compression method are checked before anything is
    reserved; a member that inflates past its declared size is cut there and then fails the CRC.
    Every problem is a one-line :class:`~mxvision.errors.WeightsError` naming the file and member.
    """
    what = "member %s" % one_line(repr(info.filename), 80)
    if info.flag_bits & 0x1:
        raise WeightsError(source, "%s is encrypted; weights files are never encrypted" % what)
    if info.compress_type not in _READABLE_METHODS:
        raise WeightsError(source, "%s uses zip compression method %d; PyTorch writes stored (0) "
                           "or deflated (8) members" % (what, info.compress_type))
    if info.file_size > max_bytes:
        raise WeightsError(source, "%s would be %.1f MB, more than the %.1f MB these weights can take "
                           "(a compression bomb, or not these weights)"
                           % (what, info.file_size / 1e6, max_bytes / 1e6))
    buf = bytearray(info.file_size)
    view = memoryview(buf)
    filled = 0
    try:
        with zf.open(info) as member:
            while True:
                chunk = member.read(_CHUNK)
                if not chunk:
                    break
                if filled + len(chunk) > len(buf):
                    raise WeightsError(source, "%s is longer than its header says" % what)
                view[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
    except WeightsError:
        raise
    except ZIP_READ_ERRORS as err:
        reason = one_line(err, 120) or ("the file ends inside it" if isinstance(err, EOFError) else type(err).__name__)
        raise WeightsError(source, "cannot read %s (corrupt zip: %s)" % (what, reason)) from None
    if filled != len(buf):
        raise WeightsError(source, "%s ends after %d of its %d bytes (truncated or corrupt file)"
                           % (what, filled, len(buf)))
    return buf
