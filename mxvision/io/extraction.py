"""The private folder an archive is extracted into, and its move into the destination.

:mod:`mxvision.io.archive` decides *what* to extract; this module makes sure that, whatever the
archive holds and in whatever order, nothing is written outside the destination, no link
pointing outside survives, and the destination changes only if the whole archive was good:

* members are written into a fresh folder ``.NAME.extract-*/tree`` beside the destination (inside
  it when the parent is not writable or another file system), which only this process writes to;
  each write goes through a parent folder whose ``realpath`` at that moment is inside the tree,
  with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a link already there is replaced, never followed);
* :meth:`ExtractionTree.place` checks every link of the finished tree with ``realpath`` (links
  made after a link count: ``x -> a/a/../../v`` then ``a -> .``), then renames the tree into
  place when the destination is absent or empty, else merges it entry by entry with a journal:
  a file it replaces is moved aside, and if anything fails -- a clash, a link that leaves through
  a link already in the destination -- the journal puts everything back.

A killed extraction leaves the hidden ``.NAME.extract-*`` folder; it is never mistaken for the
result, and can be deleted.
"""
import os
import re
import shutil
import stat
import tempfile

from mxvision.errors import DownloadError, one_line

__all__ = ["ExtractionTree", "member_parts", "refusal", "data_mode", "inside"]

_CHUNK = 1 << 16
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def refusal(archive, name, why):
    """The DownloadError for a member that is refused."""
    return DownloadError(archive, "refusing to extract member %r: %s" % (name, why))


def member_parts(archive, name):
    """Split an archive member name into safe relative parts (refusing absolute and '..')."""
    clean = name.replace("\\", "/")
    if "\x00" in clean:
        raise refusal(archive, name, "NUL byte in name")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise refusal(archive, name, "absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refusal(archive, name, "'..' in path")
    return parts


def inside(root_real, path):
    """Whether ``path`` resolves (links followed as they are now) to ``root_real`` or below."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def data_mode(mode):
    """File permission bits as tarfile's 'data' filter keeps them: no setuid/setgid/sticky, no
    group/other write, no execute for others unless the owner has it, owner read/write always.
    The umask applies on top (files are created with this mode)."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _missing_folders(path):
    """The folders of ``path`` that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _work_folder(archive, dest):
    """A fresh private folder beside ``dest`` (same file system, so the tree can be renamed)."""
    parent = os.path.dirname(dest)
    prefix = ".%s.extract-" % (os.path.basename(dest) or "archive")
    try:
        os.makedirs(parent, exist_ok=True)
        if os.path.isdir(dest) and os.stat(dest).st_dev != os.stat(parent).st_dev:
            raise OSError("another file system")
        return tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError:
        pass
    try:
        os.makedirs(dest, exist_ok=True)
        return tempfile.mkdtemp(prefix=".extract-", dir=dest)
    except OSError as err:
        raise DownloadError(archive, "cannot extract into %s (%s)"
                            % (dest, one_line(err.strerror or err))) from None


def _empty_folder(path):
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


class ExtractionTree:
    """Members written into a private folder, then moved into ``dest`` by :meth:`place`.

    Always call :meth:`discard` afterwards (it removes the private folder, and after a failure
    everything extracted so far). OS errors become DownloadErrors naming the archive and member.
    """

    def __init__(self, archive, dest):
        self.archive = archive
        self.dest = os.path.realpath(os.fspath(dest))
        if os.path.lexists(self.dest) and not os.path.isdir(self.dest):
            raise DownloadError(archive, "cannot extract into %s: it is not a folder" % self.dest)
        self.made = _missing_folders(self.dest)  # removed again if left empty
        self.work = _work_folder(archive, self.dest)
        self.root = os.path.join(os.path.realpath(self.work), "tree")
        os.mkdir(self.root)
        self.written = {}  # path relative to the tree -> None, files and links in order
        self.links = {}  # path relative to the tree -> member name
        self._folders = {}  # member folder parts -> its real path in the tree
        self.placed = False
        self.total = 0

    # ---------------------------------------------------------------- errors
    def cannot(self, name, err):
        reason = one_line(err.strerror or err) if isinstance(err, OSError) else one_line(err)
        return DownloadError(self.archive, "cannot write member %r (%s)" % (name, reason))

    def corrupt(self, name, err):
        return DownloadError(self.archive, "corrupt member %r (%s)" % (name, one_line(err)))

    # ---------------------------------------------------------------- writing
    def _parent(self, name, parts):
        """The real folder member ``parts`` goes in (made if missing), inside the tree. Resolved
        folders are remembered until a link is made or removed (archives of thousands of files
        in one folder would otherwise resolve it thousands of times)."""
        key = tuple(parts[:-1])
        folder = self._folders.get(key)
        if folder is None:
            folder = os.path.realpath(os.path.join(self.root, *key))
            if not inside(self.root, folder):
                raise refusal(self.archive, name, "its folder resolves outside the destination "
                                                  "(symlink)")
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                raise self.cannot(name, err) from None
            self._folders[key] = folder
        return folder

    def _clear(self, name, target):
        """Make room for a file or link at ``target``: a file or link there is removed (never
        followed); a folder is a clash; a link there that resolves outside is refused, as
        tarfile's 'data' filter does (the archive is up to something)."""
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            if not inside(self.root, target):
                raise refusal(self.archive, name, "its path resolves outside the destination "
                                                  "(symlink)")
            self._folders.clear()
        elif stat.S_ISDIR(mode):
            raise self.cannot(name, "a folder of that name was extracted before")
        os.unlink(target)

    def _record(self, path, name=None):
        rel = os.path.relpath(path, self.root)
        self.written.pop(rel, None)
        self.written[rel] = None
        if name is None:
            self.links.pop(rel, None)
        else:
            self.links[rel] = name

    def folder(self, name, parts):
        target = os.path.join(self._parent(name, parts), parts[-1])
        if os.path.islink(target):
            if not inside(self.root, target):
                raise refusal(self.archive, name, "resolves outside the destination (symlink)")
            if not os.path.isdir(target):
                raise self.cannot(name, "a link to a file of that name was extracted before")
            return
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as err:
            raise self.cannot(name, err) from None

    def write(self, name, parts, src, limit, mode, read_errors):
        """Copy the open member ``src`` to ``parts``, at most ``limit`` bytes, with ``mode``."""
        target = os.path.join(self._parent(name, parts), parts[-1])
        written = 0
        try:
            self._clear(name, target)
            with os.fdopen(os.open(target, _CREATE, mode), "wb") as out:
                while True:
                    try:
                        block = src.read(_CHUNK)
                    except read_errors as err:
                        raise self.corrupt(name, err) from None
                    if not block:
                        break
                    written += len(block)
                    if written > limit:
                        raise refusal(self.archive, name, "more than %d bytes" % limit)
                    out.write(block)
        except OSError as err:
            raise self.cannot(name, err) from None
        self.total += written
        self._record(target)

    def symlink(self, name, parts, linkname):
        parent = self._parent(name, parts)
        if not inside(self.root, os.path.join(parent, linkname)):
            raise refusal(self.archive, name, "link %r resolves outside the destination" % linkname)
        target = os.path.join(parent, parts[-1])
        try:
            self._clear(name, target)
            self._folders.clear()
            os.symlink(linkname, target)
        except OSError as err:
            raise self.cannot(name, err) from None
        self._record(target, name)

    def copy(self, name, parts, source_parts, linkname, limit, mode):
        """A hard link: a copy of the file extracted before at ``source_parts``."""
        source = os.path.realpath(os.path.join(self.root, *source_parts))
        if not inside(self.root, source) or not os.path.isfile(source):
            raise refusal(self.archive, name, "hard link to %r, not an extracted file" % linkname)
        with open(source, "rb") as src:
            self.write(name, parts, src, limit, mode, OSError)

    # ---------------------------------------------------------------- placing
    def _check_links(self, root):
        for rel, name in self.links.items():
            path = os.path.join(root, rel)
            if os.path.islink(path) and not inside(root, path):
                raise refusal(self.archive, name, "link %r resolves outside the destination"
                              % os.readlink(path))

    def place(self):
        """Move the finished tree into the destination; return the paths of its files and links."""
        self._check_links(self.root)
        if not os.path.lexists(self.dest) or _empty_folder(self.dest):
            try:
                os.rename(self.root, self.dest)  # replaces an empty folder (POSIX)
                return self._paths()
            except OSError as err:
                if not os.path.isdir(self.dest):
                    raise self.cannot(os.path.basename(self.dest), err) from None
        journal = []
        try:
            self._merge(self.root, self.dest, "", journal)
            self._check_links(self.dest)
        except BaseException:
            self._undo(journal)
            raise
        return self._paths()

    def _paths(self):
        self.placed = True
        return [os.path.join(self.dest, rel) for rel in self.written]

    def _merge(self, src, dst, rel, journal):
        with os.scandir(src) as entries:
            names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
        for name, is_dir in names:
            member, target = os.path.join(rel, name), os.path.join(dst, name)
            try:
                there = os.lstat(target).st_mode
            except FileNotFoundError:
                there = None
            except OSError as err:
                raise self.cannot(member, err) from None
            if there is not None and stat.S_ISDIR(there):
                if not is_dir:
                    raise self.cannot(member, "a folder of that name is in the destination")
                self._merge(os.path.join(src, name), target, member, journal)
                continue
            if is_dir and there is not None:
                if stat.S_ISLNK(there) and not inside(self.dest, target):
                    raise refusal(self.archive, member, "its folder resolves outside the "
                                                        "destination (symlink in the destination)")
                raise self.cannot(member, "a file or link of that name is in the destination")
            try:
                backup = None
                if there is not None:
                    backup = os.path.join(self.work, "replaced-%d" % len(journal))
                    os.rename(target, backup)
                journal.append((target, backup))
                os.rename(os.path.join(src, name), target)
            except OSError as err:
                raise self.cannot(member, err) from None

    @staticmethod
    def _undo(journal):
        for target, backup in reversed(journal):
            try:
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.unlink(target)
                if backup is not None:
                    os.rename(backup, target)
            except OSError:
                pass

    def discard(self):
        """Remove the private folder and, unless the tree was placed, the folders made for it."""
        shutil.rmtree(self.work, ignore_errors=True)
        for folder in [] if self.placed else self.made:
            try:
                if os.path.lexists(folder):
                    os.rmdir(folder)
            except OSError:
                break
