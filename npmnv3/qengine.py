"""The int8 network's fast path (``QuantizedMobileNetV3.__call__``): the same integers as the readable
path (``quantized.py``), computed with fewer passes over memory.

What is stored how, and why it stays exact:

- Activations are NHWC float32 arrays holding *centred* integers ``c = q - zero_point`` (the
  readable path's uint8 ``q`` minus its zero point, so ``|c| <= 255``: exact in float32). A
  convolution reads them as they are, with no conversion or centring pass; zero padding stands for
  the zero point, as a quantized convolution's padding does. The layer before a k x k conv writes
  its output into the middle of a zero-bordered map (``padded``), so that nothing pads by copying.
- Each conv or linear layer keeps its int8 weights and int32 bias as float32 or float64 arrays in
  ``fast_kernels``' layouts, the accumulation type chosen once per layer (``accumulation_dtype``):
  every partial sum of ``bias_q + sum_k w_q[k] * c[k]``, in any order, is an integer of magnitude at
  most ``qkernels.accumulator_bound`` (255 * sum |w_q| + |bias_q|). Below 2**24 float32 holds each
  exactly, so float32 BLAS / einsum (half the memory traffic of float64, and faster) gives the
  integers an int32 kernel gives; otherwise the layer accumulates in float64 (exact below 2**53;
  ``quantize_layer`` refuses weights whose accumulator could pass 2**31 - 1).
- Requantizing is ``qkernels.requantize``'s float32 steps, ``float32(acc) * M`` then ``rint``, with
  the clamp [lo, 255] moved to centred values, [lo - zp, 255 - zp]; adding the zero point before or
  after the clamp gives the same integers (exact in float32 wherever the clamp does not bite).
- Hard-swish and the SE's hard-sigmoid are the readable path's 256-entry tables, stored with
  centred outputs and gathered with ``np.take`` at index ``c + zero_point``.
- The residual add (QNNPACK's fixed point, ``qkernels.add``) of two uint8 tensors with fixed
  scales has 256 * 256 possible inputs: a table of ``qkernels.add`` on all of them, gathered at
  ``256 * q_a + q_b`` (computed in float32, exact below 2**17).
- The SE multiply and the global average pools are ``qkernels.mul`` / ``qkernels.global_avg_pool``'s
  arithmetic on centred values (the products and sums are integers held exactly; a pool over so
  many positions that its sum could reach 2**24 sums in float64).

``prepare`` makes a ``FastNetwork`` from ``quantized.convert``'s layers once per parameter version;
``run`` is one batch's forward pass (``tests/test_quantized.py`` holds it equal, integer for
integer, to the readable path).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import fast_kernels as FK
from . import qkernels as QK
from .config import Block, SqueezeExcite

F32 = np.float32
FLOAT32_EXACT = 2 ** 24      # float32 holds every integer of smaller magnitude


def accumulation_dtype(bound):
    """float32 when every partial sum (at most ``bound`` in magnitude) is exact in float32, else float64."""
    return np.dtype(F32) if bound < FLOAT32_EXACT else np.dtype(np.float64)


@dataclass(frozen=True)
class Requantize:
    """Accumulator -> centred output: ``rint(float32(acc) * multiplier)`` clamped to [low, high], then
    the activation's centred ``table`` (if any) at index ``value + zero_point``."""

    multiplier: np.float32
    low: np.float32
    high: np.float32
    zero_point: int
    table: Optional[np.ndarray] = None


def requantizer(multiplier, zero_point, low=0, table=None):
    """The ``Requantize`` to a uint8 tensor with ``zero_point``, clamped to [low, 255] (low = the zero
    point for a fused ReLU), in centred values."""
    return Requantize(F32(multiplier), F32(low - zero_point), F32(QK.UINT8_MAX - zero_point), zero_point, table)


@dataclass(frozen=True)
class FastLayer:
    """One conv or linear layer: ``kind`` "depthwise" (weight (k, k, C)), "conv" (k x k, weight
    (k*k*C_in, C_out) in ``fast_kernels.conv_matrix`` order) or "matmul" (1x1 conv or linear, weight
    (C_in, C_out)); weight and bias in the accumulation dtype; then ``requantize``."""

    kind: str
    weight: np.ndarray
    bias: np.ndarray
    requantize: Requantize
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1


@dataclass(frozen=True)
class FastSqueezeExcite:
    """The SE block: the pool's requantization (input scale and zero point), fc1, fc2, the hard-sigmoid
    (uint8 gate, zero point 0, as float32) and the multiply's requantization."""

    scale: np.float32
    zero_point: int
    fc1: FastLayer
    fc2: FastLayer
    gate: np.ndarray
    multiply: Requantize


@dataclass(frozen=True)
class FastAdd:
    """The residual add as a table: ``table[256 * q_a + q_b]`` is the centred output."""

    a_zero_point: int
    b_zero_point: int
    table: np.ndarray


@dataclass(frozen=True)
class FastNetwork:
    """``layers`` by record name (``FastLayer``, ``FastSqueezeExcite``, ``FastAdd``); ``input``: the
    input's (scale, zero point); ``outputs``: each ``features.i``'s; ``logit_scale``: the last layer's
    output scale."""

    input: tuple
    outputs: dict
    logit_scale: np.float32
    layers: dict


# --------------------------------------------------------------------------- prepare

def centred_table(table, zero_point):
    """A uint8 table's outputs as centred float32 values."""
    return table.astype(F32) - F32(zero_point)


def requantization(q):
    """The ``Requantize`` of a ``quantized.QuantizedLayer`` (with its hard-swish table, if any)."""
    zero_point = q.output.zero_point
    hard_swish = centred_table(q.table, q.activation.zero_point) if q.table is not None else None
    return requantizer(q.multiplier, zero_point, zero_point if q.relu else QK.UINT8_MIN, hard_swish)


def fast_layer(q, conv=None):
    """A ``QuantizedLayer`` (of ``config.Conv`` record ``conv``, or a linear layer) in the fast layout."""
    dtype = accumulation_dtype(QK.accumulator_bound(q.weight, q.bias).max())
    bias = q.bias.astype(dtype)
    if conv is None or conv.kernel == 1:
        weight = q.weight.reshape(len(q.weight), -1).T.astype(dtype)
        return FastLayer("matmul", np.ascontiguousarray(weight), bias, requantization(q))
    if conv.depthwise:
        kind, weight = "depthwise", FK.depthwise_taps(q.weight).astype(dtype)
    else:
        kind, weight = "conv", FK.conv_matrix(q.weight).astype(dtype)
    return FastLayer(kind, weight, bias, requantization(q), conv.kernel, conv.stride, conv.padding, conv.dilation)


def add_table(a, b, out):
    """``FastAdd`` of a residual add of tensors quantized as ``a`` and ``b`` (``QParams``) to ``out``:
    ``qkernels.add`` on every pair of uint8 inputs."""
    qa, qb = np.divmod(np.arange(256 * 256), 256)
    table = QK.add(qa, a.scale, a.zero_point, qb, b.scale, b.zero_point, *out)
    return FastAdd(a.zero_point, b.zero_point, centred_table(table, out.zero_point))


def prepare(features, classifier, network):
    """The ``FastNetwork`` of a ``quantized.QuantizedNetwork``, walking the layer records as ``convert``
    does to know each tensor's scale and zero point."""
    layers, outputs, x = {}, {}, network.input
    for record in features:
        block_input = x
        for conv in (record.layers if isinstance(record, Block) else [record]):
            if isinstance(conv, SqueezeExcite):
                fc1, fc2 = network.layers[f"{conv.name}.fc1"], network.layers[f"{conv.name}.fc2"]
                out = network.layers[conv.name]
                multiply = QK.requantization_multiplier((x.scale, QK.HARD_SIGMOID_SCALE), out.scale)
                layers[conv.name] = FastSqueezeExcite(
                    x.scale, x.zero_point, fast_layer(fc1), fast_layer(fc2),
                    network.layers[f"{conv.name}.gate"].astype(F32),
                    requantizer(multiply, out.zero_point))
                x = out
            else:
                q = network.layers[conv.name]
                layers[conv.name] = fast_layer(q, conv)
                x = q.result
        if isinstance(record, Block) and record.residual:
            out = network.layers[record.name]
            layers[record.name] = add_table(block_input, x, out)
            x = out
        outputs[record.name] = x
    for layer in classifier:
        layers[layer.name] = fast_layer(network.layers[layer.name])
    return FastNetwork(network.input, outputs, network.layers[classifier[-1].name].result.scale, layers)


# --------------------------------------------------------------------------- the forward pass

def requantize(acc, r, out=None):
    """``Requantize`` ``r`` on an accumulator, into ``out`` (default: in place; float64 accumulators are
    first rounded to float32, as ``qkernels.requantize`` does): centred float32."""
    y = acc if acc.dtype == F32 else acc.astype(F32)
    out = y if out is None else out
    np.multiply(y, r.multiplier, out=out)
    np.rint(out, out=out)
    FK.clip(out, r.low, r.high, out=out)
    if r.table is not None:
        lookup(r.table, out, r.zero_point, out=out)
    return out


def lookup(table, y, offset, out):
    """``out = table[y + offset]`` for centred float32 ``y`` (integers, their sum with ``offset`` inside
    the table: ``mode="clip"`` never clips here, it only spares NumPy's checked copy of ``out``)."""
    index = np.add(y, offset, out=np.empty(y.shape, np.intp), casting="unsafe")
    return np.take(table, index, out=out, mode="clip")


def accumulate(x, layer):
    """A layer's accumulator (in its accumulation dtype) for centred NHWC (or (N, C)) input ``x``; the
    input of a k x k layer comes zero-padded by ``layer.padding`` (see ``padded``)."""
    x = x.astype(layer.weight.dtype, copy=False)
    if layer.kind == "depthwise":
        acc = FK.depthwise_conv2d(x, layer.weight, layer.stride, 0, layer.dilation)
    elif layer.kind == "conv":
        acc = FK.conv2d(x, layer.weight, None, layer.kernel, layer.stride, 0, layer.dilation)
    else:
        acc = np.matmul(x.reshape(-1, x.shape[-1]), layer.weight).reshape(*x.shape[:-1], -1)
    acc += layer.bias
    return acc


def padded(shape, pad):
    """An uninitialised NHWC map with a zero border of ``pad``: (buffer, its middle of ``shape``)."""
    n, h, w, c = shape
    out = np.empty((n, h + 2 * pad, w + 2 * pad, c), F32)
    if pad == 0:
        return out, out
    for border in (out[:, :pad], out[:, -pad:], out[:, pad:-pad, :pad], out[:, pad:-pad, -pad:]):
        border[...] = 0
    return out, out[:, pad:-pad, pad:-pad]


def conv(x, layer, pad=0):
    """One conv layer on a centred NHWC map: accumulate, requantize, activation. With ``pad``, the
    output is written into the middle of a map zero-padded by ``pad`` (the next depthwise layer's
    input, so that no copy pads it); returns that padded map."""
    acc = accumulate(x, layer)
    if pad == 0:
        return requantize(acc, layer.requantize)
    out, middle = padded(acc.shape, pad)
    requantize(acc, layer.requantize, out=middle)
    return out


def linear(x, layer):
    """One linear layer (or 1x1 conv on a 1x1 map) on centred (N, C) values."""
    return requantize(accumulate(x, layer), layer.requantize)


def average_pool(x, scale, zero_point):
    """``qkernels.global_avg_pool`` on centred NHWC ``x``: (N, H, W, C) -> centred (N, C)."""
    n, h, w, c = x.shape
    count = h * w
    dtype = accumulation_dtype(QK.UINT8_MAX * count)
    total = x.reshape(n, count, c).sum(axis=1, dtype=dtype)
    return requantize(total, requantizer(QK.pool_multiplier(scale, count), zero_point))


def squeeze_excite(x, se):
    """The SE block on centred NHWC ``x``: pool, fc1 + ReLU, fc2, hard-sigmoid gate, ``qkernels.mul``."""
    e = linear(linear(average_pool(x, se.scale, se.zero_point), se.fc1), se.fc2)
    gate = lookup(se.gate, e, se.fc2.requantize.zero_point, out=e)          # (N, C), zero point 0
    return requantize(x * gate[:, None, None, :], se.multiply)


def residual_add(a, b, add):
    """``qkernels.add`` of centred a and b by its table, at index 256 * q_a + q_b."""
    index = a * F32(256)
    index += b
    return lookup(add.table, index, 256 * add.a_zero_point + add.b_zero_point, out=index)


def bneck(x, block, layers):
    """One bneck block on centred NHWC ``x``, as ``quantized.quantized_bneck``."""
    pad = layers[block.depthwise.name].padding
    y = FK.pad(x, pad) if block.expand is None else conv(x, layers[block.expand.name], pad)
    y = conv(y, layers[block.depthwise.name])
    if block.se is not None:
        y = squeeze_excite(y, layers[block.se.name])
    y = conv(y, layers[block.project.name])
    return residual_add(x, y, layers[block.name]) if block.residual else y


def quantize_input(x, scale, zero_point, pad):
    """``qkernels.quantize`` of float NCHW ``x``, centred, NHWC and zero-padded by ``pad`` (for the stem)."""
    y = x * (F32(1) / F32(scale))
    np.rint(y, out=y)
    FK.clip(y, F32(QK.UINT8_MIN - zero_point), F32(QK.UINT8_MAX - zero_point), out=y)
    out, middle = padded(y.transpose(0, 2, 3, 1).shape, pad)
    middle[...] = y.transpose(0, 2, 3, 1)
    return out


def uint8_nchw(y, zero_point):
    """Centred NHWC values back to the readable path's uint8 NCHW integers."""
    return np.ascontiguousarray((y + F32(zero_point)).astype(np.uint8).transpose(0, 3, 1, 2))


def run(x, features, classifier, network, outputs=None):
    """The forward pass of one batch: x (N, 3, H, W) float32 -> dequantized float32 logits (N, classes).

    ``outputs``, when given, receives each ``"features.i"`` as a ``qkernels.QTensor`` (uint8 NCHW)."""
    y = quantize_input(x, *network.input, network.layers[features[0].name].padding)
    for record in features:
        if isinstance(record, Block):
            y = bneck(y, record, network.layers)
        else:
            y = conv(y, network.layers[record.name])
        if outputs is not None:
            scale, zero_point = network.outputs[record.name]
            outputs[record.name] = QK.QTensor(uint8_nchw(y, zero_point), scale, zero_point)
    y = average_pool(y, *network.outputs[features[-1].name])
    for layer in classifier:
        y = linear(y, network.layers[layer.name])
    return y * network.logit_scale
