"""The fast NHWC kernels (npmnv3/fast_kernels.py), each called on its own, against kernels.py (NCHW)."""

import numpy as np
import pytest

from npmnv3 import fast_kernels as F
from npmnv3 import kernels as K

DTYPES = pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=("float64", "float32"))
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x):
    return x.transpose(0, 3, 1, 2)


def close(got, ref, dtype):
    assert got.dtype == dtype and got.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got.astype(np.float64) - ref).max()) <= TOL[dtype] * scale


# N, C, H, W, k, stride, padding, dilation: stride 1 (the row einsum), stride 2 on maps wide enough for
# the phase planes and on narrow ones (the 6-d einsum), dilation 2, padding larger than the map
DEPTHWISE = [(2, 5, 17, 23, 3, 1, 1, 1), (1, 4, 40, 37, 5, 2, 2, 1), (1, 6, 33, 35, 3, 2, 1, 1),
             (3, 3, 9, 8, 3, 2, 1, 1), (2, 3, 11, 13, 5, 1, 4, 2), (1, 2, 1, 1, 5, 1, 2, 1), (1, 3, 7, 6, 3, 2, 1, 1)]


@DTYPES
@pytest.mark.parametrize("n,c,h,w,k,stride,padding,dilation", DEPTHWISE)
def test_depthwise_conv2d_equals_the_plain_kernel(n, c, h, w, k, stride, padding, dilation, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((c, 1, k, k)).astype(dtype)
    ref = K.depthwise_conv2d(x.astype(np.float64), weight.astype(np.float64), stride, padding, dilation)
    got = F.depthwise_conv2d(nhwc(x), np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0)), stride, padding, dilation)
    close(nchw(got), ref, dtype)


@DTYPES
@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2), (5, 1, 2, 1)])
def test_conv2d_through_im2col_equals_the_plain_kernel(k, stride, padding, dilation, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 13, 10)).astype(dtype)
    weight = rng.standard_normal((7, 3, k, k)).astype(dtype)
    bias = rng.standard_normal(7).astype(dtype)
    ref = K.conv2d(x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64), stride, padding, dilation)
    got = F.conv2d(nhwc(x), F.conv_matrix(weight), bias, k, stride, padding, dilation)
    close(nchw(got), ref, dtype)


@DTYPES
def test_conv1x1_pooling_and_squeeze_excite_equal_the_plain_kernels(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 5, 7)).astype(dtype)
    w = rng.standard_normal((4, 6, 1, 1)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    close(nchw(F.conv1x1(nhwc(x), np.ascontiguousarray(w[:, :, 0, 0].T), b)), K.conv2d(x, w, b).astype(np.float64), dtype)
    close(F.global_avg_pool(nhwc(x)), K.global_avg_pool(x.astype(np.float64)), dtype)
    w1, b1 = rng.standard_normal((8, 6, 1, 1)).astype(dtype), rng.standard_normal(8).astype(dtype)
    w2, b2 = rng.standard_normal((6, 8, 1, 1)).astype(dtype), rng.standard_normal(6).astype(dtype)
    ref = K.squeeze_excite(*(a.astype(np.float64) for a in (x, w1, b1, w2, b2)))
    got = F.squeeze_excite(nhwc(x), np.ascontiguousarray(w1[:, :, 0, 0].T), b1, np.ascontiguousarray(w2[:, :, 0, 0].T), b2)
    close(nchw(got), ref, dtype)


@DTYPES
def test_activations_equal_the_plain_kernels(dtype):
    x = np.concatenate([np.linspace(-8, 8, 161), [-3, 3, 0, -3 - 1e-6, 3 + 1e-6, 6, -6, 100]]).astype(dtype)
    close(F.relu(x), K.relu(x).astype(np.float64), dtype)
    close(F.relu6(x), np.clip(x.astype(np.float64), 0, 6), dtype)
    close(F.hard_swish(x), K.hard_swish(x.astype(np.float64)), dtype)
    out = np.empty_like(x)
    F.hard_swish6(x, out)
    np.testing.assert_array_equal(out, x * np.clip(x + 3, 0, 6))       # the same floats as the formula


@DTYPES
@pytest.mark.parametrize("whole", [1, 1000])
def test_hard_swish6_adds_the_bias_and_writes_a_strided_output_whole_or_in_pieces(dtype, whole, monkeypatch):
    # pieces of 2 rows of a (3, 7, 5, 4) map: several pieces per image, the last one short; or one piece
    monkeypatch.setattr(F, "PIECE", 2 * 5 * 4)
    monkeypatch.setattr(F, "WHOLE", whole)
    rng = np.random.default_rng(5)
    x = (4 * rng.standard_normal((3, 7, 5, 4))).astype(dtype)
    bias = rng.standard_normal((5, 4)).astype(dtype)
    padded = np.full((3, 9, 7, 4), 7, dtype)
    y = x.copy()
    F.hard_swish6(y, padded[:, 1:-1, 1:-1], bias)
    expected = (x + bias) * np.clip(x + bias + 3, 0, 6)
    np.testing.assert_array_equal(padded[:, 1:-1, 1:-1], expected)
    np.testing.assert_array_equal(y, x + bias)                          # the bias is added in place
    assert (padded[:, 0] == 7).all() and (padded[:, -1] == 7).all() and (padded[:, :, 0] == 7).all()


def test_views_do_not_copy():
    xp = np.zeros((1, 9, 9, 4), np.float32)
    assert np.shares_memory(F.rows_view(xp, 3, 7, 7), xp)
    assert np.shares_memory(F.strided_view(xp, 3, 4, 4, 2), xp)
    assert np.shares_memory(F.im2col_nhwc(xp, 3, 7, 7), xp)
    assert not F.rows_view(xp, 3, 7, 7).flags.writeable


@DTYPES
@pytest.mark.parametrize("size,out", [((5, 7), (9, 13)), ((33, 45), (17, 8)), ((1, 1), (4, 3)), ((7, 5), (7, 5))])
def test_nhwc_resize_is_the_plain_resize(size, out, dtype):
    x = np.random.default_rng(3).standard_normal((2, 3, *size)).astype(dtype)
    for align_corners in (False, True):
        ref = K.interpolate(x, out, align_corners)
        np.testing.assert_array_equal(nchw(F.resize(nhwc(x), out, align_corners)), ref)   # the same operations


@DTYPES
@pytest.mark.parametrize("h,w,k,dilation", [(9, 11, 3, 1), (9, 11, 3, 4), (5, 6, 3, 12), (33, 33, 3, 36), (7, 8, 5, 2)])
def test_conv2d_by_taps_equals_the_plain_convolution(h, w, k, dilation, dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, h, w)).astype(dtype)
    weight = rng.standard_normal((5, 6, k, k)).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    pad = (k - 1) // 2 * dilation
    ref = K.conv2d(x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64), 1, pad, dilation)
    got = F.conv2d_by_taps(nhwc(x), np.ascontiguousarray(weight.transpose(2, 3, 1, 0)), bias, dilation)
    close(nchw(got), ref, dtype)


def test_plane_by_plane_resize_is_the_plain_resize():
    x = np.random.default_rng(5).standard_normal((2, 3, 13, 9)).astype(np.float32)
    for size in [(40, 31), (13, 9), (5, 4)]:
        np.testing.assert_array_equal(F.resize_nchw(x, size), K.interpolate(x, size))
