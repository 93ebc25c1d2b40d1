"""The fast kernels: NHWC versions of ``kernels.py``'s, the ones the fast engine runs.

Like CS231n's ``fast_layers.py`` beside ``layers.py``: the same mathematics, arranged for speed.
Each function here can be called on arrays (``tests/test_fast_kernels.py`` holds it equal to its
``kernels.py`` counterpart), and the engine's planner (``engine/plan.py``) builds its calls from
the same view and layout helpers.

Layout. Activations are NHWC and C-contiguous: an (N, H, W, C) map is also an (N*H*W, C) matrix,
so a 1x1 convolution is one matrix product (BLAS GEMM), and an (N*H, W*C) matrix whose rows are
long and contiguous, which is what element-wise passes and the depthwise convolution want. Weights:
1x1 convs (C_in, C_out) for ``x2d @ W``; depthwise convs (k, k, C); other convs (k*k*C_in, C_out)
with rows in im2col order (i, j, c).

What makes them fast (see ``benchmarks/README.md`` for the measurements):

- depthwise convolution, stride 1: the zero-padded input seen as rows of Wp*C floats, and one
  ``as_strided`` view ``V[n, h, i, j, x] = xpad[n, h + i*d, j*d*C + x]`` (x < W_out*C) that turns
  the convolution into one ``einsum('nhijx,ijx->nhx', V, W_tiled)`` whose inner loop runs over
  W_out*C contiguous values, with ``W_tiled[i, j, w*C + c] = weight[i, j, c]``;
- depthwise convolution, stride 2: on large maps the padded input's four space-to-depth phase
  planes (even/odd rows x even/odd columns): tap (i, j) reads plane (i % 2, j % 2) at offset
  (i // 2, j // 2) with stride 1, so each plane is again one row einsum; on small maps one einsum
  over a 6-d view whose inner loop is C;
- ReLU as ``clip(x, 0, BIG)`` with two finite bounds (with ``None`` NumPy takes a slower path);
- hard-swish as ``x * (clip(x, -3, 3) + 3)``, which is 6 * hard_swish(x): the engine leaves the
  1/6 to the next linear layer's weights. Its three passes (and the bias add before them) run over
  pieces of about ``PIECE`` floats, one after another, so that the piece and the scratch stay in
  cache between passes instead of each pass streaming the whole map from memory.
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .kernels import conv_output_size, resize_source

BIG = float(np.finfo(np.float32).max)   # a finite upper bound makes clip take its fast path
# np.clip is a Python function that reaches the ``clip`` ufunc through ndarray.clip; called directly,
# the ufunc saves ~2 microseconds a call, and the engine makes many small ones
try:
    from numpy._core.umath import clip          # NumPy 2
except ImportError:                             # pragma: no cover - older NumPy
    try:
        from numpy.core.umath import clip
    except ImportError:
        clip = np.clip
HS_SCALE = 6.0                          # hard_swish6(x) = HS_SCALE * hard_swish(x)
PHASE_MIN_WIDTH = 16                    # stride-2 depthwise convs with outputs this wide use phase planes
PIECE = 65536                           # floats per piece of hard_swish6 (256 KB in float32: fits in L2)
WHOLE = 4                               # ... which takes arrays of up to this many pieces whole


# --------------------------------------------------------------------------- activations

def relu(x, out=None):
    """max(x, 0)."""
    return clip(x, 0, BIG, out=out)


def relu6(x, out=None):
    """min(max(x, 0), 6)."""
    return clip(x, 0, 6, out=out)


def hard_swish6(x, out, bias=None, tmp=None):
    """``out = y * clip(y + 3, 0, 6)`` = 6 * hard_swish(y), where y = x + bias (added to x in place).

    x: (N, H, ...) C-contiguous, e.g. an NHWC map; out: x's shape, each ``out[n, h]`` contiguous
    (e.g. the interior of a zero-padded map); bias: None or an array that broadcasts over
    ``x[n, h]``'s trailing axes ((W, C) for an NHWC map, the (C,) bias tiled along W); tmp: None
    or scratch of x's shape (only its first piece is used; None: a new piece-sized array). Arrays
    of fewer than three axes or of at most ``WHOLE`` pieces are taken whole (more calls would cost
    more than the cache saves).

    Computed as y * (clip(y, -3, 3) + 3): the same floats (y + 3 is rounded once either way), and
    the in-place + 3 on the freshly written scratch is cheaper than an add from y. The passes run
    over pieces of rows ``x[n, h0:h1]`` of about ``PIECE`` floats, all with the same scratch.
    """
    if x.ndim < 3 or x.size <= WHOLE * PIECE:
        pieces = [(x, out)]
        scratch = np.empty_like(x) if tmp is None else tmp
    else:
        rows = max(1, PIECE // max(x[0, 0].size, 1))
        pieces = [(x[n, h:h + rows], out[n, h:h + rows]) for n in range(x.shape[0]) for h in range(0, x.shape[1], rows)]
        scratch = np.empty(pieces[0][0].shape, x.dtype) if tmp is None else tmp[0, :rows]
    for y, o in pieces:
        piece_tmp = scratch[:len(y)]
        if bias is not None:
            y += bias
        clip(y, -3, 3, out=piece_tmp)
        piece_tmp += 3
        np.multiply(y, piece_tmp, out=o)
    return out


def hard_swish(x):
    """x * relu6(x + 3) / 6, any shape."""
    out = np.empty_like(x)
    hard_swish6(x, out)
    out *= 1 / HS_SCALE
    return out


# --------------------------------------------------------------------------- padding and views

def pad(x, padding):
    """Zero-pad the two spatial axes of an NHWC array by ``padding`` on each side."""
    if padding == 0:
        return x
    return np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def rows_view(xp, kernel, ho, wo, dilation=1):
    """Stride-1 depthwise windows of a padded NHWC map as rows: (n, ho, k1, k2, wo * C),
    ``V[n, h, i, j, x] = xp[n, h + i*d, j*d*C + x]``; ``kernel`` is k or (k1, k2). No copy."""
    k1, k2 = (kernel, kernel) if isinstance(kernel, int) else kernel
    n, _, wp, c = xp.shape
    isz = xp.itemsize
    row = wp * c * isz
    return as_strided(xp, (n, ho, k1, k2, wo * c), (xp.strides[0], row, dilation * row, dilation * c * isz, isz),
                      writeable=False)


def tile_along_width(weight, wo):
    """Depthwise weight (k1, k2, C) repeated along the output width: (k1, k2, wo * C)."""
    k1, k2, c = weight.shape
    return np.ascontiguousarray(np.tile(weight.reshape(k1, k2, 1, c), (1, 1, wo, 1)).reshape(k1, k2, wo * c))


def strided_view(xp, k, ho, wo, stride, dilation=1):
    """Depthwise windows of a padded NHWC map with any stride: (n, ho, k, k, wo, C). No copy."""
    n, _, wp, c = xp.shape
    isz = xp.itemsize
    row = wp * c * isz
    return as_strided(xp, (n, ho, k, k, wo, c),
                      (xp.strides[0], stride * row, dilation * row, dilation * c * isz, stride * c * isz, isz),
                      writeable=False)


def broadcast_width(weight, wo):
    """Depthwise weight (k, k, C) broadcast along the output width, contiguous: (k, k, wo, C)."""
    k1, k2, c = weight.shape
    return np.ascontiguousarray(np.broadcast_to(weight[:, :, None, :], (k1, k2, wo, c)))


def phase_slices(k):
    """The four stride-2 phases of a k x k kernel: [((a, b), rows of taps, columns of taps)]."""
    return [((a, b), slice(a, k, 2), slice(b, k, 2)) for a in range(2) for b in range(2)]


def im2col_nhwc(xp, k, ho, wo, stride=1, dilation=1):
    """Every k x k window of a padded NHWC map as a view (n, ho, wo, k, k, C) (reshape to
    (n*ho*wo, k*k*C) for the matrix product). No copy."""
    n, _, wp, c = xp.shape
    s0, s1, s2, s3 = xp.strides
    return as_strided(xp, (n, ho, wo, k, k, c), (s0, stride * s1, stride * s2, dilation * s1, dilation * s2, s3),
                      writeable=False)


# --------------------------------------------------------------------------- layers

def depthwise_conv2d(x, weight, stride=1, padding=0, dilation=1):
    """Depthwise convolution, NHWC: x (N, H, W, C), weight (k, k, C) -> (N, H_out, W_out, C).

    ``weight[i, j, c]`` is ``kernels.depthwise_conv2d``'s ``weight[c, 0, i, j]``. Stride 1 is one
    row einsum; stride 2 on maps at least ``PHASE_MIN_WIDTH`` wide (dilation 1) goes through the
    four phase planes, otherwise one einsum over a 6-d view (see the module docstring).
    """
    n, h, w, c = x.shape
    k = weight.shape[0]
    ho = conv_output_size(h, k, stride, padding, dilation)
    wo = conv_output_size(w, k, stride, padding, dilation)
    xp = pad(x, padding)
    if stride == 1:
        out = np.einsum("nhijx,ijx->nhx", rows_view(xp, k, ho, wo, dilation), tile_along_width(weight, wo))
        return out.reshape(n, ho, wo, c)
    if stride == 2 and dilation == 1 and wo >= PHASE_MIN_WIDTH:
        out = np.zeros((n, ho, wo * c), x.dtype)
        for (a, b), rows, cols in phase_slices(k):
            taps = weight[rows, cols]
            plane = np.ascontiguousarray(xp[:, a::2, b::2])
            out += np.einsum("nhijx,ijx->nhx", rows_view(plane, taps.shape[:2], ho, wo), tile_along_width(taps, wo))
        return out.reshape(n, ho, wo, c)
    return np.einsum("nhijwc,ijwc->nhwc", strided_view(xp, k, ho, wo, stride, dilation), broadcast_width(weight, wo))


def conv1x1(x, weight, bias=None):
    """1x1 convolution, NHWC: x (N, H, W, C_in), weight (C_in, C_out), bias (C_out,) -> (N, H, W, C_out)."""
    n, h, w, c = x.shape
    y = np.matmul(x.reshape(-1, c), weight)
    if bias is not None:
        y += bias
    return y.reshape(n, h, w, weight.shape[1])


def conv2d(x, weight, bias=None, kernel=3, stride=1, padding=0, dilation=1):
    """k x k convolution, NHWC, through im2col: x (N, H, W, C_in), weight (k*k*C_in, C_out) with rows
    in (i, j, c) order (``conv_matrix``) -> (N, H_out, W_out, C_out)."""
    n, h, w, c = x.shape
    ho = conv_output_size(h, kernel, stride, padding, dilation)
    wo = conv_output_size(w, kernel, stride, padding, dilation)
    cols = im2col_nhwc(pad(x, padding), kernel, ho, wo, stride, dilation).reshape(n * ho * wo, -1)
    y = cols @ weight
    if bias is not None:
        y += bias
    return y.reshape(n, ho, wo, weight.shape[1])


def depthwise_taps(weight):
    """A PyTorch depthwise conv weight (C, 1, k, k) as the (k, k, C) array of ``depthwise_conv2d``."""
    return np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0))


def conv_matrix(weight):
    """A PyTorch conv weight (O, C, k, k) as the (k*k*C, O) matrix of ``conv2d`` (rows in (i, j, c) order)."""
    o = weight.shape[0]
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, o))


def global_avg_pool(x):
    """Mean over positions: (N, H, W, C) -> (N, C), as one matrix-vector product per image."""
    n, h, w, c = x.shape
    mean_vec = np.full((1, h * w), 1.0 / (h * w), x.dtype)
    return np.matmul(mean_vec, x.reshape(n, h * w, c))[:, 0]


def squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """Squeeze-and-excitation, NHWC: x (N, H, W, C); fc1_weight (C, S), fc2_weight (S, C) (transposed
    1x1 conv weights) -> x * hard_sigmoid(relu(mean(x) @ fc1 + b1) @ fc2 + b2), per image."""
    z = relu(global_avg_pool(x) @ fc1_weight + fc1_bias)
    gate = clip((z @ fc2_weight + fc2_bias) / 6 + 0.5, 0, 1)
    return x * gate[:, None, None, :]


def conv2d_by_taps(x, taps, bias=None, dilation=1):
    """A k x k convolution with stride 1 and "same" padding ((k - 1) // 2 * dilation), NHWC: x (N, H, W,
    C_in), taps (k, k, C_in, C_out) -> (N, H, W, C_out), as one matrix product per kernel tap over the
    rectangle of the output that the tap reaches inside the map::

        y[n, r, c] = bias + sum_{i, j} x[n, r + i*d - p, c + j*d - p] @ taps[i, j]   (where inside)

    A dilated tap that lands wholly in the padding (a dilation of 36 on a 33 x 33 map) costs nothing.
    """
    n, h, w, _ = x.shape
    k, out_channels = taps.shape[0], taps.shape[3]
    pad = (k - 1) // 2 * dilation
    y = np.zeros((n, h, w, out_channels), x.dtype)
    if bias is not None:
        y += bias
    for i in range(k):
        for j in range(k):
            dy, dx = i * dilation - pad, j * dilation - pad
            r0, r1, c0, c1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
            if r0 >= r1 or c0 >= c1:
                continue
            src = np.ascontiguousarray(x[:, r0 + dy:r1 + dy, c0 + dx:c1 + dx])
            y[:, r0:r1, c0:c1] += (src.reshape(-1, src.shape[-1]) @ taps[i, j]).reshape(n, r1 - r0, c1 - c0, -1)
    return y


def resize(x, size, align_corners=False):
    """Bilinear resize, NHWC: (N, H, W, C) -> (N, H_out, W_out, C); ``kernels.interpolate`` (the same
    positions, weights and order of operations: along W, then along H) for NHWC arrays."""
    h0, h1, wh0, wh1 = resize_source(x.shape[1], size[0], x.dtype, align_corners)
    w0, w1, ww0, ww1 = resize_source(x.shape[2], size[1], x.dtype, align_corners)
    rows = x[:, :, w0] * ww0[:, None] + x[:, :, w1] * ww1[:, None]
    out = rows[:, h0]
    out *= wh0[:, None, None]
    bottom = rows[:, h1]
    bottom *= wh1[:, None, None]
    out += bottom
    return out


def resize_nchw(x, size, align_corners=False, out=None):
    """``kernels.interpolate`` (the same floats) for a large NCHW output, one (H_out, W_out) plane at a
    time: the temporaries are one plane each and reused, where whole-array temporaries would cost
    more in page faults than the arithmetic itself. ``out``: an (N, C, H_out, W_out) array to fill
    (e.g. a slice of channels of a larger one, for threads that each resize some channels)."""
    n, c, height, width = x.shape
    out_h, out_w = size
    h0, h1, wh0, wh1 = resize_source(height, out_h, x.dtype, align_corners)
    w0, w1, ww0, ww1 = resize_source(width, out_w, x.dtype, align_corners)
    rows = x[..., w0] * ww0
    rows += x[..., w1] * ww1                              # (N, C, H, W_out)
    if out is None:
        out = np.empty((n, c, out_h, out_w), x.dtype)
    top, bottom = np.empty((2, out_h, out_w), x.dtype)
    for i in range(n):
        for k in range(c):
            np.take(rows[i, k], h0, axis=0, out=top, mode="clip")      # (mode "raise" would copy first)
            np.take(rows[i, k], h1, axis=0, out=bottom, mode="clip")
            np.multiply(top, wh0[:, None], out=top)
            np.multiply(bottom, wh1[:, None], out=bottom)
            np.add(top, bottom, out=out[i, k])
    return out
