"""Reading lines, writing files atomically, the stderr channel for warnings, and where
llmcli keeps its cache.

Text is UTF-8 whatever the locale. Invalid bytes are replaced (U+FFFD) with one
warning per stream naming the first bad line, never a crash.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from llmcli.errors import UserError

STDIN_NAME = "-"


class _Settings:
    quiet = False


settings = _Settings()


def warn(message: str) -> None:
    """A warning on stderr, unless --quiet."""
    if not settings.quiet:
        print(f"llmcli: warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    """A progress or status line on stderr, unless --quiet."""
    if not settings.quiet:
        print(message, file=sys.stderr, flush=True)


def _display_name(path: str | os.PathLike | None) -> str:
    return "<stdin>" if path in (None, STDIN_NAME) else str(path)


def _open_binary(path: str | os.PathLike | None) -> IO[bytes]:
    if path in (None, STDIN_NAME):
        if sys.stdin is None:  # started with file descriptor 0 closed (`<&-`): no input
            return io.BytesIO()
        return sys.stdin.buffer
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a text file")
    try:
        return open(p, "rb")
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except PermissionError:
        raise UserError(f"{p}: permission denied") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None


def _is_stdin(stream: IO[bytes]) -> bool:
    return sys.stdin is not None and stream is sys.stdin.buffer


def iter_lines(path: str | os.PathLike | None) -> Iterator[str]:
    """Yield the lines of a file (or stdin for None / '-') without their line ends.

    Lazy, so a million-line file is read in bounded memory.
    """
    name = _display_name(path)
    stream = _open_binary(path)
    warned = False
    try:
        for number, raw in enumerate(stream, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                if not warned:
                    warn(f"{name}:{number}: invalid UTF-8 replaced with U+FFFD (further lines not reported)")
                    warned = True
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield line
    finally:
        if not _is_stdin(stream):
            stream.close()


def read_lines(path: str | os.PathLike | None) -> list[str]:
    return list(iter_lines(path))


def read_text(path: str | os.PathLike) -> str:
    """A whole file as text (e.g. JSON), invalid UTF-8 being a user error."""
    stream = _open_binary(path)
    try:
        data = stream.read()
    finally:
        if not _is_stdin(stream):
            stream.close()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{_display_name(path)}: not valid UTF-8 (byte {e.start})") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside `path`, then rename over it.

    A crash, Ctrl-C or kill -9 leaves either the old file or the complete new one, never half
    of one. On Linux the temporary file has no name until it is complete (O_TMPFILE), so even
    kill -9 leaves nothing behind; elsewhere a named temporary file is removed on any exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _unnamed_file(path.parent)
    if fd is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_file_mode())
    try:
        kwargs = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if tmp is None:  # give it a name only now; the window to the rename is a few syscalls
                tmp = _temporary_name(path)
                _link_fd(f.fileno(), tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _unnamed_file(directory: Path) -> tuple[int | None, None]:
    """An open file in `directory` that vanishes if the process dies (Linux O_TMPFILE); (None, None) where unsupported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or _linkat() is None or not os.path.isdir("/proc/self/fd"):
        return None, None
    try:
        return os.open(directory, flag | os.O_WRONLY, 0o600), None
    except OSError:  # a filesystem without O_TMPFILE support
        return None, None


@functools.cache
def _linkat():
    """libc's linkat: os.link calls link(2), which cannot name an O_TMPFILE file (EXDEV)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.linkat
    except (OSError, AttributeError):
        return None


def _link_fd(fd: int, name: str) -> None:
    import ctypes

    AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400  # as open(2) documents for O_TMPFILE
    if _linkat()(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, os.fsencode(name), AT_SYMLINK_FOLLOW) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), name)


def _temporary_name(path: Path) -> str:
    return str(path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def temporary_directory(path: str | os.PathLike) -> Path:
    """A new empty directory beside `path`, named as a temporary (.NAME.PID.HEX.tmp), to fill and
    then put in place with replace_directory."""
    d = Path(_temporary_name(Path(path)))
    d.mkdir(parents=True)
    return d


def replace_directory(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the complete directory `new` in place of `path`, as os.replace does for a file: a crash
    at any moment leaves the old directory or the new one under `path`, whole; the old one is
    removed after. Linux swaps the two names in one step (renameat2 RENAME_EXCHANGE); elsewhere,
    or on a filesystem without it, the old one is moved aside first, a moment with neither."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # the old one, under the temporary name now
        return
    aside = _temporary_name(path)
    os.rename(path, aside)
    os.rename(new, path)
    shutil.rmtree(aside, ignore_errors=True)


def remove_directory(path: str | os.PathLike) -> None:
    """Renamed to a temporary name first, so a crash never leaves part of it under its own name."""
    aside = _temporary_name(Path(path))
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28)
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    import ctypes

    AT_FDCWD, RENAME_EXCHANGE = -100, 2  # as rename(2) documents
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def default_file_mode() -> int:
    """0o666 less the umask: what open() would have given (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def user_cache() -> Path:
    """$XDG_CACHE_HOME, else ~/.cache: the folder llmcli's and Hugging Face's caches live in."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def cache_root() -> Path:
    """llmcli's cache (the demo, converted models): $LLMCLI_CACHE, else user_cache()/llmcli."""
    return Path(os.environ.get("LLMCLI_CACHE") or user_cache() / "llmcli")


class LineWriter:
    """Writes whole lines to stdout or a file; flushes per line on a terminal."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.interactive = stream.isatty() if hasattr(stream, "isatty") else False

    def write(self, line: str) -> None:
        # A newline inside an output would break the one-line-per-input contract: written as \n
        # (jsonl keeps it as it is).
        self.stream.write(line.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r") + "\n")
        if self.interactive:
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def output_lines(path: str | os.PathLike | None) -> Iterator[LineWriter]:
    """Lines to stdout (None or '-') or atomically to a file."""
    if path in (None, STDIN_NAME):
        writer = LineWriter(sys.stdout)
        try:
            yield writer
        finally:
            writer.flush()
    else:
        with atomic_write(path) as f:
            yield LineWriter(f)
