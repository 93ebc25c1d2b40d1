"""Each kernel: the plain loop version == the vectorised version == torch.nn.functional."""

import itertools

import numpy as np
import pytest

from npmnv3 import kernels as K

torch = pytest.importorskip("torch")
F = torch.nn.functional

CONV_CASES = list(itertools.product((1, 2), (3, 5), (1, 2), (1, 3)))   # stride, k, dilation, batch
CASE_IDS = [f"s{s}-k{k}-d{d}-n{n}" for s, k, d, n in CONV_CASES]


def rng(seed=0):
    return np.random.default_rng(seed)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def assert_close(got, ref, dtype):
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert got.dtype == dtype
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("stride,k,dilation,n", CONV_CASES, ids=CASE_IDS)
def test_im2col_naive_equals_vectorised_and_unfold(stride, k, dilation, n):
    x = rng().standard_normal((n, 2, 11, 9))
    pad = (k - 1) // 2 * dilation
    fast = K.im2col(x, k, k, stride, pad, dilation)
    np.testing.assert_array_equal(K.im2col_naive(x, k, k, stride, pad, dilation), fast)
    ref = F.unfold(t(x), k, dilation=dilation, padding=pad, stride=stride).numpy()
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
@pytest.mark.parametrize("stride,k,dilation,n", CONV_CASES, ids=CASE_IDS)
def test_conv2d(stride, k, dilation, n, dtype):
    r = rng(1)
    x = r.standard_normal((n, 3, 13, 10)).astype(dtype)
    w = r.standard_normal((5, 3, k, k)).astype(dtype)
    b = r.standard_normal(5).astype(dtype)
    pad = (k - 1) // 2 * dilation
    ref = F.conv2d(t(x), t(w), t(b), stride, pad, dilation).numpy()
    assert_close(K.conv2d(x, w, b, stride, pad, dilation), ref, dtype)
    assert_close(K.conv2d_naive(x, w, b, stride, pad, dilation), ref, dtype)


@pytest.mark.parametrize("n", (1, 3))
def test_conv2d_1x1_and_stem(n):
    r = rng(2)
    x = r.standard_normal((n, 7, 9, 5))
    w = r.standard_normal((4, 7, 1, 1))
    assert_close(K.conv2d(x, w), F.conv2d(t(x), t(w)).numpy(), np.float64)
    assert_close(K.conv2d_naive(x, w), F.conv2d(t(x), t(w)).numpy(), np.float64)
    stem_x = r.standard_normal((n, 3, 33, 47))
    stem_w = r.standard_normal((16, 3, 3, 3))
    ref = F.conv2d(t(stem_x), t(stem_w), stride=2, padding=1).numpy()
    assert_close(K.conv2d(stem_x, stem_w, None, 2, 1), ref, np.float64)
    assert ref.shape == (n, 16, 17, 24)


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
@pytest.mark.parametrize("stride,k,dilation,n", CONV_CASES, ids=CASE_IDS)
def test_depthwise_conv2d(stride, k, dilation, n, dtype):
    r = rng(3)
    x = r.standard_normal((n, 6, 15, 12)).astype(dtype)
    w = r.standard_normal((6, 1, k, k)).astype(dtype)
    pad = (k - 1) // 2 * dilation
    ref = F.conv2d(t(x), t(w), None, stride, pad, dilation, groups=6).numpy()
    assert_close(K.depthwise_conv2d(x, w, stride, pad, dilation), ref, dtype)
    assert_close(K.depthwise_conv2d_naive(x, w, stride, pad, dilation), ref, dtype)


def _bn_params(r, c):
    return (r.standard_normal(c), r.uniform(0.2, 3.0, c), r.uniform(0.5, 1.5, c), r.standard_normal(c))


@pytest.mark.parametrize("n", (1, 3))
def test_batch_norm(n):
    r = rng(4)
    x = r.standard_normal((n, 5, 7, 9))
    mean, var, weight, bias = _bn_params(r, 5)
    ref = F.batch_norm(t(x), t(mean), t(var), t(weight), t(bias), training=False, eps=0.001).numpy()
    assert_close(K.batch_norm(x, mean, var, weight, bias), ref, np.float64)
    assert_close(K.batch_norm_naive(x, mean, var, weight, bias), ref, np.float64)
    # eps matters: torchvision's MobileNetV3 uses 0.001, and 1e-5 gives a visibly different answer
    assert np.abs(K.batch_norm(x, mean, var * 0 + 1e-3, weight, bias)
                  - K.batch_norm(x, mean, var * 0 + 1e-3, weight, bias, eps=1e-5)).max() > 1e-2


@pytest.mark.parametrize("depthwise", (False, True))
@pytest.mark.parametrize("dtype", (np.float64, np.float32))
def test_fold_batch_norm(depthwise, dtype):
    r = rng(5)
    x = r.standard_normal((3, 4, 9, 7)).astype(dtype)
    w = r.standard_normal((4, 1 if depthwise else 4, 3, 3)).astype(dtype)
    mean, var, weight, bias = (p.astype(dtype) for p in _bn_params(r, 4))
    conv = (lambda a, ww: K.depthwise_conv2d(a, ww, 2, 1)) if depthwise else (lambda a, ww: K.conv2d(a, ww, None, 2, 1))
    unfused = K.batch_norm(conv(x, w), mean, var, weight, bias)
    fw, fb = K.fold_batch_norm(w, mean, var, weight, bias)
    assert fw.dtype == dtype and fb.dtype == dtype
    assert_close(conv(x, fw) + fb[None, :, None, None], unfused, dtype)


@pytest.mark.parametrize("name,torch_fn", [("relu", F.relu), ("relu6", F.relu6), ("sigmoid", torch.sigmoid),
                                           ("hard_sigmoid", F.hardsigmoid), ("hard_swish", F.hardswish)])
@pytest.mark.parametrize("dtype", (np.float64, np.float32))
def test_activations(name, torch_fn, dtype):
    # values on and around the kinks at -3, 0, 3 and 6, where sigmoid saturates (exp(800) overflows), and random
    x = np.concatenate([[-3.0, 3.0, 0.0, 6.0, -3.0001, 2.9999, 5.9999, 6.0001, -1e-9, 1e-9, -800.0, 800.0, -40.0],
                        rng(6).uniform(-8, 8, 194)]).astype(dtype).reshape(1, 1, 9, 23)
    ref = torch_fn(t(x)).numpy()
    assert_close(getattr(K, name)(x), ref, dtype)
    assert_close(getattr(K, name + "_naive")(x), ref, dtype)


def torch_se(x, w1, b1, w2, b2):
    s = F.adaptive_avg_pool2d(x, 1)
    s = F.hardsigmoid(F.conv2d(F.relu(F.conv2d(s, w1, b1)), w2, b2))
    return x * s


@pytest.mark.parametrize("n", (1, 3))
def test_squeeze_excite(n):
    r = rng(7)
    c, s = 24, 8
    x = r.standard_normal((n, c, 5, 7))
    w1, b1 = r.standard_normal((s, c, 1, 1)), r.standard_normal(s)
    w2, b2 = r.standard_normal((c, s, 1, 1)), r.standard_normal(c)
    ref = torch_se(t(x), t(w1), t(b1), t(w2), t(b2)).numpy()
    assert_close(K.squeeze_excite(x, w1, b1, w2, b2), ref, np.float64)
    assert_close(K.squeeze_excite_naive(x, w1, b1, w2, b2), ref, np.float64)


@pytest.mark.parametrize("n", (1, 3))
def test_pool_and_linear(n):
    r = rng(8)
    x = r.standard_normal((n, 6, 5, 3))
    ref = F.adaptive_avg_pool2d(t(x), 1).flatten(1).numpy()
    assert_close(K.global_avg_pool(x), ref, np.float64)
    assert_close(K.global_avg_pool_naive(x), ref, np.float64)
    v, w, b = r.standard_normal((n, 6)), r.standard_normal((4, 6)), r.standard_normal(4)
    ref = F.linear(t(v), t(w), t(b)).numpy()
    assert_close(K.linear(v, w, b), ref, np.float64)
    assert_close(K.linear_naive(v, w, b), ref, np.float64)


def test_conv_output_size_matches_torch():
    for size, k, s, d in itertools.product((1, 2, 7, 32, 33), (1, 3, 5), (1, 2), (1, 2)):
        p = (k - 1) // 2 * d
        x = torch.zeros(1, 1, size, size)
        expected = F.conv2d(x, torch.zeros(1, 1, k, k), stride=s, padding=p, dilation=d).shape[-1]
        assert K.conv_output_size(size, k, s, p, d) == expected


@pytest.mark.parametrize("shape,size", [((1, 2, 7, 9), (16, 23)), ((3, 1, 31, 17), (8, 5)), ((2, 3, 5, 6), (5, 6)),
                                        ((1, 1, 1, 1), (4, 3)), ((1, 2, 9, 4), (1, 1)), ((1, 1, 40, 3), (13, 11))],
                         ids=["up", "down", "same", "from-1x1", "to-1x1", "mixed"])
@pytest.mark.parametrize("align_corners", (False, True))
@pytest.mark.parametrize("dtype", (np.float64, np.float32))
def test_bilinear_interpolate(shape, size, align_corners, dtype):
    x = rng(7).standard_normal(shape).astype(dtype)
    ref = F.interpolate(t(x), size=size, mode="bilinear", align_corners=align_corners).numpy()
    assert_close(K.interpolate(x, size, align_corners), ref, dtype)
    assert_close(K.interpolate_naive(x, size, align_corners), ref, dtype)
