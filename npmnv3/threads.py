"""Threads: how many npmnv3 may use, and BLAS's own thread count held for the duration of a call.

``threads=`` on every builder says how many threads a network's forward pass may use (default:
the number of cores this process may run on). With ``threads=1`` npmnv3 starts no thread at all;
with more, the fast engine starts its helper threads at the beginning of a forward pass and
joins them before returning, so nothing keeps running between calls.

NumPy's BLAS (OpenBLAS, usually) has threads of its own. While a forward pass runs, ``blas_threads``
holds it to the number the pass asks for (1 in the fast engine, whose own threads share the
work; ``threads`` in the readable path) and restores the previous count when the pass ends, also
when it raises. This goes through ``threadpoolctl``. The count is process-wide while it is held:
NumPy code in other threads at that moment gets the same limit. Calls that overlap in time hold
the smallest count any of them asked for, and the count is restored when the last one ends.

While npmnv3's own threads share a pass, ``switch_interval`` holds Python's thread switch interval
(``sys.setswitchinterval``) at ``SWITCH_INTERVAL`` the same way: between its NumPy calls each
thread needs the GIL for a few microseconds, and with Python's default of 5 ms a thread that
asks for it while the other runs Python code can wait that long.
"""

import contextlib
import os
import sys
import threading

from threadpoolctl import ThreadpoolController

SWITCH_INTERVAL = 5e-4     # seconds: Python's thread switch interval while npmnv3's threads run

_lock = threading.Lock()
_blas = None            # a threadpoolctl controller for the BLAS libraries, found on first use


def cpu_count():
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1


def check_threads(threads):
    """``threads`` as a positive int (None: ``cpu_count()``); ValueError for anything else."""
    if threads is None:
        return cpu_count()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive integer or None, got {threads!r}")
    return threads


def _set(lib, count):
    """Set one BLAS library's thread count, from whichever thread calls.

    threadpoolctl (>= 3.6) lets only one thread, the first to set it, change OpenBLAS's process-wide
    count and silently ignores the others; every change here is made under ``_lock``, so this thread
    takes that control for the call and hands it back afterwards."""
    release = getattr(lib, "clear_controlling_thread", None)
    if release is not None:
        release(force=True)
    lib.set_num_threads(count)
    if release is not None:
        release()


class _Held:
    """A process-wide setting held, while any ``hold`` block runs, at the smallest value asked for, and
    restored when the last block ends (also when it raises). ``get()`` reads the setting, ``put(v)``
    sets it; both are called under ``_lock``."""

    def __init__(self, get, put):
        self.get, self.put = get, put
        self.requests, self.saved = [], None

    def _apply(self):
        if self.requests:
            if self.saved is None:
                self.saved = self.get()
            self.put(min(self.requests))
        elif self.saved is not None:
            self.put(self.saved)
            self.saved = None

    @contextlib.contextmanager
    def hold(self, value):
        with _lock:
            self.requests.append(value)
            self._apply()
        try:
            yield
        finally:
            with _lock:
                self.requests.remove(value)
                self._apply()


def _blas_libraries():
    global _blas
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


def _put_blas(count):
    if isinstance(count, int):
        count = [count] * len(_blas_libraries())
    for lib, c in zip(_blas_libraries(), count):
        _set(lib, c)


_blas_count = _Held(lambda: [lib.get_num_threads() for lib in _blas_libraries()], _put_blas)
_switch = _Held(sys.getswitchinterval, sys.setswitchinterval)


def blas_threads(count):
    """Hold NumPy's BLAS at ``count`` threads inside the ``with`` block (see the module docstring)."""
    return _blas_count.hold(count)


def switch_interval(seconds=SWITCH_INTERVAL):
    """Hold Python's thread switch interval at ``seconds`` inside the ``with`` block (see the module docstring)."""
    return _switch.hold(seconds)
