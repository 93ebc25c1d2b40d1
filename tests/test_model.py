"""npmnv3's MobileNetV3 against torchvision's, logits and every features.i output."""

import numpy as np
import pytest

import npmnv3
from conftest import ARCHS, npmnv3_model, random_torch_model, record, rel_err, torch_forward

OPTIONS = [
    {},
    {"width_mult": 0.75},
    {"reduced_tail": True},
    {"dilated": True},
    {"reduced_tail": True, "dilated": True, "num_classes": 10},   # Small: the tail's first block has in == out
    {"width_mult": 1.25, "num_classes": 7},
]
TOL = {np.float32: 1e-4, np.float64: 1e-10}


def check_agreement(model, torch_model, x, dtype, label):
    """Both paths, model(x) (fast) and model.forward_reference(x) (readable), against torchvision."""
    ref_logits, ref_feats = torch_forward(torch_model, x, dtype)
    check_path(model(x, return_intermediates=True), ref_logits, ref_feats, dtype, label)
    ref_path = model.forward_reference(x, return_intermediates=True)
    check_path(ref_path, ref_logits, ref_feats, dtype, label + " reference-path")
    return ref_path[0], ref_logits


def check_path(result, ref_logits, ref_feats, dtype, label):
    logits, feats = result
    assert logits.dtype == dtype and logits.shape == ref_logits.shape
    assert list(feats) == list(ref_feats)
    for key, ref in ref_feats.items():
        assert feats[key].dtype == dtype and feats[key].shape == ref.shape, key
        assert record(f"{label} features", rel_err(feats[key], ref)) <= TOL[dtype], key
    assert record(f"{label} logits", rel_err(logits, ref_logits)) <= TOL[dtype]
    assert np.abs(ref_logits).max() > 0.5, "logits too small for the test to mean anything"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("float32", "float64"))
def test_agrees_with_torchvision_at_224(arch, dtype):
    torch_model = random_torch_model(arch, seed=1)
    model = npmnv3_model(arch, torch_model, dtype)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(dtype)
    logits, ref = check_agreement(model, torch_model, x, dtype, np.dtype(dtype).name)
    # top-5 classes in the same order
    np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :5], np.argsort(-ref, axis=1)[:, :5])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("float32", "float64"))
def test_agrees_with_torchvision_options_and_odd_sizes(arch, options, dtype):
    torch_model = random_torch_model(arch, seed=2, **options)
    model = npmnv3_model(arch, torch_model, dtype, **options)
    rng = np.random.default_rng(3)
    for shape in [(1, 3, 97, 131), (3, 3, 33, 45)]:
        x = rng.standard_normal(shape).astype(dtype)
        check_agreement(model, torch_model, x, dtype, np.dtype(dtype).name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_state_dict_names_and_shapes_match_torchvision(arch, options):
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, arch)(**options).state_dict()
    ours = getattr(npmnv3, arch)(**options).state_dict()
    assert list(ours) == list(reference)
    for key, value in reference.items():
        assert ours[key].shape == tuple(value.shape), key
        if key.endswith("num_batches_tracked"):
            assert ours[key].dtype == np.int64 and ours[key].ndim == 0
        else:
            assert ours[key].dtype == np.float32


def test_tensor_counts():
    assert len(npmnv3.mobilenet_v3_large().state_dict()) == 312
    assert len(npmnv3.mobilenet_v3_small().state_dict()) == 244


def test_input_is_cast_and_float64_is_a_reference_mode():
    torch_model = random_torch_model("mobilenet_v3_small", seed=4)
    m32 = npmnv3_model("mobilenet_v3_small", torch_model, np.float32)
    m64 = npmnv3_model("mobilenet_v3_small", torch_model, np.float64)
    assert all(v.dtype == np.float64 for v in m64.params.values())
    x = np.random.default_rng(5).standard_normal((1, 3, 64, 64))
    assert m32(x).dtype == np.float32 and m32(x.astype(np.float32)).dtype == np.float32
    assert m64(x.astype(np.float32)).dtype == np.float64
    assert rel_err(m32(x), m64(x)) < 1e-4


def test_bad_inputs():
    model = npmnv3.mobilenet_v3_small()
    with pytest.raises(TypeError, match=r"x: expected a numpy array of shape \(N, 3, H, W\), got list"):
        model([[1.0]])
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 3, H, W\), got \(3, 64, 64\) \(for one image use x\[None\]\)"):
        model(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 3, H, W\), got \(1, 64, 64, 3\)"):
        model(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"x: expected a non-empty batch, got shape \(0, 3, 64, 64\)"):
        model(np.zeros((0, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"x: expected a float array \(use npmnv3.preprocess for images\), got dtype uint8"):
        model(np.zeros((1, 3, 64, 64), np.uint8))


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="dtype: expected float32 or float64, got float16"):
        npmnv3.mobilenet_v3_large(dtype="float16")
    with pytest.raises(ValueError, match="num_classes: expected a positive integer, got 0"):
        npmnv3.mobilenet_v3_small(num_classes=0)
    with pytest.raises(ValueError, match="width_mult: expected a positive number, got -1"):
        npmnv3.mobilenet_v3_small(width_mult=-1)
