"""The quantized kernels: each plain version equal to its vectorised one, and both equal to PyTorch's
quantized operator under the QNNPACK engine, integer for integer."""

import numpy as np
import pytest

from npmnv3 import qkernels as QK

torch = pytest.importorskip("torch")
import torchref  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning"),
              pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")]
F32 = np.float32
RNG = np.random.default_rng(0)


def qtensor(values, scale, zero_point):
    return torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(values)), float(scale),
                                                   int(zero_point))


def random_qparams(rng, low=0.005, high=0.2):
    return F32(rng.uniform(low, high)), int(rng.integers(0, 256))


def test_quantize_and_dequantize_match_torch():
    for scale, zero_point in [(F32(0.0213), 128), (F32(0.05), 3), (F32(1 / 64), 250)]:
        x = (RNG.standard_normal((2, 3, 9, 11)) * 3).astype(F32)
        x.flat[::2] = ((RNG.integers(-128, 127, x.size) + 0.5) * np.float64(scale)).astype(F32)[::2]   # near ties
        ref = torch.quantize_per_tensor(torch.from_numpy(x), float(scale), zero_point, torch.quint8)
        q = QK.quantize(x, scale, zero_point)
        np.testing.assert_array_equal(q, ref.int_repr().numpy())
        np.testing.assert_array_equal(QK.quantize_naive(x, scale, zero_point), q)
        np.testing.assert_array_equal(QK.dequantize(q, scale, zero_point), ref.dequantize().numpy())
        np.testing.assert_array_equal(QK.dequantize_naive(q, scale, zero_point), QK.dequantize(q, scale, zero_point))


def test_requantize_rounds_half_to_even_and_clamps():
    acc = np.array([-300, -3, -1, 0, 1, 3, 5, 7, 1000, 2 ** 24 + 1, 2 ** 30], np.float64)
    got = QK.requantize(acc, F32(0.5), 10)
    #   -150+10 -> 0, -1.5 -> -2, -0.5 -> 0, 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 500 -> 255
    np.testing.assert_array_equal(got[:9], [0, 8, 10, 10, 10, 12, 12, 14, 255])
    np.testing.assert_array_equal(QK.requantize(acc, F32(0.5), 10, relu=True)[:3], [10, 10, 10])
    for relu in (False, True):
        np.testing.assert_array_equal(QK.requantize_naive(acc, F32(0.0007), 100, relu),
                                      QK.requantize(acc, F32(0.0007), 100, relu))


def test_requantization_multiplier_is_float32_product_times_reciprocal():
    m = QK.requantization_multiplier((F32(0.0123), F32(0.0456)), F32(0.0789))
    assert m.dtype == F32 and m == F32(F32(F32(0.0123) * F32(0.0456)) * (F32(1) / F32(0.0789)))


def test_activation_qparams_match_torch_observer():
    from torch.ao.quantization.observer import MinMaxObserver
    for low, high in [(-4.28, 3.89), (0.0, 6.1), (-0.37, 0.0), (0.5, 2.0), (-1e-9, 1e-9)]:
        obs = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
        obs(torch.tensor([low, high]))
        scale, zero_point = obs.calculate_qparams()
        assert QK.affine_qparams(F32(low), F32(high)) == (F32(scale.item()), int(zero_point.item()))
    assert QK.affine_qparams(F32(np.inf), F32(-np.inf)) == (F32(1.0), 0)     # nothing observed


def test_weight_quantization_matches_torch():
    from torch.ao.quantization.observer import MinMaxObserver
    w = (RNG.standard_normal((8, 4, 3, 3)) * 0.3).astype(F32)
    obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-128, quant_max=127)
    obs(torch.from_numpy(w))
    scale, _ = obs.calculate_qparams()
    assert QK.symmetric_weight_scale(F32(w.min()), F32(w.max())) == F32(scale.item())
    ref = torch.quantize_per_tensor(torch.from_numpy(w), scale.item(), 0, torch.qint8).int_repr().numpy()
    np.testing.assert_array_equal(QK.quantize_weight(w, F32(scale.item())), ref)
    halves = RNG.integers(-127, 127, 4000) + 0.5 + RNG.choice([0, 1e-7, -1e-7, 3e-7], 4000)   # at and near ties
    for scale in (F32(0.00317), F32(0.0123), F32(1 / 128)):
        w = (halves * np.float64(scale)).astype(F32)
        ref = torch.quantize_per_tensor(torch.from_numpy(w), float(scale), 0, torch.qint8).int_repr().numpy()
        np.testing.assert_array_equal(QK.quantize_weight(w, scale), ref)


def test_biases_at_half_steps_round_as_torch_does():
    """Zero weights and an output scale equal to s_x * s_w: the output is the quantized bias itself.
    Biases a hair around (k + 1/2) * s_x * s_w show how torch rounds them."""
    rng = np.random.default_rng(1)
    channels = 64
    with torchref.quantized_engine("qnnpack"):
        for _ in range(20):
            s_in, s_w = F32(rng.uniform(0.01, 0.2)), F32(rng.uniform(0.001, 0.01))
            unit = F32(s_in * s_w)
            k = rng.integers(-100, 100, channels) + 0.5 + rng.choice([0, 1e-7, -1e-7, 3e-7, -3e-7], channels)
            bias = (k * np.float64(unit)).astype(F32)
            x_q = np.full((1, channels, 1, 1), 7, np.uint8)
            ref = torch_conv(x_q, (s_in, 7), np.zeros((channels, 1, 1, 1), np.int8), s_w, bias, (unit, 128), 1, 0,
                             channels)
            np.testing.assert_array_equal(QK.quantize_bias(bias, s_in, s_w), ref.ravel().astype(np.int64) - 128)


def test_bias_that_does_not_fit_int32_is_refused():
    with pytest.raises(ValueError, match="does not fit in int32"):
        QK.quantize_bias(np.array([1.0], F32), F32(1e-6), F32(1e-6))
    bound = QK.accumulator_bound(np.full((2, 3, 1, 1), -128, np.int8), np.array([5, -7]))
    np.testing.assert_array_equal(bound, [255 * 384 + 5, 255 * 384 + 7])


def torch_conv(x_q, x_qp, w_q, w_scale, bias, out_qp, stride, padding, groups):
    """torch.ao.nn.quantized.Conv2d (QNNPACK) on the same integers."""
    conv = torch.ao.nn.quantized.Conv2d(x_q.shape[1], w_q.shape[0], w_q.shape[2], stride, padding, groups=groups)
    conv.set_weight_bias(torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_q), float(w_scale), 0),
                         torch.from_numpy(bias))
    conv.scale, conv.zero_point = float(out_qp[0]), out_qp[1]
    return conv(qtensor(x_q, *x_qp)).int_repr().numpy()


@pytest.mark.parametrize("depthwise", (False, True), ids=("conv", "depthwise"))
@pytest.mark.parametrize("stride,padding,kernel", [(1, 0, 1), (2, 1, 3), (1, 2, 5)])
def test_convolutions_plain_vectorised_and_torch_agree(depthwise, stride, padding, kernel):
    rng = np.random.default_rng(kernel + stride)
    c, o = (6, 6) if depthwise else (5, 7)
    x_q = rng.integers(0, 256, (2, c, 9, 8)).astype(np.uint8)
    w_q = rng.integers(-128, 128, (o, 1 if depthwise else c, kernel, kernel)).astype(np.int8)
    x_qp, out_qp, w_scale = random_qparams(rng), random_qparams(rng, 0.05, 0.5), F32(0.004)
    bias = rng.normal(0, 0.3, o).astype(F32)
    b_q = QK.quantize_bias(bias, x_qp[0], w_scale)
    plain, fast = ((QK.depthwise_conv2d_naive, QK.depthwise_conv2d) if depthwise
                   else (QK.conv2d_naive, QK.conv2d))
    acc = plain(x_q, x_qp[1], w_q, b_q, stride, padding)
    np.testing.assert_array_equal(fast(x_q, x_qp[1], w_q, b_q, stride, padding), acc)
    m = QK.requantization_multiplier((w_scale, x_qp[0]), out_qp[0])
    with torchref.quantized_engine("qnnpack"):
        ref = torch_conv(x_q, x_qp, w_q, w_scale, bias, out_qp, stride, padding, c if depthwise else 1)
    np.testing.assert_array_equal(QK.requantize(acc, m, out_qp[1]), ref)


def test_linear_plain_vectorised_and_torch_agree():
    rng = np.random.default_rng(5)
    x_q = rng.integers(0, 256, (3, 40)).astype(np.uint8)
    w_q = rng.integers(-128, 128, (12, 40)).astype(np.int8)
    x_qp, out_qp, w_scale = random_qparams(rng), random_qparams(rng, 0.05, 0.5), F32(0.003)
    bias = rng.normal(0, 0.3, 12).astype(F32)
    b_q = QK.quantize_bias(bias, x_qp[0], w_scale)
    acc = QK.linear_naive(x_q, x_qp[1], w_q, b_q)
    np.testing.assert_array_equal(QK.linear(x_q, x_qp[1], w_q, b_q), acc)
    layer = torch.ao.nn.quantized.Linear(40, 12)
    layer.set_weight_bias(torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_q), float(w_scale), 0),
                          torch.from_numpy(bias))
    layer.scale, layer.zero_point = float(out_qp[0]), out_qp[1]
    with torchref.quantized_engine("qnnpack"):
        ref = layer(qtensor(x_q, *x_qp)).int_repr().numpy()
    np.testing.assert_array_equal(QK.requantize(acc, QK.requantization_multiplier((w_scale, x_qp[0]), out_qp[0]),
                                                out_qp[1]), ref)


def test_hard_swish_and_hard_sigmoid_tables_match_torch_on_every_input():
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    rng = np.random.default_rng(6)
    with torchref.quantized_engine("qnnpack"):
        for _ in range(20):
            (s_in, z_in), (s_out, z_out) = random_qparams(rng, 0.005, 0.1), random_qparams(rng, 0.005, 0.05)
            ref = torch.ao.nn.quantized.functional.hardswish(qtensor(every, s_in, z_in), float(s_out), z_out)
            got = QK.hard_swish(every, s_in, z_in, s_out, z_out)
            np.testing.assert_array_equal(got, ref.int_repr().numpy())
            np.testing.assert_array_equal(QK.hard_swish_naive(every, s_in, z_in, s_out, z_out), got)
            ref = torch.nn.functional.hardsigmoid(qtensor(every, s_in, z_in))
            assert (F32(ref.q_scale()), ref.q_zero_point()) == (QK.HARD_SIGMOID_SCALE, QK.HARD_SIGMOID_ZERO_POINT)
            got = QK.hard_sigmoid(every, s_in, z_in)
            np.testing.assert_array_equal(got, ref.int_repr().numpy())
            np.testing.assert_array_equal(QK.hard_sigmoid_naive(every, s_in, z_in), got)


def test_relu_clamps_at_the_zero_point():
    q = np.array([[0, 5, 100, 255]], np.uint8)
    np.testing.assert_array_equal(QK.relu(q, 100), [[100, 100, 100, 255]])
    np.testing.assert_array_equal(QK.relu_naive(q, 100), QK.relu(q, 100))


def functional(scale, zero_point):
    f = torch.ao.nn.quantized.QFunctional()
    f.scale, f.zero_point = float(scale), int(zero_point)
    return f


def test_residual_add_is_qnnpack_fixed_point():
    rng = np.random.default_rng(7)
    with torchref.quantized_engine("qnnpack"):
        for _ in range(30):
            (sa, za), (sb, zb), (so, zo) = (random_qparams(rng) for _ in range(3))
            a, b = (rng.integers(0, 256, (2, 4, 5, 6)).astype(np.uint8) for _ in range(2))
            ref = functional(so, zo).add(qtensor(a, sa, za), qtensor(b, sb, zb)).int_repr().numpy()
            got = QK.add(a, sa, za, b, sb, zb, so, zo)
            np.testing.assert_array_equal(got, ref)
            np.testing.assert_array_equal(QK.add_naive(a, sa, za, b, sb, zb, so, zo), got)


def test_squeeze_excite_multiply_broadcasts_and_matches_torch():
    rng = np.random.default_rng(8)
    with torchref.quantized_engine("qnnpack"):
        for trial in range(30):
            sa, za = random_qparams(rng)
            so = sa if trial % 2 else F32(sa * rng.uniform(0.3, 1.2))     # equal scales make many exact ties
            zo = int(rng.integers(0, 256))
            a = rng.integers(0, 256, (2, 8, 5, 6)).astype(np.uint8)
            gate = rng.integers(0, 256, (2, 8, 1, 1)).astype(np.uint8)
            ref = functional(so, zo).mul(qtensor(a, sa, za), qtensor(gate, QK.HARD_SIGMOID_SCALE, 0))
            got = QK.mul(a, sa, za, gate, QK.HARD_SIGMOID_SCALE, 0, so, zo)
            np.testing.assert_array_equal(got, ref.int_repr().numpy())
            np.testing.assert_array_equal(QK.mul_naive(a, sa, za, gate, QK.HARD_SIGMOID_SCALE, 0, so, zo), got)


@pytest.mark.parametrize("size", [(7, 7), (4, 5), (2, 3), (1, 2), (13, 17)])
def test_global_average_pool_rounds_as_torch_does(size):
    rng = np.random.default_rng(size[0] * 100 + size[1])
    with torchref.quantized_engine("qnnpack"):
        for trial in range(20):
            scale, zero_point = random_qparams(rng, 0.001, 0.3)
            q = rng.integers(0, 256, (2, 16, *size))
            if trial % 2:       # values near the zero point: sums ending in .5 are frequent
                q = np.clip(zero_point + rng.integers(-3, 4, q.shape), 0, 255)
            q = q.astype(np.uint8)
            ref = torch.nn.functional.adaptive_avg_pool2d(qtensor(q, scale, zero_point), 1)
            got = QK.global_avg_pool(q, zero_point, scale)
            np.testing.assert_array_equal(got, ref.int_repr().numpy()[:, :, 0, 0])
            np.testing.assert_array_equal(QK.global_avg_pool_naive(q, zero_point, scale), got)
