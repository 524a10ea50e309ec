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
"""
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib

from ..errors import DownloadError

__all__ = ["safe_extract_zip", "safe_extract_tar", "MAX_MEMBER_SIZE", "MAX_TOTAL_SIZE"]

MAX_MEMBER_SIZE = 4 << 30  # default per-member limit (largest Gluon model-zoo file is ~550 MB)
MAX_TOTAL_SIZE = 8 << 30
_CHUNK = 1 << 16


def _one_line(text):
    return " ".join(str(text).split())


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


def _write_stream(archive, name, src, target, limit):
    """Copy ``src`` to ``target`` through a temp file, enforcing ``limit`` on the real bytes."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".extract-")
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for block in iter(lambda: src.read(_CHUNK), b""):
                written += len(block)
                if written > limit:
                    raise _refuse(archive, name, "more than %d bytes" % limit)
                out.write(block)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return written


def _check_sizes(archive, name, size, total, max_size, max_total):
    if size > max_size:
        raise _refuse(archive, name, "%d bytes exceeds the %d-byte member limit" % (size, max_size))
    if total > max_total:
        raise _refuse(archive, name, "archive expands beyond the %d-byte limit" % max_total)


def safe_extract_zip(zip_path, dest, max_size=MAX_MEMBER_SIZE, max_total=MAX_TOTAL_SIZE):
    """Extract a zip into ``dest`` and return the written file paths.

    Every member is checked before anything is written. Zip symlinks, device entries and
    encrypted members are refused (``zipfile`` cannot create links safely anyway); sizes are
    enforced on the decompressed bytes, not just the (forgeable) header.
    """
    zip_path = os.fspath(zip_path)
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DownloadError(zip_path, "not a readable zip archive (%s)" % _one_line(err)) from None
    with zf:
        plan, total = [], 0
        for info in zf.infolist():
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
                _check_sizes(zip_path, info.filename, info.file_size, total, max_size, max_total)
            if parts:
                plan.append((info, parts))
        written, total = [], 0
        for info, parts in plan:
            target = _target(zip_path, info.filename, dest_real, parts)
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            try:
                with zf.open(info) as src:
                    total += _write_stream(zip_path, info.filename, src, target,
                                           min(max_size, max_total - total))
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                problem = "corrupt member %r (%s)" % (info.filename, _one_line(err))
                raise DownloadError(zip_path, problem) from None
            written.append(target)
    return written


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


def safe_extract_tar(tar_path, dest, max_size=MAX_MEMBER_SIZE, max_total=MAX_TOTAL_SIZE):
    """Extract a (possibly compressed) tar into ``dest``; return the written file paths.

    Members are validated up front (names, link targets, types, sizes); while extracting,
    each target and link is re-checked with ``realpath`` so chains of links cannot escape.
    Hard links are materialised as copies of an already extracted file inside ``dest``.
    """
    tar_path = os.fspath(tar_path)
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    try:
        tf = tarfile.open(tar_path, "r:*")
        members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DownloadError(tar_path, "not a readable tar archive (%s)" % _one_line(err)) from None
    with tf:
        plan, total = [], 0
        for m in members:
            parts = _member_parts(tar_path, m.name)
            if m.issym() or m.islnk():
                link = _link_parts(tar_path, m, parts)
                if m.islnk() and not link:
                    raise _refuse(tar_path, m.name, "hard link to the archive root")
            elif m.isreg():
                total += m.size
                _check_sizes(tar_path, m.name, m.size, total, max_size, max_total)
            elif not m.isdir():
                raise _refuse(tar_path, m.name, "device, fifo or special file")
            if parts:
                plan.append((m, parts))
        written, total = [], 0
        for m, parts in plan:
            target = _target(tar_path, m.name, dest_real, parts)
            if m.isdir():
                if not _inside(dest_real, target):
                    raise _refuse(tar_path, m.name, "resolves outside the destination")
                os.makedirs(target, exist_ok=True)
            elif m.isreg():
                with tf.extractfile(m) as src:
                    total += _write_stream(tar_path, m.name, src, target, min(max_size, max_total - total))
                written.append(target)
            elif m.issym():
                if not _inside(dest_real, os.path.join(os.path.dirname(target), m.linkname)):
                    raise _refuse(tar_path, m.name, "link %r resolves outside the destination" % m.linkname)
                tmp = os.path.join(os.path.dirname(target), ".extract-link-%d" % os.getpid())
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(m.linkname, tmp)
                os.replace(tmp, target)
                written.append(target)
            else:  # hard link: copy the (already extracted, inside) file it names
                source = os.path.join(dest_real, *_link_parts(tar_path, m, parts))
                if not _inside(dest_real, source) or not os.path.isfile(source):
                    raise _refuse(tar_path, m.name, "hard link to %r, not an extracted file" % m.linkname)
                with open(os.path.realpath(source), "rb") as src:
                    total += _write_stream(tar_path, m.name, src, target, min(max_size, max_total - total))
                written.append(target)
    return written
