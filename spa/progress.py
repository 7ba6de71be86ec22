"""Progress lines: what a long stage says while it works.

Every stage takes ``progress``, a callable of one line of text (``spa.prune(..., progress=print)``;
the default says nothing).  A stage of many steps (calibration batches, the sensitivity table's
groups, OBS's groups, tokens of synthetic text) reports through :func:`stepper`, which adds how long
the rest will take, measured on the steps done so far, and says it at most once every few seconds.
:func:`printer` is what the ``spa`` command prints: each line on stderr after the seconds since the
command started and the peak memory of the process so far.  The standard library only.
"""
from __future__ import annotations

import sys
import time

#: the most often (seconds) :func:`stepper` passes a line on, after the first
EVERY = 5.0


def quiet(msg) -> None:
    """Progress that says nothing (the library's default, and ``spa --quiet``)."""


def stepper(progress, total: int, what: str, every: float = EVERY):
    """``step(i, detail="")``, to call as step ``i`` (0-based) of ``total`` starts: passes ``what
    i+1/total``, then ``detail``, and the time left (from the mean time of the steps done) to
    ``progress``, at the first step and then at most once every ``every`` seconds."""
    start, last = time.perf_counter(), [None]

    def step(i: int, detail: str = "") -> None:
        if progress is None or progress is quiet:
            return
        now = time.perf_counter()
        if last[0] is not None and now - last[0] < every:
            return
        last[0] = now
        left = f", about {_duration((now - start) / i * (total - i))} left" if i else ""
        progress(f"{what} {i + 1}/{total}{': ' + detail if detail else ''}{left}")

    return step


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def peak_gb() -> float:
    """Peak resident memory of this process so far, in GB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return 0.0
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def printer(started: float | None = None, stream=None):
    """A progress callable that writes ``spa: [  12.3s  1.25 GB] line`` to ``stream`` (stderr): the
    seconds since ``started`` (a ``time.perf_counter()``; now by default) and the peak memory."""
    t0 = time.perf_counter() if started is None else started

    def say(msg) -> None:
        print(f"spa: [{time.perf_counter() - t0:6.1f}s {peak_gb():5.2f} GB] {msg}", file=stream or sys.stderr,
              flush=True)

    return say
