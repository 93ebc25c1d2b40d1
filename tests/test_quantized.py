"""The int8 MobileNetV3-Large against torch's quantized model (QNNPACK), layer by layer, from QAT state
dicts saved as torchvision's training leaves them; loading them strictly; the random network."""

import numpy as np
import pytest

import npmnv3
from npmnv3 import qengine as QE
from npmnv3 import qkernels as QK
from npmnv3.config import Conv
from npmnv3.errors import StateDictError
from npmnv3.quantized import QParams, QuantizedLayer, quantized_conv

torch = pytest.importorskip("torch")
import torchref  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning"),
              pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams:UserWarning")]
F32 = np.float32
MIN_EXACT = 0.999          # share of each features.i's integers equal to torch's
MAX_LOGIT_STEPS = 2        # dequantized logits: at most this many output steps from torch's
INPUTS = {"224 batch 1": (1, 224, 224), "97x131 batch 3": (3, 97, 131)}
SAME_INPUTS = dict(INPUTS, **{"224 batch 3": (3, 224, 224), "97x131 batch 1": (1, 97, 131),
                              "65x33 batch 2": (2, 65, 33)})


def saved(tmp_path_factory, qat_model, name):
    """The QAT model's state dict as torch.save writes it, read back through npmnv3's safe reader."""
    path = tmp_path_factory.mktemp("qat") / name
    torch.save(qat_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(file, torch's quantized model): a QAT state dict as saved right after the observers were calibrated."""
    qat, quantized = torchref.quantized_model(seed=0)
    return saved(tmp_path_factory, qat, "calibrated.pth"), quantized


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(file, torch's quantized model): the QAT end state -- observers disabled, weights trained on after
    the last observation (so the observed weight ranges are stale and some weights are clamped)."""
    qat, _ = torchref.quantized_model(seed=1)
    qat = torchref.end_of_training(qat, seed=1)
    return saved(tmp_path_factory, qat, "trained.pth"), torchref.convert(qat)


def one_step_apart(a, b):
    """Scales within one float32 step of each other."""
    return abs(F32(a) - F32(b)) <= np.spacing(F32(max(a, b)))


def check_agreement(model, torch_model, x):
    """Every features.i (integers, scale, zero point), the logits (in output steps) and the top-5."""
    ref_logits, ref_feats = torchref.quantized_features_and_logits(torch_model, x)
    logits, feats = model(x, return_intermediates=True)
    assert list(feats) == list(ref_feats)
    for name, (values, scale, zero_point) in ref_feats.items():
        got = feats[name]
        assert got.values.dtype == np.uint8 and got.values.shape == values.shape, name
        assert one_step_apart(got.scale, scale) and got.zero_point == zero_point, name
        diff = np.abs(got.values.astype(np.int16) - values.astype(np.int16))
        assert diff.max() <= 1 and (diff == 0).mean() >= MIN_EXACT, (name, diff.max(), (diff == 0).mean())
    step = torch_model.classifier[3].scale
    assert logits.dtype == np.float32 and logits.shape == ref_logits.shape
    assert np.abs(logits - ref_logits).max() <= MAX_LOGIT_STEPS * step * (1 + 1e-6)
    assert len(np.unique(ref_logits)) > 100, "logits too coarse for the test to mean anything"
    for row, ref in zip(logits, ref_logits):
        top, ref_top = np.argsort(-row, kind="stable")[:5], np.argsort(-ref, kind="stable")[:5]
        for a, b in zip(top, ref_top):      # a swap only between classes torch puts within one step
            assert a == b or abs(ref[a] - ref[b]) <= step * (1 + 1e-6), (top, ref_top)


def inputs(label, seed=7):
    n, h, w = SAME_INPUTS[label]
    return torchref.smooth_images(n, h, w, seed).numpy()


def assert_same_integers(fast, reference):
    """model(x) and model.forward_reference(x), both with their intermediates: equal to the bit."""
    (logits, feats), (ref_logits, ref_feats) = fast, reference
    assert list(feats) == list(ref_feats) == [f"features.{i}" for i in range(17)]
    for name, ref in ref_feats.items():
        got = feats[name]
        assert got.values.dtype == ref.values.dtype == np.uint8 and got.values.shape == ref.values.shape, name
        assert (got.scale, got.zero_point) == (ref.scale, ref.zero_point), name
        np.testing.assert_array_equal(got.values, ref.values, err_msg=name)
    assert logits.dtype == ref_logits.dtype == np.float32
    np.testing.assert_array_equal(logits, ref_logits)


@pytest.mark.slow
@pytest.mark.parametrize("label", INPUTS)
def test_calibrated_qat_file_agrees_with_torch_qnnpack(calibrated, label):
    path, torch_model = calibrated
    model = npmnv3.quantized_mobilenet_v3_large(weights=path)
    check_agreement(model, torch_model, inputs(label))


@pytest.mark.slow
@pytest.mark.parametrize("label", INPUTS)
def test_qat_end_state_file_agrees_with_torch_qnnpack(trained, label):
    path, torch_model = trained
    model = npmnv3.quantized_mobilenet_v3_large(weights=path, threads=1)
    check_agreement(model, torch_model, inputs(label, seed=8))


@pytest.mark.parametrize("label", [pytest.param(label, marks=[pytest.mark.slow] if label.startswith("224") else [])
                                   for label in SAME_INPUTS])
def test_fast_path_gives_the_readable_paths_integers_in_every_layer(calibrated, trained, label):
    for seed, (path, _) in enumerate((calibrated, trained)):
        model = npmnv3.quantized_mobilenet_v3_large(weights=path)
        x = inputs(label, seed=seed)
        assert_same_integers(model(x, return_intermediates=True), model.forward_reference(x, return_intermediates=True))
        np.testing.assert_array_equal(model(x), model.forward_reference(x))


def test_layers_accumulate_in_float32_only_below_two_to_the_24(calibrated):
    path, _ = calibrated
    network = npmnv3.quantized_mobilenet_v3_large(weights=path).engine()
    for name, layer in network.fast.layers.items():
        if isinstance(layer, QE.FastLayer):
            bound = QK.accumulator_bound(network.layers[name].weight, network.layers[name].bias).max()
            assert layer.weight.dtype == layer.bias.dtype == (np.float32 if bound < 2 ** 24 else np.float64), name
            if layer.kind == "depthwise":       # 9 or 25 taps: 255 * 127 * 25 < 2**23
                assert layer.weight.dtype == np.float32, name


def wide_layer(channels=1024, outputs=4):
    """A 1x1 conv whose accumulator passes 2**24 on the way: weights 127 on every channel but the first
    (weight 1), a bias that brings the sum back near 0, M = 1. On inputs 255 but for channel 0 the
    output is x[0] + 5 * o, exact only if no partial sum was rounded (float32 rounds above 2**24)."""
    weight = np.full((outputs, channels, 1, 1), 127, np.int8)
    weight[:, 0] = 1
    bias = -127 * 255 * (channels - 1) - 128 + 5 * np.arange(outputs, dtype=np.int64)
    return QuantizedLayer(weight=weight, weight_scale=F32(0.01), bias=bias, weight64=weight.astype(np.float64),
                          bias64=bias.astype(np.float64), multiplier=F32(1), output=QParams(F32(0.01), 128))


def test_a_layer_above_two_to_the_24_accumulates_in_float64_and_stays_exact():
    q = wide_layer()
    record = Conv("wide", in_channels=1024, out_channels=4)
    layer = QE.fast_layer(q, record)
    assert QK.accumulator_bound(q.weight, q.bias).max() > 2 ** 24 and layer.weight.dtype == np.float64
    values = np.full((2, 1024, 5, 6), 255, np.uint8)
    values[:, 0] = np.random.default_rng(3).integers(100, 140, (2, 5, 6))
    reference = quantized_conv(QK.QTensor(values, F32(0.02), 0), record, q)
    np.testing.assert_array_equal(reference.values, values[:, :1] + 5 * np.arange(4)[:, None, None])
    centred = np.ascontiguousarray(values.transpose(0, 2, 3, 1)).astype(F32)          # zero point 0
    fast = QE.conv(centred, layer)
    np.testing.assert_array_equal(fast + F32(128), reference.values.transpose(0, 2, 3, 1))
    in_float32 = QE.FastLayer("matmul", layer.weight.astype(F32), layer.bias.astype(F32), layer.requantize)
    assert not np.array_equal(QE.conv(centred, in_float32), fast), "float32 would have been exact here"


def test_network_with_a_layer_above_two_to_the_24_runs_it_in_float64_and_matches_the_readable_path(calibrated):
    """classifier.0's first row at the observed extreme (int8 +-127 on 960 inputs: 255 * 127 * 960 > 2**24)."""
    path, _ = calibrated
    state_dict = dict(npmnv3.load_state_dict(path))
    weight = state_dict["classifier.0.weight"].copy()
    weight[0] = np.sign(weight[0]) * np.abs(weight).max()
    model = npmnv3.quantized_mobilenet_v3_large()
    model.load_state_dict(dict(state_dict, **{"classifier.0.weight": weight}))
    network = model.engine()
    head = network.layers["classifier.0"]
    assert QK.accumulator_bound(head.weight, head.bias).max() > 2 ** 24
    assert network.fast.layers["classifier.0"].weight.dtype == np.float64
    x = inputs("97x131 batch 3")
    assert_same_integers(model(x, return_intermediates=True), model.forward_reference(x, return_intermediates=True))


def test_state_dict_layout_is_torchvisions_qat_model():
    qat = torchref.prepare_qat(torchref.random_quantizable_model(seed=2))
    expected = {k: tuple(v.shape) for k, v in qat.state_dict().items()}
    model = npmnv3.quantized_mobilenet_v3_large()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected


def test_weights_and_qparams_are_those_convert_makes(calibrated):
    path, torch_model = calibrated
    network = npmnv3.quantized_mobilenet_v3_large(weights=path).engine()
    stem = torch_model.features[0][0]
    layer = network.layers["features.0"]
    np.testing.assert_array_equal(layer.weight, stem.weight().int_repr().numpy())
    assert layer.weight_scale == F32(stem.weight().q_scale())
    assert layer.output == (F32(stem.scale), stem.zero_point)
    head = torch_model.classifier[3]
    np.testing.assert_array_equal(network.layers["classifier.3"].weight, head.weight().int_repr().numpy())
    assert network.input == (F32(torch_model.quant.scale.item()), int(torch_model.quant.zero_point.item()))


@pytest.mark.slow
def test_random_network_converts_as_torchvision_without_weights():
    """weights=None: untouched observers, as torchvision's builder without weights; torch converts the same
    state dict to the same integers."""
    model = npmnv3.quantized_mobilenet_v3_large(seed=4)
    qat = torchref.prepare_qat(torchref.random_quantizable_model(seed=4)).eval()
    dtypes = {k: v.dtype for k, v in qat.state_dict().items()}
    qat.load_state_dict({k: torch.from_numpy(np.asarray(v)).to(dtypes[k]) for k, v in model.state_dict().items()})
    torch_model = torchref.convert(qat)
    x = inputs("97x131 batch 3")
    ref_logits, ref_feats = torchref.quantized_features_and_logits(torch_model, x)
    logits, feats = model(x, return_intermediates=True)
    assert feats["features.16"].scale == F32(1.0) and feats["features.16"].zero_point == 0
    for name, (values, _, _) in ref_feats.items():
        np.testing.assert_array_equal(feats[name].values, values, err_msg=name)
    np.testing.assert_array_equal(logits, ref_logits)


def test_missing_unexpected_and_misshaped_keys_in_one_error(calibrated):
    path, _ = calibrated
    state_dict = dict(npmnv3.load_state_dict(path))
    del state_dict["features.3.block.1.0.bn.running_var"]
    del state_dict["quant.activation_post_process.activation_post_process.min_val"]
    state_dict["features.0.0.weight"] = state_dict["features.0.0.weight"][:8]
    state_dict["extra.scale"] = np.zeros(1, F32)
    model = npmnv3.quantized_mobilenet_v3_large()
    with pytest.raises(StateDictError) as info:
        model.load_state_dict(state_dict)
    message = str(info.value)
    assert ("missing keys (2): features.3.block.1.0.bn.running_var, "
            "quant.activation_post_process.activation_post_process.min_val") in message
    assert "unexpected keys (1): extra.scale" in message
    assert "mis-shaped keys (1): features.0.0.weight: expected (16, 3, 3, 3), got (8, 3, 3, 3)" in message


def test_float_weights_are_refused_with_a_pointer_to_the_float_network(tmp_path):
    float_model = torchref.random_model("mobilenet_v3_large", seed=3)
    torch.save(float_model.state_dict(), tmp_path / "float.pth")
    with pytest.raises(StateDictError, match=r"these weights are no QAT state dict \(no quant\.activation_post_"
                                             r"process\.\*\): a float model's weights go to "
                                             r"npmnv3\.mobilenet_v3_large"):
        npmnv3.quantized_mobilenet_v3_large(weights=tmp_path / "float.pth")


def test_files_without_the_hard_sigmoid_fixed_qparams_load_and_agree(calibrated):
    """torchvision's SE had no fake-quant on its hard-sigmoid before its version 2; its quantization is fixed
    (1/256), so files without those keys load and give the same result."""
    path, _ = calibrated
    full = npmnv3.load_state_dict(path)
    older = {k: v for k, v in full.items() if ".scale_activation." not in k}
    assert len(older) < len(full)
    a, b = npmnv3.quantized_mobilenet_v3_large(), npmnv3.quantized_mobilenet_v3_large()
    a.load_state_dict(full)
    b.load_state_dict(older)
    x = inputs("97x131 batch 3")
    np.testing.assert_array_equal(a(x), b(x))


def test_accumulator_that_could_overflow_int32_is_refused(calibrated):
    path, _ = calibrated
    state_dict = dict(npmnv3.load_state_dict(path))
    network = npmnv3.quantized_mobilenet_v3_large(weights=path).engine()
    unit = F32(network.layers["classifier.0"].result.scale * network.layers["classifier.3"].weight_scale)
    model = npmnv3.quantized_mobilenet_v3_large()
    for bias_q, message in [(QK.INT32_MAX - 1000, r"classifier\.3: an int32 accumulator could reach \d+ \(> 2\*\*31 - 1\)"),
                            (3 * QK.INT32_MAX, r"bias: \d+ does not fit in int32")]:
        bias = state_dict["classifier.3.bias"].copy()
        bias[0] = F32(bias_q) * unit       # in the accumulator's units: bias_q, give or take rounding
        model.load_state_dict(dict(state_dict, **{"classifier.3.bias": bias}))
        with pytest.raises(ValueError, match=message):
            model(inputs("97x131 batch 3"))


def test_intermediates_are_quantized_tensors_and_threads_do_not_change_results(calibrated):
    path, _ = calibrated
    x = inputs("97x131 batch 3")
    one = npmnv3.quantized_mobilenet_v3_large(weights=path, threads=1)
    two = npmnv3.quantized_mobilenet_v3_large(weights=path, threads=2)
    logits, feats = one(np.concatenate([x, x]), return_intermediates=True)      # 6 images: two chunks
    assert isinstance(feats["features.4"], QK.QTensor) and feats["features.4"].values.shape == (6, 40, 13, 17)
    np.testing.assert_array_equal(two(np.concatenate([x, x])), logits)
    np.testing.assert_array_equal(logits[:3], logits[3:])
    np.testing.assert_array_equal(feats["features.16"].dequantize(),
                                  (feats["features.16"].values.astype(F32) - feats["features.16"].zero_point)
                                  * feats["features.16"].scale)


@pytest.mark.slow
def test_npz_round_trip_and_new_parameters_give_a_new_network(calibrated, tmp_path):
    path, _ = calibrated
    model = npmnv3.quantized_mobilenet_v3_large(weights=path)
    model.save(tmp_path / "q.npz")
    again = npmnv3.quantized_mobilenet_v3_large(weights=tmp_path / "q.npz")
    x = inputs("97x131 batch 3")
    np.testing.assert_array_equal(again(x), model(x))
    before = model(x)
    bias = np.asarray(model.params["classifier.3.bias"]) + 1.0
    model.load_state_dict({"classifier.3.bias": bias}, strict=False)
    assert not np.array_equal(model(x), before)


def test_bad_input_is_refused_like_the_float_network():
    model = npmnv3.quantized_mobilenet_v3_large()
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 3, H, W\), got \(3, 32, 32\) \(for one image use x\[None\]\)"):
        model(np.zeros((3, 32, 32), F32))
    with pytest.raises(ValueError, match="x: expected a float array"):
        model(np.zeros((1, 3, 32, 32), np.uint8))
