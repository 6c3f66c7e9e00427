"""Outputs that appear complete or not at all, checked output paths, and cache locks.

Every file FlexCiM writes goes through here (the way pip, git and ccache do it):

* :func:`atomic_path` / :func:`atomic_write`: the data is written to a temporary name in the
  destination folder and ``os.replace``-d onto the final name, so an interrupt, a full disk or a
  file-size limit leaves the previous file (or none), never a truncated one;
* :func:`atomic_paths`: several files of one result (Verilog + sidecar + core, a result and its
  stats) are all written to temporary names first and renamed together at the end, with
  SIGINT/SIGTERM held off during the renames (a window of microseconds: only a SIGKILL or a power
  cut between two renames can leave a mix of old and new);
* :func:`atomic_dir`: a folder (a model directory, a cache entry) is built under a temporary name
  and renamed as a whole; ``replace=False`` is the cache form: when another process published the
  same entry first, ours is dropped;
* :func:`check_output`: an output path is validated before any work (empty name, a folder, a
  missing or unwritable folder, a read-only file, a sidecar's name, an input's path);
* :func:`file_lock`: an exclusive ``fcntl`` lock (released by the kernel when its holder dies)
  so that parallel runs build a cache entry once.

Temporary names start with ``.`` and hold the writer's pid; leftovers of a killed writer are
removed by the next writer of the same output (:func:`sweep_stale`).

This module is at the bottom of the layering (beside :mod:`flexcim.errors`): golden/, hw/, sim/
and flow/ all import it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import signal
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from flexcim.errors import FlexCimError, WorkError

TMP_MARK = ".tmp-"


def _temp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` that keeps its suffix (numpy appends ``.npy`` to
    names without it)."""
    return path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
                          f"{path.suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(path: str | os.PathLike) -> None:
    """Remove temporary siblings of ``path`` left by writers that no longer run."""
    path = Path(path)
    prefix = f".{path.stem}{TMP_MARK}"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse a directory fsync
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait (they are delivered on exit) while the block runs."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_error(path: Path, exc: OSError) -> FlexCimError:
    return WriteError(f"cannot write {str(path)!r}: {exc.strerror or exc}")


class WriteError(WorkError):
    """Writing an output failed (full disk, file-size limit, permissions): a failure of the
    work, exit status 1; the previous file, if any, is unchanged."""


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary paths for ``paths``, renamed onto them together when the block succeeds.

    Each temporary file is in its destination's folder (so the rename is atomic) and is created
    empty; the caller writes it by name.  On any exception (KeyboardInterrupt included) they are
    removed and the destinations are untouched.  An ``OSError`` becomes a one-line
    :class:`WriteError` naming the output.
    """
    finals = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for final in finals:
            sweep_stale(final)
            tmp = _temp_name(final)
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except OSError as exc:
                raise _write_error(final, exc) from None
            temps.append(tmp)
        try:
            yield list(temps)
            for tmp in temps:
                _fsync_file(tmp)
        except OSError as exc:
            raise _write_error(finals[0], exc) from None
        with _signals_held():
            for tmp, final in zip(temps, finals, strict=True):
                os.replace(tmp, final)
            temps.clear()
        for directory in {f.absolute().parent for f in finals}:
            _fsync_dir(directory)
    finally:
        for tmp in temps:
            _remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """One temporary path renamed onto ``path`` when the block succeeds (see
    :func:`atomic_paths`)."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns ``Path(path)``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed to ``path`` when the block succeeds.

    ``replace=True``: an existing ``path`` is replaced (renamed aside, then removed); there is a
    moment when ``path`` is absent, never one when it is half written.  ``replace=False`` (cache
    entries): if ``path`` exists when the block ends, another writer won and ours is dropped.
    On an exception the temporary folder is removed and ``path`` is untouched.
    """
    final = Path(path)
    sweep_stale(final)
    tmp = _temp_name(final)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _write_error(final, exc) from None
    published = False
    try:
        try:
            yield tmp
        except OSError as exc:
            raise _write_error(final, exc) from None
        with _signals_held():
            if final.exists() and not replace:
                return
            old = None
            if final.exists():
                old = _temp_name(final)
                os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if old is not None:
                    os.rename(old, final)
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and not replace:
                    return
                raise _write_error(final, exc) from None
            published = True
        if old is not None:
            _remove(old)
        _fsync_dir(final.absolute().parent)
    finally:
        if not published:
            _remove(tmp)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    The kernel drops the lock when the holder exits, however it exits, so a killed builder
    never blocks the next one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_output(path: str | os.PathLike | None, what: str, *, suffixes: Iterable[str] = (),
                 sidecars: Iterable[str] = (), inputs: Iterable[str | os.PathLike | None] = (),
                 folder: bool = False, marker: str | None = None) -> Path:
    """Validate an output path before any work; returns it as a :class:`Path`.

    Parameters
    ----------
    path : str
        The user's output path.
    what : str
        How the message names it (``"output (-o)"``).
    suffixes : list of str
        Allowed suffixes (``.npy``), if restricted.
    sidecars : list of str
        Suffixes of files written beside ``path`` (``.json``, ``.core``): ``path`` may not
        have one of them, or the sidecar would overwrite the main output.
    inputs : list of path
        Input files or folders of the same command: the output may not be one of them, nor,
        for a folder output, contain one.
    folder : bool
        The output is a folder (replaced as a whole).
    marker : str, optional
        With ``folder``: an existing non-empty folder is replaced only if it holds this file
        (a previous output of the same command), never an unrelated folder.

    Raises
    ------
    FlexCimError
        One line naming the path and what was expected.
    """
    if path is None or not str(path).strip():
        raise FlexCimError(f"{what} must be a file name, not {str(path or '')!r}")
    text = str(path)
    p = Path(text)
    if text.endswith(os.sep) and not folder:
        raise FlexCimError(f"{what} {text!r} names a folder; expected a file name")
    suffixes = tuple(suffixes)
    if suffixes and p.suffix not in suffixes:
        raise FlexCimError(f"{what} {text!r} must end in {' or '.join(suffixes)}")
    sidecars = tuple(sidecars)
    if p.suffix in sidecars:
        raise FlexCimError(f"{what} {text!r} ends in {p.suffix}, the suffix of its sidecar "
                           f"file; use another suffix")
    parent = p.absolute().parent
    if not parent.exists():
        raise FlexCimError(f"output directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise FlexCimError(f"output directory {str(parent)!r} is not a directory")
    written = [p, *(p.with_suffix(s) for s in sidecars)]
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        for target in written:
            if _same(target, inp) or (folder and p.exists() and inp.exists()
                                      and _inside(inp, p)):
                raise FlexCimError(f"{what} {text!r} would overwrite the input {str(inp)!r}")
    for target in written:
        if folder:
            break
        if target.is_dir():
            raise FlexCimError(f"{what} {str(target)!r} is a directory; expected a file name")
        if target.exists() and not os.stat(target).st_mode & (stat.S_IWUSR | stat.S_IWGRP
                                                              | stat.S_IWOTH):
            raise FlexCimError(f"{what} {str(target)!r} is read-only")
    if folder and p.exists():
        if not p.is_dir():
            raise FlexCimError(f"{what} {text!r} exists and is not a directory")
        if any(p.iterdir()) and (marker is None or not (p / marker).is_file()):
            raise FlexCimError(f"{what} {text!r} is a non-empty folder that is not a previous "
                               f"output; choose a new name")
    # The real test of writability (root ignores permission bits; a read-only mount does not).
    try:
        probe = _temp_name(parent / "probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise FlexCimError(f"output directory {str(parent)!r} is not writable: "
                           f"{exc.strerror or exc}") from None
    return p
