"""The fast forward pass that ``model(x)`` runs: same network as ``forward_reference``, laid out for speed.

Everything here is plain NumPy; what makes it fast is how the work is arranged, not what is computed.
``tests/test_fast.py`` holds it to ``forward_reference`` and to torchvision.

Layout
    Activations are NHWC and C-contiguous: an (N, H, W, C) map is also an (N*H*W, C) matrix, so a 1x1
    convolution is one ``np.matmul(x2d, W, out=...)`` (BLAS GEMM), and an (N*H, W*C) matrix whose rows
    are long and contiguous, which is what element-wise passes and the depthwise kernel want.

Weights, prepared once in ``FastEngine.__init__`` (float64 arithmetic, then cast to ``model.dtype``)
    - BatchNorm is folded into the conv before it (``kernels.fold_batch_norm``): one weight, one bias.
    - 1x1 conv / linear weights are stored (C_in, C_out) for ``x2d @ W``.
    - Depthwise weights are stored (k, k, C) and tiled along W per input size (see "Depthwise").
    - Activation scales. Hard-swish is computed as ``x * clip(x + 3, 0, 6)``, i.e. 6 * hswish(x): the
      1/6 is not applied but remembered as the tensor's *scale* (stored value = scale * true value).
      Every linear op divides its weight by its input's scale, so pre-activations always have scale 1.
      ReLU keeps the scale. Where a scaled tensor meets a residual add (Large's first block takes the
      stem's hard-swish output), the projection conv multiplies its weight and bias by that scale, so
      both addends share it. ``features.i`` are divided by their scale only when they are returned.
    - Offsets. A block output feeding a 1x1 conv is stored *without* its projection bias (stored =
      scale * value - offset): the next expand / head conv adds ``offset @ W`` to its own bias for free,
      and a residual add carries the offset along (offset_out = bias + offset_in). Only a block whose
      output goes straight into a (zero-padded) depthwise conv adds its bias, there it cannot be moved.
    - SE's hard-sigmoid ``clip(z / 6 + 1/2, 0, 1)`` folds its 1/6 and 1/2 into fc2's weight and bias.

Per input shape (and thread) a ``_Plan`` is built once and cached: every buffer, every view
(including the ``as_strided`` windows of the depthwise convs) and every tiled bias row is made up
front, and ``forward`` is then a flat list of NumPy calls with pre-bound arguments (few Python
operations). Large buffers are shared between layers by role (expanded map, padded map, depthwise
output, scratch); each block output has its own (small) buffer with one extra channel held at 1,
so that the next 1x1 conv's bias rides inside its GEMM as one more row of the weight.

Depthwise conv (the layer NumPy is worst at)
    Stride 1: the zero-padded input (N, Hp, Wp, C) is seen as rows of Wp*C floats, and one ``as_strided``
    view ``V[n, h, i, j, x] = xpad[n, h + i*d, j*d*C + x]`` (x < W_out*C) turns the convolution into one
    ``np.einsum('nhijx,ijx->nhx', V, Wtiled)`` whose inner loop runs over W_out*C contiguous values with
    no temporaries; ``Wtiled[i, j, w*C + c] = weight[c, i, j]``.
    Stride 2 on large maps: the padded input is split into its four space-to-depth phase planes
    (even/odd rows x even/odd columns); tap (i, j) reads plane (i % 2, j % 2) at offset (i // 2, j // 2)
    with stride 1, so each plane is again one rows-einsum (4 einsums, summed). The planes have their own
    buffers (zero borders written once); the activation runs in place on the contiguous expanded map
    and four strided copies fill the plane interiors (activating straight into them was 2x slower).
    Stride 2 on small maps: one einsum over a 6-d view with inner loop C (the phase copies cost more).

Element-wise passes
    ReLU is ``np.clip(x, 0, BIG, out=x)`` with two finite bounds (with ``None`` NumPy routes to
    ``maximum``, 3-5x slower here). Biases are added as pre-tiled (W*C,) rows to (N*H, W*C) matrices:
    broadcasting a short (C,) row is much slower when C is small. The last activation of a layer writes
    straight into the next buffer (e.g. the padded depthwise input), so padding costs no extra copy.

Stem: the 3x3 stride-2 conv on 3 channels is im2col (one strided copy into a (27 + 1, P) matrix whose
last row is ones, so the bias rides inside the GEMM) and one matmul.

Squeeze-excite: the spatial mean is a GEMV with a (1/P)-filled vector; the channel scale is applied
either to the map or, when the map has more positions than the projection has outputs, to a per-image
copy of the projection weight (``(x * e) @ W == x @ (e[:, None] * W)``), whichever touches fewer floats.

Threads: N > 1 is cut into chunks of up to 8 images (a multiple of the core count of them) that run
on a small thread pool (NumPy's ufuncs, einsum and matmul release the GIL). Inside a chunk the first
blocks (output stride <= 4: large, memory-bound maps) run one image at a time so that their buffers
stay in cache, and the rest (small maps, where GEMMs gain from more rows) on the whole chunk. During every forward
OpenBLAS is set to 1 thread through its C API (found with ctypes in the loaded NumPy; process-wide,
restored afterwards; skipped when not found): for batches so that the two levels of threading do not
fight, and also for N == 1. Measured on the 2-core machine, BLAS's second thread saved at best 15% at
N == 1 but its spinning workers (OpenBLAS keeps them busy-waiting after each call) made the median
2-3x worse whenever anything else ran, torch included.

One image (N == 1) on two cores: the calling thread plus one persistent helper thread (``_Worker``).
The N == 1 plan is rewritten once (``_parallelize``): each row-independent call (1x1 conv GEMMs,
depthwise einsums, activations, bias / residual adds, copies, zero-border fills, the SE map scaling)
is cut into two row bands (at 55% of the spatial rows, on whole rows so that consecutive layers' bands
line up), and consecutive cut calls form one group as long as no band touches memory (checked with
``np.shares_memory`` at build time) of another band of the group; a depthwise conv, which reads rows
across the cut, starts a new group, so a block is ~1 group (consecutive blocks use alternating
buffers so that nothing else forces a barrier). A group runs as: the caller takes bands from a shared
iterator starting with the first; the helper, woken through a lock, takes what is left (work
stealing: if it is late, e.g. its core is busy, the caller does everything and waits only for a band
the helper has actually started). Groups estimated under ``SPLIT_MIN_US`` of work stay serial (a
handoff costs ~25-50 us). Every N == 1 forward without intermediates runs this plan, on two threads
when the helper is free (one forward at a time uses it; batches, whose chunks already use both
cores, never do) and split forwards have not just been measured slower than serial ones
(``FastEngine._run_single``: when the other core is busy the split lost ~15-30%; after 3 slower ones
it backs off for 20 forwards and tries again), otherwise serially (the bands one after the other on
the caller): the same calls either way, hence the same floats (cutting a GEMM into row bands can
change its last bits). Large at 224: 24 groups, 11.9 -> 9.2 ms.
"""

import ctypes
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import SimpleNamespace

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .config import BN_EPS
from .kernels import conv_output_size, fold_batch_norm

BIG = float(np.finfo(np.float32).max)   # a finite upper bound makes np.clip take its fast path
HS_SCALE = 6.0                          # x * clip(x + 3, 0, 6) is 6 * hard_swish(x)
CHUNK = 8                               # images per thread task for batches (4 and 16 measured)
MAX_PLANS = 16                          # cached (shape, thread) plans per engine
PREFIX_STRIDE = 4                       # in a chunk, blocks up to this output stride run per image
SPLIT = True                            # N == 1: row-split large layers over the caller + one worker
SPLIT_CUTS = (0.55,)                    # N == 1: row bands cut at these fractions (caller: first)
SPLIT_MIN_US = 200.0                    # estimated work below which a group stays on one core
SPLIT_SLOW = 3                          # after this many split N == 1 forwards in a row slower than
SPLIT_BACKOFF = 20                      # one-thread ones, this many run on one thread


# --------------------------------------------------------------------------- BLAS thread control

class _BlasThreads:
    """Set OpenBLAS's thread count through its C API (found in the loaded NumPy via ctypes)."""

    def __init__(self):
        self._set = self._get = None
        self._lock, self._active, self._previous = threading.Lock(), 0, None
        lib = self._find_openblas()
        if lib is None:
            return
        for suffix in ("", "64_", "_64"):
            for prefix in ("scipy_openblas", "openblas"):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    getter.argtypes, getter.restype = [], ctypes.c_int
                    self._set, self._get = setter, getter
                    return

    @staticmethod
    def _find_openblas():
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
        except OSError:
            return None
        for path in sorted(paths):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
        return None

    def get(self):
        return self._get() if self._get else None

    def set(self, n):
        if self._set and n:
            self._set(int(n))

    def hold_one(self):
        """Enter a forward: BLAS at 1 thread while any forward runs (counted: with concurrent
        forwards, the first to finish must not restore the count under the others, whose GEMMs
        would then change their last bits)."""
        with self._lock:
            if self._active == 0:
                self._previous = self.get()
                self.set(1)
            self._active += 1

    def release(self):
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.set(self._previous)


_BLAS = _BlasThreads()
_POOL = None
_POOL_LOCK = threading.Lock()


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, min(_cpu_count(), 8)), thread_name_prefix="npmnv3")
        return _POOL


# --------------------------------------------------------------------------- weight preparation

def _fold(params, name, in_scale=1.0, out_scale=1.0):
    """conv + BN -> (weight (O, C, kh, kw), bias (O,)) in float64, scaled for input/output scales."""
    w, b = fold_batch_norm(np.asarray(params[f"{name}.0.weight"], np.float64),
                           *(params[f"{name}.1.{f}"] for f in ("running_mean", "running_var", "weight", "bias")),
                           eps=BN_EPS)
    return w * (out_scale / in_scale), b * out_scale


def _prepare(model):
    """All weights in the engine's layout, in model.dtype. Returns (stem, blocks, head) dicts."""
    p, dt = model.params, model.dtype
    cast = lambda a: np.ascontiguousarray(a, dtype=dt)
    layers = {layer["name"]: layer for layer in model.layers}

    # stem: rows (c, i, j) of the im2col matrix plus a bias row for its row of ones
    w, b = _fold(p, "features.0")
    stem = dict(w=cast(np.vstack([w.reshape(w.shape[0], -1).T, b[None]])), cout=w.shape[0], scale=HS_SCALE)

    # the block outputs are stored as scale * value - offset (see the module docstring)
    scale, offset = stem["scale"], np.zeros(stem["cout"])
    blocks = []
    for i, blk in enumerate(model.blocks, start=1):
        names = [n for n in layers if n.startswith(f"features.{i}.block.")]
        d = dict(cin=blk.in_channels, exp=blk.expanded, cout=blk.out_channels, act=blk.activation,
                 k=blk.kernel, stride=blk.depthwise_stride, dilation=blk.dilation,
                 residual=blk.use_residual, in_scale=scale, in_offset=offset, expand=None, se=None)
        act_scale = HS_SCALE if blk.activation == "HS" else 1.0
        j = 0
        x_scale = scale
        if blk.has_expand:
            w, b = _fold(p, names[j], in_scale=x_scale)
            w2d = w[:, :, 0, 0].T
            b = b + offset @ w2d                                    # the input's offset, undone here
            d["expand"] = (cast(w2d), cast(b), cast(np.vstack([w2d, b[None]])))
            x_scale, j = act_scale, j + 1
        w, b = _fold(p, names[j], in_scale=x_scale)
        d["dw"] = (np.asarray(w[:, 0].transpose(1, 2, 0), dt), cast(b))      # (k, k, C)
        x_scale, j = act_scale, j + 1
        if blk.use_se:
            n = names[j]
            w1 = np.asarray(p[f"{n}.fc1.weight"], np.float64)[:, :, 0, 0].T / x_scale
            w2 = np.asarray(p[f"{n}.fc2.weight"], np.float64)[:, :, 0, 0].T / 6.0
            b2 = np.asarray(p[f"{n}.fc2.bias"], np.float64) / 6.0 + 0.5
            d["se"] = (cast(w1), cast(p[f"{n}.fc1.bias"]), cast(w2), cast(b2))
            j += 1
        out_scale = scale if blk.use_residual else 1.0
        w, b = _fold(p, names[j], in_scale=x_scale, out_scale=out_scale)
        bias = b + offset if blk.use_residual else b        # the residual brings its offset along
        following = model.blocks[i] if i < len(model.blocks) else None
        if following is not None and not following.has_expand:
            d["project"] = (cast(w[:, :, 0, 0].T), cast(bias))      # a depthwise conv follows:
            offset = np.zeros(len(b))                                # (zero padding) add the bias
        else:
            d["project"] = (cast(w[:, :, 0, 0].T), None)            # a 1x1 conv follows: it adds
            offset = bias                                            # the bias for free
        scale = out_scale
        d["out_scale"], d["out_offset"] = scale, cast(offset)
        blocks.append(d)

    w, b = _fold(p, f"features.{len(model.blocks) + 1}", in_scale=scale)
    b = b + offset @ w[:, :, 0, 0].T
    w_aug = np.vstack([w[:, :, 0, 0].T, b[None]])
    w0 = np.asarray(p["classifier.0.weight"], np.float64).T / HS_SCALE
    w3 = np.asarray(p["classifier.3.weight"], np.float64).T / HS_SCALE
    head = dict(conv=(cast(w[:, :, 0, 0].T), cast(b), cast(w_aug)),
                fc0=(cast(w0), cast(p["classifier.0.bias"])),
                fc3=(cast(w3), cast(p["classifier.3.bias"])))
    return stem, blocks, head


# --------------------------------------------------------------------------- element-wise kernels

def _relu(y, out):
    np.clip(y, 0, BIG, out=out)


def _hswish6(y, tmp, out):
    """out = y * clip(y + 3, 0, 6) = 6 * hard_swish(y); tmp is scratch of y's shape.

    As y * (clip(y, -3, 3) + 3): the same floats (y + 3 is rounded once either way), and the
    in-place + 3 on the freshly written tmp is cheaper than an add from y (measured 55 vs 64 us
    per 188k floats)."""
    np.clip(y, -3, 3, out=tmp)
    tmp += 3
    np.multiply(y, tmp, out=out)


def _bias_act(y_rows, bias_row, act, y, tmp, out):
    """y += bias (a tiled row; None: already in), then the activation from y into out (may be y)."""
    if bias_row is not None:
        y_rows += bias_row
    if act == "HS":
        _hswish6(y, tmp, out)
    elif act == "RE":
        _relu(y, out)
    elif out is not y:
        np.copyto(out, y)


# --------------------------------------------------------------------------- plan (per input shape)

class _Arena:
    """Buffers shared between layers by role; sized in a first (dry) build, filled in the second.

    While ``skipping`` (layers of a plan that will never run them) it hands out stand-ins too."""

    def __init__(self, dtype, sizes=None):
        self.dtype = dtype
        self.sizes = {} if sizes is None else sizes
        self.dry = sizes is None
        self.skipping = False
        self.suffix = ""        # appended to roles (alternating per block in split plans)
        self.flat = {} if self.dry else {r: np.empty(s, dtype) for r, s in sizes.items()}

    @property
    def real(self):
        return not (self.dry or self.skipping)

    def get(self, role, shape):
        role += self.suffix
        size = int(np.prod(shape))
        if not self.real:   # a stand-in that allocates nothing and is never run
            if not self.skipping:
                self.sizes[role] = max(self.sizes.get(role, 0), size)
            return np.broadcast_to(np.zeros((), self.dtype), shape)
        return self.flat[role][:size].reshape(shape)


def _rows(x):
    """(n, h, w, c) -> the (n*h*w, c) matrix view."""
    return x.reshape(-1, x.shape[-1])


def _tile_row(v, width):
    """(C,) -> (width * C,): the row added to an (N*H, W*C) view."""
    return np.tile(v, width)


def _zero_border(xp, p):
    """Calls that zero the p-wide border of an (n, Hp, Wp, C) buffer: 2 strided views."""
    n, hp, wp, c = xp.shape
    row, isz = wp * c, xp.itemsize
    top_bottom = as_strided(xp, (n, 2, p * row), (xp.strides[0], (hp - p) * row * isz, isz))
    # the right border of row r and the left border of row r + 1 are adjacent in memory
    start = ((p - 1) * row + (wp - p) * c)
    sides = as_strided(xp.reshape(-1)[start:],
                       (n, hp - 2 * p + 1, 2 * p * c), (xp.strides[0], row * isz, isz))
    return [partial(np.copyto, top_bottom, 0), partial(np.copyto, sides, 0)]


def _rows_einsum(xp, w, ho, wo, dil, out_rows):
    """Stride-1 depthwise as one einsum over rows: see the module docstring."""
    n, hp, wp, c = xp.shape
    k, isz = w.shape[0], xp.itemsize
    row = wp * c * isz
    view = as_strided(xp, (n, ho, k, k, wo * c), (xp.strides[0], row, dil * row, dil * c * isz, isz))
    wt = np.ascontiguousarray(np.tile(w.reshape(k, k, 1, c), (1, 1, wo, 1)).reshape(k, k, wo * c))
    return [partial(np.einsum, "nhijx,ijx->nhx", view, wt, out=out_rows)]


def _strided_einsum(xp, w, ho, wo, stride, out4):
    """Depthwise with stride as one einsum over a 6-d view (inner loop C)."""
    n, hp, wp, c = xp.shape
    k, isz = w.shape[0], xp.itemsize
    row = wp * c * isz
    view = as_strided(xp, (n, ho, k, k, wo, c),
                      (xp.strides[0], stride * row, row, c * isz, stride * c * isz, isz))
    wt = np.ascontiguousarray(np.broadcast_to(w[:, :, None, :], (k, k, wo, c)))
    return [partial(np.einsum, "nhijwc,ijwc->nhwc", view, wt, out=out4)]


def _phase_planes(arena, key, n, h, w, c, pad):
    """The four space-to-depth phase planes of the zero-padded (n, h + 2 pad, w + 2 pad, c) map.

    Plane (a, b) holds padded rows a, a + 2, ... and columns b, b + 2, ...; its own buffer (role
    ``key``), so its zero border is written once. Returns (planes, parts) where parts lists, per
    plane, the (row slice, column slice) of the unpadded map that lands in the plane's interior and
    that interior's view: writing them all is the same as padding then splitting, without the copies.
    """
    hp, wp = h + 2 * pad, w + 2 * pad
    planes, parts = {}, []
    for a in range(2):
        for b in range(2):
            plane = arena.get(f"{key}.phase{a}{b}", (n, (hp - a + 1) // 2, (wp - b + 1) // 2, c))
            if arena.real:
                plane[...] = 0
            planes[a, b] = plane
            h0, w0 = (a - pad) % 2, (b - pad) % 2          # first source row / column in this plane
            rows, cols = len(range(h0, h, 2)), len(range(w0, w, 2))
            m0, q0 = (h0 + pad) // 2, (w0 + pad) // 2
            if rows and cols:
                parts.append(((slice(h0, None, 2), slice(w0, None, 2)),
                              plane[:, m0:m0 + rows, q0:q0 + cols]))
    return planes, parts


def _phase_einsum(planes, w, ho, wo, arena, out_rows):
    """Stride-2 depthwise from the four phase planes: tap (i, j) reads plane (i % 2, j % 2) at
    offset (i // 2, j // 2) with stride 1, so each plane is one rows-einsum; the four are summed."""
    k = w.shape[0]
    steps, first = [], True
    tmp = arena.get("dw_phase_tmp", out_rows.shape)
    for (a, b), plane in planes.items():
        n, _, pw, c = plane.shape
        ka, kb = (k - a + 1) // 2, (k - b + 1) // 2
        isz = plane.itemsize
        row = pw * c * isz
        view = as_strided(plane, (n, ho, ka, kb, wo * c), (plane.strides[0], row, row, c * isz, isz))
        wt = np.ascontiguousarray(np.tile(w[a::2, b::2].reshape(ka, kb, 1, c), (1, 1, wo, 1))
                                  .reshape(ka, kb, wo * c))
        target = out_rows if first else tmp
        steps.append(partial(np.einsum, "nhijx,ijx->nhx", view, wt, out=target))
        if not first:
            steps.append(partial(np.add, out_rows, tmp, out=out_rows))
        first = False
    return steps


def _se_gate(d_map, w1, b1, w2, b2, mean_vec, out):
    """Squeeze-excite gate (n, C) in [0, 1] for d_map (n, P, C) into ``out`` (scales pre-folded)."""
    m = np.matmul(mean_vec, d_map)[:, 0]           # (n, C): mean over positions as a GEMV
    z = m @ w1
    z += b1
    np.clip(z, 0, BIG, out=z)
    np.matmul(z, w2, out=out)
    out += b2
    np.clip(out, 0, 1, out=out)


class _Plan:
    """Buffers, views and the list of calls for one (n, H, W) input shape."""

    def __init__(self, engine, n, h, w, sizes=None, skip=0, split=False):
        """skip: features.0 .. features.<skip - 1> will never run here (their rows are filled by
        the caller into features.<skip - 1>'s buffer), so they get no buffers."""
        self.arena = arena = _Arena(engine.dtype, sizes)
        arena.skipping = skip > 1
        dt = engine.dtype
        self.stages = []                # (calls, (feature name, NHWC view, scale)) per features.i
        self.widths = {}                # rows of an (H * W, C) matrix -> W (for the row splits)
        self.block_buffers = [None]     # per features.i (blocks only): its whole output buffer
        self.steps = []
        add = self._add

        # ---- stem: zero-padded NCHW copy, im2col with a row of ones, one matmul, hard-swish
        stem = engine.stem
        xpad = arena.get("stem_pad", (n, 3, h + 2, w + 2))      # roles used by the stem only:
        self.x_interior = xpad[:, :, 1:-1, 1:-1]
        h1, w1 = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        self.widths[h1 * w1] = w1
        cols = arena.get("stem_cols", (28, n * h1 * w1))
        if arena.real:                                          # their constant parts are set once
            xpad[...] = 0
            cols[27] = 1
        s = xpad.strides
        window = as_strided(xpad, (3, 3, 3, n, h1, w1), (s[1], s[2], s[3], s[0], 2 * s[2], 2 * s[3]))
        add([partial(np.copyto, cols[:27].reshape(3, 3, 3, n, h1, w1), window)])
        c0 = stem["cout"]
        y = arena.get("stem", (n, h1, w1, c0))
        t = arena.get("tmp", y.shape)
        x = arena.get("x0", y.shape)
        add([partial(np.matmul, cols.T, stem["w"], out=y.reshape(-1, c0)),
             partial(_hswish6, y, t, x)])
        self._end_stage("features.0", x, stem["scale"])
        h, w, x_aug = h1, w1, None

        # ---- bneck blocks
        for i, blk in enumerate(engine.blocks, start=1):
            arena.skipping = i < skip - 1
            if split:   # consecutive blocks share no buffer, so their row bands can share a handoff
                arena.suffix = f".{i % 2}"
            x, x_aug, h, w = self._block(blk, x, x_aug, h, w, n, add)
            self.block_buffers.append(x if x_aug is None else x_aug)
            self._end_stage(f"features.{i}", x, blk["out_scale"], blk["out_offset"])

        # ---- head conv, pool, classifier
        if split:
            arena.suffix = f".{(len(engine.blocks) + 1) % 2}"
        wh, bh, wh_aug = engine.head["conv"]
        ch = wh.shape[1]
        y = arena.get("exp", (n, h, w, ch))
        t = arena.get("tmp", y.shape)
        if x_aug is not None:   # the bias rides in the GEMM (see _block)
            add([partial(np.matmul, _rows(x_aug), wh_aug, out=y.reshape(-1, ch)),
                 partial(_bias_act, None, None, "HS", y, t, y)])
        else:
            add([partial(np.matmul, _rows(x), wh, out=y.reshape(-1, ch)),
                 partial(_bias_act, y.reshape(n * h, w * ch), _tile_row(bh, w), "HS", y, t, y)])
        self._end_stage(f"features.{len(engine.blocks) + 1}", y, HS_SCALE)
        self.head_map = y.reshape(n, h * w, ch)
        self.mean_vec = np.full((1, h * w), 1.0 / (h * w), dt)

    def parallelize(self, fractions, min_us):
        """Make this (N == 1) plan run its large layers on two cores (see ``_parallelize``)."""
        _worker()
        self.backoff, self.single, self.slow = 2, None, 0    # see FastEngine._run_single
        self.mode = SimpleNamespace(serial=False)
        steps = _parallelize([s for stage, _ in self.stages for s in stage], self.widths, fractions, min_us,
                             self.mode)
        # groups may cross stage boundaries: all calls go to the last stage (such a plan is never
        # asked for intermediate features nor run as a prefix)
        self.stages = [([], info) for _, info in self.stages[:-1]] + [(steps, self.stages[-1][1])]

    def _add(self, calls):
        self.steps.extend(calls)

    def _end_stage(self, name, view, scale, offset=None):
        """The calls so far produce features.<i> in ``view`` (stored as scale * value - offset)."""
        self.stages.append((self.steps, (name, view, scale, offset)))
        self.steps = []

    def _phase_expand(self, x_aug, w_aug, act, parts, n, e):
        """Expand conv of a stride-2 block computed phase by phase: the 1x1 conv is per pixel, so
        gathering the (narrow) input into phase order first lets each GEMM's activation write
        straight into its phase plane, instead of copying the (wide) expanded map four times."""
        calls, start = [], 0
        cin = x_aug.shape[-1]
        for (hs, ws), out in parts:
            src = x_aug[:, hs, ws]
            rows, cols = src.shape[1:3]
            size = n * rows * cols
            g = self.arena.get("gather", (n * x_aug.shape[1] * x_aug.shape[2], cin))[start:start + size]
            y = self.arena.get("exp", (n * x_aug.shape[1] * x_aug.shape[2], e))[start:start + size]
            t = self.arena.get("tmp", (n * x_aug.shape[1] * x_aug.shape[2], e))[start:start + size]
            y4, t4 = y.reshape(n, rows, cols, e), t.reshape(n, rows, cols, e)
            calls += [partial(np.copyto, g.reshape(n, rows, cols, cin), src),
                      partial(np.matmul, g, w_aug, out=y),
                      partial(_bias_act, None, None, act, y4, t4, out)]
            start += size
        return calls

    def _block(self, blk, x, x_aug, h, w, n, add):
        """Calls for one bneck block. x: its input (n, h, w, C) view; x_aug: the same with the
        column of ones (n, h, w, C + 1), or None. Returns (output, output with ones, ho, wo)."""
        arena, dt = self.arena, self.arena.dtype
        e, k, dil, stride = blk["exp"], blk["k"], blk["dilation"], blk["stride"]
        pad = (k - 1) // 2 * dil
        hp, wp = h + 2 * pad, w + 2 * pad
        ho = conv_output_size(h, k, stride, pad, dil)
        wo = conv_output_size(w, k, stride, pad, dil)
        self.widths.setdefault(h * w, w)
        self.widths.setdefault(ho * wo, wo)

        # 1x1 expand -> BN -> act, written straight into the depthwise conv's zero-padded input:
        # one padded buffer, or for stride 2 on large maps its four phase planes
        use_phases = stride == 2 and wo >= 16
        if use_phases:
            planes, parts = _phase_planes(arena, f"block{len(self.stages)}", n, h, w, e, pad)
        else:
            xp = arena.get("pad", (n, hp, wp, e))
            parts = [((slice(None), slice(None)), xp[:, pad:pad + h, pad:pad + w, :])]
            add(_zero_border(xp, pad))          # the buffer is shared with other layers
        if blk["expand"] is not None:
            we, be, we_aug = blk["expand"]
            y = arena.get("exp", (n, h, w, e))
            t = arena.get("tmp", y.shape)
            y_rows = y.reshape(n * h, w * e)
            if use_phases and x_aug is not None and n > 1:
                # measured: 2.5% faster for Large in chunks of 4, 3.5% slower for one image
                add(self._phase_expand(x_aug, we_aug, blk["act"], parts, n, e))
            else:
                if x_aug is not None:   # the bias rides in the GEMM on the input's column of ones
                    add([partial(np.matmul, _rows(x_aug), we_aug, out=y.reshape(-1, e))])
                    bias_row = None
                else:
                    add([partial(np.matmul, x.reshape(-1, x.shape[-1]), we, out=y.reshape(-1, e))])
                    bias_row = _tile_row(be, w)
                if use_phases:      # activation in place (contiguous, fast), then 4 strided copies
                    add([partial(_bias_act, y_rows, bias_row, blk["act"], y, t, y)]
                        + [partial(np.copyto, out, y[:, hs, ws]) for (hs, ws), out in parts])
                else:
                    add([partial(_bias_act, y_rows, bias_row, blk["act"], y, t, parts[0][1])])
        else:
            assert not blk["in_offset"].any(), "a block without expand conv needs an exact input"
            add([partial(np.copyto, out, x[:, hs, ws]) for (hs, ws), out in parts])

        # depthwise kxk -> BN -> act (in place)
        wd, bd = blk["dw"]
        d = arena.get("dw", (n, ho, wo, e))
        d_rows = d.reshape(n * ho, wo * e)
        if use_phases:
            add(_phase_einsum(planes, wd, ho, wo, arena, d.reshape(n, ho, wo * e)))
        elif stride == 1:
            add(_rows_einsum(xp, wd, ho, wo, dil, d.reshape(n, ho, wo * e)))
        else:
            add(_strided_einsum(xp, wd, ho, wo, stride, d))
        t = arena.get("tmp", d.shape)
        add([partial(_bias_act, d_rows, _tile_row(bd, wo), blk["act"], d, t, d)])

        # squeeze-excite, then 1x1 project -> BN (+ residual), into the block's own output buffer
        # whose last channel is a column of ones for the next 1x1 conv's bias (written once, as the
        # GEMM writes the other channels; a residual add over whole rows is faster than over the
        # first C channels when C is small, and then the ones, made twos, are rewritten). Not when
        # the residual input has no such column (Large's first block): the add would then run over
        # C-wide pieces (0.2 ms for C = 16 at 112x112, 5x the contiguous add).
        wp_, bp = blk["project"]
        cout = wp_.shape[1]
        residual_full = blk["residual"] and x_aug is not None
        ones = residual_full or not blk["residual"]
        width = cout + 1 if ones else cout
        out_aug = arena.get(f"out{len(self.stages)}", (n, ho, wo, width))
        if ones and arena.real:
            out_aug[..., cout] = 1
        out = out_aug[..., :cout]
        d3, out3 = d.reshape(n, ho * wo, e), out_aug.reshape(n, ho * wo, width)[:, :, :cout]
        out2d = _rows(out_aug)[:, :cout]
        if blk["se"] is not None:
            # the gate, then applied to per-image copies of the projection weight (in a buffer made
            # once: a fresh megabyte per call costs page faults) or to the map, whichever touches
            # fewer floats (x * e) @ W == x @ (e[:, None] * W); separate calls so that the map-sized
            # ones can be row-split at N == 1
            mean_vec = np.full((1, ho * wo), 1.0 / (ho * wo), dt)
            gate = arena.get("se_gate", (n, e))
            add([partial(_se_gate, d3, *blk["se"], mean_vec, gate)])
            if ho * wo > cout:      # fewer floats to scale in the weight than in the map
                w_buf = arena.get("se_weight", (n, e, cout))
                add([partial(np.multiply, gate[:, :, None], wp_, out=w_buf)])
                if n == 1:
                    add([partial(np.matmul, d.reshape(-1, e), w_buf[0], out=out2d)])
                else:
                    add([partial(np.matmul, d3, w_buf, out=out3)])
            else:
                add([partial(np.multiply, d, gate[:, None, None, :], out=d),
                     partial(np.matmul, d.reshape(-1, e), wp_, out=out2d)])
        else:
            add([partial(np.matmul, d.reshape(-1, e), wp_, out=out2d)])
        if bp is not None:      # the bias is added only where a depthwise conv follows
            out_rows = out_aug.reshape(n * ho, wo * width)
            add([partial(np.add, out_rows, _tile_row(np.append(bp, 0) if ones else bp, wo), out=out_rows)])
        if residual_full:
            add([partial(np.add, out_aug, x_aug, out=out_aug),      # whole rows: long inner loops
                 partial(np.copyto, out_aug[..., cout], 1)])
        elif blk["residual"]:
            add([partial(np.add, out, x, out=out)])
        return out, (out_aug if ones else None), ho, wo

    def run_prefix(self, x, stop):
        """Run features.0 .. features.<stop - 1> only, on x (n, 3, H, W)."""
        np.copyto(self.x_interior, x)
        for steps, _ in self.stages[:stop]:
            for step in steps:
                step()

    def run(self, x, logits, fc0, fc3, features=None, start=0):
        """x: (n, 3, H, W) NCHW chunk; writes logits (n, classes); NCHW features into ``features``.
        With ``start`` > 0, x is ignored: the caller filled features.<start - 1>'s buffer."""
        if start == 0:
            np.copyto(self.x_interior, x)
        for steps, (name, view, scale, offset) in self.stages[start:]:
            for step in steps:
                step()
            if features is not None:    # buffers are reused later: copy out now, as NCHW
                f = view.transpose(0, 3, 1, 2).copy()     # C order, never a view
                if offset is not None:
                    f += offset[:, None, None]
                if scale != 1:
                    f *= 1.0 / scale
                features[name] = f
        pooled = np.matmul(self.mean_vec, self.head_map)[:, 0]
        z = pooled @ fc0[0]
        z += fc0[1]
        z6 = np.empty_like(z)
        _hswish6(z, z6, z6)
        np.matmul(z6, fc3[0], out=logits)
        logits += fc3[1]


# --------------------------------------------------------------------------- one image on two cores

class _Worker:
    """One persistent helper thread for N == 1: it takes row bands of a layer group that the caller
    has not taken yet (work stealing), so the caller never waits for a helper that is not running.

    Measured on the 2-vCPU machine: a lock ping-pong round trip costs ~50 us, and right after a torch
    call its OpenMP workers keep spinning for ~5-30 ms (libgomp's default spin count, long on this
    CPU), during which the helper gets the second core late or only in part. With a fixed split the
    caller then waited for the helper at every group (13.4 vs 11.7 ms unsplit); with stealing it
    does the bands the helper has not started, and when the split is still slower than one thread,
    ``FastEngine._run_single`` stops using it for a while. The helper sleeps on a lock between jobs
    (never spins), and a late or dead helper (e.g. after fork) cannot block the caller."""

    def __init__(self):
        self.busy = threading.Lock()        # one forward at a time uses the helper
        self._wake = threading.Lock()
        self._wake.acquire()
        self._sleeping = False
        self._job = None
        threading.Thread(target=self._loop, name="npmnv3-split", daemon=True).start()

    def _loop(self):
        last = None
        while True:
            job = self._job
            if job is not None and (job, job.gen) != last:
                last = (job, job.gen)
                job.help()
                continue
            self._sleeping = True
            job = self._job
            if job is not None and (job, job.gen) != last:
                self._sleeping = False
                continue
            self._wake.acquire()

    def post(self, job):
        self._job = job
        if self._sleeping:
            self._sleeping = False
            try:
                self._wake.release()
            except RuntimeError:    # already released (a wake-up is pending)
                pass


_WORKER = None


def _worker():
    global _WORKER
    with _POOL_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER


def _run_calls(calls):
    for call in calls:
        call()


class _Split:
    """A group of row-split calls: band b of every call, in order, is one piece; the caller runs
    pieces from the first, the helper steals from the same iterator; the caller then waits only
    for a piece the helper is still running (the helper holds ``lock`` while running one)."""

    def __init__(self, bands, mode):
        self.pieces = [partial(_run_calls, calls) for calls in bands]
        self.mode = mode        # shared by the plan: mode.serial runs all bands on the caller
        self.lock = threading.Lock()
        self.gen = 0
        self.it = iter(())
        self.error = None

    def help(self):
        it = self.it
        while True:
            with self.lock:
                piece = next(it, None)
                if piece is None:
                    return
                try:
                    piece()
                except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                    self.error = exc


    def __call__(self):
        if self.mode.serial:    # the same calls in the same order: the same floats as with the helper
            for piece in self.pieces:
                piece()
            return
        self.it = it = iter(self.pieces)
        self.gen += 1
        _WORKER.post(self)
        try:
            for piece in it:
                piece()
        finally:
            for _ in it:            # (after an exception here: leave nothing for the helper)
                pass
            self.lock.acquire()     # wait for the piece the helper may be running
            self.lock.release()
        if self.error is not None:
            exc, self.error = self.error, None
            raise exc


def _cuts(a, axis, rs):
    """a cut along ``axis`` at the indices rs (ascending): len(rs) + 1 views."""
    bounds = [None, *rs, None]
    index = (slice(None),) * axis
    return [a[index + (slice(lo, hi),)] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _split_step(step, fractions, widths):
    """(pieces, est_us) cutting one planned call of an N == 1 plan into row bands (cut at the
    given fractions of its rows), or None when the call is not one of the row-independent kinds.
    Rows are cut on spatial-row boundaries (a matmul's M = H * W rows, W from ``widths``) so that
    consecutive layers' bands line up and can share one handoff."""
    if not isinstance(step, partial):
        return None
    f, args, kw = step.func, step.args, step.keywords

    def at(length):
        rs = sorted({int(round(q * length)) for q in fractions})
        return rs if rs and 0 < rs[0] and rs[-1] < length else None

    def cut_all(arrays, axes, rs):
        """per array its pieces (arrays passed whole, axis None, repeat: weights, bias rows)."""
        return [_cuts(a, ax, rs) if ax is not None else [a] * (len(rs) + 1) for a, ax in zip(arrays, axes)]

    if f is np.matmul:
        a, w = args
        out = kw["out"]
        if a.ndim != 2 or out.ndim != 2:
            return None
        width = widths.get(a.shape[0], 1)
        rs = at(a.shape[0] // width)
        if rs is None:
            return None
        rs = [r * width for r in rs]
        est = a.shape[0] * a.shape[1] * w.shape[1] / 35e3
        return [partial(np.matmul, p, w, out=o) for p, o in zip(_cuts(a, 0, rs), _cuts(out, 0, rs))], est
    if f is np.einsum:
        spec, view, wt = args
        out = kw["out"]
        rs = at(view.shape[1])
        if rs is None:
            return None
        est = out.size * int(np.prod(view.shape[2:4])) / 7e3
        return [partial(np.einsum, spec, v, wt, out=o) for v, o in zip(_cuts(view, 1, rs), _cuts(out, 1, rs))], est
    if f is _bias_act:
        y_rows, bias_row, act, y, tmp, out = args
        if y.shape[0] != 1:
            return None
        rs = at(y.shape[1])
        if rs is None:
            return None
        yr = _cuts(y_rows, 0, rs) if y_rows is not None else [None] * (len(rs) + 1)
        ys, ts, os_ = cut_all([y, tmp, out], [1, 1, 1], rs)
        est = y.size * (3 if act == "HS" else 1 + (bias_row is not None)) / 2e3
        return [partial(_bias_act, *p) for p in zip(yr, [bias_row] * len(yr), [act] * len(yr), ys, ts, os_)], est
    if f is _hswish6:
        y = args[0]
        if y.shape[0] != 1:
            return None
        rs = at(y.shape[1])
        if rs is None:
            return None
        return [partial(_hswish6, *p) for p in zip(*cut_all(args, [1, 1, 1], rs))], y.size * 3 / 2e3
    if f is np.copyto and not kw and not isinstance(args[1], np.ndarray) and args[0].ndim >= 2:
        dst, value = args                           # a fill (zero borders, the ones column)
        rs = at(dst.shape[1])
        if rs is None:
            return None
        return [partial(np.copyto, d, value) for d in _cuts(dst, 1, rs)], dst.size / 1e3
    if f is np.copyto:
        dst, src = args
        if kw or not isinstance(src, np.ndarray) or src.shape != dst.shape or dst.ndim not in (4, 6):
            return None
        axis = 1 if dst.ndim == 4 else 4           # the rows (the stem's im2col: (3, 3, 3, n, h, w))
        if dst.shape[0 if dst.ndim == 4 else 3] != 1:
            return None
        rs = at(dst.shape[axis])
        if rs is None:
            return None
        return [partial(np.copyto, *p) for p in zip(*cut_all([dst, src], [axis, axis], rs))], dst.size / 1e3
    if f is np.add or f is np.multiply:
        a, b = args
        out = kw.get("out")
        if out is None or out is not a or a.ndim < 2 or a.shape[0] != 1 and a.ndim > 2:
            return None
        axis = 0 if a.ndim == 2 else 1      # (n * h, w * c) rows with n == 1, or (1, h, ...)
        rs = at(a.shape[axis])
        if rs is None:
            return None
        b_axis = axis if isinstance(b, np.ndarray) and b.shape == a.shape else None
        return [partial(f, p, q, out=p) for p, q in zip(*cut_all([a, b], [axis, b_axis], rs))], a.size / 2e3
    return None


def _arrays(call):
    return [a for a in call.args if isinstance(a, np.ndarray)] + \
           [a for a in call.keywords.values() if isinstance(a, np.ndarray)]


_TOO_HARD = getattr(getattr(np, "exceptions", np), "TooHardError", ValueError)   # NumPy < 1.25: np.


def _overlap(a, b):
    """Whether two views may share memory (exactly when cheap to decide, else assume they do)."""
    try:
        return np.shares_memory(a, b, max_work=100000)
    except _TOO_HARD:
        return True


def _parallelize(steps, widths, fractions, min_us, mode):
    """Rewrite a list of planned calls (N == 1) into groups of row-split calls, one handoff each.

    Consecutive splittable calls join the current group while none of their bands may share memory
    with another band of the group (arrays passed whole to every band are the read-only weights and
    bias rows, and are not compared); otherwise (e.g. a depthwise conv reading rows on both sides
    of a cut) a new group starts. Groups estimated under ``min_us`` of work stay serial (a handoff
    would cost more than it saves)."""
    out, group = [], []     # group: [(original, pieces, est, per-band activation arrays)]

    def flush():
        if group:
            if sum(g[2] for g in group) >= min_us:
                out.append(_Split([list(band) for band in zip(*(g[1] for g in group))], mode))
            else:
                out.extend(g[0] for g in group)
            group.clear()

    for step in steps:
        split = _split_step(step, fractions, widths)
        if split is None or (group and len(split[0]) != len(group[0][1])):
            flush()
        if split is None:
            out.append(step)
            continue
        pieces, est = split
        arrays = [_arrays(p) for p in pieces]
        common = set.intersection(*({id(a) for a in arrs} for arrs in arrays))
        arrays = [[a for a in arrs if id(a) not in common] for arrs in arrays]
        if any(_overlap(a, b) for g in group for i, mine in enumerate(arrays)
               for j, theirs in enumerate(g[3]) if i != j for a in mine for b in theirs):
            flush()
        group.append((step, pieces, est, arrays))
    flush()
    return out


# --------------------------------------------------------------------------- engine

def _prefix_blocks(blocks, max_stride):
    """How many leading blocks have outputs at most ``max_stride`` times smaller than the input."""
    stride, count = 2, 0        # the stem has stride 2
    for blk in blocks:
        stride *= blk.depthwise_stride
        if stride > max_stride:
            break
        count += 1
    return count


class FastEngine:
    """Weights prepared once from a ``MobileNetV3``; ``forward`` runs the network (NHWC inside)."""

    def __init__(self, model):
        self.dtype = model.dtype
        self.num_classes = model.num_classes
        self.stem, self.blocks, self.head = _prepare(model)
        self.threads = max(1, min(_cpu_count(), 8))
        self._plans = OrderedDict()     # (n, H, W, skip, thread id) -> _Plan
        self.prefix = _prefix_blocks(model.blocks, PREFIX_STRIDE)
        self._lock = threading.Lock()

    def _plan(self, n, h, w, skip=0, split=False):
        key = (n, h, w, skip, threading.get_ident(), split)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        dry = _Plan(self, n, h, w, skip=skip, split=split)    # sizes the shared buffers
        plan = _Plan(self, n, h, w, sizes=dry.arena.sizes, skip=skip, split=split)
        if split:
            plan.parallelize(SPLIT_CUTS, SPLIT_MIN_US)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        return plan

    def _run_chunk(self, x, logits, feats):
        n, _, h, w = x.shape
        k = self.prefix
        if n == 1 or k == 0 or feats is not None:
            self._plan(n, h, w).run(x, logits, self.head["fc0"], self.head["fc3"], feats)
            return
        # The first blocks (large maps, memory-bound) one image at a time: their buffers stay in
        # cache (measured on Large: 3.3 vs 4.1 ms/img for stem + blocks 1-3, 4.3 vs 5.0 with both
        # cores busy); the rest (small maps, GEMM-bound) on the whole chunk, where GEMMs are faster.
        plan = self._plan(n, h, w, skip=k + 1)
        single, out = self._plan(1, h, w), plan.block_buffers[k]
        for i in range(n):
            single.run_prefix(x[i:i + 1], k + 1)
            np.copyto(out[i:i + 1], single.block_buffers[k])
        plan.run(None, logits, self.head["fc0"], self.head["fc3"], start=k + 1)

    def forward(self, x, return_intermediates=False):
        """x: validated C-contiguous (N, 3, H, W) in model.dtype -> logits (N, classes) [, features]."""
        n = x.shape[0]
        logits = np.empty((n, self.num_classes), self.dtype)
        chunks = self._chunks(n)
        parts = [OrderedDict() if return_intermediates else None for _ in chunks]
        _BLAS.hold_one()    # see the module docstring: BLAS's own threads cost more than they gain
        try:
            if n == 1 and SPLIT and self.threads > 1 and not return_intermediates:
                worker = _worker()
                if worker.busy.acquire(blocking=False):
                    try:    # one image: its large layers row-split over this thread and the helper
                        self._run_single(x, logits)
                    finally:
                        worker.busy.release()
                else:       # the helper is busy (another thread's forward): the same plan, serially
                    self._run_split_plan(x, logits, serial=True)
            elif len(chunks) == 1:
                self._run_chunk(x, logits, parts[0])
            else:
                futures = [_pool().submit(self._run_chunk, x[a:b], logits[a:b], part)
                           for (a, b), part in zip(chunks, parts)]
                for f in futures:
                    f.result()
        finally:
            _BLAS.release()
        if not return_intermediates:
            return logits
        if len(parts) == 1:
            return logits, parts[0]
        features = OrderedDict((name, np.concatenate([p[name] for p in parts])) for name in parts[0])
        return logits, features

    def _run_split_plan(self, x, logits, serial):
        plan = self._plan(1, x.shape[2], x.shape[3], split=True)
        plan.mode.serial = serial
        try:
            plan.run(x, logits, self.head["fc0"], self.head["fc3"])
        finally:
            plan.mode.serial = False
        return plan

    def _run_single(self, x, logits):
        """One image, split over two threads unless that has been measured slower just now.

        Both ways run the split plan (serially: its bands one after the other on this thread), so
        that the logits do not depend on which way ran: cutting a GEMM into row bands can change its
        last bits (OpenBLAS picks kernels by size; seen on Small, whose one-thread plan without cuts
        then gave different probabilities for the same image). The plan keeps the time of recent
        serial forwards (``single``, an average) and counts consecutive two-thread forwards slower
        than it by 5%; SPLIT_SLOW in a row (the helper's core is busy: another process) make the
        next SPLIT_BACKOFF forwards run serially, re-measuring ``single``, then it tries again.
        Measured with a busy-looping process on the other core: split forwards took 13-17 ms (the
        helper gets half a core, and its wake-ups cost the caller) against 12.7 on one thread.
        Three, not two: right after a torch call its OpenMP workers keep spinning for ~25 ms, which
        slows the next two forwards only (19 and 13 ms, then 9), and that should not switch the
        split off for the next 20."""
        plan = self._plan(1, x.shape[2], x.shape[3], split=True)
        t0 = time.perf_counter()
        if plan.backoff > 0:
            plan.backoff -= 1
            self._run_split_plan(x, logits, serial=True)
            t = time.perf_counter() - t0
            plan.single = t if plan.single is None else 0.5 * (plan.single + t)
            return
        self._run_split_plan(x, logits, serial=False)
        t = time.perf_counter() - t0
        slow = plan.single is not None and t > 1.05 * plan.single
        plan.slow = plan.slow + 1 if slow else 0
        if plan.slow >= SPLIT_SLOW:
            plan.backoff, plan.slow = SPLIT_BACKOFF, 0

    def _chunks(self, n):
        """[(start, stop)] splitting n images into a multiple of the thread count of ~CHUNK-image tasks."""
        if n == 1 or self.threads == 1:
            return [(0, n)]
        count = self.threads * -(-n // (self.threads * CHUNK))
        count = min(count, n)
        bounds = [n * i // count for i in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))
