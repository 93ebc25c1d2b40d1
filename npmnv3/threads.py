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
"""

import contextlib
import os
import threading

from threadpoolctl import ThreadpoolController

_lock = threading.Lock()
_requests = []          # the counts asked for by the blocks running now
_saved = None           # [(library controller, its count before the first block)]
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


def _apply():
    global _blas, _saved
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    if _requests:
        if _saved is None:
            _saved = [(lib, lib.get_num_threads()) for lib in _blas]
        for lib in _blas:
            _set(lib, min(_requests))
    elif _saved is not None:
        for lib, count in _saved:
            _set(lib, count)
        _saved = None


@contextlib.contextmanager
def blas_threads(count):
    """Hold NumPy's BLAS at ``count`` threads inside the ``with`` block (see the module docstring)."""
    with _lock:
        _requests.append(count)
        _apply()
    try:
        yield
    finally:
        with _lock:
            _requests.remove(count)
            _apply()
