"""LR-ASPP and DeepLabV3 on MobileNetV3-Large against torchvision's, both paths; segment(); the CLI."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import npmnv3
from conftest import record, rel_err
from npmnv3 import StateDictError
from npmnv3 import weights as W

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import torchref  # noqa: E402  (needs torch)

TOL = {np.float32: 1e-4, np.float64: 1e-10}
MODELS = [("lraspp_mobilenet_v3_large", {}), ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
          ("deeplabv3_mobilenet_v3_large", {"aux_loss": False})]
IDS = ["lraspp", "deeplabv3+aux", "deeplabv3"]


@functools.lru_cache(maxsize=None)
def torch_model(arch, aux=None, dtype=np.float32):
    """torchvision's model with random calibrated weights, in float32 or (a copy) in float64; kept for
    the whole session (torch's first float64 calls at a new size take seconds)."""
    if dtype == np.float64:
        import copy
        return copy.deepcopy(torch_model(arch, aux)).double()
    return torchref.random_segmentation_model(arch, seed=1, **({} if aux is None else {"aux_loss": aux}))


def pair(arch, options, dtype):
    tm = torch_model(arch, options.get("aux_loss"))
    model = getattr(npmnv3, arch)(dtype=dtype, **options)
    model.load_state_dict(torchref.numpy_state_dict(tm))
    return tm, model


def torch_outputs(tm, x):
    """torchvision's outputs and the two backbone outputs its heads read, as NumPy."""
    with torch.no_grad():
        t = torch.from_numpy(x)
        features = tm.backbone(t)
        return {k: v.numpy() for k, v in tm(t).items()}, {k: v.numpy() for k, v in features.items()}


def check(arch, options, dtype, shape, reference=True):
    tm, model = pair(arch, options, dtype)
    x = torchref.smooth_images(shape[0], shape[2], shape[3], seed=shape[2]).numpy().astype(dtype)
    ref, ref_features = torch_outputs(torch_model(arch, options.get("aux_loss"), dtype), x)
    paths = [("fast", model(x, return_intermediates=True))]
    if reference:
        paths.append(("reference", model.forward_reference(x, return_intermediates=True)))
    label = f"{arch.split('_')[0]} {np.dtype(dtype).name}"
    for path, (out, features) in paths:
        assert sorted(out) == sorted(ref)
        for key in ref:
            assert out[key].dtype == dtype and out[key].shape == ref[key].shape == (shape[0], 21, *shape[2:])
            assert record(f"{label} {path} {key}", rel_err(out[key], ref[key])) <= TOL[dtype], (path, key)
        low, high = model.taps           # torchvision's IntermediateLayerGetter calls them low/high or aux/out
        tv_low, tv_high = (ref_features["low"], ref_features["high"]) if "low" in ref_features else \
            (ref_features.get("aux"), ref_features["out"])
        assert rel_err(features[high], tv_high) <= TOL[dtype]
        if tv_low is not None:
            assert rel_err(features[low], tv_low) <= TOL[dtype]
    # the masks hold many classes: the outputs depend on the image
    assert len(np.unique(ref["out"].argmax(1))) >= 4


@pytest.mark.parametrize("arch,options", MODELS, ids=IDS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("float32", "float64"))
@pytest.mark.parametrize("shape", [pytest.param((1, 3, 224, 224), marks=pytest.mark.slow), (2, 3, 97, 131)],
                         ids=("224", "2x97x131"))
def test_agrees_with_torchvision(arch, options, dtype, shape):
    check(arch, options, dtype, shape)


@pytest.mark.slow
def test_fast_float32_backbone_is_as_accurate_as_torchvisions_on_noise():
    # On white noise at 520x520 the random dilated backbone amplifies rounding errors ~1000-fold, and
    # errors that are the same at every position (in a squeeze-excite mean, a folded weight) grow the
    # most. One input's error is a lottery: it moves tenfold with the order of a single sum, in either
    # library and from one machine to another. So against float64, the median over eight inputs of
    # npmnv3's fast float32 error must stay within 2x of torchvision's float32 median.
    tm = torchref.random_segmentation_model("deeplabv3_mobilenet_v3_large", seed=0, aux_loss=False)
    state_dict = torchref.numpy_state_dict(tm)
    fast = npmnv3.deeplabv3_mobilenet_v3_large()
    exact = npmnv3.deeplabv3_mobilenet_v3_large(dtype="float64")
    fast.load_state_dict(state_dict)
    exact.load_state_dict(state_dict)
    ours, theirs = [], []
    for seed in range(8):
        x = np.random.default_rng(seed).standard_normal((1, 3, 520, 520)).astype(np.float32)
        truth = exact(x.astype(np.float64), return_intermediates=True)[1]["backbone.16"]
        ours.append(rel_err(fast(x, return_intermediates=True)[1]["backbone.16"], truth))
        with torch.no_grad():
            theirs.append(rel_err(tm.backbone(torch.from_numpy(x))["out"].numpy(), truth))
    assert np.median(theirs) > 5e-6, "the input no longer amplifies errors: the test would prove nothing"
    assert np.median(ours) <= 2 * np.median(theirs), (ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("arch,options,dtype", [(*MODELS[0], np.float32), (*MODELS[0], np.float64),
                                                (*MODELS[1], np.float32)],
                         ids=["lraspp-float32", "lraspp-float64", "deeplabv3+aux-float32"])
def test_agrees_with_torchvision_at_the_recipe_size(arch, options, dtype):
    """At 520 x 391 (what the recipe feeds a 4:3 photograph); DeepLabV3 in float64 there takes torch ~20 s."""
    check(arch, options, dtype, (1, 3, 520, 391), reference=dtype == np.float32)


@pytest.mark.parametrize("arch,options", MODELS, ids=IDS)
def test_state_dict_names_and_shapes_match_torchvision(arch, options):
    from torchvision.models import segmentation
    reference = getattr(segmentation, arch)(weights=None, weights_backbone=None, **options).state_dict()
    ours = getattr(npmnv3, arch)(**options).state_dict()
    assert list(ours) == list(reference)
    assert all(ours[k].shape == tuple(v.shape) for k, v in reference.items())


def test_strict_loading_reports_every_problem_once():
    model = npmnv3.lraspp_mobilenet_v3_large()
    with pytest.raises(StateDictError) as info:
        model.load_state_dict(npmnv3.deeplabv3_mobilenet_v3_large().state_dict())
    message = str(info.value)
    assert message.startswith("state_dict does not fit LRASPP('lraspp_mobilenet_v3_large', num_classes=21")
    assert "missing keys (10): classifier.cbr.0.weight" in message and "unexpected keys (" in message
    sd = model.state_dict()
    sd["classifier.low_classifier.weight"] = np.zeros((21, 40, 3, 3), np.float32)
    with pytest.raises(StateDictError, match=r"classifier.low_classifier.weight: expected \(21, 40, 1, 1\), "
                                             r"got \(21, 40, 3, 3\)"):
        model.load_state_dict(sd)


def test_builders_take_the_classes_and_the_aux_head_from_the_weights(tmp_path):
    model = npmnv3.deeplabv3_mobilenet_v3_large(num_classes=5, aux_loss=True, seed=3)
    model.save(tmp_path / "d.npz")
    again = npmnv3.deeplabv3_mobilenet_v3_large(weights=tmp_path / "d.npz")
    assert again.num_classes == 5 and "aux" in again.heads
    assert npmnv3.deeplabv3_mobilenet_v3_large().heads.keys() == {"out"}
    lr = npmnv3.lraspp_mobilenet_v3_large(num_classes=3, dtype="float64")
    lr.save(tmp_path / "l.npz")
    again = npmnv3.lraspp_mobilenet_v3_large(weights=tmp_path / "l.npz")
    assert again.num_classes == 3 and again.dtype == np.float64


def test_inputs_smaller_than_32_are_refused():
    model = npmnv3.lraspp_mobilenet_v3_large()
    with pytest.raises(ValueError, match=r"x: expected H and W of at least 32, got shape \(1, 3, 31, 40\)"):
        model(np.zeros((1, 3, 31, 40), np.float32))


def test_summary_totals_are_torchvisions():
    lr = npmnv3.summary(npmnv3.lraspp_mobilenet_v3_large(), 520, print_table=False)
    dl = npmnv3.summary(npmnv3.deeplabv3_mobilenet_v3_large(aux_loss=True), 520, print_table=False)
    assert lr["total_params"] == 3_221_538 and dl["total_params"] == 11_029_328
    # torchvision's published "GFLOPS" (multiply-accumulates) at 520 x 520: 2.086 and 10.452
    assert round(lr["total_macs"] / 1e9, 3) == 2.086 and round(dl["total_macs"] / 1e9, 3) == 10.452
    names = [r["name"] for r in lr["rows"]]
    assert names[:2] == ["backbone.0", "backbone.1"] and names[-1] == "classifier.high_classifier"


# --------------------------------------------------------------------------- segment()

def photo(seed, size):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


@pytest.fixture
def official_lraspp():
    """Random LR-ASPP weights with the official weights' recipe and names."""
    tm = torch_model("lraspp_mobilenet_v3_large")
    model = npmnv3.lraspp_mobilenet_v3_large()
    model.load_state_dict(torchref.numpy_state_dict(tm))
    model.meta = W.OFFICIAL[("lraspp_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1")].meta()
    return tm, model


@pytest.mark.slow
def test_preprocessing_without_a_crop_is_torchvisions():
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights
    transform = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.transforms()
    for size in [(333, 250), (250, 333), (520, 520), (61, 47), (1000, 31)]:
        image = photo(sum(size), size)
        ours = npmnv3.preprocess(image, resize_size=520, crop_size=None)
        assert np.array_equal(ours, transform(image).numpy()), size


@pytest.mark.slow
def test_segment_equals_torchvisions_pipeline(official_lraspp):
    tm, model = official_lraspp
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights
    transform = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.transforms()
    images = [photo(1, (333, 250)), photo(2, (120, 160))]
    results = npmnv3.segment(images, model=model)
    for image, result in zip(images, results):
        with torch.no_grad():
            out = tm(transform(image)[None])["out"]
        scores = torch.nn.functional.interpolate(out, size=image.size[::-1], mode="bilinear", align_corners=False)
        expected = scores.argmax(1)[0].numpy()
        # identical, except where torchvision's two best scores tie within float32 rounding
        top2 = np.sort(scores[0].numpy(), axis=0)[-2:]
        ties = (top2[1] - top2[0]) <= 1e-4 * max(1.0, float(np.abs(top2).max()))
        assert result["mask"].shape == expected.shape and result["mask"].dtype.kind == "i"
        assert np.array_equal(result["mask"][~ties], expected[~ties]) and ties.mean() < 1e-2
        counts = np.bincount(expected.ravel(), minlength=21)
        names = W.OFFICIAL[("lraspp_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1")].meta()["categories"]
        assert result["labels"][0] == names[counts.argmax()] and len(result["labels"]) == (counts > 0).sum()
        assert sum(result["fractions"].values()) == pytest.approx(1.0)
    single = npmnv3.segment(images[0], model=model)
    assert np.array_equal(single["mask"], results[0]["mask"])


def test_segment_names_bad_images(official_lraspp, tmp_path):
    _, model = official_lraspp
    with pytest.raises(npmnv3.ImageError, match=r"^image 1 \(file '.*missing.png'\): no such file"):
        npmnv3.segment([photo(1, (64, 64)), str(tmp_path / "missing.png")], model=model)


@pytest.mark.slow
def test_cli_segment_writes_masks_and_overlays(official_lraspp, tmp_path):
    _, model = official_lraspp
    model.save(tmp_path / "lraspp.npz")
    photo(1, (120, 90)).save(tmp_path / "street.png")
    run = subprocess.run([sys.executable, "-m", "npmnv3", "segment", str(tmp_path / "street.png"), "--weights",
                          str(tmp_path / "lraspp.npz"), "--out", str(tmp_path / "out"), "--json"],
                         capture_output=True, text=True, env=dict(os.environ, NPMNV3_OFFLINE="1"))
    assert run.returncode == 0, run.stderr
    entry, = json.loads(run.stdout)
    expected = npmnv3.segment(str(tmp_path / "street.png"), model=model)
    assert entry["labels"] == expected["labels"]
    mask = Image.open(entry["mask"])
    assert mask.mode == "P" and np.array_equal(np.asarray(mask), expected["mask"])
    assert Image.open(entry["overlay"]).size == (120, 90)
    run = subprocess.run([sys.executable, "-m", "npmnv3", "segment", str(tmp_path / "street.png"), "--weights",
                          str(tmp_path / "lraspp.npz")], capture_output=True, text=True)
    lines = run.stdout.splitlines()
    assert lines[0] == str(tmp_path / "street.png") and lines[1].split()[0] == expected["labels"][0]
    assert lines[1].endswith(f"{100 * expected['fractions'][expected['labels'][0]]:.2f}%")
