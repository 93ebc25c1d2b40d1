"""Planning one forward pass: every buffer, view and call made once for an input shape.

``Plan`` walks the layer records (``config.Conv``, ``config.Block``, ``config.Linear``) and turns
each into ``Call`` records (``parallel.py``) on preallocated NHWC buffers; running the plan is then
a flat loop over the calls. What each layer becomes:

- stem (the first Conv, on the NCHW input): one strided copy into an im2col matrix whose last row
  is ones, so the bias rides in the GEMM; one matmul; the activation;
- Block: the expand conv's GEMM (its bias inside the GEMM when the input carries a channel of
  ones, else one row add), its activation written straight into the depthwise conv's zero-padded
  input (or, for stride 2 on large maps, into the four phase planes of ``fast_kernels``); the
  depthwise einsum(s), bias and activation in place; squeeze-and-excite's gate, applied to a
  per-image copy of the projection weight when that is smaller than the map
  (``(x * e) @ W == x @ (e[:, None] * W)``); the projection GEMM into the block's own output
  buffer, whose extra last channel is held at 1 for the next 1x1 conv's bias; bias; residual add;
- a 1x1 Conv (the head); the classifier: pooling as a matrix-vector product, two small GEMMs.

Values are stored as ``scale`` times their true value minus an ``offset`` per channel: hard-swish
leaves 6x (``fast_kernels.hard_swish6``), and a block whose output goes into a 1x1 conv leaves its
projection's bias out (the offset): the next conv adds ``offset @ W`` to its own bias for free,
which saves a pass over every such block output. The reading layer's weights and bias absorb
scale and offset (``prepare.py``); a block whose output goes straight into a (zero-padded)
depthwise conv adds its bias, since there it cannot be moved.

Large buffers are shared between layers by role ("exp", "pad", "dw", "tmp", ...): a first, dry
pass records the largest size each role needs, the second allocates them. Plans that split one
image over threads (``banded``) alternate two sets of roles from block to block, so that
consecutive blocks' row bands can share one handoff (see ``parallel.row_groups``).
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import fast_kernels as F
from ..config import Block
from .parallel import Call, run_steps

# Rough costs in microseconds (measured on the 2-core machine), only to tell whether cutting a group
# of calls into bands pays for the handoff between threads: every call has a fixed cost, then
# GEMMs run at ~30 GMAC/s, depthwise einsums at ~4.5, element-wise passes at ~4 Gfloat/s.
CALL_US = 4.0


def _gemm_cost(macs):
    return CALL_US + macs / 30e3


def _einsum_cost(macs):
    return CALL_US + macs / 4.5e3


def _pass_cost(floats, passes=1):
    return CALL_US + passes * floats / 4e3


def _copy_cost(floats):
    return CALL_US + floats / 3e3


ALIGN = 64     # bytes: every buffer starts at such a boundary
SUM_BLOCK = 128    # squeeze-excite sums its map's positions in blocks of this many


def aligned_empty(size, dtype):
    """A new 1-D array of ``size`` elements whose data starts on an ``ALIGN``-byte boundary.

    Kernels may take a different path (and so round differently) for differently aligned data:
    with every buffer aligned alike, every plan for a shape computes the very same floats."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size * itemsize + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + size * itemsize].view(dtype)


class Arena:
    """Buffers shared between layers by role; sized in a first (dry) pass, allocated in the second.

    While ``skipping`` (layers a plan will never run) it hands out stand-ins that allocate nothing."""

    def __init__(self, dtype, sizes=None):
        self.dtype = dtype
        self.dry = sizes is None
        self.sizes = {} if sizes is None else sizes
        self.flat = {} if self.dry else {role: aligned_empty(size, dtype) for role, size in sizes.items()}
        self.skipping = False
        self.suffix = ""

    @property
    def real(self):
        return not (self.dry or self.skipping)

    def get(self, role, shape):
        role += self.suffix
        size = int(np.prod(shape))
        if not self.real:
            if not self.skipping:
                self.sizes[role] = max(self.sizes.get(role, 0), size)
            return np.broadcast_to(np.zeros((), self.dtype), shape)
        return self.flat[role][:size].reshape(shape)


class Map:
    """A planned activation: the NHWC view ``x`` plus ``offset`` is ``scale`` times the values
    (``offset``: a float64 (C,) array or None, the bias left out by layer ``offset_of``); ``ones`` is
    the same buffer seen with one more channel, held at 1 (or None)."""

    __slots__ = ("x", "scale", "ones", "offset", "offset_of")

    def __init__(self, x, scale=1.0, ones=None, offset=None, offset_of=None):
        self.x, self.scale, self.ones, self.offset, self.offset_of = x, scale, ones, offset, offset_of


def _reads_with_1x1(layer):
    """Whether ``layer`` starts with a 1x1 conv (which can absorb its input's offset)."""
    if isinstance(layer, Block):
        return layer.expand is not None
    return layer is not None and layer.kernel == 1 and layer.groups == 1


def _bias_act(y_rows, bias_row, act, y, out):
    """y += bias (a tiled row; None: already in), then the activation from y into out.
    act: "RE", "RE6", "copy" (into out), or None (y is out, nothing to do); hard-swish is
    ``fast_kernels.hard_swish6``, which adds the bias itself, piece by piece."""
    if bias_row is not None:
        y_rows += bias_row
    if act == "RE":
        F.relu(y, out)
    elif act == "RE6":
        F.relu6(y, out)
    elif act == "copy":
        np.copyto(out, y)


def _se_gate(d3, w1, b1, w2, b2, blocks, partial, total, z, gate):
    """Squeeze-excite gate (n, C) in [0, 1] of the map d3 (n, P, C), into ``gate`` (scales and the
    mean's 1/P pre-folded into w1). The sum over the P positions is taken in blocks (one GEMM with
    the (B, P) indicator matrix ``blocks``, then the B partial sums added): a float32 sum's rounding
    error grows with the number of terms added one after another, and a map's mean steers every
    gate after it. ``partial`` (n, B, C), ``total`` (n, C) and ``z`` (n, S) are scratch."""
    np.matmul(blocks, d3, out=partial)
    np.add.reduce(partial, axis=1, out=total)
    np.matmul(total, w1, out=z)
    z += b1
    F.relu(z, z)
    np.matmul(z, w2, out=gate)
    gate += b2
    F.clip(gate, 0, 1, out=gate)


def _linear(x, weight, bias, act, out):
    """out = act(x @ weight + bias) for the classifier."""
    np.matmul(x, weight, out=out)
    out += bias
    if act == "HS":
        F.hard_swish6(out, out)


def linear_layers(prepared, classifier, scale):
    """(layer, weight, bias) of each Linear record, its weights absorbing the scale its input has."""
    for layer in classifier:
        weight, bias = prepared.linear(layer, in_scale=scale)
        yield layer, weight, bias
        scale = F.HS_SCALE if layer.activation == "HS" else 1.0


def classify(prepared, classifier, pooled, scale):
    """The Linear layers on a whole batch of pooled features (N, C) at ``scale``: logits (N, classes).

    A batch's chunks pool on their own plans and meet here, so the classifier's weights (5 MB for
    Large) are read once per batch rather than once per chunk."""
    z = pooled
    for layer, weight, bias in linear_layers(prepared, classifier, scale):
        y = np.empty((len(z), layer.out_features), z.dtype)
        _linear(z, weight, bias, layer.activation, y)
        z = y
    return z


class Plan:
    """Buffers, views and calls of one forward pass for inputs of shape (n, 3, h, w).

    Parameters
    ----------
    prepared : prepare.Prepared
    features : list of config.Conv / config.Block
        The layers, in order; the first is the stem, on the NCHW input.
    classifier : list of config.Linear or None
    n, h, w : int
        The input shape.
    taps : collection of str
        Names of layers (features, or a block's expand conv) whose outputs ``run`` returns: they get
        buffers that no later layer reuses, and are exported when the run is over.
    skip : int
        features.0 .. features.<skip - 1> will never run here: the caller fills
        features.<skip - 1>'s output (``entry``), so only that layer gets real buffers.
    banded : bool
        Alternate the buffer roles from block to block (for one image on several threads).
    sizes : dict or None
        Role sizes from the dry pass (None: this is the dry pass).
    """

    def __init__(self, prepared, features, classifier, n, h, w, taps=(), skip=0, banded=False, sizes=None):
        self.prep, self.n, self.taps = prepared, n, frozenset(taps)
        self.arena = arena = Arena(prepared.dtype, sizes)
        self.calls = []
        self.stages = []        # per features.i: (name, output Map, number of calls that produce it)
        self.points = {}        # layer name -> output Map, for every output that can be tapped
        arena.skipping = skip > 1
        x = self._stem(features[0], h, w)
        self._mark(features[0].name, x, stage=True)
        for i, layer in enumerate(features[1:], start=1):
            arena.skipping = i < skip - 1
            if banded:
                arena.suffix = f".{i % 2}"
            if isinstance(layer, Block):
                following = features[i + 1] if i + 1 < len(features) else None
                x = self._block(layer, x, carry=_reads_with_1x1(following))
            else:
                x = self._conv1x1(layer, x, f"out.{layer.name}" if layer.name in self.taps else "exp")
            self._mark(layer.name, x, stage=True)
        self.pooled = self.logits = None
        if classifier is not None:
            self.pooled, self.pooled_scale = self._pool(x)
            self.pooled_at = len(self.calls)
            self.logits = self._classifier(self.pooled, self.pooled_scale, classifier)

    # ------------------------------------------------------------------ building blocks

    def _add(self, fn, *args, cuts=(), rows=0, cost=0.0, **kwargs):
        """Plan one call. cuts: (argument, axis, unit, writes) for the arguments holding rows of a map;
        only one-image plans are cut (their spatial rows are the rows of every map)."""
        if self.n != 1:
            cuts = ()
        self.calls.append(Call(fn, *args, cuts=cuts, rows=rows, cost=cost, **kwargs))

    def _mark(self, name, x, stage=False):
        """The calls planned so far produce layer ``name``'s output, Map x."""
        self.points[name] = x
        if stage:
            self.stages.append((name, x, len(self.calls)))

    def _gemm(self, a, w, out, width):
        """out = a @ w on the (rows, C) matrices of NHWC views a and out (a spatial row = ``width`` rows)."""
        a2, o2 = a.reshape(-1, a.shape[-1]), out.reshape(-1, out.shape[-1])
        self._add(np.matmul, a2, w, out=o2, cuts=[(0, 0, width, False), ("out", 0, width, True)],
                  rows=a2.shape[0] // width, cost=_gemm_cost(a2.shape[0] * w.shape[0] * w.shape[1]))

    def _bias_act(self, y, bias, act, out):
        """Bias (``(C,)``, tiled along W; None: already added) and activation from y into out (may be y).
        Returns the output's scale."""
        n, h, w, c = y.shape
        code = act or ("copy" if out is not y else None)
        if bias is None and code is None:
            return 1.0
        bias_row = None if bias is None else np.tile(bias, w)
        passes = (bias is not None) + (3 if act == "HS" else 1)
        if act == "HS":
            bias_wc = None if bias is None else bias_row.reshape(w, c)
            tmp = self.arena.get("tmp", y.shape)    # (cut with y: each band has its own scratch)
            self._add(F.hard_swish6, y, out, bias_wc, tmp, cuts=[(0, 1, 1, True), (1, 1, 1, True), (3, 1, 1, True)],
                      rows=h, cost=_pass_cost(y.size, passes))
            return F.HS_SCALE
        self._add(_bias_act, y.reshape(n * h, w * c), bias_row, code, y, out,
                  cuts=[(0, 0, 1, True), (3, 1, 1, True), (4, 1, 1, True)], rows=h, cost=_pass_cost(y.size, passes))
        return 1.0

    def _zero_border(self, xp, p):
        """Zero the p-wide border of the (n, Hp, Wp, C) buffer ``xp`` (it is shared with other layers)."""
        n, hp, wp, c = xp.shape
        row, isz = wp * c, xp.itemsize
        top_bottom = as_strided(xp, (n, 2, p * row), (xp.strides[0], (hp - p) * row * isz, isz))
        # the right border of row r and the left border of row r + 1 are adjacent in memory
        start = (p - 1) * row + (wp - p) * c
        sides = as_strided(xp.reshape(-1)[start:], (n, hp - 2 * p + 1, 2 * p * c), (xp.strides[0], row * isz, isz))
        # (the top and the bottom strip are the two "rows" of top_bottom: one band each)
        self._add(np.copyto, top_bottom, 0, cuts=[(0, 1, 1, True)], rows=2, cost=_copy_cost(top_bottom.size))
        self._add(np.copyto, sides, 0, cuts=[(0, 1, 1, True)], rows=sides.shape[1], cost=_copy_cost(sides.size))

    def _phase_planes(self, key, h, w, c, pad):
        """The four phase planes of the zero-padded (n, h + 2 pad, w + 2 pad, c) map, each in its own
        buffer (so its zero border is written once). Returns (planes, parts): parts lists, per plane,
        the (row slice, column slice) of the unpadded map that lands in the plane's interior, and that
        interior: writing them all is padding then splitting, without the copies."""
        n, hp, wp = self.n, h + 2 * pad, w + 2 * pad
        planes, parts = {}, []
        for a in range(2):
            for b in range(2):
                plane = self.arena.get(f"{key}.phase{a}{b}", (n, (hp - a + 1) // 2, (wp - b + 1) // 2, c))
                if self.arena.real:
                    plane[...] = 0
                planes[a, b] = plane
                h0, w0 = (a - pad) % 2, (b - pad) % 2          # first source row / column in this plane
                rows, cols = len(range(h0, h, 2)), len(range(w0, w, 2))
                m0, q0 = (h0 + pad) // 2, (w0 + pad) // 2
                if rows and cols:
                    parts.append(((slice(h0, None, 2), slice(w0, None, 2)), plane[:, m0:m0 + rows, q0:q0 + cols]))
        return planes, parts

    # ------------------------------------------------------------------ layers

    def _stem(self, conv, h, w):
        """The first conv on the NCHW input: im2col (with a row of ones for the bias) and one GEMM."""
        arena, n = self.arena, self.n
        k, s, p = conv.kernel, conv.stride, conv.padding
        cin = conv.in_channels
        xpad = arena.get("stem_pad", (n, cin, h + 2 * p, w + 2 * p))
        self.x_interior = xpad[:, :, p:p + h, p:p + w]      # run() copies the input here
        ho, wo = conv.output_size(h, w)
        taps = cin * k * k
        cols = arena.get("stem_cols", (taps + 1, n * ho * wo))
        if arena.real:                                      # the constant parts are set once
            xpad[...] = 0
            cols[taps] = 1
        st = xpad.strides
        window = as_strided(xpad, (cin, k, k, n, ho, wo), (st[1], st[2], st[3], st[0], s * st[2], s * st[3]),
                            writeable=False)
        self._add(np.copyto, cols[:taps].reshape(cin, k, k, n, ho, wo), window,
                  cuts=[(0, 4, 1, True), (1, 4, 1, False)], rows=ho, cost=_copy_cost(taps * ho * wo))
        y = arena.get("stem", (n, ho, wo, conv.out_channels))
        weight = self.prep.im2col(conv)
        self._add(np.matmul, cols.T, weight, out=y.reshape(-1, conv.out_channels),
                  cuts=[(0, 0, wo, False), ("out", 0, wo, True)], rows=ho, cost=_gemm_cost(n * ho * wo * weight.size))
        x = arena.get("x0", y.shape)
        return Map(x, self._bias_act(y, None, conv.activation, x))

    def _conv1x1(self, conv, x, role, dest=None):
        """A 1x1 Conv on Map x: GEMM into buffer ``role`` (the bias in the GEMM when x has its ones),
        activation into ``dest`` (default: in place). Returns the output Map."""
        if conv.kernel != 1 or conv.groups != 1:
            raise NotImplementedError(f"{conv.name}: the fast engine plans 1x1 convs after the stem only")
        n, h, w, _ = x.x.shape
        weight, bias, augmented = self.prep.pointwise(conv, in_scale=x.scale, in_offset=(x.offset_of, x.offset))
        y = self.arena.get(role, (n, h, w, conv.out_channels))
        if x.ones is not None:
            self._gemm(x.ones, augmented, y, w)
            bias = None
        else:
            self._gemm(x.x, weight, y, w)
        out = y if dest is None else dest
        return Map(out, self._bias_act(y, bias, conv.activation, out))

    def _block(self, blk, x, carry=False):
        """One bneck block (see the module docstring) on Map x; returns the block's output Map.
        ``carry``: the next layer is a 1x1 conv, so the projection's bias is left to it (an offset)."""
        arena, n = self.arena, self.n
        dw = blk.depthwise
        _, h, w, _ = x.x.shape
        e, k, p = dw.out_channels, dw.kernel, dw.padding
        ho, wo = dw.output_size(h, w)
        expand_tapped = blk.expand is not None and blk.expand.name in self.taps
        phases = dw.stride == 2 and dw.dilation == 1 and wo >= F.PHASE_MIN_WIDTH and not expand_tapped

        # the depthwise conv's zero-padded input: one buffer, or its four phase planes
        if phases:
            planes, parts = self._phase_planes(blk.name, h, w, e, p)
        else:       # (a tapped expand output keeps its buffer to itself)
            xp = arena.get(f"pad.{blk.name}" if expand_tapped else "pad", (n, h + 2 * p, w + 2 * p, e))
            parts = [((slice(None), slice(None)), xp[:, p:p + h, p:p + w])]
            self._zero_border(xp, p)

        # 1x1 expand -> BN -> act, written straight into that input; or the input copied there
        if blk.expand is not None:
            if phases:      # activation in place (contiguous, fast), then 4 strided copies
                y = self._conv1x1(blk.expand, x, "exp")
                for (hs, ws), interior in parts:
                    self._copy(interior, y.x[:, hs, ws])
                scale = y.scale
            else:
                y = self._conv1x1(blk.expand, x, "exp", dest=parts[0][1])
                scale = y.scale
                self._mark(blk.expand.name, y)
        else:
            if x.offset is not None:
                raise ValueError(f"{blk.name}: a block without expand conv needs an input without offset")
            for (hs, ws), interior in parts:
                self._copy(interior, x.x[:, hs, ws])
            scale = x.scale

        # k x k depthwise -> BN -> act, in place
        weight, bias = self.prep.depthwise(dw, in_scale=scale)
        d = arena.get("dw", (n, ho, wo, e))
        d_rows = d.reshape(n, ho, wo * e)
        if phases:
            tmp = arena.get("dw_phase_tmp", d_rows.shape)
            for index, ((a, b), rows, cols) in enumerate(F.phase_slices(k)):
                taps = weight[rows, cols]
                view = F.rows_view(planes[a, b], taps.shape[:2], ho, wo)
                self._einsum("nhijx,ijx->nhx", view, F.tile_along_width(taps, wo), d_rows if index == 0 else tmp)
                if index:
                    self._add(np.add, d_rows, tmp, out=d_rows, cuts=[(0, 1, 1, True), (1, 1, 1, False),
                              ("out", 1, 1, True)], rows=ho, cost=_pass_cost(d.size))
        elif dw.stride == 1:
            self._einsum("nhijx,ijx->nhx", F.rows_view(xp, k, ho, wo, dw.dilation), F.tile_along_width(weight, wo),
                         d_rows)
        else:
            self._einsum("nhijwc,ijwc->nhwc", F.strided_view(xp, k, ho, wo, dw.stride, dw.dilation),
                         F.broadcast_width(weight, wo), d)
        d_scale = self._bias_act(d, bias, dw.activation, d)

        # squeeze-excite, then 1x1 project -> BN (+ residual) into the block's own output buffer, whose
        # last channel is a column of ones for the next 1x1 conv's bias. Not when the residual input has
        # no such column (Large's first block): the add would then run over C-wide pieces.
        project = blk.project
        out_scale = x.scale if blk.residual else 1.0
        proj_w, proj_b, _ = self.prep.pointwise(project, in_scale=d_scale, out_scale=out_scale)
        cout = project.out_channels
        residual_rows = blk.residual and x.ones is not None
        ones = residual_rows or not blk.residual
        width = cout + ones
        out_aug = arena.get(f"out.{blk.name}", (n, ho, wo, width))
        if ones and arena.real:
            out_aug[..., cout] = 1
        out = out_aug[..., :cout]
        if blk.se is not None:
            self._squeeze_excite(blk.se, d, d_scale, proj_w, out)
        else:
            self._gemm(d, proj_w, out, wo)
        # the bias (and the residual input's offset): carried to the next 1x1 conv, or added here
        offset = proj_b.astype(np.float64)
        if blk.residual and x.offset is not None:
            offset = offset + x.offset
        carry = carry and project.activation is None
        if not carry:
            out_rows = out_aug.reshape(n * ho, wo * width)
            row = np.tile(np.append(offset, 0) if ones else offset, wo).astype(arena.dtype)
            self._add(np.add, out_rows, row, out=out_rows, cuts=[(0, 0, 1, True), ("out", 0, 1, True)],
                      rows=ho, cost=_pass_cost(out_rows.size))
        if residual_rows:       # whole rows (long inner loops), then the column of ones made 1 again
            self._add(np.add, out_aug, x.ones, out=out_aug, cuts=[(0, 1, 1, True), (1, 1, 1, False),
                      ("out", 1, 1, True)], rows=ho, cost=_pass_cost(out_aug.size))
            self._add(np.copyto, out_aug[..., cout], 1, cuts=[(0, 1, 1, True)], rows=ho, cost=_copy_cost(ho * wo))
        elif blk.residual:
            self._add(np.add, out, x.x, out=out, cuts=[(0, 1, 1, True), (1, 1, 1, False), ("out", 1, 1, True)],
                      rows=ho, cost=_pass_cost(out.size))
        if project.activation is not None:      # (SSDLite's extra blocks) ReLU and ReLU6 keep the ones
            if project.activation not in ("RE", "RE6") or out_scale != 1:
                raise NotImplementedError(f"{project.name}: projection activation {project.activation}")
            target = out_aug if ones else out
            self._bias_act(target, None, project.activation, target)
        if carry:
            return Map(out, out_scale, out_aug if ones else None, offset, blk.name)
        return Map(out, out_scale, out_aug if ones else None)

    def _copy(self, dst, src):
        self._add(np.copyto, dst, src, cuts=[(0, 1, 1, True), (1, 1, 1, False)], rows=dst.shape[1],
                  cost=_copy_cost(dst.size))

    def _einsum(self, spec, view, weight, out):
        taps = view.shape[2] * view.shape[3]
        self._add(np.einsum, spec, view, weight, out=out, cuts=[(1, 1, 1, False), ("out", 1, 1, True)],
                  rows=out.shape[1], cost=_einsum_cost(out.size * taps))

    def _squeeze_excite(self, se, d, d_scale, proj_w, out):
        """The gate of map d (n, ho, wo, e), then the projection of the gated map into ``out``."""
        arena, n = self.arena, self.n
        _, ho, wo, e = d.shape
        cout = proj_w.shape[1]
        gate = arena.get("se_gate", (n, e))
        blocks = self._block_indicator(ho * wo)
        self._add(_se_gate, d.reshape(n, ho * wo, e), *self.prep.squeeze_excite(se, in_scale=d_scale * ho * wo),
                  blocks, arena.get("se_partial", (n, len(blocks), e)), arena.get("se_total", (n, e)),
                  arena.get("se_z", (n, se.squeeze)), gate)
        if ho * wo > cout:      # fewer floats to scale in the weight than in the map
            w_gated = arena.get("se_weight", (n, e, cout))
            self._add(np.multiply, gate[:, :, None], proj_w, out=w_gated)
            if n == 1:
                self._gemm(d, w_gated[0], out, wo)
            else:
                self._add(np.matmul, d.reshape(n, ho * wo, e), w_gated, out=out.reshape(n, ho * wo, cout))
        else:
            self._add(np.multiply, d, gate[:, None, None, :], out=d, cuts=[(0, 1, 1, True), ("out", 1, 1, True)],
                      rows=ho, cost=_pass_cost(d.size))
            self._gemm(d, proj_w, out, wo)

    def _pool(self, x):
        """Global pooling of Map x as sums over blocks of positions (as squeeze-excite's): an (n, C)
        buffer of sums, and the scale that makes them means (1/P folded in). One image's pooling is
        cut by channels."""
        n, h, w, c = x.x.shape
        blocks = self._block_indicator(h * w)
        partial = self.arena.get("pool_partial", (n, len(blocks), c))
        pooled = self.arena.get("pooled", (n, c))
        self._add(np.matmul, blocks, x.x.reshape(n, h * w, c), out=partial,
                  cuts=[(1, 2, 1, False), ("out", 2, 1, True)], rows=c, cost=_pass_cost(h * w * c))
        self._add(np.add.reduce, partial, axis=1, out=pooled, cuts=[(0, 2, 1, False), ("out", 1, 1, True)], rows=c,
                  cost=_pass_cost(partial.size))
        return pooled, x.scale * h * w

    def _classifier(self, z, scale, classifier):
        """The Linear layers on the pooled (n, C) features, into an (n, classes) buffer.

        One image's layers are cut by output columns (reading a 5 MB weight in two halves on two
        cores takes half as long); each needs all of the previous one's output."""
        n = z.shape[0]
        for k, (layer, weight, bias) in enumerate(linear_layers(self.prep, classifier, scale)):
            shape = (n, layer.out_features)
            y = self.arena.get(f"classifier.{k}", shape)
            self._add(_linear, z, weight, bias, layer.activation, y,
                      cuts=[(1, 1, 1, False), (2, 0, 1, False), (4, 1, 1, True)],
                      rows=layer.out_features, cost=_pass_cost(weight.size))
            z = y
        return z

    def _block_indicator(self, positions):
        """The (B, positions) matrix whose row b is 1 on positions [b L, (b + 1) L) (L = ``SUM_BLOCK``)."""
        count = -(-positions // SUM_BLOCK)
        blocks = self.arena.get(f"blocks{positions}", (count, positions))
        if self.arena.real:
            blocks[...] = 0
            for b in range(count):
                blocks[b, b * SUM_BLOCK:(b + 1) * SUM_BLOCK] = 1
        return blocks

    # ------------------------------------------------------------------ running

    def entry(self, index):
        """The whole output buffer of features.<index> (with its column of ones, if any)."""
        m = self.stages[index][1]
        return m.x if m.ones is None else m.ones

    def run(self, x=None, taps=(), start=0, stop=None, layout="NCHW", steps=None, threads=1, classify=True):
        """Run the plan on x (n, 3, H, W); return {name: output} for the ``taps`` asked for.

        With ``start`` > 0, x is ignored: the caller filled features.<start - 1> (``entry``).
        With ``stop``, only features.0 .. features.<stop - 1> run; with ``classify`` false, the
        classifier stops after the pooling (``pooled``). ``steps`` (from ``parallel.row_groups``)
        run on ``threads`` threads instead of the calls one by one."""
        if start == 0:
            np.copyto(self.x_interior, x)
        if steps is not None:
            run_steps(steps, threads)
        else:
            begin = self.stages[start - 1][2] if start else 0
            end = self.stages[stop - 1][2] if stop is not None else \
                len(self.calls) if classify or self.pooled is None else self.pooled_at
            for call in self.calls[begin:end]:
                call()
        return {name: export(m, layout) for name, m in self.points.items() if name in taps}     # in layer order


def export(m, layout="NCHW"):
    """A planned Map's values as a new array (offset added, divided by its scale), NCHW (C order) or NHWC."""
    values = m.x if m.offset is None else m.x + m.offset.astype(m.x.dtype)
    values = values if m.scale == 1 else values * (1.0 / m.scale)
    if layout == "NHWC":
        return np.array(values, copy=True, order="C")
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2))
