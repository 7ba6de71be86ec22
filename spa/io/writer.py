"""The safe writer: every file spa writes goes through here.

A write never replaces one of the run's input files or anything that is not a regular file; it
goes to a temporary folder beside the target, is fsynced, given the umask's mode and renamed over
the target; on any failure, SIGTERM included, the temporary folder goes and the target is left as
it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from ..errors import SpaError


def check_target(path, inputs=(), *, what="output") -> Path:
    """Refuse, in one line, a write that would replace one of the run's input files (``inputs``:
    paths; hard links count) or anything that is not a regular file (a symbolic link, a device, a
    FIFO, a folder); the target's folder must exist or be creatable."""
    p = Path(path)
    if p.is_symlink():
        raise SpaError(f"{what} {p}: is a symbolic link; spa writes regular files only (give the real path)")
    if p.exists():
        if not p.is_file():
            raise SpaError(f"{what} {p}: exists and is not a regular file; spa will not replace it")
        for src in inputs:
            try:
                same = src is not None and os.path.samefile(p, src)
            except OSError:
                continue
            if same:
                raise SpaError(f"{what} {p}: is {src}, an input of this run; choose another path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SpaError(f"{what} {p}: cannot write in {parent} (not a writable folder)")
    return p


def write_atomic(path, write, *, inputs=(), what="output") -> Path:
    """Write ``path`` the safe way: ``check_target``, then ``write(tmp)`` into a temporary folder
    beside it, fsync, the mode the umask gives (0644 under 022), rename over the target.  On any
    failure, SIGTERM included, the temporary folder is removed and the target left as it was."""
    path = Path(path)
    write_files([path], lambda folder: write(os.path.join(folder, path.name)), inputs=inputs, what=what)
    return path


def write_files(targets, write, *, inputs=(), what="output") -> None:
    """``write(folder)`` makes each target's file, under its own name, in a temporary folder beside
    them; each is then fsynced, given the umask's mode and renamed over its target, in order.  The
    temporary folder goes on any failure, SIGTERM included."""
    targets = [check_target(t, inputs, what=what) for t in targets]
    parent = targets[0].parent
    with _cleanup_on_term():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(prefix=".spa-", dir=str(parent))
        except OSError as exc:
            raise SpaError(f"{what} {targets[0]}: cannot write there ({exc.strerror or exc})") from None
        try:
            write(folder)
            for final in targets:
                tmp = os.path.join(folder, final.name)
                _finish(tmp)
                os.replace(tmp, final)
            _sync_dir(parent)
        except OSError as exc:
            raise SpaError(f"{what} {targets[0]}: write failed ({exc.strerror or exc}); nothing was written") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def write_text(path, text: str, *, inputs=(), what="output") -> Path:
    """A text file (a JSON report) through ``write_atomic``."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), inputs=inputs, what=what)


def _finish(tmp) -> None:
    """fsync the written file and give it the mode a plain open() would (0666 less the umask)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    plain_mode(tmp)


def plain_mode(path) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 less the umask: 0644 under 022), not the
    0600 of ``tempfile.mkstemp``: for every file spa or its tools write through a temporary file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sync_dir(folder) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _cleanup_on_term():
    """SIGTERM during a write raises SystemExit, so that the writer's ``finally`` removes its
    temporary files (the default action would kill the process and leave them behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
