"""Where a run's files go: a local folder or an object store (gs://, s3://, any URL etils.epath
opens), every file written through `epath.Path`.

An object store lacks two things a file system has that the run's writers rely on: an object
cannot be appended to (gcsfs opens mode "a" as "w", dropping what was there), and it cannot be
locked. `AppendFile` therefore appends where it can and rewrites the object whole where it cannot,
and checkpointing.workdir_lock locks local workdirs only.

What counts as a failure of the storage layer (`is_storage_error`) is defined here, once: every
writer of the run (set-up, checkpoints, metrics, exports) stops on the same set.

Neither NumPy nor JAX at import: covjax.metrics imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import Callable, Iterator

from etils import epath

# Exceptions that are bugs of the code, never the storage layer's: they keep their traceback.
PROGRAMMING_ERRORS = (
    ArithmeticError, AssertionError, AttributeError, LookupError, NameError, TypeError,
)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a local path with "~" expanded and made absolute, a URL as given.
    ValueError naming the path when etils.epath opens no URL of its scheme."""
    text = os.fspath(path)
    if "://" not in text:
        return epath.Path(pathlib.Path(text).expanduser().resolve())
    try:
        return epath.Path(text)
    except KeyError:  # epath's registry of URL prefixes
        scheme = text.partition("://")[0]
        raise ValueError(f"{text}: etils.epath opens no {scheme}:// paths") from None


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on a local (POSIX) file system rather than an object store."""
    return "://" not in os.fspath(path)


def is_storage_error(error: BaseException) -> bool:
    """Whether `error`, raised while reading or writing the run's files, is the storage layer's (a
    full disk, no credentials, no such bucket, a network error, an uninstalled backend such as
    gcsfs) rather than a bug. Each backend raises its own types (OSError, ImportError, gcsfs's
    HttpError, google-auth's errors), which cannot be named without importing optional packages,
    so every Exception counts except PROGRAMMING_ERRORS."""
    return isinstance(error, Exception) and not isinstance(error, PROGRAMMING_ERRORS)


@contextlib.contextmanager
def storage_errors_as(
    wrap: Callable[[Exception], BaseException], passing: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Re-raises a storage error of the block (`is_storage_error`) as `wrap(error)`, its traceback
    logged at INFO (the one-line message hides it); a programming error, or one of `passing`,
    passes through unchanged."""
    try:
        yield
    except passing:
        raise
    except Exception as error:
        raise wrap(kept_storage_error(error)) from error


def kept_storage_error(error: Exception) -> Exception:
    """`error` when it is a storage error (`is_storage_error`), its traceback logged at INFO (the
    one-line message that reports it hides it); a programming error is raised again."""
    if not is_storage_error(error):
        raise error
    logging.info("storage error, re-raised as one line", exc_info=error)
    return error


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class AppendFile:
    """A file that grows at its end: `write` keeps bytes, `flush` adds them to the file.

    On a local file system `flush` appends to the file, opening and closing it, so an error (a
    full disk) is raised there. On an object store, which cannot append, the file's bytes are
    kept in memory (read when it is opened) and `flush` writes the object whole: one atomic write
    the size of the file, so the object is complete after every flush.
    """

    def __init__(self, path: epath.Path):
        self.path = path
        self._pending = bytearray()
        self._whole: bytearray | None = None
        if not is_local(path):
            self._whole = bytearray(path.read_bytes() if path.exists() else b"")

    def write(self, data: bytes) -> int:
        self._pending += data
        return len(data)

    def flush(self) -> None:
        if self._whole is None:
            with self.path.open("ab") as f:
                f.write(self._pending)
        else:
            self.path.write_bytes(bytes(self._whole + self._pending))
            self._whole += self._pending
        self._pending.clear()

    def close(self) -> None:
        self.flush()
