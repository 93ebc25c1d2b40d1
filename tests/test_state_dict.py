"""load_state_dict: one error listing every problem; num_batches_tracked optional; dtype casts."""

import numpy as np
import pytest

import npmnv3
from npmnv3 import StateDictError


def test_round_trip_and_cast():
    a = npmnv3.mobilenet_v3_small(seed=1)
    b = npmnv3.mobilenet_v3_small(seed=2, dtype="float64")
    b.load_state_dict(a.state_dict())
    assert all(v.dtype == np.float64 for v in b.params.values())
    for k, v in a.params.items():
        np.testing.assert_array_equal(b.params[k], v.astype(np.float64))
    x = np.random.default_rng(0).standard_normal((1, 3, 40, 40))
    np.testing.assert_allclose(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_state_dict_is_a_copy():
    model = npmnv3.mobilenet_v3_small()
    sd = model.state_dict()
    sd["classifier.3.bias"][:] = 7
    assert not np.any(model.params["classifier.3.bias"] == 7)


def test_num_batches_tracked_is_optional_and_ignored():
    source = npmnv3.mobilenet_v3_small(seed=1)
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = npmnv3.mobilenet_v3_small(seed=2)
    model.load_state_dict(sd)                       # strict, and no counters: loads
    sd["features.0.1.num_batches_tracked"] = np.array(12345, np.int64)
    model.load_state_dict(sd)                       # a counter of any value: loads, and is not kept
    for key, value in source.params.items():
        np.testing.assert_array_equal(model.params[key], value)
    assert "features.0.1.num_batches_tracked" not in model.params
    assert model.state_dict()["features.0.1.num_batches_tracked"] == 0


def test_one_error_lists_every_problem():
    model = npmnv3.mobilenet_v3_small()
    sd = model.state_dict()
    del sd["features.1.block.0.0.weight"], sd["classifier.3.bias"]
    sd["features.1.block.9.weight"] = np.zeros(3, np.float32)
    sd["extra"] = np.zeros(1, np.float32)
    sd["classifier.3.weight"] = np.zeros((10, 1024), np.float32)
    sd["features.0.0.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    with pytest.raises(StateDictError) as info:
        model.load_state_dict(sd)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith("state_dict does not fit MobileNetV3('mobilenet_v3_small'")
    assert "missing keys (2): features.1.block.0.0.weight, classifier.3.bias" in message
    assert "unexpected keys (2): features.1.block.9.weight, extra" in message
    assert ("mis-shaped keys (2): features.0.0.weight: expected (16, 3, 3, 3), got (16, 3, 5, 5); "
            "classifier.3.weight: expected (1000, 1024), got (10, 1024)") in message
    # nothing was loaded
    np.testing.assert_array_equal(model.params["features.0.0.weight"],
                                  npmnv3.mobilenet_v3_small().params["features.0.0.weight"])


def test_non_strict_allows_missing_and_unexpected_but_not_wrong_shapes():
    model = npmnv3.mobilenet_v3_small()
    model.load_state_dict({"classifier.3.bias": np.ones(1000), "other": np.zeros(1)}, strict=False)
    np.testing.assert_array_equal(model.params["classifier.3.bias"], np.ones(1000, np.float32))
    with pytest.raises(StateDictError, match=r"classifier.3.bias: expected \(1000,\), got \(10,\)"):
        model.load_state_dict({"classifier.3.bias": np.ones(10)}, strict=False)


def test_large_state_dict_does_not_fit_small():
    with pytest.raises(StateDictError, match=r"missing keys \(\d+\).*\n  unexpected keys"):
        npmnv3.mobilenet_v3_small().load_state_dict(npmnv3.mobilenet_v3_large().state_dict())


def test_non_numeric_values_are_refused():
    model = npmnv3.mobilenet_v3_small()
    sd = model.state_dict()
    sd["classifier.3.bias"] = np.array(["x"] * 1000)
    with pytest.raises(StateDictError, match=r"classifier.3.bias: expected a numeric array, got dtype <U1"):
        model.load_state_dict(sd)


def test_a_seed_gives_the_same_random_weights_whatever_was_loaded_first():
    reference = npmnv3.mobilenet_v3_small(seed=3)
    model = npmnv3.mobilenet_v3_small(seed=3)
    loaded = np.full((1000,), 0.5, np.float32)
    model.load_state_dict({"classifier.3.bias": loaded}, strict=False)   # before any key was read
    np.testing.assert_array_equal(model.params["classifier.3.bias"], loaded)
    for key, value in reference.params.items():
        if key != "classifier.3.bias":
            np.testing.assert_array_equal(model.params[key], value)
    assert list(model.params) == list(reference.params) and len(model.params) == len(reference.params)
    assert "features.0.0.weight" in model.params and "features.0.1.num_batches_tracked" not in model.params


def test_building_from_a_weights_file_draws_no_random_weights(tmp_path, monkeypatch):
    source = npmnv3.mobilenet_v3_small(seed=4)
    source.save(tmp_path / "small.npz")
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 40)).astype(np.float32)

    def no_drawing(*args, **kwargs):
        raise AssertionError("a random initialisation was drawn")
    monkeypatch.setattr("npmnv3.parameters.random_value", no_drawing)
    model = npmnv3.mobilenet_v3_small(weights=str(tmp_path / "small.npz"))
    np.testing.assert_array_equal(model(x), source(x))
    random = npmnv3.mobilenet_v3_small()
    with pytest.raises(KeyError):
        random.params["features.0.1.num_batches_tracked"]     # not a stored key: nothing drawn for it
    with pytest.raises(AssertionError, match="random initialisation was drawn"):
        random.params["features.0.0.weight"]
