"""Safe extraction of downloaded zip and tar archives.

Archives fetched from a mirror are untrusted input: ``ZipFile.extractall`` and
``TarFile.extractall`` (before Python's ``filter="data"``) will follow ``..`` and absolute
member names, create links pointing anywhere, create device nodes, and fill the disk for a small
compressed "bomb". These functions check every member before writing anything, then re-check
each target with ``realpath`` while writing (so links already in the destination, or created
earlier in the same archive, cannot redirect a write outside it), count the real decompressed
bytes against the limits, and write each file through a temp file + ``os.replace`` so a failure
never leaves a half-written member under its final name. Refusals raise
:class:`~mxvision.errors.DownloadError` naming the archive and the member.

Extraction is all or nothing for what it adds: when a member is refused or cannot be written
half way through (a corrupt member, a name clash such as a file ``a`` and a member ``a/b``, a
full disk), the files, links and folders this call created are removed again, so a partly
extracted archive is never mistaken for a complete one (files that existed before and were
replaced by a complete member stay replaced). The member count is limited too (``max_members``),
so an archive of a million empty files cannot exhaust the inodes.
"""
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib

from mxvision.errors import DownloadError, one_line

__all__ = ["safe_extract_zip", "safe_extract_tar", "MAX_MEMBER_SIZE", "MAX_TOTAL_SIZE",
           "MAX_MEMBERS"]

MAX_MEMBER_SIZE = 4 << 30  # default per-member limit (largest Gluon model-zoo file is ~550 MB)
MAX_TOTAL_SIZE = 8 << 30
MAX_MEMBERS = 1_000_000  # CheXpert, the largest common chest X-ray zip, has ~224,000 files
_CHUNK = 1 << 16


def _refuse(archive, name, why):
    return DownloadError(archive, "refusing to extract member %r: %s" % (name, why))


def _member_parts(archive, name):
    """Split an archive member name into safe relative parts (refusing absolute and '..')."""
    clean = name.replace("\\", "/")
    if "\x00" in clean:
        raise _refuse(archive, name, "NUL byte in name")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise _refuse(archive, name, "absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "'..' in path")
    return parts


def _inside(root_real, path):
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _target(archive, name, dest_real, parts):
    """Absolute target path for ``parts``; refuses if an existing symlink leads it outside."""
    target = os.path.join(dest_real, *parts)
    if not _inside(dest_real, os.path.dirname(target)):
        raise _refuse(archive, name, "its folder resolves outside the destination (symlink)")
    return target


class _Output:
    """The writes of one extraction: each new file, link and folder is remembered so that a
    failure can take them all back (:meth:`rollback`); OS errors become DownloadErrors."""

    def __init__(self, archive, dest_real):
        self.archive, self.dest_real = archive, dest_real
        self.files, self.folders, self.written_bytes = [], [], 0

    def _new(self, target):
        if not os.path.lexists(target):
            self.files.append(target)

    def folder(self, name, path):
        missing = []
        head = path
        while not os.path.isdir(head) and head != self.dest_real:
            missing.append(head)
            head = os.path.dirname(head)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise self.error(name, err) from None
        self.folders.extend(reversed(missing))

    def stream(self, name, src, target, limit):
        """Copy ``src`` to ``target`` through a temp file, enforcing ``limit`` on the real bytes."""
        self.folder(name, os.path.dirname(target))
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".extract-")
        except OSError as err:
            raise self.error(name, err) from None
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for block in iter(lambda: src.read(_CHUNK), b""):
                    written += len(block)
                    if written > limit:
                        raise _refuse(self.archive, name, "more than %d bytes" % limit)
                    out.write(block)
            self._new(target)
            os.replace(tmp, target)
        except OSError as err:
            raise self.error(name, err) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.written_bytes += written
        return target

    def symlink(self, name, linkname, target):
        self.folder(name, os.path.dirname(target))
        tmp = os.path.join(os.path.dirname(target), ".extract-link-%d" % os.getpid())
        try:
            os.symlink(linkname, tmp)
            self._new(target)
            os.replace(tmp, target)
        except OSError as err:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise self.error(name, err) from None
        return target

    def error(self, name, err):
        reason = one_line(err.strerror or err) if isinstance(err, OSError) else one_line(err)
        return DownloadError(self.archive, "cannot write member %r (%s)" % (name, reason))

    def rollback(self):
        """Remove what this extraction created: files and links, then its (now empty) folders."""
        for path in reversed(self.files):
            try:
                os.unlink(path)
            except OSError:
                pass
        for path in reversed(self.folders):
            try:
                os.rmdir(path)
            except OSError:
                pass


def _check_sizes(archive, name, size, total, max_size, max_total, count=0, max_members=MAX_MEMBERS):
    if count > max_members:
        raise _refuse(archive, name, "the archive has more than %d members" % max_members)
    if size > max_size:
        raise _refuse(archive, name, "%d bytes exceeds the %d-byte member limit" % (size, max_size))
    if total > max_total:
        raise _refuse(archive, name, "archive expands beyond the %d-byte limit" % max_total)


def safe_extract_zip(zip_path, dest, max_size=MAX_MEMBER_SIZE, max_total=MAX_TOTAL_SIZE,
                     max_members=MAX_MEMBERS):
    """Extract a zip into ``dest`` and return the written file paths.

    Every member is checked before anything is written. Zip symlinks, device entries and
    encrypted members are refused (``zipfile`` cannot create links safely anyway); sizes are
    enforced on the decompressed bytes, not just the (forgeable) header. On any failure what
    this call created is removed again.
    """
    zip_path = os.fspath(zip_path)
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise DownloadError(zip_path, "not a readable zip archive (%s)" % one_line(err)) from None
    with zf:
        plan, total = [], 0
        for count, info in enumerate(zf.infolist(), start=1):
            parts = _member_parts(zip_path, info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
            if kind == stat.S_IFLNK:
                raise _refuse(zip_path, info.filename, "symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse(zip_path, info.filename, "device or special file")
            if info.flag_bits & 0x1:
                raise _refuse(zip_path, info.filename, "encrypted")
            if not info.is_dir():
                total += info.file_size
            _check_sizes(zip_path, info.filename, 0 if info.is_dir() else info.file_size, total,
                         max_size, max_total, count, max_members)
            if parts:
                plan.append((info, parts))
        out = _Output(zip_path, dest_real)
        try:
            written = [_extract_zip_member(zf, info, parts, out, max_size, max_total)
                       for info, parts in plan]
        except BaseException:
            out.rollback()
            raise
    return [path for path in written if path is not None]


def _extract_zip_member(zf, info, parts, out, max_size, max_total):
    target = _target(out.archive, info.filename, out.dest_real, parts)
    if info.is_dir():
        out.folder(info.filename, target)
        return None
    try:
        with zf.open(info) as src:
            return out.stream(info.filename, src, target,
                              min(max_size, max_total - out.written_bytes))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        problem = "corrupt member %r (%s)" % (info.filename, one_line(err))
        raise DownloadError(out.archive, problem) from None


def _link_parts(archive, member, parts):
    """Archive-relative parts a symlink points to; refuses targets escaping the archive root."""
    if member.linkname.startswith("/") or re.match(r"^[A-Za-z]:", member.linkname):
        raise _refuse(archive, member.name, "link to absolute path %r" % member.linkname)
    stack = list(parts[:-1]) if member.issym() else []
    for piece in member.linkname.replace("\\", "/").split("/"):
        if piece in ("", "."):
            continue
        if piece == "..":
            if not stack:
                raise _refuse(archive, member.name, "link %r points outside" % member.linkname)
            stack.pop()
        else:
            stack.append(piece)
    return stack


def safe_extract_tar(tar_path, dest, max_size=MAX_MEMBER_SIZE, max_total=MAX_TOTAL_SIZE,
                     max_members=MAX_MEMBERS):
    """Extract a (possibly compressed) tar into ``dest``; return the written file paths.

    Members are validated up front (names, link targets, types, sizes, count); while
    extracting, each target and link is re-checked with ``realpath`` so chains of links cannot
    escape. Hard links are materialised as copies of an already extracted file inside ``dest``.
    On any failure what this call created is removed again.
    """
    tar_path = os.fspath(tar_path)
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    try:
        tf = tarfile.open(tar_path, "r:*")
        members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DownloadError(tar_path, "not a readable tar archive (%s)" % one_line(err)) from None
    with tf:
        plan, total = [], 0
        for count, m in enumerate(members, start=1):
            parts = _member_parts(tar_path, m.name)
            if m.issym() or m.islnk():
                link = _link_parts(tar_path, m, parts)
                if m.islnk() and not link:
                    raise _refuse(tar_path, m.name, "hard link to the archive root")
            elif m.isreg():
                total += m.size
            elif not m.isdir():
                raise _refuse(tar_path, m.name, "device, fifo or special file")
            _check_sizes(tar_path, m.name, m.size if m.isreg() else 0, total, max_size, max_total,
                         count, max_members)
            if parts:
                plan.append((m, parts))
        out = _Output(tar_path, dest_real)
        try:
            written = [_extract_tar_member(tf, m, parts, out, max_size, max_total)
                       for m, parts in plan]
        except (tarfile.TarError, EOFError, zlib.error) as err:
            out.rollback()
            raise DownloadError(tar_path, "truncated or corrupt archive (%s)" % one_line(err)) from None
        except BaseException:
            out.rollback()
            raise
    return [path for path in written if path is not None]


def _extract_tar_member(tf, m, parts, out, max_size, max_total):
    archive, dest_real = out.archive, out.dest_real
    target = _target(archive, m.name, dest_real, parts)
    limit = min(max_size, max_total - out.written_bytes)
    if m.isdir():
        if not _inside(dest_real, target):
            raise _refuse(archive, m.name, "resolves outside the destination")
        out.folder(m.name, target)
        return None
    if m.isreg():
        with tf.extractfile(m) as src:
            return out.stream(m.name, src, target, limit)
    if m.issym():
        if not _inside(dest_real, os.path.join(os.path.dirname(target), m.linkname)):
            raise _refuse(archive, m.name, "link %r resolves outside the destination" % m.linkname)
        return out.symlink(m.name, m.linkname, target)
    # hard link: copy the (already extracted, inside) file it names
    source = os.path.join(dest_real, *_link_parts(archive, m, parts))
    if not _inside(dest_real, source) or not os.path.isfile(source):
        raise _refuse(archive, m.name, "hard link to %r, not an extracted file" % m.linkname)
    with open(os.path.realpath(source), "rb") as src:
        return out.stream(m.name, src, target, limit)
