"""OpenCV's image decoders, with what libpng and libjpeg print kept off the terminal.

Every problem the decoders report already becomes one ``BadImage`` line, and their own lines
beside it (``libpng error: ...``, ``Corrupt JPEG data: ...``) broke the one-line rule. Most of
it is prevented (``png_image_chunks`` checks CRCs and drops the ancillary chunks libpng
complains about), but libjpeg warns about corrupt entropy-coded data only while decoding it, and
OpenCV gives Python no way to install libjpeg's or libpng's message handlers. Both print with
``fprintf(stderr, ...)``, so :class:`DecoderChatter` points C's ``stderr`` stream elsewhere while
OpenCV decodes.
"""
import ctypes
import logging
import os
import re
import tempfile
import threading

import cv2
import numpy as np

log = logging.getLogger(__name__)

_RESET_BYTES = 1 << 20  # the capture file is emptied (between captures) once this much was read


class DecoderChatter:
    """Sends what C code prints through ``stderr`` to a capture file while OpenCV decodes.

    Only the C library's ``stderr`` *stream* (the ``FILE *`` libpng and libjpeg write through)
    is swapped, reference-counted: the first decoding thread in points it at an unbuffered stream
    on an anonymous file, the last one out points it back. File descriptor 2 is never touched,
    so Python's ``sys.stderr`` -- mxvision's messages, logging, progress bars from any thread --
    reaches the terminal unchanged and undelayed; only C output is captured. Whenever a thread
    leaves, the bytes captured since are read: the decoders' lines (``CHATTER``) and the bare
    newlines libpng prints apart from its messages are dropped (logged at DEBUG level); any
    other C output is written to the real stderr, so nothing is lost.

    Where the C library's ``stderr`` cannot be found (Windows), nothing is captured. The cost
    is a few microseconds per decode (against ~2 ms for a 512 px PNG).
    """

    CHATTER = re.compile(rb"libpng (warning|error): |Corrupt JPEG data|Premature end of JPEG file|"
                         rb"Invalid SOS parameters|Inconsistent progression sequence|"
                         rb"Unknown Adobe color transform|Warning: unknown JFIF revision|"
                         rb"Warning: thumbnail image size|Application transferred too many")
    _LINE_ENDS = re.compile(rb"(?<=[\r\n])")

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._ready = None  # None: not set up yet; False: cannot capture here
        self._libc = self._stderr = self._stream = None
        self._saved = None  # C's own stderr stream while ours is in place
        self._sink = None  # the capture file
        self._read = 0  # bytes of the capture file already handled
        self._pending = b""  # an unfinished line seen at the last read

    def capturing(self):
        """A context manager: C's stderr goes to the capture file until the last thread leaves."""
        return _Capture(self)

    def enter(self) -> bool:
        with self._lock:
            if self._ready is None:
                self._ready = self._set_up()
            if not self._ready:
                return False
            if self._active == 0:
                self._forward(final=True)  # what a write already under way added after the last read
                if self._read > _RESET_BYTES:
                    os.ftruncate(self._sink, 0)
                    self._read = 0
                self._saved = self._stderr.value
                self._stderr.value = self._stream
            self._active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._stderr.value = self._saved
            dropped = self._forward(final=self._active == 0)
        for line in dropped:
            log.debug("decoder message (not printed): %s", line.decode("utf-8", "replace").strip())

    def _set_up(self) -> bool:
        """Find C's ``stderr`` variable and open the capture stream; False where impossible."""
        try:
            libc = ctypes.CDLL(None)
            for name in ("stderr", "__stderrp"):  # glibc and musl; macOS
                try:
                    variable = ctypes.c_void_p.in_dll(libc, name)
                    break
                except ValueError:
                    continue
            else:
                return False
            libc.fdopen.restype = ctypes.c_void_p
            libc.fdopen.argtypes = (ctypes.c_int, ctypes.c_char_p)
            libc.setvbuf.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t)
            sink = _capture_file()
            stream = libc.fdopen(os.dup(sink), b"a")
            if not stream or libc.setvbuf(stream, None, 2, 0) != 0:  # 2 = _IONBF: unbuffered
                os.close(sink)
                return False
        except (OSError, AttributeError, TypeError):
            return False
        self._libc, self._stderr, self._stream, self._sink = libc, variable, stream, sink
        return True

    def _forward(self, final):
        """Read what was captured since the last read; write all but the chatter to fd 2."""
        size = os.fstat(self._sink).st_size
        data = self._pending + (os.pread(self._sink, size - self._read, self._read)
                                if size > self._read else b"")
        self._read = max(size, self._read)
        pieces = [p for p in self._LINE_ENDS.split(data) if p]
        self._pending = b""
        if pieces and not pieces[-1].endswith((b"\n", b"\r")) and not final:
            self._pending = pieces.pop()  # unfinished: judged whole at the next read
        keep, dropped = [], []
        for piece in pieces:
            found = self.CHATTER.search(piece)
            if found is not None:
                keep.append(piece[:found.start()])
                dropped.append(piece[found.start():])
            elif piece.strip():  # libpng prints its newline apart; threads may split the two
                keep.append(piece)
        text = b"".join(keep)
        while text:
            try:
                text = text[os.write(2, text):]
            except OSError:  # stderr closed or full: nothing more can be done
                break
        return dropped


class _Capture:
    def __init__(self, chatter):
        self.chatter, self.active = chatter, False

    def __enter__(self):
        self.active = self.chatter.enter()
        return self

    def __exit__(self, *exc):
        if self.active:
            self.chatter.leave()
        return False


def _capture_file() -> int:
    """An unnamed file (memory-backed where the system allows)."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("mxvision-decoder-chatter", getattr(os, "MFD_CLOEXEC", 0))
        except OSError:
            pass
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


DECODER_CHATTER = DecoderChatter()


def imdecode(data, flags):
    """``cv2.imdecode`` with the decoders' chatter captured: ``(image or None, error text)``."""
    with DECODER_CHATTER.capturing():
        try:
            return cv2.imdecode(np.frombuffer(data, np.uint8), flags), ""
        except cv2.error as exc:
            return None, str(exc)


__all__ = ["DecoderChatter", "DECODER_CHATTER", "imdecode"]
