"""The quantized kernels of int8 MobileNetV3, each twice: a plain loop version to read, and the vectorised one.

Affine quantization represents a real tensor ``x`` by integers ``q`` with a ``scale`` and a
``zero_point`` (the integer that stands for the real 0)::

    x ~ (q - zero_point) * scale

Activations are uint8 (q in 0..255, any zero point), weights int8 (q in -128..127, zero point 0,
"symmetric"). A quantized layer never leaves the integers: it accumulates products of integers in
int32 and *requantizes* the sum to the next tensor's scale and zero point::

    acc = bias_q + sum_k (x_q[k] - x_zp) * w_q[k]              int32, bias_q = rint(b * (1 / (s_x * s_w)))
    y_q = clamp(rint(acc * M) + y_zp, 0, 255),   M = (s_w * s_x) * (1 / s_y)

Everything here follows what PyTorch's quantized CPU kernels compute under the QNNPACK engine
(``torch.backends.quantized.engine = "qnnpack"``), to the bit: float32 wherever they use float32,
``rint`` (round half to even) where they round, the lookup tables of their hard-swish and
hard-sigmoid, and the fixed-point arithmetic of QNNPACK's residual add. A float64 stand-in for any of
these differs from PyTorch on some weights, and one wrong integer early in the network grows
through every layer after it.

Accumulating exactly. The vectorised convolutions and linear layers accumulate the integer products
with float64 BLAS (``kernels.conv2d`` and friends on integer-valued float64 arrays): every product
and partial sum is an integer below 2**53, so float64 holds it exactly. ``accumulator_bound`` says
how large an int32 accumulator can get for given weights; the network refuses weights whose
accumulator could pass 2**31 - 1 instead of letting an int32 kernel wrap around silently.

Arrays are NCHW like ``kernels.py``; integer outputs of the ``*_naive`` functions are int64 arrays,
of the vectorised accumulators integer-valued float64 arrays (the same numbers). Weights and biases
may be given as int8 / int64 arrays or as the same integers in float64 (what the network keeps, so
that nothing is converted per call).
"""

from typing import NamedTuple

import numpy as np

from . import fast_kernels as FK
from . import kernels as K

F32 = np.float32
UINT8_MIN, UINT8_MAX = 0, 255       # activations
INT8_MIN, INT8_MAX = -128, 127      # weights
INT32_MAX = 2 ** 31 - 1
HARD_SIGMOID_SCALE = F32(1 / 256)   # QNNPACK's quantized hard-sigmoid always outputs scale 1/256, zero point 0
HARD_SIGMOID_ZERO_POINT = 0


class QTensor(NamedTuple):
    """A quantized tensor: integer ``values`` (uint8 activations), their ``scale`` (float32) and ``zero_point``."""

    values: np.ndarray
    scale: np.float32
    zero_point: int

    def dequantize(self):
        """The real values it stands for, (values - zero_point) * scale, in float32."""
        return dequantize(self.values, self.scale, self.zero_point)


# --------------------------------------------------------------------------- quantize, dequantize, requantize

def quantize_naive(x, scale, zero_point):
    """Float to uint8, element by element: q = clamp(rint(x * (1 / scale)) + zero_point, 0, 255).

    x: any shape, float32. The multiplication by the reciprocal (not a division) and the float32
    arithmetic are PyTorch's (``quantize_per_tensor``)."""
    inverse = F32(1) / F32(scale)
    flat = np.asarray(x, F32).ravel()
    out = np.empty(flat.shape, np.uint8)
    for i, v in enumerate(flat):
        q = int(np.rint(F32(v) * inverse)) + int(zero_point)
        out[i] = min(max(q, UINT8_MIN), UINT8_MAX)
    return out.reshape(np.shape(x))


def quantize(x, scale, zero_point):
    """Vectorised ``quantize_naive``: (any shape) float32 -> uint8."""
    q = np.rint(np.asarray(x, F32) * (F32(1) / F32(scale))) + F32(zero_point)
    return np.clip(q, UINT8_MIN, UINT8_MAX).astype(np.uint8)


def dequantize_naive(q, scale, zero_point):
    """Integers back to reals, element by element: x = (q - zero_point) * scale, float32."""
    flat = np.asarray(q).ravel()
    out = np.array([F32(int(v) - int(zero_point)) * F32(scale) for v in flat], F32)
    return out.reshape(np.shape(q))


def dequantize(q, scale, zero_point):
    """Vectorised ``dequantize_naive``: (q - zero_point) * scale in float32."""
    return (np.asarray(q, F32) - F32(zero_point)) * F32(scale)


def requantization_multiplier(input_scales, output_scale):
    """M = (product of ``input_scales``) * (1 / output_scale), in float32 as PyTorch computes it.

    A convolution's inputs are (weight scale, activation scale); the SE multiply's the two factors'."""
    product = F32(1)
    for s in input_scales:
        product = F32(product * F32(s))
    return F32(product * (F32(1) / F32(output_scale)))


def requantize_naive(acc, multiplier, zero_point, relu=False):
    """An int32 accumulator to uint8, element by element::

        y = clamp(rint(float32(acc) * M) + zero_point, lo, 255),   lo = zero_point with ``relu``, else 0

    ``float32(acc)`` rounds sums beyond 2**24 as the kernels' int-to-float conversion does; ``rint``
    rounds half to even. ReLU fused into a convolution is only the clamp at the zero point (real 0).
    """
    low = int(zero_point) if relu else UINT8_MIN
    flat = np.asarray(acc).ravel()
    out = np.empty(flat.shape, np.uint8)
    for i, a in enumerate(flat):
        q = int(np.rint(F32(a) * F32(multiplier))) + int(zero_point)
        out[i] = min(max(q, low), UINT8_MAX)
    return out.reshape(np.shape(acc))


def requantize(acc, multiplier, zero_point, relu=False):
    """Vectorised ``requantize_naive``: accumulators (integer-valued, any shape) -> uint8."""
    y = np.asarray(acc).astype(F32)
    y *= F32(multiplier)
    np.rint(y, out=y)
    y += F32(zero_point)
    FK.clip(y, F32(zero_point if relu else UINT8_MIN), F32(UINT8_MAX), out=y)
    return y.astype(np.uint8)


# --------------------------------------------------------------------------- weights and biases

def symmetric_weight_scale(min_val, max_val, eps=np.finfo(F32).eps):
    """The int8 weight scale of a symmetric observer that saw [min_val, max_val]::

        scale = max(-min(min_val, 0), max(max_val, 0)) / 127.5,  at least float32 eps

    (127.5 = (127 - (-128)) / 2; PyTorch's ``per_tensor_symmetric`` rule, in float32)."""
    largest = max(-min(F32(min_val), F32(0)), max(F32(max_val), F32(0)))
    return max(F32(F32(largest) / F32(127.5)), F32(eps))


def affine_qparams(min_val, max_val, eps=np.finfo(F32).eps):
    """(scale, zero_point) of a uint8 activation observer that saw [min_val, max_val]::

        scale = (max(max_val, 0) - min(min_val, 0)) / 255   (at least eps)
        zero_point = clamp(0 - rint(min(min_val, 0) / scale), 0, 255)

    in float32, PyTorch's ``per_tensor_affine`` rule. An observer that saw nothing (min = +inf)
    gives (1.0, 0), as PyTorch's does."""
    min_val, max_val = F32(min_val), F32(max_val)
    if not min_val <= max_val:
        return F32(1.0), 0
    low, high = min(min_val, F32(0)), max(max_val, F32(0))
    scale = max(F32(F32(high - low) / F32(UINT8_MAX - UINT8_MIN)), F32(eps))
    zero_point = UINT8_MIN - int(np.rint(F32(low / scale)))
    return scale, min(max(zero_point, UINT8_MIN), UINT8_MAX)


def quantize_weight(w, scale):
    """Float weights to int8: clamp(rint(w * (1 / scale)), -128, 127) in float32 (any shape)."""
    q = np.rint(np.asarray(w, F32) * (F32(1) / F32(scale)))
    return np.clip(q, INT8_MIN, INT8_MAX).astype(np.int8)


def quantize_bias(b, input_scale, weight_scale):
    """A float bias to the int32 accumulator's units: rint(b * (1 / (s_x * s_w))) in float32.

    The multiplication by the reciprocal is PyTorch's; a division rounds b / s = k + 0.5 the other way
    now and then, and that one integer then shifts every output of its channel. Returns int64 (the
    int32 values); ValueError when one does not fit in int32."""
    q = np.rint(np.asarray(b, F32) * (F32(1) / F32(F32(input_scale) * F32(weight_scale)))).astype(np.int64)
    if q.size and np.abs(q).max() > INT32_MAX:
        raise ValueError(f"bias: {np.abs(q).max()} does not fit in int32 at scale {input_scale} * {weight_scale}")
    return q


def accumulator_bound(w_q, bias_q):
    """The largest |accumulator| any uint8 input can give, per output channel: 255 * sum |w_q| + |bias_q|.

    w_q: (O, ...) int8; bias_q: (O,). An int32 kernel is exact while this stays below 2**31."""
    w = np.abs(np.asarray(w_q, np.int64)).reshape(len(w_q), -1)
    return UINT8_MAX * w.sum(axis=1) + np.abs(np.asarray(bias_q, np.int64))


# --------------------------------------------------------------------------- convolutions and linear layers

def conv2d_naive(x_q, x_zero_point, w_q, bias_q, stride=1, padding=0, dilation=1):
    """Quantized 2-D convolution's int32 accumulator, spelt out in integers.

    x_q: (N, C, H, W) uint8; w_q: (O, C, kh, kw) int8; bias_q: (O,) -> (N, O, H_out, W_out) int64::

        acc[n, o, oh, ow] = bias_q[o] + sum_{c, i, j} w_q[o, c, i, j] * (xpad[n, c, ...] - x_zero_point)

    The padding stands for real zeros, i.e. for the zero point (0 after subtracting it)."""
    centred = np.asarray(x_q, np.int64) - int(x_zero_point)
    acc = K.conv2d_naive(centred, np.asarray(w_q, np.int64), None, stride, padding, dilation)
    return acc + np.asarray(bias_q, np.int64)[None, :, None, None]


def _centred(x_q, x_zero_point):
    """x_q - zero_point as float64 (exact integers)."""
    x = np.asarray(x_q, np.float64)
    if x is x_q:
        x = x.copy()
    x -= float(x_zero_point)
    return x


def conv2d(x_q, x_zero_point, w_q, bias_q, stride=1, padding=0, dilation=1):
    """Vectorised ``conv2d_naive``: im2col and one float64 matrix product per image (exact)."""
    acc = K.conv2d(_centred(x_q, x_zero_point), np.asarray(w_q, np.float64), None, stride, padding, dilation)
    acc += np.asarray(bias_q, np.float64)[None, :, None, None]
    return acc


def depthwise_conv2d_naive(x_q, x_zero_point, w_q, bias_q, stride=1, padding=0, dilation=1):
    """Quantized depthwise convolution's accumulator (groups = C), in integers.

    x_q: (N, C, H, W) uint8; w_q: (C, 1, kh, kw) int8; bias_q: (C,) -> (N, C, H_out, W_out) int64."""
    centred = np.asarray(x_q, np.int64) - int(x_zero_point)
    acc = K.depthwise_conv2d_naive(centred, np.asarray(w_q, np.int64), stride, padding, dilation)
    return acc + np.asarray(bias_q, np.int64)[None, :, None, None]


def depthwise_conv2d(x_q, x_zero_point, w_q, bias_q, stride=1, padding=0, dilation=1):
    """Vectorised ``depthwise_conv2d_naive``, in float64 (exact): the fast NHWC kernel
    (``fast_kernels.depthwise_conv2d``, whose inner loops run over W * C contiguous values) on the
    channels-last view of x, then back to NCHW."""
    centred = np.ascontiguousarray(_centred(x_q, x_zero_point).transpose(0, 2, 3, 1))
    taps = FK.depthwise_taps(np.asarray(w_q, np.float64))       # (k, k, C)
    acc = FK.depthwise_conv2d(centred, taps, stride, padding, dilation)
    acc += np.asarray(bias_q, np.float64)
    return acc.transpose(0, 3, 1, 2)


def linear_naive(x_q, x_zero_point, w_q, bias_q):
    """Quantized fully connected layer's accumulator. x_q: (N, I) uint8, w_q: (O, I) int8 -> (N, O) int64::

        acc[n, o] = bias_q[o] + sum_i w_q[o, i] * (x_q[n, i] - x_zero_point)"""
    centred = np.asarray(x_q, np.int64) - int(x_zero_point)
    return K.linear_naive(centred, np.asarray(w_q, np.int64), np.asarray(bias_q, np.int64))


def linear(x_q, x_zero_point, w_q, bias_q):
    """Vectorised ``linear_naive``: one float64 matrix product (exact)."""
    return K.linear(_centred(x_q, x_zero_point), np.asarray(w_q, np.float64), np.asarray(bias_q, np.float64))


# --------------------------------------------------------------------------- activations as lookup tables

def hard_swish_real(x):
    """hard_swish on float32 reals as the quantized kernel evaluates it: x * min(max(x + 3, 0), 6) / 6."""
    return x * np.clip(x + F32(3), F32(0), F32(6)) / F32(6)


def hard_sigmoid_real(x):
    """hard_sigmoid on float32 reals as the quantized kernel evaluates it: min(max(x + 3, 0), 6) / 6."""
    return np.clip(x + F32(3), F32(0), F32(6)) / F32(6)


def _activation_naive(q, function, in_scale, in_zero_point, out_scale, out_zero_point):
    """Element by element: dequantize, apply ``function`` in float32, requantize (rint, clamp)."""
    inverse = F32(1) / F32(out_scale)
    flat = np.asarray(q).ravel()
    out = np.empty(flat.shape, np.uint8)
    for i, v in enumerate(flat):
        x = F32(in_scale) * F32(int(v) - int(in_zero_point))
        y = min(max(inverse * function(x) + F32(out_zero_point), F32(UINT8_MIN)), F32(UINT8_MAX))
        out[i] = int(np.rint(y))
    return out.reshape(np.shape(q))


def activation_table(function, in_scale, in_zero_point, out_scale, out_zero_point):
    """The 256-entry table of a quantized activation: table[q] is the output for input integer q.

    A uint8 input has only 256 values, so any element-wise function is a lookup; this is how
    PyTorch's kernels evaluate hard-swish and hard-sigmoid. The same float32 steps as
    ``_activation_naive``, on all 256 inputs at once."""
    x = F32(in_scale) * (np.arange(256) - int(in_zero_point)).astype(F32)
    y = (F32(1) / F32(out_scale)) * function(x) + F32(out_zero_point)
    return np.rint(np.clip(y, F32(UINT8_MIN), F32(UINT8_MAX))).astype(np.uint8)


def hard_swish_naive(q, in_scale, in_zero_point, out_scale, out_zero_point):
    """Quantized hard-swish, element by element: y = requantize(hard_swish(dequantize(q))). uint8 -> uint8."""
    return _activation_naive(q, hard_swish_real, in_scale, in_zero_point, out_scale, out_zero_point)


def hard_swish(q, in_scale, in_zero_point, out_scale, out_zero_point):
    """Vectorised ``hard_swish_naive``: one lookup in the 256-entry table (``activation_table``)."""
    return activation_table(hard_swish_real, in_scale, in_zero_point, out_scale, out_zero_point)[q]


def hard_sigmoid_naive(q, in_scale, in_zero_point):
    """Quantized hard-sigmoid, element by element, to scale 1/256 and zero point 0 (QNNPACK's fixed output
    quantization: the gate's range [0, 1] in 256 steps, 1 itself clamped to 255/256). uint8 -> uint8."""
    return _activation_naive(q, hard_sigmoid_real, in_scale, in_zero_point, HARD_SIGMOID_SCALE,
                             HARD_SIGMOID_ZERO_POINT)


def hard_sigmoid(q, in_scale, in_zero_point):
    """Vectorised ``hard_sigmoid_naive``: one lookup in the 256-entry table."""
    return activation_table(hard_sigmoid_real, in_scale, in_zero_point, HARD_SIGMOID_SCALE,
                            HARD_SIGMOID_ZERO_POINT)[q]


def relu_naive(q, zero_point):
    """Quantized ReLU (same scale and zero point): max(q, zero_point), element by element."""
    flat = np.asarray(q).ravel()
    return np.array([max(int(v), int(zero_point)) for v in flat], np.uint8).reshape(np.shape(q))


def relu(q, zero_point):
    """Vectorised ``relu_naive``. (In the network ReLU is fused into the convolution's requantization.)"""
    return np.maximum(q, np.uint8(zero_point))


# --------------------------------------------------------------------------- squeeze-and-excite multiply

def mul_naive(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point):
    """Quantized element-wise product (b broadcast against a), element by element::

        y = clamp(rint(float32((a - a_zp) * (b - b_zp)) * M) + y_zp, 0, 255),   M = (s_a * s_b) * (1 / s_y)

    The SE block multiplies each channel (a: (N, C, H, W)) by its gate (b: (N, C, 1, 1))."""
    m = requantization_multiplier((a_scale, b_scale), out_scale)
    a, b = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(b, np.int64))
    products = np.empty(a.shape, np.int64)
    for index in np.ndindex(a.shape):
        products[index] = (int(a[index]) - int(a_zero_point)) * (int(b[index]) - int(b_zero_point))
    return requantize_naive(products, m, out_zero_point)


def mul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point):
    """Vectorised ``mul_naive`` (products below 2**16: exact in float32)."""
    product = (np.asarray(a, F32) - F32(a_zero_point)) * (np.asarray(b, F32) - F32(b_zero_point))
    return requantize(product, requantization_multiplier((a_scale, b_scale), out_scale), out_zero_point)


# --------------------------------------------------------------------------- residual add (QNNPACK fixed point)

def add_parameters(a_scale, b_scale, out_scale):
    """QNNPACK's fixed-point add: integer multipliers (a_mult, b_mult) and a right ``shift``.

    The two ratios r = s_a / s_y and r_b = s_b / s_y (float32) become integers below 2**22 in units
    of 2**-shift, the larger of them in [2**21, 2**22)::

        shift = 21 - exponent(max(r_a, r_b)),   a_mult = rint(r_a * 2**shift),   b_mult likewise
    """
    ra, rb = F32(F32(a_scale) / F32(out_scale)), F32(F32(b_scale) / F32(out_scale))
    if not (2.0 ** -14 <= min(ra, rb) and max(ra, rb) < 2.0 ** 8):
        raise ValueError(f"add: scale ratios {ra}, {rb} outside QNNPACK's range [2**-14, 2**8)")
    exponent = int(np.frexp(max(ra, rb))[1]) - 1             # max = m * 2**exponent, 1 <= m < 2
    shift = 21 - exponent
    unit = F32(2.0 ** shift)
    return int(np.rint(F32(ra * unit))), int(np.rint(F32(rb * unit))), shift


def _shift_round(acc, shift):
    """acc / 2**shift rounded half away from zero, in integers (QNNPACK's rounding shift)."""
    remainder = (acc & ((1 << shift) - 1)) - (acc < 0)
    return (acc >> shift) + (remainder > ((1 << shift) - 1) >> 1)


def add_naive(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point):
    """Quantized a + b (same shapes), element by element, in QNNPACK's fixed point::

        acc = a_mult * (a - a_zp) + b_mult * (b - b_zp)                       (see ``add_parameters``)
        y   = clamp(round_half_away(acc / 2**shift) + y_zp, 0, 255)
    """
    a_mult, b_mult, shift = add_parameters(a_scale, b_scale, out_scale)
    flat_a, flat_b = np.asarray(a).ravel(), np.asarray(b).ravel()
    out = np.empty(flat_a.shape, np.uint8)
    for i in range(flat_a.size):
        acc = a_mult * (int(flat_a[i]) - int(a_zero_point)) + b_mult * (int(flat_b[i]) - int(b_zero_point))
        out[i] = min(max(int(_shift_round(acc, shift)) + int(out_zero_point), UINT8_MIN), UINT8_MAX)
    return out.reshape(np.shape(a))


def add(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_scale, out_zero_point):
    """Vectorised ``add_naive`` (int64 arithmetic)."""
    a_mult, b_mult, shift = add_parameters(a_scale, b_scale, out_scale)
    acc = a_mult * (np.asarray(a, np.int64) - int(a_zero_point)) + b_mult * (np.asarray(b, np.int64) - int(b_zero_point))
    return np.clip(_shift_round(acc, shift) + int(out_zero_point), UINT8_MIN, UINT8_MAX).astype(np.uint8)


# --------------------------------------------------------------------------- global average pooling

def pool_multiplier(scale, count):
    """s_x / (s_y * count) with s_y = s_x, in float32: close to 1 / count, and not always equal to it."""
    return F32(F32(scale) / F32(F32(scale) * F32(count)))


def global_avg_pool_naive(q, zero_point, scale):
    """Quantized mean over all positions of each channel (output scale and zero point = the input's).

    q: (N, C, H, W) uint8 -> (N, C) uint8::

        y = clamp(rint(float32(sum (q - zp)) * (s / (s * H * W))) + zp, 0, 255)

    The float32 multiplier ``pool_multiplier`` is what decides the many exact ties (sum / count
    ending in .5): it is a hair below or above 1 / count depending on the scale."""
    n_batch, channels, height, width = np.shape(q)
    m = pool_multiplier(scale, height * width)
    totals = np.empty((n_batch, channels), np.int64)
    for n in range(n_batch):
        for c in range(channels):
            totals[n, c] = sum(int(v) - int(zero_point) for v in np.asarray(q[n, c]).ravel())
    return requantize_naive(totals, m, zero_point)


def global_avg_pool(q, zero_point, scale):
    """Vectorised ``global_avg_pool_naive``: (N, C, H, W) -> (N, C)."""
    count = q.shape[2] * q.shape[3]
    total = q.sum(axis=(2, 3), dtype=np.int64) - int(zero_point) * count
    return requantize(total, pool_multiplier(scale, count), zero_point)
