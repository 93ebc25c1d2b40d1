"""The kernels of MobileNetV3, each twice: a plain loop version to read, and the vectorised one to run.

Every array is NCHW: ``x`` has shape (N, C, H, W). Conv weights are OIHW as in PyTorch.
The ``*_naive`` functions spell the formula out with Python loops; they are slow and exist to be
read and to check the vectorised functions against (``tests/test_kernels.py`` holds each pair
equal, and equal to ``torch.nn.functional``). All kernels keep the dtype of their input.

Output size of a convolution along one axis (PyTorch's rule)::

    H_out = floor((H + 2 * padding - dilation * (k - 1) - 1) / stride) + 1
"""

import math

import numpy as np


def conv_output_size(size, kernel, stride=1, padding=0, dilation=1):
    """Length of a convolution's output along one axis of length ``size``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pad(x, padding):
    """Zero-pad the two spatial axes of an NCHW array by ``padding`` on each side."""
    if padding == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


# --------------------------------------------------------------------------- im2col

def im2col_naive(x, kh, kw, stride=1, padding=0, dilation=1):
    """Unfold every receptive field of ``x`` into a column.

    x: (N, C, H, W) -> cols: (N, C * kh * kw, H_out * W_out), where::

        cols[n, (c * kh + i) * kw + j, oh * W_out + ow] = xpad[n, c, oh * stride + i * dilation,
                                                                    ow * stride + j * dilation]
    """
    n_batch, channels, height, width = x.shape
    h_out = conv_output_size(height, kh, stride, padding, dilation)
    w_out = conv_output_size(width, kw, stride, padding, dilation)
    xp = _pad(x, padding)
    cols = np.zeros((n_batch, channels * kh * kw, h_out * w_out), dtype=x.dtype)
    for n in range(n_batch):
        for c in range(channels):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    for oh in range(h_out):
                        for ow in range(w_out):
                            cols[n, row, oh * w_out + ow] = xp[n, c, oh * stride + i * dilation,
                                                               ow * stride + j * dilation]
    return cols


def im2col(x, kh, kw, stride=1, padding=0, dilation=1):
    """Vectorised ``im2col_naive``: one strided slice per kernel tap (i, j) instead of per pixel."""
    n_batch, channels, height, width = x.shape
    h_out = conv_output_size(height, kh, stride, padding, dilation)
    w_out = conv_output_size(width, kw, stride, padding, dilation)
    xp = _pad(x, padding)
    cols = np.empty((n_batch, channels, kh, kw, h_out, w_out), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation, j * dilation
            cols[:, :, i, j] = xp[:, :, top:top + stride * (h_out - 1) + 1:stride,
                                  left:left + stride * (w_out - 1) + 1:stride]
    return cols.reshape(n_batch, channels * kh * kw, h_out * w_out)


# --------------------------------------------------------------------------- convolution

def conv2d_naive(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """Standard 2-D convolution (cross-correlation, as in PyTorch).

    x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> (N, O, H_out, W_out)::

        y[n, o, oh, ow] = bias[o] + sum_{c, i, j} weight[o, c, i, j]
                                     * xpad[n, c, oh * stride + i * dilation, ow * stride + j * dilation]
    """
    n_batch, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    h_out = conv_output_size(height, kh, stride, padding, dilation)
    w_out = conv_output_size(width, kw, stride, padding, dilation)
    xp = _pad(x, padding)
    y = np.zeros((n_batch, out_channels, h_out, w_out), dtype=x.dtype)
    for n in range(n_batch):
        for o in range(out_channels):
            for oh in range(h_out):
                for ow in range(w_out):
                    total = 0.0 if bias is None else bias[o]
                    for i in range(kh):
                        for j in range(kw):
                            pixel = xp[n, :, oh * stride + i * dilation, ow * stride + j * dilation]
                            total = total + np.dot(weight[o, :, i, j], pixel)
                    y[n, o, oh, ow] = total
    return y


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """Vectorised ``conv2d_naive``: im2col, then one matrix product per image.

    y[n] = weight.reshape(O, C * kh * kw) @ im2col(x)[n]   (+ bias).
    A 1x1 convolution with stride 1 needs no im2col: it is ``weight[:, :, 0, 0] @ x.reshape(N, C, H*W)``.
    """
    n_batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    h_out = conv_output_size(height, kh, stride, padding, dilation)
    w_out = conv_output_size(width, kw, stride, padding, dilation)
    if kh == kw == 1 and stride == 1 and padding == 0:
        cols = x.reshape(n_batch, channels, height * width)
    else:
        cols = im2col(x, kh, kw, stride, padding, dilation)
    y = np.matmul(weight.reshape(out_channels, -1), cols)
    if bias is not None:
        y += bias[:, None]
    return y.reshape(n_batch, out_channels, h_out, w_out)


def depthwise_conv2d_naive(x, weight, stride=1, padding=0, dilation=1):
    """Depthwise convolution: each channel is convolved with its own kernel (groups = C).

    x: (N, C, H, W), weight: (C, 1, kh, kw) -> (N, C, H_out, W_out)::

        y[n, c, oh, ow] = sum_{i, j} weight[c, 0, i, j] * xpad[n, c, oh * stride + i * dilation,
                                                                     ow * stride + j * dilation]
    """
    n_batch, channels, height, width = x.shape
    kh, kw = weight.shape[2:]
    h_out = conv_output_size(height, kh, stride, padding, dilation)
    w_out = conv_output_size(width, kw, stride, padding, dilation)
    xp = _pad(x, padding)
    y = np.zeros((n_batch, channels, h_out, w_out), dtype=x.dtype)
    for n in range(n_batch):
        for c in range(channels):
            for oh in range(h_out):
                for ow in range(w_out):
                    total = 0.0
                    for i in range(kh):
                        for j in range(kw):
                            total += weight[c, 0, i, j] * xp[n, c, oh * stride + i * dilation,
                                                             ow * stride + j * dilation]
                    y[n, c, oh, ow] = total
    return y


def depthwise_conv2d(x, weight, stride=1, padding=0, dilation=1):
    """Vectorised ``depthwise_conv2d_naive``: shift and accumulate, one whole-array step per tap.

    y = sum_{i, j} weight[:, 0, i, j] (broadcast over C) * xpad[:, :, i*d :: stride, j*d :: stride]
    """
    n_batch, channels, height, width = x.shape
    kh, kw = weight.shape[2:]
    h_out = conv_output_size(height, kh, stride, padding, dilation)
    w_out = conv_output_size(width, kw, stride, padding, dilation)
    xp = _pad(x, padding)
    y = np.zeros((n_batch, channels, h_out, w_out), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation, j * dilation
            window = xp[:, :, top:top + stride * (h_out - 1) + 1:stride,
                        left:left + stride * (w_out - 1) + 1:stride]
            y += weight[:, 0, i, j][None, :, None, None] * window
    return y


# --------------------------------------------------------------------------- batch norm

def batch_norm_naive(x, running_mean, running_var, weight, bias, eps=0.001):
    """Batch normalisation in inference form, channel by channel.

    x: (N, C, H, W); the four statistics and parameters have shape (C,)::

        y[:, c] = (x[:, c] - running_mean[c]) / sqrt(running_var[c] + eps) * weight[c] + bias[c]
    """
    y = np.empty_like(x)
    for c in range(x.shape[1]):
        y[:, c] = (x[:, c] - running_mean[c]) / np.sqrt(running_var[c] + eps) * weight[c] + bias[c]
    return y


def batch_norm(x, running_mean, running_var, weight, bias, eps=0.001):
    """Vectorised ``batch_norm_naive``: y = x * scale + shift with (1, C, 1, 1) broadcasting,
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale."""
    scale = weight / np.sqrt(running_var + eps)
    shift = bias - running_mean * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def fold_batch_norm(conv_weight, running_mean, running_var, weight, bias, eps=0.001):
    """Fold an inference BatchNorm into the convolution before it.

    conv_weight: (O, C, kh, kw) -> (folded_weight (O, C, kh, kw), folded_bias (O,)) such that
    ``batch_norm(conv(x, conv_weight)) == conv(x, folded_weight) + folded_bias``::

        scale = weight / sqrt(running_var + eps)
        folded_weight = conv_weight * scale[:, None, None, None]
        folded_bias   = bias - running_mean * scale

    Computed in float64 and returned in ``conv_weight``'s dtype, so float32 weights lose nothing extra.
    """
    scale = np.asarray(weight, np.float64) / np.sqrt(np.asarray(running_var, np.float64) + eps)
    folded_weight = np.asarray(conv_weight, np.float64) * scale[:, None, None, None]
    folded_bias = np.asarray(bias, np.float64) - np.asarray(running_mean, np.float64) * scale
    return folded_weight.astype(conv_weight.dtype), folded_bias.astype(conv_weight.dtype)


# --------------------------------------------------------------------------- activations

def relu_naive(x):
    """relu(x) = max(x, 0), element by element."""
    flat = x.ravel()
    return np.array([v if v > 0 else 0 for v in flat], dtype=x.dtype).reshape(x.shape)


def relu(x):
    """relu(x) = max(x, 0)."""
    return np.maximum(x, 0)


def relu6_naive(x):
    """relu6(x) = min(max(x, 0), 6), element by element (SSDLite's activation)."""
    flat = x.ravel()
    return np.array([0 if v < 0 else 6 if v > 6 else v for v in flat], dtype=x.dtype).reshape(x.shape)


def relu6(x):
    """relu6(x) = min(max(x, 0), 6)."""
    return np.clip(x, 0, 6)


def sigmoid_naive(x):
    """sigmoid(x) = 1 / (1 + exp(-x)), element by element (written as exp(x) / (1 + exp(x)) for x < 0,
    so that exp never overflows)."""
    def one(v):
        if v >= 0:
            return 1.0 / (1.0 + math.exp(-v))
        e = math.exp(v)
        return e / (1.0 + e)
    flat = x.ravel()
    return np.array([one(float(v)) for v in flat], dtype=x.dtype).reshape(x.shape)


def sigmoid(x):
    """sigmoid(x) = 1 / (1 + exp(-x)) (the logistic function), computed from e = exp(-|x|) without
    overflow: 1 / (1 + e) for x >= 0, e / (1 + e) below."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def hard_sigmoid_naive(x):
    """hard_sigmoid(x) = relu6(x + 3) / 6: 0 below -3, 1 above 3, the line x / 6 + 1/2 between."""
    def one(v):
        if v <= -3:
            return 0.0
        if v >= 3:
            return 1.0
        return (v + 3) / 6
    flat = x.ravel()
    return np.array([one(v) for v in flat], dtype=x.dtype).reshape(x.shape)


def hard_sigmoid(x):
    """hard_sigmoid(x) = min(max(x + 3, 0), 6) / 6, a piecewise-linear stand-in for sigmoid."""
    return np.clip(x + 3, 0, 6) / 6


def hard_swish_naive(x):
    """hard_swish(x) = x * relu6(x + 3) / 6: 0 below -3, x above 3, x (x + 3) / 6 between."""
    def one(v):
        if v <= -3:
            return 0.0
        if v >= 3:
            return v
        return v * (v + 3) / 6
    flat = x.ravel()
    return np.array([one(v) for v in flat], dtype=x.dtype).reshape(x.shape)


def hard_swish(x):
    """hard_swish(x) = x * min(max(x + 3, 0), 6) / 6, a cheap stand-in for swish(x) = x * sigmoid(x)."""
    return x * np.clip(x + 3, 0, 6) / 6


# --------------------------------------------------------------------------- pooling, linear, SE

def global_avg_pool_naive(x):
    """Mean over all positions of each channel: (N, C, H, W) -> (N, C)."""
    n_batch, channels, height, width = x.shape
    y = np.zeros((n_batch, channels), dtype=x.dtype)
    for n in range(n_batch):
        for c in range(channels):
            total = 0.0
            for h in range(height):
                for w in range(width):
                    total += x[n, c, h, w]
            y[n, c] = total / (height * width)
    return y


def global_avg_pool(x):
    """Mean over all positions of each channel: (N, C, H, W) -> (N, C)."""
    return x.mean(axis=(2, 3))


def linear_naive(x, weight, bias=None):
    """Fully connected layer. x: (N, I), weight: (O, I), bias: (O,) -> (N, O)::

        y[n, o] = bias[o] + sum_i weight[o, i] * x[n, i]
    """
    n_batch, out_features = x.shape[0], weight.shape[0]
    y = np.zeros((n_batch, out_features), dtype=x.dtype)
    for n in range(n_batch):
        for o in range(out_features):
            total = 0.0 if bias is None else bias[o]
            for i in range(weight.shape[1]):
                total += weight[o, i] * x[n, i]
            y[n, o] = total
    return y


def linear(x, weight, bias=None):
    """Fully connected layer: y = x @ weight.T + bias; (N, I) -> (N, O)."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def squeeze_excite_naive(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """Squeeze-and-excitation in torchvision's form, one image at a time.

    x: (N, C, H, W); fc1_weight: (S, C, 1, 1), fc1_bias: (S,); fc2_weight: (C, S, 1, 1), fc2_bias: (C,)::

        s = mean_{h, w} x[n]                           squeeze: one number per channel, (C,)
        z = relu(fc1_weight @ s + fc1_bias)            (S,)   S = make_divisible(C // 4, 8)
        e = hard_sigmoid(fc2_weight @ z + fc2_bias)    (C,)   excitation: a weight in [0, 1]
        y[n, c] = x[n, c] * e[c]                       scale each channel

    The 1x1 convolutions on a 1x1 map are plain matrix-vector products.
    """
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        s = global_avg_pool_naive(x[n:n + 1])[0]
        z = relu_naive(linear_naive(s[None], fc1_weight[:, :, 0, 0], fc1_bias))[0]
        e = hard_sigmoid_naive(linear_naive(z[None], fc2_weight[:, :, 0, 0], fc2_bias))[0]
        for c in range(x.shape[1]):
            y[n, c] = x[n, c] * e[c]
    return y


def squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """Vectorised ``squeeze_excite_naive``: the whole batch at once. (N, C, H, W) -> (N, C, H, W)."""
    s = global_avg_pool(x)                                              # (N, C)
    z = relu(linear(s, fc1_weight[:, :, 0, 0], fc1_bias))               # (N, S)
    e = hard_sigmoid(linear(z, fc2_weight[:, :, 0, 0], fc2_bias))       # (N, C)
    return x * e[:, :, None, None]


# --------------------------------------------------------------------------- resizing

def resize_source(in_size, out_size, dtype, align_corners=False):
    """For each output position along one axis: (i0, i1, w0, w1), the two input positions it reads and
    their weights, as ``F.interpolate(mode="bilinear")`` computes them::

        align_corners=False:  src = (in / out) * (i + 0.5) - 0.5, clamped at 0
        align_corners=True:   src = (in - 1) / (out - 1) * i
        i0 = min(floor(src), in - 1),  i1 = i0 + 1 (in - 1 at the edge),  w1 = src - i0,  w0 = 1 - w1

    in ``dtype`` like PyTorch, whose compiled ``scale * (i + 0.5) - 0.5`` is one fused multiply-add
    (rounded once): here it is computed in a wider type and then rounded to ``dtype``.
    """
    dt = np.dtype(dtype).type
    wide = np.float64 if np.dtype(dtype).itemsize < 8 else np.longdouble
    i = np.arange(out_size, dtype=wide)
    if align_corners:
        scale = dt((in_size - 1) / (out_size - 1)) if out_size > 1 else dt(0)
        src = (wide(scale) * i).astype(dtype)
    else:
        scale = dt(in_size) / dt(out_size)
        src = np.maximum(wide(scale) * (i + wide(0.5)) - wide(0.5), 0).astype(dtype)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    return i0, i1, (dt(1) - w1).astype(dtype), w1


def interpolate_naive(x, size, align_corners=False):
    """Bilinear resize of x (N, C, H, W) to ``size`` = (H_out, W_out), pixel by pixel::

        y[n, c, i, j] = wh0[i] * (ww0[j] * x[n, c, h0[i], w0[j]] + ww1[j] * x[n, c, h0[i], w1[j]])
                      + wh1[i] * (ww0[j] * x[n, c, h1[i], w0[j]] + ww1[j] * x[n, c, h1[i], w1[j]])

    with the positions and weights of ``resize_source`` along each axis. No antialiasing: as
    ``torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=...)``.
    """
    n_batch, channels, height, width = x.shape
    out_h, out_w = size
    h0, h1, wh0, wh1 = resize_source(height, out_h, x.dtype, align_corners)
    w0, w1, ww0, ww1 = resize_source(width, out_w, x.dtype, align_corners)
    y = np.empty((n_batch, channels, out_h, out_w), dtype=x.dtype)
    for n in range(n_batch):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    top = x[n, c, h0[i], w0[j]] * ww0[j] + x[n, c, h0[i], w1[j]] * ww1[j]
                    bottom = x[n, c, h1[i], w0[j]] * ww0[j] + x[n, c, h1[i], w1[j]] * ww1[j]
                    y[n, c, i, j] = top * wh0[i] + bottom * wh1[i]
    return y


def interpolate(x, size, align_corners=False):
    """Vectorised ``interpolate_naive``: the bilinear resize is separable, so first along W (two
    gathered columns, weighted), then along H (two gathered rows of that, weighted); the same
    products and sums, in the same order, as the pixel-by-pixel formula."""
    out_h, out_w = size
    h0, h1, wh0, wh1 = resize_source(x.shape[2], out_h, x.dtype, align_corners)
    w0, w1, ww0, ww1 = resize_source(x.shape[3], out_w, x.dtype, align_corners)
    rows = np.take(x, w0, axis=3) * ww0 + np.take(x, w1, axis=3) * ww1    # (N, C, H, W_out)
    out = np.take(rows, h0, axis=2)                       # (N, C, H_out, W_out); in place from here
    out *= wh0[:, None]                                   # (the same floats as rows[h0] * wh0 + rows[h1] * wh1,
    bottom = np.take(rows, h1, axis=2)                    # with two large temporaries fewer; np.take gathers
    bottom *= wh1[:, None]                                # faster than x[..., index])
    out += bottom
    return out
