"""The exceptions mxvision raises for problems a user can fix.

Every message is one line that names the file (or thing) and the problem, so the CLI can print
``str(err)`` and exit non-zero without a traceback. Programming errors stay ordinary exceptions.
"""


class MxvisionError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code = 2

    def __init__(self, subject, problem=None):
        self.subject = str(subject)
        self.problem = problem
        super().__init__(f"{subject}: {problem}" if problem is not None else str(subject))


class BadImage(MxvisionError):
    """An image file that cannot be read as a chest X-ray (missing, corrupt, unsupported)."""


class BadIndex(MxvisionError):
    """An index CSV / folder layout that is malformed (missing columns, labels, files)."""


class DownloadError(MxvisionError):
    """A download that failed after its retries, or whose checksum did not match."""


class WeightsError(MxvisionError):
    """Pretrained weights that are unavailable, corrupt, or do not fit the network."""


class BadRun(MxvisionError):
    """A feature store, run or checkpoint directory that is missing or inconsistent."""


def one_line(value, limit=None):
    """``str(value)`` with every run of whitespace (newlines included) collapsed to one space and,
    given ``limit``, cut to that many characters ending in "...": how a library's multi-line
    exception text is quoted inside an mxvision message, which must stay one line."""
    text = " ".join(str(value).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
