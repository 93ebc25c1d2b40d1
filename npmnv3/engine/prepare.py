"""Weights in the fast engine's layouts, prepared once per parameter version.

Every layer's weights are computed in float64 from the model's parameters and then cast to the
model's dtype:

- BatchNorm is folded into the conv before it (``kernels.fold_batch_norm``): one weight, one bias;
- 1x1 convs and linear layers become (C_in, C_out) matrices for ``x2d @ W``, optionally with the
  bias as one more row (``augmented``) for inputs that carry a channel of ones;
- depthwise weights become (k, k, C); the stem's 3x3 conv a (27 + 1, C_out) im2col matrix with the
  bias row last;
- scales: a tensor may be stored as ``scale`` times its value (hard-swish outputs are stored times
  6, see ``fast_kernels.hard_swish6``); a layer reading it divides its weights by that scale, and a
  layer asked to produce a scaled output multiplies its weights and bias by it;
- squeeze-and-excite's hard-sigmoid ``clip(z / 6 + 1/2, 0, 1)`` has its 1/6 and 1/2 folded into fc2.

``Prepared`` caches each result by (layer, scales), so plans for several input shapes share them.
"""

import threading

import numpy as np

from .. import fast_kernels as F
from ..kernels import fold_batch_norm


class Prepared:
    """Weights of one parameter version in the engine's layouts (see the module docstring)."""

    def __init__(self, params):
        self.params, self.dtype = params, np.dtype(params.dtype)
        self._cache, self._lock = {}, threading.Lock()

    def _cached(self, key, make):
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = make()
        with self._lock:
            return self._cache.setdefault(key, value)

    def _cast(self, *arrays):
        return tuple(np.ascontiguousarray(a, dtype=self.dtype) for a in arrays)

    def folded(self, conv):
        """A ``config.Conv`` as (weight (O, C/groups, k, k), bias (O,)) in float64, BatchNorm folded in."""
        p = self.params
        weight = np.asarray(p[conv.weight_key], np.float64)
        bias = np.asarray(p[conv.bias_key], np.float64) if conv.bias else np.zeros(conv.out_channels)
        if not conv.norm:
            return weight, bias
        mean, var, gamma, beta = (np.asarray(p[key], np.float64) for key in conv.batch_norm_keys())
        # BN(conv(x) + b) = BN'(conv(x)) where BN' has the running mean moved by -b
        return fold_batch_norm(weight, mean - bias, var, gamma, beta, eps=conv.eps)

    def pointwise(self, conv, in_scale=1.0, out_scale=1.0, in_offset=(None, None)):
        """A 1x1 conv as (W (C_in, C_out), b (C_out,), W_aug (C_in + 1, C_out) = W with b as its last row).

        ``in_offset``: (name, offset) when the input is stored ``offset`` below its (scaled) values,
        the bias that layer ``name`` left out; it moves into this conv's bias: b + offset @ W."""
        name, offset = in_offset

        def make():
            w, b = self.folded(conv)
            w = w[:, :, 0, 0].T * (out_scale / in_scale)
            b = b * out_scale
            if offset is not None:
                b = b + offset @ w
            return self._cast(w, b, np.vstack([w, b[None]]))
        return self._cached(("pointwise", conv.name, in_scale, out_scale, name), make)

    def depthwise(self, conv, in_scale=1.0):
        """A depthwise conv as (W (k, k, C), b (C,))."""
        def make():
            w, b = self.folded(conv)
            return self._cast(F.depthwise_taps(w) / in_scale, b)
        return self._cached(("depthwise", conv.name, in_scale), make)

    def im2col(self, conv, in_scale=1.0):
        """A k x k conv on NCHW input as the (C * k * k + 1, C_out) matrix of an im2col product: rows in
        (c, i, j) order, the bias last (it meets a row of ones)."""
        def make():
            w, b = self.folded(conv)
            return self._cast(np.vstack([w.reshape(w.shape[0], -1).T / in_scale, b[None]]))[0]
        return self._cached(("im2col", conv.name, in_scale), make)

    def conv_taps(self, conv):
        """A k x k conv as (W (k, k, C_in, C_out), b): one matrix per kernel tap (``fast_kernels.conv2d_by_taps``)."""
        def make():
            w, b = self.folded(conv)
            return self._cast(w.transpose(2, 3, 1, 0), b)
        return self._cached(("taps", conv.name), make)

    def squeeze_excite(self, se, in_scale=1.0):
        """(fc1 (C, S) / in_scale, b1, fc2 (S, C) / 6, b2 / 6 + 1/2): the gate is then clip(z @ fc2 + b2, 0, 1)."""
        def make():
            p = self.params
            w1 = np.asarray(p[f"{se.name}.fc1.weight"], np.float64)[:, :, 0, 0].T / in_scale
            w2 = np.asarray(p[f"{se.name}.fc2.weight"], np.float64)[:, :, 0, 0].T / 6.0
            b2 = np.asarray(p[f"{se.name}.fc2.bias"], np.float64) / 6.0 + 0.5
            return self._cast(w1, p[f"{se.name}.fc1.bias"], w2, b2)
        return self._cached(("se", se.name, in_scale), make)

    def linear(self, layer, in_scale=1.0):
        """A ``config.Linear`` as (W (in, out) / in_scale, b)."""
        def make():
            w = np.asarray(self.params[f"{layer.name}.weight"], np.float64).T / in_scale
            return self._cast(w, self.params[f"{layer.name}.bias"])
        return self._cached(("linear", layer.name, in_scale), make)
