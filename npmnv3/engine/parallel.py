"""Running a plan's calls, on one thread or, for one image, on several.

A plan is a flat list of ``Call`` records: a NumPy function with its arguments bound (buffers and
views made once). Running it on one thread is ``for call in calls: call()``.

One image on several cores: most calls are row-local -- a 1x1 convolution, an activation, a bias
or residual add on rows [lo, hi) of a map reads and writes only those rows. The planner says so
explicitly: such a call carries ``cuts``, the arguments that are cut into bands of spatial rows
(along which axis, in units of how many elements per row, and whether the call writes them);
every other argument is read-only and passed whole to each band (weights, bias rows).
``row_groups`` then turns consecutive cut calls into one ``Group`` of bands (band b = rows
[cut_b, cut_b+1) of every call in the group, in order), as long as nothing a band writes may
share memory with what another band reads or writes (checked with ``np.shares_memory``): a
depthwise convolution, whose windows read rows on both sides of the cut that the layer before
wrote, starts a new group, and so does a call that is not cut. Groups estimated cheaper than
``MIN_GROUP_US`` stay serial, since a handoff between threads costs tens of microseconds.

``run_steps`` runs the steps in order on the calling thread and, when asked for more threads, on
one helper thread started for this run: each group's bands are taken one at a time from a shared
iterator, by whichever thread is free (work stealing), so a late helper never holds the caller
up; the caller waits only for a band the helper has started. The same bands run whoever runs
them, so the floats do not depend on the timing. While threads share the work, Python's switch
interval is held short (``threads.switch_interval``). The helper is joined before ``run_steps``
returns, also when a call raises (the first exception is re-raised in the caller).
"""

import threading

import numpy as np

from ..threads import switch_interval

CALLER_SHARE = 0.55     # with two bands the caller's band is the larger: it starts at once
MIN_GROUP_US = 200.0    # groups estimated cheaper than this run on one thread

_TOO_HARD = getattr(getattr(np, "exceptions", np), "TooHardError", ValueError)   # NumPy < 1.25: np.


class Call:
    """One planned call ``fn(*args, **kwargs)``.

    Parameters
    ----------
    fn : callable
    *args, **kwargs
        Its arguments, bound once.
    cuts : tuple of (argument, axis, unit, writes)
        The arguments that hold rows of a map: ``argument`` is a position in ``args`` or a keyword;
        cutting the call to spatial rows [lo, hi) slices that argument to [lo * unit, hi * unit)
        along ``axis``; ``writes`` says whether the call writes it. Empty: the call cannot be cut.
        Arguments not listed are passed whole to every band and must only be read by it.
    rows : int
        The number of spatial rows the call covers (with ``cuts``).
    cost : float
        Estimated microseconds, to decide whether splitting pays.
    """

    __slots__ = ("fn", "args", "kwargs", "cuts", "rows", "cost")

    def __init__(self, fn, *args, cuts=(), rows=0, cost=0.0, **kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.cuts, self.rows, self.cost = tuple(cuts), rows, cost

    def __call__(self):
        self.fn(*self.args, **self.kwargs)

    def __repr__(self):
        return f"Call({getattr(self.fn, '__name__', self.fn)}, rows={self.rows}, cuts={len(self.cuts)})"

    def band(self, lo, hi):
        """This call restricted to spatial rows [lo, hi)."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for arg, axis, unit, _ in self.cuts:
            index = (slice(None),) * axis + (slice(lo * unit, hi * unit),)
            if isinstance(arg, int):
                args[arg] = args[arg][index]
            else:
                kwargs[arg] = kwargs[arg][index]
        return Call(self.fn, *args, cuts=self.cuts, cost=self.cost * (hi - lo) / max(self.rows, 1), **kwargs)

    def cut_arrays(self):
        """(written, read): the arrays this call writes (cut ones marked so) and reads (the other cut
        ones, and every array passed whole)."""
        values = dict(enumerate(self.args), **self.kwargs)
        cut = {arg: writes for arg, _, _, writes in self.cuts}
        written = [values[arg] for arg, writes in cut.items() if writes]
        read = [v for arg, v in values.items() if isinstance(v, np.ndarray) and not cut.get(arg, False)]
        return written, read


class Group:
    """Bands of consecutive row-local calls: ``bands[b]`` is the list of calls of band b, in order."""

    def __init__(self, bands):
        self.bands = bands

    def __call__(self):     # one thread: the bands one after the other (the same floats as in parallel)
        for band in self.bands:
            for call in band:
                call()


def band_bounds(rows, count):
    """[(lo, hi)] cutting ``rows`` spatial rows into ``count`` bands (the first a little larger), or
    None when some band would be empty."""
    if count == 2:
        cuts = [round(CALLER_SHARE * rows)]
    else:
        cuts = [round(rows * i / count) for i in range(1, count)]
    bounds = [0, *cuts, rows]
    pairs = list(zip(bounds[:-1], bounds[1:]))
    return pairs if all(lo < hi for lo, hi in pairs) else None


def _may_overlap(a, b):
    try:
        return np.shares_memory(a, b, max_work=100_000)
    except _TOO_HARD:
        return True


def _conflict(mine, theirs):
    """Whether what one band writes may meet what another reads or writes ((written, read) pairs)."""
    return any(_may_overlap(a, b) for a in mine[0] for b in theirs[0] + theirs[1]) or \
        any(_may_overlap(a, b) for a in theirs[0] for b in mine[1])


def row_groups(calls, bands, min_cost=MIN_GROUP_US):
    """Rewrite ``calls`` into steps: single ``Call`` records and ``Group`` records of ``bands`` bands."""
    steps, group = [], []           # group: [(call, its bands, per band: (written, read) arrays)]

    def flush():
        if group and sum(call.cost for call, _, _ in group) >= min_cost:
            steps.append(Group([list(band) for band in zip(*(pieces for _, pieces, _ in group))]))
        else:
            steps.extend(call for call, _, _ in group)
        group.clear()

    for call in calls:
        bounds = band_bounds(call.rows, bands) if call.cuts else None
        if bounds is None:
            flush()
            steps.append(call)
            continue
        pieces = [call.band(lo, hi) for lo, hi in bounds]
        arrays = [piece.cut_arrays() for piece in pieces]
        if any(_conflict(mine, other) for i, mine in enumerate(arrays) for other in arrays[i + 1:]):
            flush()         # its own bands would collide: it cannot be cut
            steps.append(call)
            continue
        if any(_conflict(mine, other) for _, _, theirs in group for i, mine in enumerate(arrays)
               for j, other in enumerate(theirs) if i != j):
            flush()
        group.append((call, pieces, arrays))
    flush()
    return steps


class _Run:
    """One run of planned steps by the caller and one helper thread: per group, its bands and two locks.

    ``opened[k]`` is held until the caller reaches group k (the helper waits on it). The helper holds
    ``busy[k]`` while it takes and runs a band of group k, so the caller, once no band is left to
    take, waits for the helper's band by acquiring it."""

    def __init__(self, groups):
        self.groups = groups
        self.bands = [iter(g.bands) for g in groups]
        self.opened = [threading.Lock() for _ in groups]
        self.busy = [threading.Lock() for _ in groups]
        for lock in self.opened:
            lock.acquire()
        self.error = None

    def help(self):
        """The helper thread: each group in turn, as soon as the caller opens it."""
        for k in range(len(self.groups)):
            self.opened[k].acquire()
            while self.error is None:
                with self.busy[k]:
                    band = next(self.bands[k], None)
                    if band is None:
                        break
                    try:
                        for call in band:
                            call()
                    except BaseException as exc:    # noqa: BLE001 - re-raised by the caller
                        self.error = exc
            if self.error is not None:
                return

    def run_group(self, k):
        """The caller's side of group k: open it, run bands while any is left, wait for the helper's."""
        self.opened[k].release()
        try:
            for band in self.bands[k]:      # (the same iterator the helper takes from)
                for call in band:
                    call()
        finally:
            for _ in self.bands[k]:         # after an exception here: leave nothing for the helper
                pass
            self.busy[k].acquire()          # the band the helper may be running
            self.busy[k].release()
        if self.error is not None:
            raise self.error

    def close(self):
        """After an exception in the caller: let the helper, waiting for a group never opened, go."""
        self.error = self.error or RuntimeError("the run stopped")
        for lock in self.opened:
            if lock.locked():
                lock.release()


def run_steps(steps, threads=1):
    """Run planned steps (``Call`` and ``Group``) in order; with ``threads`` > 1 the groups' bands are
    shared with one helper thread (the plans cut one image into two bands)."""
    groups = [step for step in steps if isinstance(step, Group)]
    if threads == 1 or not groups:
        for step in steps:
            step()
        return
    run = _Run(groups)
    with switch_interval():
        _run_shared(steps, run)


def _run_shared(steps, run):
    helper = threading.Thread(target=run.help, name="npmnv3-band", daemon=True)
    helper.start()
    finished = False
    try:
        k = 0
        for step in steps:
            if isinstance(step, Group):
                run.run_group(k)
                k += 1
            else:
                step()
        finished = True
    finally:
        if not finished:
            run.close()
        helper.join()


def run_tasks(tasks, threads):
    """Run independent callables (e.g. chunks of a batch) on ``threads`` threads: each thread takes the
    next task until none is left; the first exception is re-raised after all threads stopped."""
    if threads == 1 or len(tasks) == 1:
        for task in tasks:
            task()
        return
    lock, queue, errors = threading.Lock(), iter(tasks), []

    def worker():
        while True:
            with lock:
                task = None if errors else next(queue, None)
            if task is None:
                return
            try:
                task()
            except BaseException as exc:    # noqa: BLE001 - re-raised below
                with lock:
                    errors.append(exc)

    helpers = [threading.Thread(target=worker, name="npmnv3-chunk", daemon=True)
               for _ in range(min(threads, len(tasks)) - 1)]
    with switch_interval():
        for helper in helpers:
            helper.start()
        try:
            worker()
        finally:
            for helper in helpers:
                helper.join()
    if errors:
        raise errors[0]
