"""The fast engine that ``model(x)`` runs: the same network as the readable path, arranged for speed.

Three parts, each in its own file:

- ``prepare.py``: the weights in the engine's layouts, computed once per parameter version
  (BatchNorm folded, 1x1 convs as matrices, scales absorbed);
- ``plan.py``: for one input shape, every buffer, view and call of a forward pass, made once;
- ``parallel.py``: running a plan -- one image with its row bands spread over threads, a batch
  in chunks spread over threads.

``Engine`` ties them together: it keeps the prepared weights and a small pool of plans per input
shape, and ``run`` takes a plan for the duration of one call (two calls at once, from two
threads, each get their own plan, so they never share buffers).

Batches are cut into chunks of at most ``CHUNK`` images, as a function of N alone (so results do
not depend on the thread count); chunks run on up to ``threads`` threads. In a chunk, the first
layers (output stride <= ``PREFIX_STRIDE``: the large maps) run one image at a time so that their
buffers stay in cache, the rest on the whole chunk (GEMMs are faster on more rows). One image
runs its row bands on two threads when ``threads`` > 1 (``parallel.row_groups``); with
``threads`` = 1 no thread is started. Tapped outputs (``run(x, taps=...)``) have buffers of
their own and are exported when a run is over, so they work with any of these ways.
"""

import threading
from collections import OrderedDict
from functools import partial

import numpy as np

from ..config import Block
from ..threads import blas_threads
from .parallel import row_groups, run_tasks
from .plan import Plan, classify
from .prepare import Prepared

CHUNK = 8               # images per chunk of a batch (4 and 16 measured slower)
PREFIX_STRIDE = 4       # in a chunk, layers up to this output stride run image by image
MAX_SHAPES = 16         # input shapes whose plans are kept
MAX_FREE_PLANS = 4      # plans kept per shape (more are made when more calls overlap)


def chunk_bounds(n, size=CHUNK):
    """[(start, stop)] cutting a batch of n into an even number of chunks of at most ``size`` images."""
    count = min(n, 2 * -(-n // (2 * size)))
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def prefix_length(features, max_stride=PREFIX_STRIDE):
    """How many leading features have outputs at most ``max_stride`` times smaller than the input."""
    stride, count = 1, 0
    for layer in features:
        stride *= layer.depthwise.stride if isinstance(layer, Block) else layer.stride
        if stride > max_stride:
            break
        count += 1
    return count


class Engine:
    """Prepared weights of one parameter version, and plans for the input shapes seen.

    Parameters
    ----------
    features : list of config.Conv / config.Block
    params : parameters.Parameters
    classifier : list of config.Linear, or None for a backbone (then ``run`` returns taps only)
    """

    def __init__(self, features, params, classifier=None):
        self.version = params.version
        self.features, self.classifier = features, classifier
        self.dtype = params.dtype
        self.prepared = Prepared(params)
        self.prefix = prefix_length(features)
        self._plans = OrderedDict()     # key -> [free plans]
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plans

    def _checkout(self, key):
        with self._lock:
            free = self._plans.get(key)
            if free:
                self._plans.move_to_end(key)
                return free.pop()
        n, h, w, taps, skip, banded = key
        build = partial(Plan, self.prepared, self.features, self.classifier, n, h, w, taps=taps, skip=skip,
                        banded=banded)
        plan = build(sizes=build().arena.sizes)         # a dry pass sizes the shared buffers
        if banded:
            plan.steps = row_groups(plan.calls, bands=2)
        return plan

    def _checkin(self, key, plan):
        with self._lock:
            free = self._plans.setdefault(key, [])
            self._plans.move_to_end(key)
            if len(free) < MAX_FREE_PLANS:
                free.append(plan)
            while len(self._plans) > MAX_SHAPES:
                self._plans.popitem(last=False)

    def _with_plan(self, key, fn):
        plan = self._checkout(key)
        try:
            return fn(plan)
        finally:
            self._checkin(key, plan)

    # ------------------------------------------------------------------ running

    def run(self, x, taps=(), threads=1, layout="NCHW"):
        """Run the network on x (N, 3, H, W), C-contiguous in the engine's dtype.

        Returns a dict: each name in ``taps`` (a features.i or a sub-layer) -> its output (a new
        array, NCHW or NHWC), and "logits" -> (N, classes) when the engine has a classifier.
        """
        n = x.shape[0]
        taps = frozenset(taps)
        with blas_threads(1):   # the engine's own threads share the work; BLAS's would compete
            if n == 1:
                return self._run_one(x, taps, threads, layout)
            chunks = chunk_bounds(n)
            parts = [None] * len(chunks)        # per chunk: (taps, scale of the pooled features)
            pooled = None if self.classifier is None else np.empty((n, self.classifier[0].in_features), self.dtype)

            def task(i, a, b):
                parts[i] = self._run_chunk(x[a:b], taps, layout, None if pooled is None else pooled[a:b])
            run_tasks([partial(task, i, a, b) for i, (a, b) in enumerate(chunks)], threads)
            out = {name: np.concatenate([p[name] for p, _ in parts]) for name in parts[0][0]}
            if pooled is not None:
                out["logits"] = classify(self.prepared, self.classifier, pooled, parts[0][1])
        return out

    def _result(self, plan, out):
        if plan.logits is not None:
            out["logits"] = plan.logits.copy()
        return out

    def _pooled(self, plan, out, pooled):
        """A chunk's outputs: its taps, and (into ``pooled``, its rows of the batch's pooled features)
        the pooled features, with their scale."""
        if pooled is None:
            return out, None
        np.copyto(pooled, plan.pooled)
        return out, plan.pooled_scale

    def _run_one(self, x, taps, threads, layout):
        banded = threads > 1
        key = (1, x.shape[2], x.shape[3], taps, 0, banded)
        steps = (lambda plan: plan.steps) if banded else (lambda plan: None)
        return self._with_plan(key, lambda plan: self._result(
            plan, plan.run(x, taps, layout=layout, steps=steps(plan), threads=threads)))

    def _run_chunk(self, x, taps, layout, pooled):
        n, _, h, w = x.shape
        k = self.prefix
        if taps or k == 0 or k >= len(self.features):
            return self._with_plan((n, h, w, taps, 0, False), lambda plan: self._pooled(
                plan, plan.run(x, taps, layout=layout, classify=False), pooled))

        def go(chunk, single):
            entry = chunk.entry(k - 1)
            for i in range(n):
                single.run(x[i:i + 1], stop=k)
                np.copyto(entry[i:i + 1], single.entry(k - 1))
            return self._pooled(chunk, chunk.run(start=k, classify=False), pooled)
        return self._with_plan((n, h, w, frozenset(), k, False),
                               lambda chunk: self._with_plan((1, h, w, frozenset(), 0, False),
                                                             lambda single: go(chunk, single)))
