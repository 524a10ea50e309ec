"""Safe extraction of downloaded zip and tar archives, and bounded reading of compressed tables.

Archives fetched from a mirror are untrusted input: ``ZipFile.extractall`` and
``TarFile.extractall`` will follow ``..`` and absolute names, create links pointing anywhere and
device nodes, fill the disk for a small compressed "bomb", and a tar whose header is corrupt half
way simply ends there. So:

* **Nothing outside.** Members are extracted into a private folder beside the destination
  (``.NAME.extract-*``, see :mod:`mxvision.io.extraction`), each write through a parent whose
  ``realpath`` at that moment is inside it, with ``O_CREAT | O_EXCL | O_NOFOLLOW``. Link targets
  are checked lexically (no absolute target, none climbing above the archive root), against the
  folder as it is when the link is made, and once more on the finished tree, where links made
  later count: ``stamp -> a/a/../../victim`` followed by ``a -> .`` passes the first two one link
  at a time, not the last. Where Python has tarfile's extraction filters (3.8.17+, 3.9.17+,
  3.10.12+, 3.11.4+) every member also passes ``tarfile.data_filter``; our checks are the floor on
  older versions and against the filter's own bypasses (fixed only in 3.9.23/3.10.18/3.11.13).
* **All or nothing.** Only a complete, checked tree is moved into the destination, so a refused,
  corrupt or truncated archive leaves it as it was (an interrupted one leaves the hidden folder).
* **Corruption is found before writing.** A tar is read twice. The first pass reads every header,
  refusing as soon as the declared sizes pass ``max_total`` or the count ``max_members`` (before
  decompressing further), requires a real end-of-archive block where the headers stop, and reads
  the compressed stream to its very end so gzip's CRC and length, xz's check and bz2's CRCs are
  verified. No single read from the stream may exceed :data:`MAX_READ` (tarfile reads a pax or
  GNU long-name header whole, at whatever size the header declares). Zip members are checked by
  their CRC as they are written; encrypted members and unknown methods are refused up front.
* **Modes** follow tar's 'data' filter: the archive's permission bits without setuid, setgid,
  sticky or group/other write, owner read/write always, masked by the umask; folders get the
  default mode.

:func:`read_decompressed` reads a plain or gzipped table (the NIH and OpenI label CSVs) through
the same kind of cap. Refusals raise :class:`~mxvision.errors.DownloadError` naming the archive
and, where there is one, the member.
"""
import gzip
import os
import stat
import tarfile
import zipfile
import zlib
from contextlib import contextmanager

from mxvision.errors import DownloadError, one_line
from mxvision.io.extraction import ExtractionTree, data_mode, member_parts, refusal

try:  # Python may be built without them; tarfile then cannot read such archives either
    import lzma
except ImportError:  # pragma: no cover
    lzma = None
try:
    import bz2
except ImportError:  # pragma: no cover
    bz2 = None

__all__ = ["safe_extract_zip", "safe_extract_tar", "open_tar", "read_decompressed", "NotAnArchive",
           "READ_ERRORS", "MAX_MEMBER_SIZE", "MAX_TOTAL_SIZE", "MAX_MEMBERS", "MAX_READ",
           "MAX_TRAILING", "MAX_TABLE_BYTES"]

MAX_MEMBER_SIZE = 4 << 30  # default per-member limit (largest Gluon model-zoo file is ~550 MB)
MAX_TOTAL_SIZE = 8 << 30  # NLMCXR_png.tgz, the largest archive mxvision fetches itself: 1.3 GB
MAX_MEMBERS = 1_000_000  # CheXpert, the largest common chest X-ray zip, has ~224,000 files
#: Largest single read from a tar stream: a pax or GNU long-name header (real ones are a few KB)
#: or one report read whole (mxvision.data.openi caps those at 1 MiB).
MAX_READ = 2 << 20
#: Most bytes after the end-of-archive block (GNU tar pads to 10 KiB records).
MAX_TRAILING = 16 << 20
#: Most decompressed bytes of a label table: 3.5x Data_Entry_2017_v2020.csv (9,003,499 bytes
#: from its 978,381-byte .gz), 6x nlmcxr_dicom_metadata.csv (5,343,206). Parsed, such a table
#: takes about 20x its size in memory, so this also bounds the parse.
MAX_TABLE_BYTES = 32 << 20
_CHUNK = 1 << 16
_LZMA_ERRORS = (lzma.LZMAError,) if lzma else ()
#: What reading a damaged archive can raise (tarfile, zipfile and the decompressors).
READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError,
               NotImplementedError, RecursionError) + _LZMA_ERRORS
_DATA_FILTER = getattr(tarfile, "data_filter", None)
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED} | (
    {zipfile.ZIP_BZIP2} if bz2 else set()) | ({zipfile.ZIP_LZMA} if lzma else set())


class NotAnArchive(DownloadError):
    """The file is not a readable archive at all (as opposed to a damaged or hostile one)."""


def _check_sizes(archive, name, size, total, max_size, max_total, count, max_members):
    if count > max_members:
        raise refusal(archive, name, "the archive has more than %d members" % max_members)
    if size > max_size:
        raise refusal(archive, name, "%d bytes exceeds the %d-byte member limit" % (size, max_size))
    if total > max_total:
        raise refusal(archive, name, "archive expands beyond the %d-byte limit" % max_total)


def _regular_file(path):
    """Open ``path`` for reading, refusing what is not a regular file (a FIFO would block,
    ``/dev/zero`` never ends)."""
    try:
        f = open(path, "rb")
    except OSError as err:
        raise NotAnArchive(path, "cannot read it (%s)" % one_line(err.strerror or err)) from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise NotAnArchive(path, "not a regular file")
    return f


# ------------------------------------------------------------------------------------ tar
class _TarStream:
    """The decompressed bytes of a tar file, for ``tarfile``, with every single read bounded."""

    def __init__(self, path):
        self.name = path
        self.raw = _regular_file(path)
        magic = self.raw.read(6)
        self.raw.seek(0)
        if magic.startswith(b"\x1f\x8b"):
            self.inner = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif magic.startswith(b"BZh") and bz2:
            self.inner = bz2.BZ2File(self.raw)
        elif magic.startswith(b"\xfd7zXZ\x00") and lzma:
            self.inner = lzma.LZMAFile(self.raw)
        else:
            self.inner = self.raw

    def read(self, size=-1):
        if size is None or size < 0 or size > MAX_READ:
            raise tarfile.ReadError("a header or read of %s bytes, more than the %d-byte limit"
                                    % ("all" if size is None or size < 0 else size, MAX_READ))
        return self.inner.read(size)

    def seek(self, offset, whence=os.SEEK_SET):
        return self.inner.seek(offset, whence)

    def tell(self):
        return self.inner.tell()

    def close(self):
        self.inner.close()
        self.raw.close()


def _check_end(tf, stream, path):
    """Where tarfile stopped reading headers there must be an end-of-archive block (tarfile
    takes a corrupt or truncated header after the first one for the end); then the rest of the
    stream is read so the decompressor verifies its checksums and length."""
    stream.seek(tf.offset)
    block = stream.read(tarfile.BLOCKSIZE)
    if not block:
        raise DownloadError(path, "truncated archive: no end-of-archive block after byte %d" % tf.offset)
    if block != bytes(tarfile.BLOCKSIZE):
        raise DownloadError(path, "corrupt or truncated archive: bad tar header at byte %d" % tf.offset)
    trailing = 0
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return
        trailing += len(chunk)
        if trailing > MAX_TRAILING:
            raise DownloadError(path, "more than %d bytes after the end of the archive" % MAX_TRAILING)


@contextmanager
def open_tar(path, max_size=MAX_MEMBER_SIZE, max_total=MAX_TOTAL_SIZE, max_members=MAX_MEMBERS):
    """Open the tar ``path`` (plain, gzip, bz2 or xz, told by its first bytes), check it whole,
    and yield ``(tarfile, members)``: every header read, sizes and count within the limits, the
    end-of-archive block found and the compressed stream verified to its end. Reading members
    afterwards decompresses a second time; what it can raise is in :data:`READ_ERRORS`.
    Raises :class:`NotAnArchive` if it is not a tar at all, DownloadError if damaged or too big.
    """
    path = os.fspath(path)
    stream = _TarStream(path)
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r:")
        except READ_ERRORS as err:
            raise NotAnArchive(path, "not a readable tar archive (%s)" % one_line(err)) from None
        with tf:
            members, total = [], 0
            try:
                while True:
                    m = tf.next()
                    if m is None:
                        break
                    members.append(m)
                    total += m.size if m.isreg() else 0
                    _check_sizes(path, m.name, m.size if m.isreg() else 0, total, max_size,
                                 max_total, len(members), max_members)
                _check_end(tf, stream, path)
            except READ_ERRORS as err:
                raise DownloadError(path, "truncated or corrupt archive (%s)" % one_line(err)) from None
            yield tf, members
    finally:
        stream.close()


def _link_parts(archive, member, parts):
    """Archive-relative parts a link points to; refuses targets escaping the archive root."""
    linkname = member.linkname.replace("\\", "/")
    if linkname.startswith("/") or (len(linkname) > 1 and linkname[1] == ":"):
        raise refusal(archive, member.name, "link to absolute path %r" % member.linkname)
    stack = list(parts[:-1]) if member.issym() else []
    for piece in linkname.split("/"):
        if piece in ("", "."):
            continue
        if piece != "..":
            stack.append(piece)
        elif stack:
            stack.pop()
        else:
            raise refusal(archive, member.name, "link %r points outside" % member.linkname)
    if member.islnk() and not stack:
        raise refusal(archive, member.name, "hard link to the archive root")
    return stack


def _tar_plan(path, members):
    """(member, parts, link parts) for each member, every name, link and type checked."""
    plan = []
    for m in members:
        parts = member_parts(path, m.name)
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            raise refusal(path, m.name, "device, fifo or special file")
        link = _link_parts(path, m, parts) if m.issym() or m.islnk() else None
        if parts:
            plan.append((m, parts, link))
    return plan


def _filter(tree, m):
    """tarfile's own 'data' filter, where this Python has it, on the tree as it is now."""
    if _DATA_FILTER is None:
        return
    try:
        _DATA_FILTER(m, tree.root)
    except tarfile.LinkOutsideDestinationError:
        raise refusal(tree.archive, m.name, "link %r resolves outside the destination"
                      % m.linkname) from None
    except tarfile.OutsideDestinationError:
        raise refusal(tree.archive, m.name, "its path resolves outside the destination (symlink)") \
            from None
    except tarfile.FilterError as err:
        raise refusal(tree.archive, m.name, "not plain data (%s)" % one_line(err)) from None


def safe_extract_tar(tar_path, dest, max_size=MAX_MEMBER_SIZE, max_total=MAX_TOTAL_SIZE,
                     max_members=MAX_MEMBERS):
    """Extract a (possibly compressed) tar into ``dest``; return the written file and link paths.

    The archive is checked whole first (:func:`open_tar`, then every name, link and type), then
    extracted into a private folder and moved into ``dest`` only when complete. Hard links are
    materialised as copies of a file extracted before them.
    """
    tar_path = os.fspath(tar_path)
    with open_tar(tar_path, max_size, max_total, max_members) as (tf, members):
        plan = _tar_plan(tar_path, members)
        tree = ExtractionTree(tar_path, dest)
        try:
            for m, parts, link in plan:
                _filter(tree, m)
                limit = min(max_size, max_total - tree.total)
                if m.isdir():
                    tree.folder(m.name, parts)
                elif m.issym():
                    tree.symlink(m.name, parts, m.linkname)
                elif m.islnk():
                    tree.copy(m.name, parts, link, m.linkname, limit, data_mode(m.mode))
                else:
                    try:
                        src = tf.extractfile(m)
                    except READ_ERRORS as err:
                        raise tree.corrupt(m.name, err) from None
                    with src:
                        tree.write(m.name, parts, src, limit, data_mode(m.mode), READ_ERRORS)
            return tree.place()
        finally:
            tree.discard()


# ------------------------------------------------------------------------------------ zip
def _zip_mode(info):
    mode = (info.external_attr >> 16) & 0o7777 if info.create_system == 3 else 0
    return data_mode(mode) if mode & 0o777 else 0o644


def _zip_plan(zip_path, zf, max_size, max_total, max_members):
    plan, total = [], 0
    for count, info in enumerate(zf.infolist(), start=1):
        parts = member_parts(zip_path, info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
        if kind == stat.S_IFLNK:
            raise refusal(zip_path, info.filename, "symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise refusal(zip_path, info.filename, "device or special file")
        if info.flag_bits & 0x1:
            raise refusal(zip_path, info.filename, "encrypted")
        if not info.is_dir() and info.compress_type not in _ZIP_METHODS:
            raise refusal(zip_path, info.filename, "compression method %d is not supported"
                          % info.compress_type)
        size = 0 if info.is_dir() else info.file_size
        total += size
        _check_sizes(zip_path, info.filename, size, total, max_size, max_total, count, max_members)
        if parts:
            plan.append((info, parts))
    return plan


def safe_extract_zip(zip_path, dest, max_size=MAX_MEMBER_SIZE, max_total=MAX_TOTAL_SIZE,
                     max_members=MAX_MEMBERS):
    """Extract a zip into ``dest`` and return the written file paths.

    Every member is checked before anything is written. Zip symlinks, device entries, encrypted
    members and unsupported compression methods are refused; sizes are enforced on the
    decompressed bytes, not just the (forgeable) header, and each member's CRC is checked. The
    members go into a private folder, moved into ``dest`` only when all are complete.
    """
    zip_path = os.fspath(zip_path)
    raw = _regular_file(zip_path)
    try:
        try:
            zf = zipfile.ZipFile(raw)
        except READ_ERRORS as err:
            raise NotAnArchive(zip_path, "not a readable zip archive (%s)" % one_line(err)) from None
        with zf:
            plan = _zip_plan(zip_path, zf, max_size, max_total, max_members)
            tree = ExtractionTree(zip_path, dest)
            try:
                for info, parts in plan:
                    if info.is_dir():
                        tree.folder(info.filename, parts)
                        continue
                    try:
                        src = zf.open(info)
                    except READ_ERRORS as err:
                        raise tree.corrupt(info.filename, err) from None
                    with src:
                        tree.write(info.filename, parts, src, min(max_size, max_total - tree.total),
                                   _zip_mode(info), READ_ERRORS)
                return tree.place()
            finally:
                tree.discard()
    finally:
        raw.close()


# ------------------------------------------------------------------------------------ tables
def read_decompressed(path, max_bytes=MAX_TABLE_BYTES, error=DownloadError):
    """The bytes of ``path``, gunzipped when it is gzip data (told by its first bytes), refusing
    with ``error(path, ...)`` a file that is not regular or decompresses to more than
    ``max_bytes``. Reading to the end verifies gzip's CRC and length; a damaged gzip raises the
    ``OSError``/``EOFError``/``zlib.error`` of :mod:`gzip` (a missing file: FileNotFoundError)."""
    path = os.fspath(path)
    with open(path, "rb") as raw:
        if not stat.S_ISREG(os.fstat(raw.fileno()).st_mode):
            raise error(path, "not a regular file")
        packed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if packed else raw
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(path, "%s more than %d bytes; refusing it (a compression bomb, or not the "
                          "file expected here)" % ("decompresses to" if packed else "holds",
                                                   max_bytes))
    return data
