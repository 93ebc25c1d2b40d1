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
    - SE's hard-sigmoid ``clip(z / 6 + 1/2, 0, 1)`` folds its 1/6 and 1/2 into fc2's weight and bias.

Per input shape a ``_Plan`` is built once and cached: every buffer, every view (including the
``as_strided`` windows of the depthwise convs) and every tiled bias row is made up front, and
``forward`` is then a flat list of NumPy calls with pre-bound arguments (few Python operations).
Buffers are shared between layers by role (block input/output, expanded map, padded map, ...).

Depthwise conv (the layer NumPy is worst at)
    Stride 1: the zero-padded input (N, Hp, Wp, C) is seen as rows of Wp*C floats, and one ``as_strided``
    view ``V[n, h, i, j, x] = xpad[n, h + i*d, j*d*C + x]`` (x < W_out*C) turns the convolution into one
    ``np.einsum('nhijx,ijx->nhx', V, Wtiled)`` whose inner loop runs over W_out*C contiguous values with
    no temporaries; ``Wtiled[i, j, w*C + c] = weight[c, i, j]``.
    Stride 2 on large maps: the padded input is split into its four space-to-depth phase planes
    (even/odd rows x even/odd columns, one copy each); tap (i, j) reads plane (i % 2, j % 2) at offset
    (i // 2, j // 2) with stride 1, so each plane is again one rows-einsum (4 einsums, summed).
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

Batches: N > 1 is cut into chunks of about 4 images that run on a small thread pool (NumPy's ufuncs,
einsum and matmul release the GIL). While they run OpenBLAS is set to 1 thread through its C API
(found with ctypes in the loaded NumPy; process-wide, restored afterwards; skipped when not found), so
the two levels of threading do not fight. N == 1 runs on the calling thread with BLAS's own threads.
"""

import ctypes
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .config import BN_EPS
from .kernels import conv_output_size, fold_batch_norm

BIG = float(np.finfo(np.float32).max)   # a finite upper bound makes np.clip take its fast path
HS_SCALE = 6.0                          # x * clip(x + 3, 0, 6) is 6 * hard_swish(x)
CHUNK = 4                               # images per thread task for batches
MAX_PLANS = 16                          # cached (shape, thread) plans per engine


# --------------------------------------------------------------------------- BLAS thread control

class _BlasThreads:
    """Set OpenBLAS's thread count through its C API (found in the loaded NumPy via ctypes)."""

    def __init__(self):
        self._set = self._get = None
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

    scale = stem["scale"]                  # scale of the current activation
    blocks = []
    for i, blk in enumerate(model.blocks, start=1):
        names = [n for n in layers if n.startswith(f"features.{i}.block.")]
        d = dict(cin=blk.in_channels, exp=blk.expanded, cout=blk.out_channels, act=blk.activation,
                 k=blk.kernel, stride=blk.depthwise_stride, dilation=blk.dilation,
                 residual=blk.use_residual, in_scale=scale, expand=None, se=None)
        act_scale = HS_SCALE if blk.activation == "HS" else 1.0
        j = 0
        x_scale = scale
        if blk.has_expand:
            w, b = _fold(p, names[j], in_scale=x_scale)
            d["expand"] = (cast(w[:, :, 0, 0].T), cast(b))
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
        d["project"] = (cast(w[:, :, 0, 0].T), cast(b))
        scale = out_scale
        blocks.append(d)

    w, b = _fold(p, f"features.{len(model.blocks) + 1}", in_scale=scale)
    w0 = np.asarray(p["classifier.0.weight"], np.float64).T / HS_SCALE
    w3 = np.asarray(p["classifier.3.weight"], np.float64).T / HS_SCALE
    head = dict(conv=(cast(w[:, :, 0, 0].T), cast(b)),
                fc0=(cast(w0), cast(p["classifier.0.bias"])),
                fc3=(cast(w3), cast(p["classifier.3.bias"])))
    return stem, blocks, head


# --------------------------------------------------------------------------- element-wise kernels

def _relu(y, out):
    np.clip(y, 0, BIG, out=out)


def _hswish6(y, tmp, out):
    """out = y * clip(y + 3, 0, 6) = 6 * hard_swish(y); tmp is scratch of y's shape."""
    np.add(y, 3, out=tmp)
    np.clip(tmp, 0, 6, out=tmp)
    np.multiply(y, tmp, out=out)


def _bias_act(y_rows, bias_row, act, y, tmp, out):
    """y += bias (as a tiled row), then the activation from y into out (may be y itself)."""
    y_rows += bias_row
    if act == "HS":
        _hswish6(y, tmp, out)
    elif act == "RE":
        _relu(y, out)
    elif out is not y:
        np.copyto(out, y)


def _bias_act_split(y_rows, bias_row, act, y, tmp, targets):
    """Like ``_bias_act``, the result scattered to several outputs: [(y part, tmp part, out)]."""
    y_rows += bias_row
    if act == "HS":
        np.add(y, 3, out=tmp)
        np.clip(tmp, 0, 6, out=tmp)
        for y_part, t_part, out in targets:
            np.multiply(y_part, t_part, out=out)
    else:
        for y_part, _, out in targets:
            np.clip(y_part, 0, BIG, out=out)


# --------------------------------------------------------------------------- plan (per input shape)

class _Arena:
    """Buffers shared between layers by role; sized in a first (dry) build, filled in the second."""

    def __init__(self, dtype, sizes=None):
        self.dtype = dtype
        self.sizes = {} if sizes is None else sizes
        self.dry = sizes is None
        self.flat = {} if self.dry else {r: np.empty(s, dtype) for r, s in sizes.items()}

    def get(self, role, shape):
        size = int(np.prod(shape))
        if self.dry:    # a stand-in that allocates nothing; the dry plan is never run
            self.sizes[role] = max(self.sizes.get(role, 0), size)
            return np.broadcast_to(np.zeros((), self.dtype), shape)
        return self.flat[role][:size].reshape(shape)


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
            if not arena.dry:
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


def _se_scale(d_map, w1, b1, w2, b2, mean_vec):
    """Squeeze-excite gate e (n, C) in [0, 1] for d_map (n, P, C) (scales pre-folded)."""
    m = np.matmul(mean_vec, d_map)[:, 0]           # (n, C): mean over positions as a GEMV
    z = m @ w1
    z += b1
    np.clip(z, 0, BIG, out=z)
    e = z @ w2
    e += b2
    np.clip(e, 0, 1, out=e)
    return e


def _se_apply_map(d_map, se, mean_vec):
    e = _se_scale(d_map, *se, mean_vec)
    d_map *= e[:, None, :]


def _se_project_weights(d_map, se, mean_vec, wp, d3, out3):
    """Apply the gate to per-image copies of the projection weight, then one batched matmul."""
    e = _se_scale(d_map, *se, mean_vec)
    np.matmul(d3, e[:, :, None] * wp, out=out3)


class _Plan:
    """Buffers, views and the list of calls for one (n, H, W) input shape."""

    def __init__(self, engine, n, h, w, sizes=None):
        self.arena = arena = _Arena(engine.dtype, sizes)
        dt = engine.dtype
        self.stages = []                # (calls, (feature name, NHWC view, scale)) per features.i
        self.steps = []
        add = self._add

        # ---- stem: zero-padded NCHW copy, im2col with a row of ones, one matmul, hard-swish
        stem = engine.stem
        xpad = arena.get("stem_pad", (n, 3, h + 2, w + 2))      # roles used by the stem only:
        self.x_interior = xpad[:, :, 1:-1, 1:-1]
        h1, w1 = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        cols = arena.get("stem_cols", (28, n * h1 * w1))
        if not arena.dry:                                       # their constant parts are set once
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
        h, w, cur = h1, w1, 0

        # ---- bneck blocks
        for i, blk in enumerate(engine.blocks, start=1):
            x, h, w, cur = self._block(blk, x, h, w, n, cur, add)
            self._end_stage(f"features.{i}", x, blk["out_scale"])

        # ---- head conv, pool, classifier
        wh, bh = engine.head["conv"]
        ch = wh.shape[1]
        y = arena.get("exp", (n, h, w, ch))
        t = arena.get("tmp", y.shape)
        add([partial(np.matmul, x.reshape(-1, x.shape[-1]), wh, out=y.reshape(-1, ch)),
             partial(_bias_act, y.reshape(n * h, w * ch), _tile_row(bh, w), "HS", y, t, y)])
        self._end_stage(f"features.{len(engine.blocks) + 1}", y, HS_SCALE)
        self.head_map = y.reshape(n, h * w, ch)
        self.mean_vec = np.full((1, h * w), 1.0 / (h * w), dt)

    def _add(self, calls):
        self.steps.extend(calls)

    def _end_stage(self, name, view, scale):
        """The calls so far produce features.<i> in ``view`` (stored times ``scale``)."""
        self.stages.append((self.steps, (name, view, scale)))
        self.steps = []

    def _block(self, blk, x, h, w, n, cur, add):
        arena, dt = self.arena, self.arena.dtype
        e, k, dil, stride = blk["exp"], blk["k"], blk["dilation"], blk["stride"]
        pad = (k - 1) // 2 * dil
        hp, wp = h + 2 * pad, w + 2 * pad
        ho = conv_output_size(h, k, stride, pad, dil)
        wo = conv_output_size(w, k, stride, pad, dil)

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
            we, be = blk["expand"]
            y = arena.get("exp", (n, h, w, e))
            t = arena.get("tmp", y.shape)
            targets = [(y[:, hs, ws], t[:, hs, ws], out) for (hs, ws), out in parts]
            add([partial(np.matmul, x.reshape(-1, x.shape[-1]), we, out=y.reshape(-1, e)),
                 partial(_bias_act_split, y.reshape(n * h, w * e), _tile_row(be, w), blk["act"], y, t,
                         targets)])
        else:
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

        # squeeze-excite, then 1x1 project -> BN (+ residual)
        wp_, bp = blk["project"]
        cout = wp_.shape[1]
        cur = 1 - cur
        out = arena.get(f"x{cur}", (n, ho, wo, cout))
        d3, out3 = d.reshape(n, ho * wo, e), out.reshape(n, ho * wo, cout)
        if blk["se"] is not None:
            mean_vec = np.full((1, ho * wo), 1.0 / (ho * wo), dt)
            if ho * wo > cout:      # fewer floats to scale in the weight than in the map
                add([partial(_se_project_weights, d3, blk["se"], mean_vec, wp_, d3, out3)])
            else:
                add([partial(_se_apply_map, d3, blk["se"], mean_vec),
                     partial(np.matmul, d.reshape(-1, e), wp_, out=out.reshape(-1, cout))])
        else:
            add([partial(np.matmul, d.reshape(-1, e), wp_, out=out.reshape(-1, cout))])
        out_rows = out.reshape(n * ho, wo * cout)
        add([partial(np.add, out_rows, _tile_row(bp, wo), out=out_rows)])
        if blk["residual"]:
            add([partial(np.add, out, x, out=out)])
        return out, ho, wo, cur

    def run(self, x, logits, fc0, fc3, features=None):
        """x: (n, 3, H, W) NCHW chunk; writes logits (n, classes); NHWC features into ``features``."""
        np.copyto(self.x_interior, x)
        for steps, (name, view, scale) in self.stages:
            for step in steps:
                step()
            if features is not None:    # buffers are reused later: copy out now, as NCHW
                f = view.transpose(0, 3, 1, 2).copy()     # C order, never a view
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


# --------------------------------------------------------------------------- engine

class FastEngine:
    """Weights prepared once from a ``MobileNetV3``; ``forward`` runs the network (NHWC inside)."""

    def __init__(self, model):
        self.dtype = model.dtype
        self.num_classes = model.num_classes
        self.stem, self.blocks, self.head = _prepare(model)
        for blk in self.blocks:
            blk["out_scale"] = blk["in_scale"] if blk["residual"] else 1.0
        self.threads = max(1, min(_cpu_count(), 8))
        self._plans = OrderedDict()     # (n, H, W, thread id) -> _Plan
        self._lock = threading.Lock()

    def _plan(self, n, h, w):
        key = (n, h, w, threading.get_ident())
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        dry = _Plan(self, n, h, w)                          # sizes the shared buffers
        plan = _Plan(self, n, h, w, sizes=dry.arena.sizes)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        return plan

    def _run_chunk(self, x, logits, feats):
        n, _, h, w = x.shape
        self._plan(n, h, w).run(x, logits, self.head["fc0"], self.head["fc3"], feats)

    def forward(self, x, return_intermediates=False):
        """x: validated C-contiguous (N, 3, H, W) in model.dtype -> logits (N, classes) [, features]."""
        n = x.shape[0]
        logits = np.empty((n, self.num_classes), self.dtype)
        chunks = self._chunks(n)
        parts = [OrderedDict() if return_intermediates else None for _ in chunks]
        previous = _BLAS.get()
        _BLAS.set(1)        # see the module docstring: BLAS's own threads cost more than they gain
        try:
            if len(chunks) == 1:
                self._run_chunk(x, logits, parts[0])
            else:
                futures = [_pool().submit(self._run_chunk, x[a:b], logits[a:b], part)
                           for (a, b), part in zip(chunks, parts)]
                for f in futures:
                    f.result()
        finally:
            _BLAS.set(previous)
        if not return_intermediates:
            return logits
        if len(parts) == 1:
            return logits, parts[0]
        features = OrderedDict((name, np.concatenate([p[name] for p in parts])) for name in parts[0])
        return logits, features

    def _chunks(self, n):
        """[(start, stop)] splitting n images into a multiple of the thread count of ~CHUNK-image tasks."""
        if n == 1 or self.threads == 1:
            return [(0, n)]
        count = self.threads * -(-n // (self.threads * CHUNK))
        count = min(count, n)
        bounds = [n * i // count for i in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))
