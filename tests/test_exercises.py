"""The exercise checkers: they accept the reference kernels, report the stubs as not implemented, and
reject the mistakes students make, each with a message that says which case failed and how."""

import numpy as np
import pytest

from npmnv3 import exercises as ex
from npmnv3 import kernels as K
from npmnv3 import model as M

KERNELS = ("conv2d", "depthwise_conv2d", "batch_norm", "hard_swish", "squeeze_excite")
EXERCISES = KERNELS + ("bneck",)
REFERENCE = {**{kernel: getattr(K, kernel) for kernel in KERNELS}, "bneck": M.bneck}
NAIVE = {kernel: getattr(K, kernel + "_naive") for kernel in KERNELS}


def check(kernel, fn, **options):
    return getattr(ex, "check_" + kernel)(fn, verbose=False, **options)


def assert_fails(result, *fragments):
    """The check failed, and its message holds every fragment."""
    assert not result and result.passed is False
    for fragment in fragments:
        assert fragment in result.message, f"{fragment!r} not in:\n{result.message}"
    return result


# --------------------------------------------------------------------------- the references pass

@pytest.mark.parametrize("kernel,reference", [*REFERENCE.items(), *NAIVE.items()],
                         ids=[fn.__name__ for fn in [*REFERENCE.values(), *NAIVE.values()]])
def test_reference_kernels_pass(kernel, reference, capsys):
    result = getattr(ex, "check_" + kernel)(reference)
    assert result and result.passed
    assert result.case is None and result.max_error is None and result.where is None
    assert result.n_cases >= 6
    assert capsys.readouterr().out == f"check_{kernel}: all {result.n_cases} cases passed\n"


@pytest.mark.parametrize("seed", (1, 2, 3))
@pytest.mark.parametrize("kernel", EXERCISES)
def test_reference_kernels_pass_other_seeds(kernel, seed):
    assert check(kernel, REFERENCE[kernel], seed=seed)


def test_cases_cover_strides_dilations_kernel_sizes_batches_and_dtypes():
    cases = ex._conv2d_cases(0)
    assert {c.kwargs["stride"] for c in cases} == {1, 2}
    assert {c.kwargs["dilation"] for c in cases} == {1, 2}
    assert {c.arg("weight").shape[2] for c in cases} >= {1, 3, 5}
    assert {c.arg("x").shape[0] for c in cases} == {1, 3}
    assert {c.dtype.name for c in cases} == {"float64", "float32"}
    assert any(c.arg("x").shape[2] % 2 == 1 and c.arg("x").shape[2] != c.arg("x").shape[3] for c in cases)
    assert all(np.abs(c.arg("bias")).min() > 0 for c in cases if c.arg("bias") is not None)
    for c in ex._batch_norm_cases(0):          # eps = 0.001 dominates some variance in every case
        assert c.arg("running_var").min() < 1e-3 / 5
    x = np.concatenate([c.arg("x").ravel() for c in ex._hard_swish_cases(0)])
    for kink in (-3.0, 0.0, 3.0):
        assert (x == kink).any() and ((x != kink) & (np.abs(x - kink) < 1e-5)).any()
    for c in ex._se_cases(0):
        assert c.arg("fc1_weight").shape[0] != c.arg("x").shape[1]


def test_bneck_cases_cover_every_kind_of_block():
    cases = ex._bneck_cases(0)
    blocks = [c.arg("block") for c in cases]
    assert {b.expand is None for b in blocks} == {True, False}
    assert {b.se is None for b in blocks} == {True, False}
    assert {b.depthwise.activation for b in blocks} == {"RE", "HS"}
    assert {b.depthwise.kernel for b in blocks} == {3, 5}
    # (row stride, dilation, in == out channels, residual)
    kinds = {(c.params["stride"], c.params["dilation"], b.in_channels == b.out_channels, b.residual)
             for c, b in zip(cases, blocks)}
    assert kinds >= {(1, 1, True, True), (2, 1, True, False), (2, 1, False, False), (1, 1, False, False),
                     (2, 2, True, False)}
    assert all(b.depthwise.stride == 1 for b in blocks if b.depthwise.dilation == 2)
    assert any(b.se is not None and b.depthwise.in_channels == b.out_channels for b in blocks)   # a misplaced SE runs
    assert {c.arg("x").shape[0] for c in cases} == {1, 3}
    assert {c.dtype.name for c in cases} == {"float64", "float32"}
    assert any(c.arg("x").shape[2] % 2 == 1 and c.arg("x").shape[2] != c.arg("x").shape[3] for c in cases)


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_bneck_weights_make_every_part_of_the_block_matter(seed):
    for c in ex._bneck_cases(seed):
        block, params = c.arg("block"), c.arg("params")
        assert list(params) == [key for key, _, kind in block.parameters() if kind != "counter"]
        assert all(a.dtype == c.dtype for a in params.values())
        for conv in (block.expand, block.depthwise, block.project):
            if conv is not None:
                mean, var, weight, bias = (params[key] for key in conv.batch_norm_keys())
                assert var.min() < 2e-4 and var.max() > 1                    # eps = 0.001 matters somewhere
                assert (weight < 0).any() and (weight > 0).any() and np.abs(bias).max() > 0.1
        x, params = ex._float64(c.arg("x")), ex._float64(params)
        outputs = {}
        M.bneck(x, block, params, outputs)
        dw = block.depthwise
        before = K.batch_norm(K.depthwise_conv2d(x if block.expand is None else outputs[block.expand.name],
                                                 params[dw.weight_key], dw.stride, dw.padding, dw.dilation),
                              *(params[key] for key in dw.batch_norm_keys()))
        # the activation sees its kinks (0 for ReLU, -3 and 3 for hard-swish) and the parts between them
        assert (before < -3).any() and (before > 3).any() and (np.abs(before) < 3).mean() > 0.3
        if block.se is not None:
            w1, b1, w2, b2 = (params[f"{block.se.name}.{part}"] for part in ex._SE_PARTS)
            z = outputs[dw.name].mean(axis=(2, 3)) @ w1[:, :, 0, 0].T + b1
            assert (z < 0).any() and (z > 0).any()                            # the SE's ReLU matters
            gate = K.hard_sigmoid(np.maximum(z, 0) @ w2[:, :, 0, 0].T + b2)
            assert (gate == 0).any() and (gate == 1).any() and ((gate > 0) & (gate < 1)).mean() > 0.4
        if block.residual:                                # x and the projection both count
            assert 0.3 < np.abs(outputs[block.project.name]).mean() / np.abs(x).mean() < 3


# --------------------------------------------------------------------------- not implemented

@pytest.mark.parametrize("kernel", EXERCISES)
def test_stubs_are_not_implemented(kernel, capsys):
    stub = getattr(ex, kernel)
    with pytest.raises(NotImplementedError):
        stub(*[np.zeros((1, 1, 1, 1))] * {"conv2d": 2, "depthwise_conv2d": 2, "batch_norm": 5,
                                          "hard_swish": 1, "squeeze_excite": 5, "bneck": 3}[kernel])
    result = getattr(ex, "check_" + kernel)(stub)
    assert_fails(result, f"check_{kernel}: not implemented yet", "NotImplementedError")
    assert result.case["number"] == 1 and result.max_error is None
    assert "not implemented yet" in capsys.readouterr().out


def test_student_cell_calling_the_stub_is_not_implemented():
    def my_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
        return ex.conv2d(x, weight, bias, stride, padding, dilation)
    assert_fails(check("conv2d", my_conv2d), "not implemented yet", "my_conv2d raised NotImplementedError")


# --------------------------------------------------------------------------- convolution mistakes

def conv_padding_plus_one(x, weight, bias=None, stride=1, padding=0, dilation=1):
    return K.conv2d(x, weight, bias, stride, padding + 1, dilation)


def conv_without_padding(x, weight, bias=None, stride=1, padding=0, dilation=1):
    return K.conv2d(x, weight, bias, stride, 0, dilation)


def conv_padding_one_side(x, weight, bias=None, stride=1, padding=0, dilation=1):
    xp = np.pad(x, ((0, 0), (0, 0), (2 * padding, 0), (2 * padding, 0)))    # all of it top and left
    return K.conv2d(xp, weight, bias, stride, 0, dilation)


def conv_tf_same_padding(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """Pads only what the output size needs, the odd pixel at the bottom/right (TensorFlow's SAME)."""
    pads = []
    for axis in (2, 3):
        k = weight.shape[axis]
        out = K.conv_output_size(x.shape[axis], k, stride, padding, dilation)
        total = max((out - 1) * stride + dilation * (k - 1) + 1 - x.shape[axis], 0)
        pads.append((total // 2, total - total // 2))
    return K.conv2d(np.pad(x, ((0, 0), (0, 0), *pads)), weight, bias, stride, 0, dilation)


def conv_ignores_stride(x, weight, bias=None, stride=1, padding=0, dilation=1):
    return K.conv2d(x, weight, bias, 1, padding, dilation)


def conv_ignores_dilation(x, weight, bias=None, stride=1, padding=0, dilation=1):
    return K.conv2d(x, weight, bias, stride, padding, 1)


def conv_transposed_hw(x, weight, bias=None, stride=1, padding=0, dilation=1):
    return K.conv2d(x, weight, bias, stride, padding, dilation).swapaxes(2, 3)


def conv_height_width_swapped(x, weight, bias=None, stride=1, padding=0, dilation=1):
    n, _, w, h = x.shape                                              # H and W unpacked the wrong way
    o, _, kh, kw = weight.shape
    y = weight.reshape(o, -1) @ K.im2col(x, kh, kw, stride, padding, dilation)
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(n, o, K.conv_output_size(h, kh, stride, padding, dilation),
                     K.conv_output_size(w, kw, stride, padding, dilation))


def conv_weight_reshaped_wrongly(x, weight, bias=None, stride=1, padding=0, dilation=1):
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    cols = K.im2col(x, kh, kw, stride, padding, dilation)             # rows in (c, i, j) order
    y = weight.transpose(0, 2, 3, 1).reshape(o, -1) @ cols             # weights in (i, j, c) order
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(n, o, K.conv_output_size(h, kh, stride, padding, dilation),
                     K.conv_output_size(w, kw, stride, padding, dilation))


def conv_without_bias(x, weight, bias=None, stride=1, padding=0, dilation=1):
    return K.conv2d(x, weight, None, stride, padding, dilation)


def conv_bias_not_optional(x, weight, bias=None, stride=1, padding=0, dilation=1):
    return K.conv2d(x, weight, None, stride, padding, dilation) + bias[None, :, None, None]


def conv_in_float64(x, weight, bias=None, stride=1, padding=0, dilation=1):
    bias = None if bias is None else bias.astype(np.float64)
    return K.conv2d(x.astype(np.float64), weight.astype(np.float64), bias, stride, padding, dilation)


def test_conv_padding_plus_one():
    r = assert_fails(check("conv2d", conv_padding_plus_one), "FAILED on case 1 of 16", "padding=0",
                     "x (1, 1, 5, 5), weight (1, 1, 3, 3), bias (1,)",
                     "output shape: expected (1, 1, 3, 3), got (1, 1, 5, 5) -- the shapes differ",
                     "H_out = (H + 2*padding - dilation*(kh - 1) - 1) // stride + 1 = (5 + 2*0 - 1*(3 - 1) - 1) // 1 + 1 = 3")
    assert r.case["padding"] == 0 and r.case["shapes"]["x"] == (1, 1, 5, 5) and r.max_error is None


def test_conv_without_padding():
    assert_fails(check("conv2d", conv_without_padding), "case 2 of 16", "stride=1, padding=1, dilation=1",
                 "expected (1, 4, 7, 6), got (1, 4, 5, 4) -- the shapes differ")


def test_conv_padding_on_one_side_only():
    r = assert_fails(check("conv2d", conv_padding_one_side), "case 2 of 16", "padding=1",
                     "output shape: (1, 4, 7, 6), as expected", "max abs error", "at index")
    assert r.max_error > 0.1 and r.where[0] == 0


def test_conv_tensorflow_same_padding():
    r = assert_fails(check("conv2d", conv_tf_same_padding), "stride=2, padding=1", "max abs error", "expected")
    assert r.case["number"] == 4 and r.case["stride"] == 2


def test_conv_ignores_stride():
    r = assert_fails(check("conv2d", conv_ignores_stride), "case 4 of 16", "stride=2",
                     "expected (1, 3, 4, 4), got (1, 3, 8, 7) -- the shapes differ", "// 2 + 1 = 4")
    assert r.case["stride"] == 2


def test_conv_ignores_dilation():
    r = assert_fails(check("conv2d", conv_ignores_dilation), "case 7 of 16", "dilation=2",
                     "expected (1, 3, 7, 9), got (1, 3, 9, 11)")
    assert r.case["dilation"] == 2


def test_conv_transposed_height_and_width():
    # square output: the shape is right, the values are not
    assert_fails(check("conv2d", conv_transposed_hw), "case 1 of 16", "max abs error", "output values are off")
    # H and W swapped when unpacking x.shape: right for square inputs, then the shape is wrong
    assert_fails(check("conv2d", conv_height_width_swapped), "case 2 of 16", "x (1, 3, 7, 6)",
                 "expected (1, 4, 7, 6), got (1, 4, 6, 7) -- the shapes differ")


def test_conv_weight_reshaped_in_the_wrong_order():
    r = assert_fails(check("conv2d", conv_weight_reshaped_wrongly), "case 2 of 16",
                     "weight (4, 3, 3, 3)", "max abs error", "at index (0, ", "expected", "got")
    assert r.max_error > 0.1 and len(r.where) == 4


def test_conv_missing_bias():
    r = assert_fails(check("conv2d", conv_without_bias), "case 1 of 16", "bias (1,)", "max abs error",
                     "of 9 output values are off")
    assert np.isclose(r.max_error, abs(ex._conv2d_cases(0)[0].arg("bias")[0]))


def test_conv_crashing_on_bias_none_reports_the_exception():
    r = assert_fails(check("conv2d", conv_bias_not_optional), "case 12 of 16", "bias None",
                     "call:    conv_bias_not_optional(x, weight, None, stride=2, padding=1, dilation=1)",
                     "raised TypeError", "raised at", "bias[None, :, None, None]")
    assert r.case["shapes"]["bias"] is None


def test_conv_wrong_dtype():
    r = assert_fails(check("conv2d", conv_in_float64), "case 13 of 16", "dtype=float32",
                     "output dtype: expected float32 (the dtype of x), got float64 -- wrong dtype")
    assert r.case["dtype"] == "float32"


# --------------------------------------------------------------------------- depthwise mistakes

def dw_ignores_stride(x, weight, stride=1, padding=0, dilation=1):
    return K.depthwise_conv2d(x, weight, 1, padding, dilation)


def dw_ignores_dilation(x, weight, stride=1, padding=0, dilation=1):
    return K.depthwise_conv2d(x, weight, stride, padding, 1)


def dw_first_kernel_for_every_channel(x, weight, stride=1, padding=0, dilation=1):
    return K.depthwise_conv2d(x, np.repeat(weight[:1], len(weight), axis=0), stride, padding, dilation)


def dw_weight_index_swapped(x, weight, stride=1, padding=0, dilation=1):
    out = [K.conv2d(x[:, c:c + 1], weight[0, c][None, None], None, stride, padding, dilation)
           for c in range(x.shape[1])]
    return np.concatenate(out, axis=1)


def test_depthwise_ignores_stride():
    assert_fails(check("depthwise_conv2d", dw_ignores_stride), "case 4 of 12", "stride=2",
                 "expected (1, 4, 4, 4), got (1, 4, 8, 7) -- the shapes differ", "W_out")


def test_depthwise_ignores_dilation():
    assert_fails(check("depthwise_conv2d", dw_ignores_dilation), "case 7 of 12", "dilation=2", "shapes differ")


def test_depthwise_one_kernel_for_all_channels():
    r = assert_fails(check("depthwise_conv2d", dw_first_kernel_for_every_channel), "case 2 of 12",
                     "weight (3, 1, 3, 3)", "max abs error", "at index (0, ")
    assert r.where[1] > 0                                  # channel 0 is right, the others are not


def test_depthwise_weight_indexed_wrongly():
    assert_fails(check("depthwise_conv2d", dw_weight_index_swapped), "case 2 of 12",
                 "raised IndexError: index 1 is out of bounds", "weight[0, c][None, None]")


# --------------------------------------------------------------------------- batch-norm mistakes

def bn_eps_1e5(x, running_mean, running_var, weight, bias, eps=1e-5):
    return K.batch_norm(x, running_mean, running_var, weight, bias, eps)


def bn_eps_hardcoded(x, running_mean, running_var, weight, bias, eps=0.001):
    return K.batch_norm(x, running_mean, running_var, weight, bias, 0.001)


def bn_var_not_sqrt(x, running_mean, running_var, weight, bias, eps=0.001):
    c = (1, -1, 1, 1)
    return ((x - running_mean.reshape(c)) / (running_var.reshape(c) + eps) * weight.reshape(c)
            + bias.reshape(c))


def bn_stats_on_last_axis(x, running_mean, running_var, weight, bias, eps=0.001):
    return (x - running_mean) / np.sqrt(running_var + eps) * weight + bias


def bn_in_place(x, running_mean, running_var, weight, bias, eps=0.001):
    c = (1, -1, 1, 1)
    x -= running_mean.reshape(c)
    x /= np.sqrt(running_var.reshape(c) + eps)
    x *= weight.reshape(c)
    x += bias.reshape(c)
    return x


def test_batch_norm_wrong_default_eps():
    r = assert_fails(check("batch_norm", bn_eps_1e5), "case 1 of 6", "eps=not passed (default 0.001)",
                     "max abs error", "at index", "running_var[")
    assert r.case["eps"].startswith("not passed")
    channel = r.where[1]
    assert ex._batch_norm_cases(0)[0].arg("running_var")[channel] < 1e-3   # where eps matters


def test_batch_norm_ignores_the_eps_argument():
    r = assert_fails(check("batch_norm", bn_eps_hardcoded), "case 4 of 6", "eps=0.01", "max abs error")
    assert r.case["eps"] == 0.01


def test_batch_norm_var_instead_of_sqrt_var():
    assert_fails(check("batch_norm", bn_var_not_sqrt), "case 1 of 6", "max abs error", "expected", "got",
                 "x (1, 3, 4, 5), running_mean (3,), running_var (3,), weight (3,), bias (3,)")


def test_batch_norm_statistics_broadcast_on_the_wrong_axis():
    assert_fails(check("batch_norm", bn_stats_on_last_axis), "case 1 of 6", "raised ValueError",
                 "broadcast", "x (1, 3, 4, 5)")


def test_batch_norm_in_place():
    r = assert_fails(check("batch_norm", bn_in_place), "case 1 of 6",
                     "bn_in_place modified its input `x` in place", "largest change", "not `x -= m`")
    assert len(r.where) == 4 and r.max_error is None


# --------------------------------------------------------------------------- hard-swish mistakes

def hs_no_cap(x):
    return x * np.maximum(x + 3, 0) / 6


def hs_swish(x):
    return x / (1 + np.exp(-x))


def hs_in_place(x):
    x *= np.clip(x + 3, 0, 6) / 6
    return x


def hs_float64_constant(x):
    return x * np.clip(x + 3, 0, 6) / np.float64(6)


def hs_no_return(x):
    x * np.clip(x + 3, 0, 6) / 6


def hs_list(x):
    return (x * np.clip(x + 3, 0, 6) / 6).tolist()


def hs_nan_at_kink(x):
    return x * np.clip(x + 3, 0, 6) / (x + 3) * (x + 3) / 6


def test_hard_swish_without_the_cap_at_6():
    r = assert_fails(check("hard_swish", hs_no_cap), "case 1 of 6", "x (1, 3, 5, 4)", "dtype=float64",
                     "max abs error", "there x = 100", "expected 100, got 1716.66666")
    assert r.max_error > 1000


def test_hard_swish_is_not_swish():
    assert_fails(check("hard_swish", hs_swish), "case 1 of 6", "max abs error", "there x = ")


def test_hard_swish_in_place():
    assert_fails(check("hard_swish", hs_in_place), "modified its input `x` in place")


def test_hard_swish_wrong_dtype():
    r = assert_fails(check("hard_swish", hs_float64_constant), "case 4 of 6", "dtype=float32",
                     "expected float32", "got float64", "wrong dtype")
    assert r.case["number"] == 4


def test_hard_swish_returns_none_or_list():
    assert_fails(check("hard_swish", hs_no_return), "case 1 of 6", "returned None", "missing `return`")
    assert_fails(check("hard_swish", hs_list), "returned a builtins.list, not a numpy array")


def test_hard_swish_nan():
    with np.errstate(invalid="ignore"):
        r = assert_fails(check("hard_swish", hs_nan_at_kink), "max abs error inf", "expected 0, got nan",
                         "there x = -3")
    assert r.max_error == float("inf")


# --------------------------------------------------------------------------- squeeze-excite mistakes

def _gate(s, w1, b1, w2, b2, relu=True, gate=K.hard_sigmoid):
    z = s @ w1[:, :, 0, 0].T + b1
    if relu:
        z = np.maximum(z, 0)
    return gate(z @ w2[:, :, 0, 0].T + b2)


def se_sigmoid(x, w1, b1, w2, b2):
    return x * _gate(x.mean(axis=(2, 3)), w1, b1, w2, b2, gate=lambda t: 1 / (1 + np.exp(-t)))[:, :, None, None]


def se_no_relu(x, w1, b1, w2, b2):
    return x * _gate(x.mean(axis=(2, 3)), w1, b1, w2, b2, relu=False)[:, :, None, None]


def se_no_biases(x, w1, b1, w2, b2):
    return x * _gate(x.mean(axis=(2, 3)), w1, 0 * b1, w2, 0 * b2)[:, :, None, None]


def se_mean_over_the_batch_too(x, w1, b1, w2, b2):
    s = np.broadcast_to(x.mean(axis=(0, 2, 3)), x.shape[:2])
    return x * _gate(s, w1, b1, w2, b2)[:, :, None, None]


def se_weights_not_transposed(x, w1, b1, w2, b2):
    z = np.maximum(x.mean(axis=(2, 3)) @ w1[:, :, 0, 0] + b1, 0)
    return x * K.hard_sigmoid(z @ w2[:, :, 0, 0] + b2)[:, :, None, None]


@pytest.mark.parametrize("mistake", (se_sigmoid, se_no_relu, se_no_biases))
def test_squeeze_excite_formula_mistakes(mistake):
    r = assert_fails(check("squeeze_excite", mistake), "max abs error", "at index", "expected gate e[", "your output / x = ",
                     "fc1_weight (", "squeeze_channels=")
    assert r.max_error > 1e-3


def test_squeeze_excite_gate_shared_across_the_batch():
    assert_fails(check("squeeze_excite", se_mean_over_the_batch_too), "case 2 of 6", "x (3, 6, 5, 5)",
                 "max abs error")


def test_squeeze_excite_weight_not_transposed():
    assert_fails(check("squeeze_excite", se_weights_not_transposed), "case 1 of 6", "raised ValueError",
                 "fc1_weight (3, 5, 1, 1)")


# --------------------------------------------------------------------------- bneck mistakes

ACT = {"RE": K.relu, "HS": K.hard_swish}


def _bneck(x, block, params, *, residual=None, expand_always=False, se="depthwise", project_activation=False,
           padding=None, eps=None, activation=None):
    """A bneck written with the kernels, with one part optionally done the wrong way."""
    def conv_bn_act(h, conv, act):
        weight = params[conv.weight_key]
        if conv.depthwise:
            pad = conv.padding if padding is None else padding(conv)
            z = K.depthwise_conv2d(h, weight, conv.stride, pad, conv.dilation)
        else:
            z = K.conv2d(h, weight)
        z = K.batch_norm(z, *(params[key] for key in conv.batch_norm_keys()), eps=conv.eps if eps is None else eps)
        return z if act is None else (activation or ACT[act])(z)

    def squeeze_excite(h):
        return K.squeeze_excite(h, *(params[f"{block.se.name}.{part}"]
                                     for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))

    act = block.depthwise.activation
    h = x
    if block.expand is not None or expand_always:
        h = conv_bn_act(h, block.expand, act)
    h = conv_bn_act(h, block.depthwise, act)
    if se == "depthwise" and block.se is not None:
        h = squeeze_excite(h)
    y = conv_bn_act(h, block.project, act if project_activation else None)
    if se == "project" and block.se is not None:
        y = squeeze_excite(y)
    if block.residual if residual is None else residual:
        y = y + x
    return y


def bneck_residual_when_channels_match(x, block, params):        # forgets the stride
    return _bneck(x, block, params, residual=block.in_channels == block.out_channels)


def bneck_residual_when_stride_1(x, block, params):              # forgets the channels
    return _bneck(x, block, params, residual=block.depthwise.stride == 1)


def bneck_residual_when_shapes_match(x, block, params):          # the dilated block too
    return _bneck(x, block, params,
                  residual=block.depthwise.stride == 1 and block.in_channels == block.out_channels)


def bneck_without_residual(x, block, params):
    return _bneck(x, block, params, residual=False)


def bneck_se_after_projection(x, block, params):
    return _bneck(x, block, params, se="project")


def bneck_se_left_out(x, block, params):
    return _bneck(x, block, params, se=None)


def bneck_activation_on_projection(x, block, params):
    return _bneck(x, block, params, project_activation=True)


def bneck_padding_ignores_dilation(x, block, params):
    return _bneck(x, block, params, padding=lambda conv: conv.kernel // 2)


def bneck_padding_always_1(x, block, params):
    return _bneck(x, block, params, padding=lambda conv: 1)


def bneck_expand_always(x, block, params):
    return _bneck(x, block, params, expand_always=True)


def bneck_fixed_numbering(x, block, params):
    """Numbers the layers as in a block that has all four (block.3 the projection) to read the output width."""
    out_channels = params[f"{block.name}.block.3.0.weight"].shape[0]
    return _bneck(x, block, params)[:, :out_channels]


def bneck_eps_1e5(x, block, params):
    return _bneck(x, block, params, eps=1e-5)


def bneck_relu_always(x, block, params):
    return _bneck(x, block, params, activation=K.relu)


def bneck_hard_swish_always(x, block, params):
    return _bneck(x, block, params, activation=K.hard_swish)


def bneck_no_return(x, block, params):
    _bneck(x, block, params)


def bneck_in_float64(x, block, params):
    return _bneck(x.astype(np.float64), block, params)


def bneck_residual_in_place(x, block, params):
    y = _bneck(x, block, params, residual=False)
    if block.residual:
        x += y
        return x
    return y


def bneck_folds_batch_norm_in_place(x, block, params):
    """Folds the projection's BN into its weight -- the caller's array -- and gets the right output."""
    conv = block.project
    mean, var, gamma, beta = conv.batch_norm_keys()
    scale = params[gamma] / np.sqrt(params[var] + conv.eps)
    params[conv.weight_key] *= scale[:, None, None, None]
    folded = dict(params)
    folded[mean], folded[var] = np.zeros_like(scale), np.ones_like(scale) - conv.eps
    folded[gamma], folded[beta] = np.ones_like(scale), params[beta] - params[mean] * scale
    return _bneck(x, block, folded)


def bneck_pops_its_parameters(x, block, params):
    own = {key: params.pop(key) for key in list(params)}
    return _bneck(x, block, own)


def test_bneck_residual_on_a_stride_2_block():
    r = assert_fails(check("bneck", bneck_residual_when_channels_match), "FAILED on case 2 of 12", "stride=2",
                     "raised ValueError: operands could not be broadcast", "y = y + x",
                     "likely cause: x (3, 8, 7, 6) cannot be added to the output (3, 8, 4, 3): this block has no "
                     "residual connection (block.residual is False: stride 2, the output is smaller than x)")
    assert r.case["residual"] is False and r.case["stride"] == 2


def test_bneck_residual_on_a_block_that_changes_the_channels():
    assert_fails(check("bneck", bneck_residual_when_stride_1), "FAILED on case 5 of 12",
                 "in_channels=6", "out_channels=8", "stride=1", "raised ValueError",
                 "this block has no residual connection (block.residual is False: in_channels 6 != out_channels 8)")


def test_bneck_residual_on_the_dilated_block():
    r = assert_fails(check("bneck", bneck_residual_when_shapes_match), "FAILED on case 7 of 12",
                     "stride=2, dilation=2, residual=False", "output shape: (1, 6, 9, 7), as expected",
                     "depthwise  (1, 18, 9, 7)    5x5 on each of the 18 channels, stride 1, padding 4, dilation 2",
                     "likely cause: your output is that of this block with x added back, but it has no residual "
                     "connection (block.residual is False: a dilated block",
                     "torchvision adds x only when the row's stride is 1")
    assert r.max_error > 0.1


def test_bneck_residual_missing():
    assert_fails(check("bneck", bneck_without_residual), "FAILED on case 1 of 12", "residual=True",
                 "likely cause: your output is that of this block without its residual: block.residual is True")


def test_bneck_squeeze_excite_after_the_projection():
    assert_fails(check("bneck", bneck_se_after_projection), "FAILED on case 2 of 12", "use_se=True",
                 "likely cause: your output is that of this block with squeeze-and-excite after the projection: "
                 "it goes between the depthwise conv and the projection, on the 8 expanded channels")


def test_bneck_squeeze_excite_left_out():
    assert_fails(check("bneck", bneck_se_left_out), "FAILED on case 2 of 12",
                 "likely cause: your output is that of this block without its squeeze-and-excite")


def test_bneck_activation_on_the_projection():
    r = assert_fails(check("bneck", bneck_activation_on_projection), "FAILED on case 1 of 12", "activation=RE",
                     "max abs error", "likely cause: your output is that of this block with a ReLU after the "
                     "projection: the projection is linear (block.project.activation is None)")
    assert r.where[0] == 0 and len(r.where) == 4


def test_bneck_depthwise_padding_ignores_the_dilation():
    r = assert_fails(check("bneck", bneck_padding_ignores_dilation), "FAILED on case 7 of 12", "dilation=2",
                     "output shape: expected (1, 6, 9, 7), got (1, 6, 5, 3) -- the shapes differ",
                     "hint: the output is (N, block.project.out_channels, H_out, W_out), H_out and W_out those "
                     "of the depthwise conv, whose padding is (k - 1) // 2 * dilation = (5 - 1) // 2 * 2 = 4",
                     "H_out = (H + 2*padding - dilation*(k - 1) - 1) // stride + 1 "
                     "= (9 + 2*4 - 2*(5 - 1) - 1) // 1 + 1 = 9")
    assert r.max_error is None


def test_bneck_depthwise_padding_always_1():
    # a 5x5 block with a residual: the output cannot be added to x
    assert_fails(check("bneck", bneck_padding_always_1), "FAILED on case 4 of 12", "kernel=5",
                 "raised ValueError: operands could not be broadcast together with shapes (1,6,5,7) (1,6,7,9)",
                 "likely cause: block.residual is True, so before x is added the output must have the shape "
                 "of x, (1, 6, 7, 9)", "the depthwise conv's padding is (k - 1) // 2 * dilation = (5 - 1) // 2 * 1 = 2")


def test_bneck_expand_conv_of_a_block_without_one():
    r = assert_fails(check("bneck", bneck_expand_always), "FAILED on case 1 of 12", "expanded=4",
                     "expand     -                none: expanded == in_channels == 4 (block.expand is None",
                     "raised AttributeError: 'NoneType' object has no attribute 'weight_key'",
                     "likely cause: this block has no expand conv: expanded == in_channels == 4, so block.expand "
                     "is None and params holds no weights for one; skip the expand step when block.expand is None")
    assert "no squeeze-and-excite" not in r.message        # the failing lines name the expand conv only


def test_bneck_keys_numbered_as_if_every_layer_existed():
    assert_fails(check("bneck", bneck_fixed_numbering), "FAILED on case 1 of 12", "raised KeyError",
                 "likely cause: params has no key 'features.1.block.3.0.weight'. This block's layers: depthwise "
                 "features.1.block.0; project features.1.block.1. torchvision numbers only the layers a block has",
                 "likely cause: this block has no expand conv: expanded == in_channels == 4",
                 "likely cause: this block has no squeeze-and-excite: block.se is None")


def test_bneck_batch_norm_eps_1e5():
    assert_fails(check("bneck", bneck_eps_1e5), "FAILED on case 1 of 12", "max abs error",
                 "likely cause: your output is that of this block with BatchNorm eps=1e-5 (PyTorch's default): "
                 "MobileNetV3's BatchNorms use eps=0.001, pass eps=conv.eps to batch_norm")


def test_bneck_relu_where_hard_swish_is_asked():
    r = assert_fails(check("bneck", bneck_relu_always), "FAILED on case 5 of 12", "activation=HS",
                     "likely cause: your output is that of this block with ReLU in place of hard-swish: its "
                     "activation is 'HS' (hard-swish), see block.expand.activation and block.depthwise.activation")
    assert r.case["activation"] == "HS"
    assert_fails(check("bneck", bneck_hard_swish_always), "FAILED on case 1 of 12",
                 "with hard-swish in place of ReLU: its activation is 'RE' (ReLU), see block.depthwise.activation")


def test_bneck_generic_mistakes():
    assert_fails(check("bneck", bneck_no_return), "case 1 of 12", "returned None", "missing `return`")
    r = assert_fails(check("bneck", bneck_in_float64), "FAILED on case 9 of 12", "dtype=float32",
                     "output dtype: expected float32 (the dtype of x), got float64 -- wrong dtype")
    assert r.case["dtype"] == "float32"
    r = assert_fails(check("bneck", bneck_residual_in_place), "FAILED on case 1 of 12",
                     "bneck_residual_in_place modified its input `x` in place", "largest change")
    assert len(r.where) == 4


def test_bneck_parameters_changed_in_place_are_reported():
    """The folded weights give the right output, but the caller's parameters are no longer what they were."""
    r = assert_fails(check("bneck", bneck_folds_batch_norm_in_place), "FAILED on case 1 of 12",
                     'modified its input `params["features.1.block.1.0.weight"]` in place (largest change',
                     'at params["features.1.block.1.0.weight"][')
    assert r.max_error is None and len(r.where) == 4
    assert_fails(check("bneck", bneck_pops_its_parameters),
                 "modified its input `params` in place (keys removed: 'features.1.block.0.0.weight', ")


def test_bneck_report_describes_the_block():
    r = check("bneck", bneck_eps_1e5)
    assert r.message.splitlines()[1:11] == [
        "  case:    block=features.1, in_channels=4, kernel=3, expanded=4, out_channels=4, use_se=False, "
        "activation=RE, stride=1, dilation=1, residual=True, dtype=float64",
        "  inputs:  x (1, 4, 7, 5), block (Block features.1), params (dict of 10 arrays)",
        "  call:    bneck_eps_1e5(x, block, params)",
        "  block:   x          (1, 4, 7, 5)     the input (features.1)",
        "           expand     -                none: expanded == in_channels == 4 (block.expand is None, "
        "and params has no weights for it)",
        "           depthwise  (1, 4, 7, 5)     3x3 on each of the 4 channels, stride 1, padding 1, dilation 1, "
        "BN, ReLU",
        "           SE         -                none (block.se is None)",
        "           project    (1, 4, 7, 5)     1x1 conv 4 -> 4, BN, no activation",
        "           residual   (1, 4, 7, 5)     + x (block.residual is True: stride 1 and in_channels == "
        "out_channels == 4)",
        "  output shape: (1, 4, 7, 5), as expected"]
    assert r.case["shapes"]["x"] == (1, 4, 7, 5) and "block" not in r.case["shapes"]
    assert r.case["shapes"]["params"]["features.1.block.0.0.weight"] == (4, 1, 3, 3)
    assert r.case["block"] == "features.1" and r.n_cases == 12


@pytest.mark.parametrize("seed", (1, 2, 3))
def test_bneck_likely_cause_whatever_the_seed(seed):
    for mistake, cause in ((bneck_residual_when_shapes_match, "with x added back"),
                           (bneck_without_residual, "without its residual"),
                           (bneck_se_after_projection, "with squeeze-and-excite after the projection"),
                           (bneck_se_left_out, "without its squeeze-and-excite"),
                           (bneck_activation_on_projection, "with a ReLU after the projection"),
                           (bneck_eps_1e5, "with BatchNorm eps=1e-5"),
                           (bneck_relu_always, "with ReLU in place of hard-swish")):
        assert_fails(check("bneck", mistake, seed=seed), "likely cause: your output is that of this block " + cause)


@pytest.mark.parametrize("seed", range(8))
def test_subtle_mistakes_are_caught_whatever_the_seed(seed):
    for kernel, mistake in (("squeeze_excite", se_sigmoid), ("squeeze_excite", se_no_relu),
                            ("squeeze_excite", se_no_biases), ("batch_norm", bn_eps_1e5),
                            ("batch_norm", bn_var_not_sqrt), ("hard_swish", hs_swish),
                            ("conv2d", conv_without_bias), ("conv2d", conv_weight_reshaped_wrongly),
                            ("bneck", bneck_eps_1e5), ("bneck", bneck_se_after_projection),
                            ("bneck", bneck_activation_on_projection), ("bneck", bneck_relu_always),
                            ("bneck", bneck_residual_when_shapes_match)):
        assert not check(kernel, mistake, seed=seed), (kernel, mistake.__name__, seed)


# --------------------------------------------------------------------------- not fooled, robust

def test_not_fooled_by_changing_the_inputs():
    """Zeroing x in place and returning the convolution of zeros would pass a checker that computed
    the expected output from the same arrays after the call; this one compares with copies."""
    def sneaky(x, weight, bias=None, stride=1, padding=0, dilation=1):
        x[...] = 0
        return K.conv2d(x, weight, bias, stride, padding, dilation)
    r = assert_fails(check("conv2d", sneaky), "case 1 of 16", "modified its input `x` in place")
    assert r.where is not None

    def sneaky_weight(x, weight, bias=None, stride=1, padding=0, dilation=1):
        weight *= 2
        return K.conv2d(x, weight / 2, bias, stride, padding, dilation)
    assert_fails(check("conv2d", sneaky_weight), "modified its input `weight` in place")


def test_checker_needs_a_function():
    x = np.ones((1, 1, 3, 3))
    assert_fails(check("hard_swish", K.hard_swish(x)), "expected a function, got a ndarray",
                 "check_hard_swish(my_hard_swish)")


def test_failure_is_printed_when_verbose(capsys):
    result = ex.check_hard_swish(hs_no_cap)
    assert capsys.readouterr().out == result.message + "\n"
    assert str(result) == result.message
    assert repr(result).startswith("CheckResult('hard_swish': failed on case 1 of 6, max_error=")
    ex.check_hard_swish(hs_no_cap, verbose=False)
    assert capsys.readouterr().out == ""


def test_result_reports_the_case():
    r = check("conv2d", conv_ignores_stride)
    assert r.kernel == "conv2d" and r.n_cases == 16
    assert r.case == {"number": 4, "note": r.case["note"],
                      "call": "conv_ignores_stride(x, weight, bias, stride=2, padding=1, dilation=1)",
                      "stride": 2, "padding": 1, "dilation": 1, "kernel": "3x3", "dtype": "float64",
                      "shapes": {"x": (1, 2, 8, 7), "weight": (3, 2, 3, 3), "bias": (3,)}}


# --------------------------------------------------------------------------- other correct solutions pass

def einsum_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    o, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (dilation * (kh - 1) + 1, dilation * (kw - 1) + 1),
                                                   axis=(2, 3))[:, :, ::stride, ::stride, ::dilation, ::dilation]
    y = np.einsum("nchwij,ocij->nohw", win, weight)
    return y if bias is None else y + bias[None, :, None, None]


def einsum_depthwise(x, weight, stride=1, padding=0, dilation=1):
    kh, kw = weight.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (dilation * (kh - 1) + 1, dilation * (kw - 1) + 1),
                                                   axis=(2, 3))[:, :, ::stride, ::stride, ::dilation, ::dilation]
    return np.einsum("nchwij,cij->nchw", win, weight[:, 0])


def loop_batch_norm(x, running_mean, running_var, weight, bias, eps=0.001):
    y = np.empty_like(x)
    for c in range(x.shape[1]):
        y[:, c] = weight[c] * (x[:, c] - running_mean[c]) / np.sqrt(running_var[c] + eps) + bias[c]
    return y


def where_hard_swish(x):
    return np.where(x <= -3, 0, np.where(x >= 3, x, x * (x + 3) / 6)).astype(x.dtype)


def per_image_se(x, w1, b1, w2, b2):
    out = []
    for image in x:
        s = image.mean(axis=(1, 2))
        z = np.maximum(w1[:, :, 0, 0] @ s + b1, 0)
        e = np.minimum(np.maximum(w2[:, :, 0, 0] @ z + b2 + 3, 0), 6) / 6
        out.append(image * e[:, None, None])
    return np.stack(out)


def bneck_with_loop_kernels(x, block, params):
    def conv_bn_act(h, conv):
        weight = params[conv.weight_key]
        if conv.depthwise:
            z = K.depthwise_conv2d_naive(h, weight, conv.stride, conv.padding, conv.dilation)
        else:
            z = K.conv2d_naive(h, weight, None, conv.stride, conv.padding, conv.dilation)
        z = K.batch_norm_naive(z, *(params[key] for key in conv.batch_norm_keys()), eps=conv.eps)
        return {"RE": K.relu_naive, "HS": K.hard_swish_naive, None: np.copy}[conv.activation](z)

    h = x if block.expand is None else conv_bn_act(x, block.expand)
    h = conv_bn_act(h, block.depthwise)
    if block.se is not None:
        h = K.squeeze_excite_naive(h, *(params[f"{block.se.name}.{part}"]
                                        for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))
    y = conv_bn_act(h, block.project)
    return y + x if block.residual else y


@pytest.mark.parametrize("kernel,fn", [("conv2d", einsum_conv2d), ("depthwise_conv2d", einsum_depthwise),
                                       ("batch_norm", loop_batch_norm), ("hard_swish", where_hard_swish),
                                       ("squeeze_excite", per_image_se), ("bneck", bneck_with_loop_kernels)])
def test_other_correct_solutions_pass(kernel, fn):
    result = check(kernel, fn)
    assert result, result.message


# --------------------------------------------------------------------------- the notebook

def test_exercise_notebook_is_stored_clean_and_checks_every_kernel():
    import json
    from pathlib import Path
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "07_exercises.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    source = "\n".join("".join(c["source"]) for c in code)
    for kernel in EXERCISES + ("requantize",):
        assert f"check_{kernel}(my_{kernel})" in source
        assert f"ex.{kernel}(" in source                     # the student's cell starts on the stub
    assert "block = model.features[5]" in source and "params = model.params" in source    # the bneck hint
    assert "npmnv3/kernels.py" in "".join("".join(c["source"]) for c in nb["cells"])


# --------------------------------------------------------------------------- requantization (the int8 network's step)

def test_requantize_references_pass_and_the_stub_is_not_implemented(capsys):
    from npmnv3 import qkernels as QK
    for seed in (0, 1, 2):
        for fn in (QK.requantize, QK.requantize_naive):
            result = ex.check_requantize(fn, seed=seed, verbose=False)
            assert result and result.n_cases == 6, result.message
    with pytest.raises(NotImplementedError):
        ex.requantize(np.zeros(3, np.int64), np.float32(0.5), 0)
    assert_fails(ex.check_requantize(ex.requantize), "check_requantize: not implemented yet")
    assert "not implemented yet" in capsys.readouterr().out


def test_requantize_cases_cover_halves_clamps_relu_and_large_sums():
    cases = ex._requantize_cases(0)
    expected = np.concatenate([c.expected.ravel() for c in cases])
    assert expected.dtype == np.uint8 and expected.min() == 0 and expected.max() == 255
    halves = [c for c in cases if "halves" in c.note and "2**24" not in c.note][0]
    assert ((halves.arg("acc") * np.float64(halves.kwargs["multiplier"])) % 1 == 0.5).all()
    large = [c for c in cases if "2**24" in c.note][0]
    assert np.abs(large.arg("acc")).min() > 2 ** 24 and 0 < large.expected.min() and large.expected.max() < 255
    assert any(c.kwargs["relu"] and c.kwargs["zero_point"] > 0 for c in cases)


def _requantize_with(rounding=np.rint, product=lambda acc, m: acc.astype(np.float32) * m, relu_at_zero=False,
                     dtype=np.uint8):
    def fn(acc, multiplier, zero_point, relu=False):
        low = 0 if relu_at_zero or not relu else zero_point
        return np.clip(rounding(product(acc, multiplier)) + zero_point, low, 255).astype(dtype)
    return fn


@pytest.mark.parametrize("mistake,fragments", [
    (dict(rounding=lambda v: np.floor(v + np.float32(0.5))),
     ["case 2 of 6 (halves", "likely cause: a half rounded up or away from zero"]),
    (dict(product=lambda acc, m: acc * np.float64(m)),
     ["case 5 of 6 (sums beyond 2**24", "likely cause: the product taken in float64"]),
    (dict(relu_at_zero=True), ["case 4 of 6 (fused ReLU", "likely cause: ReLU clamped at 0 (or left out)"]),
    (dict(dtype=np.float32), ["output dtype: expected uint8 (quantized activations are uint8), got float32",
                              "y.astype(np.uint8)"]),
])
def test_requantize_mistakes_are_named(mistake, fragments):
    assert_fails(ex.check_requantize(_requantize_with(**mistake), verbose=False), *fragments)
