"""Where the time goes: the library's phases report their wall time to the collectors
that :func:`phase_times` installs, so a harness can split a pruning run into
statistics, inverses and weight updates without patching anything.

Example::

    with fastprune.profiling.phase_times() as times:
        fastprune.prune(model, WoodFisher(), 0.9, data=loader)
    print(times)   # {"stats": 1.9, "inverse": 0.3, "update": 0.1} (seconds)
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["phase_times", "phase", "timed", "PHASES"]

#: The phases reported: per-sample statistics (Fisher diagonals, blocks, per-sample
#: gradients), Fisher inverses, and OBS weight updates; for the layer-wise criteria,
#: calibration forwards (``forward``, which includes ``hessian``, the input Hessians'
#: accumulation), the damped inverse factors (``cholesky``), SparseGPT's ``sweep`` and
#: its optional least-squares ``refit``.
PHASES = ("stats", "inverse", "update", "forward", "hessian", "cholesky", "sweep", "refit")

_collectors: list[dict[str, float]] = []


@contextmanager
def phase_times() -> Iterator[dict[str, float]]:
    """While active, adds the seconds spent in each phase to the yielded dict."""
    times: dict[str, float] = defaultdict(float)
    _collectors.append(times)
    try:
        yield times
    finally:
        _collectors.remove(times)


class phase:
    """Context manager the library wraps each phase in; free when nothing collects."""

    __slots__ = ("name", "start")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.start = time.perf_counter() if _collectors else None

    def __exit__(self, *exc):
        if self.start is not None:
            elapsed = time.perf_counter() - self.start
            for times in _collectors:
                times[self.name] += elapsed


def timed(name: str):
    """Decorator: the whole call is phase ``name``."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return inner
    return wrap
