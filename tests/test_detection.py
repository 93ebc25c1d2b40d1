"""SSDLite320 on MobileNetV3-Large against torchvision's, both paths: the raw network, the detections end to
end, the postprocess alone, detect(), the CLI."""

import copy
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
from npmnv3 import detection as D
from npmnv3 import weights as W
from npmnv3.config import Block, Conv

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import torchref  # noqa: E402  (needs torch)

ARCH = "ssdlite320_mobilenet_v3_large"
TOL = {np.float32: 1e-4, np.float64: 1e-10}
SIZES = [(320, 320), (360, 480), (333, 200)]      # (H, W): square, landscape 4:3, portrait 3:5
DTYPES = pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("float32", "float64"))


@functools.lru_cache(maxsize=None)
def torch_model(dtype=np.float32):
    """torchvision's detector with random calibrated weights (``torchref.random_detection_model``), in float32
    or (a copy) in float64; made once for the whole session."""
    if dtype == np.float64:
        return copy.deepcopy(torch_model()).double()
    return torchref.random_detection_model(seed=1)


@functools.lru_cache(maxsize=None)
def model(dtype=np.float32):
    """npmnv3's detector holding ``torch_model``'s weights (shared: tests do not change it)."""
    net = npmnv3.ssdlite320_mobilenet_v3_large(dtype=dtype)
    net.load_state_dict(torchref.numpy_state_dict(torch_model()))
    return net


def test_images(sizes, seed=0):
    """Textured random images in [0, 1] (torch tensors), one per (H, W)."""
    return [torchref.textured_images(1, h, w, seed=seed + h + w)[0] for h, w in sizes]


test_images.__test__ = False


def torch_detections(images, dtype=np.float32):
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    with torch.no_grad():
        out = torch_model(dtype)([image.to(tdtype) for image in images])
    return [{k: v.numpy() for k, v in d.items()} for d in out]


def match(ours, ref, box_tol, score_tol):
    """Check that two images' detections are the same in rank order: as many, and at each rank the same
    label, the box within ``box_tol`` px and the score within ``score_tol`` -- where detections whose
    scores are within ``score_tol`` of each other may come in either order. Returns the largest
    (box, score) differences."""
    n = len(ref["scores"])
    assert len(ours["scores"]) == n, (len(ours["scores"]), n)
    assert ours["labels"].dtype == np.int64 and ours["boxes"].shape == (n, 4)
    used = np.zeros(n, bool)
    worst_box = worst_score = 0.0
    for k in range(n):
        score, box, label = ours["scores"][k], ours["boxes"][k], ours["labels"][k]
        near = np.flatnonzero(~used & (np.abs(ref["scores"] - score) <= score_tol))
        fits = [j for j in near if ref["labels"][j] == label and np.abs(ref["boxes"][j] - box).max() <= box_tol]
        assert fits, f"rank {k}: {label} {score} {box} has no counterpart in {ref['labels'][near]}"
        j = min(fits, key=lambda j: abs(j - k))
        assert j == k or abs(ref["scores"][k] - score) <= score_tol       # out of rank only in a near tie
        used[j] = True
        worst_box = max(worst_box, float(np.abs(ref["boxes"][j] - box).max()))
        worst_score = max(worst_score, float(abs(ref["scores"][j] - score)))
    return worst_box, worst_score


# --------------------------------------------------------------------------- the network

def test_state_dict_names_and_shapes_match_torchvision():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    for num_classes in (91, 5):
        reference = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
        ours = npmnv3.ssdlite320_mobilenet_v3_large(num_classes=num_classes).state_dict()
        assert list(ours) == list(reference.state_dict())
        assert all(ours[k].shape == tuple(v.shape) for k, v in reference.state_dict().items())
    assert {m.eps for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.001}


@pytest.mark.slow
def test_the_first_map_is_the_c4_blocks_expansion_inside_one_block():
    net = model()
    c4 = net.backbone[net.c4]
    assert isinstance(c4, Block) and c4.name == "backbone.features.1.0"
    assert [layer.name for layer in c4.layers] == ["backbone.features.0.13", "backbone.features.1.0.1",
                                                   "backbone.features.1.0.2", "backbone.features.1.0.3"]
    assert net.taps == ["backbone.features.0.13", "backbone.features.1.3"] + [f"backbone.extra.{k}" for k in range(4)]
    layers = [sub for b in net.backbone + net.extras for sub in (b.layers if isinstance(b, Block) else [b])]
    convs = [c for c in layers if isinstance(c, Conv)] + [b.depthwise for head in net.heads.values() for b in head]
    assert {c.eps for c in convs} == {0.001}                      # every BatchNorm's, as torchvision's builder


def test_strict_loading_reports_every_problem_once():
    net = npmnv3.ssdlite320_mobilenet_v3_large()
    with pytest.raises(StateDictError) as info:
        net.load_state_dict(npmnv3.mobilenet_v3_large().state_dict())
    message = str(info.value)
    assert message.startswith("state_dict does not fit SSDLite('ssdlite320_mobilenet_v3_large', num_classes=91")
    assert "missing keys (" in message and "backbone.features.0.13.0.weight" in message
    assert "unexpected keys (312): features.0.0.weight" in message
    sd = net.state_dict()
    sd["head.regression_head.module_list.5.1.weight"] = np.zeros((24, 128, 3, 3), np.float32)
    with pytest.raises(StateDictError, match=r"head.regression_head.module_list.5.1.weight: expected "
                                             r"\(24, 128, 1, 1\), got \(24, 128, 3, 3\)"):
        net.load_state_dict(sd)


@DTYPES
@pytest.mark.parametrize("shape", [pytest.param((2, 3, 320, 320), marks=pytest.mark.slow), (1, 3, 256, 192)],
                         ids=("2x320", "256x192"))
def test_forward_raw_agrees_with_torchvision(dtype, shape):
    tm, net = torch_model(dtype), model(dtype)
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    images = list(torchref.textured_images(shape[0], *shape[2:], seed=shape[2]).to(tdtype))
    x = tm.transform(images)[0].tensors if shape[2:] == (320, 320) else (torch.stack(images) - 0.5) / 0.5
    with torch.no_grad():
        maps = list(tm.backbone(x).values())
        ref = tm.head(maps)
    x = x.numpy().astype(dtype)
    label = np.dtype(dtype).name
    for path, (raw, ours) in (("fast", net.forward_raw(x, return_intermediates=True)),
                              ("reference", net.forward_raw_reference(x, return_intermediates=True))):
        assert sorted(raw) == ["bbox_regression", "cls_logits"] and list(ours) == net.taps
        boxes = 6 * sum(m.shape[2] * m.shape[3] for m in maps)
        for key, columns in (("cls_logits", 91), ("bbox_regression", 4)):
            assert raw[key].dtype == dtype and raw[key].shape == ref[key].shape == (shape[0], boxes, columns)
            assert record(f"detector raw {label} {path} {key}", rel_err(raw[key], ref[key].numpy())) <= TOL[dtype]
        for (name, got), expected in zip(ours.items(), maps):
            assert got.shape == tuple(expected.shape) and rel_err(got, expected.numpy()) <= TOL[dtype], name
    if shape[2:] == (320, 320):
        assert boxes == 3234
    # the outputs depend on the image: a box's best class (not the background) differs between images and boxes
    best = ref["cls_logits"][..., 1:].argmax(-1).numpy()
    assert len(np.unique(best)) >= 20 and (shape[0] == 1 or (best[0] != best[1]).mean() > 0.5)


# --------------------------------------------------------------------------- end to end

def own_differences(images):
    """torchvision's own float32-vs-float64 differences on ``images``: the largest (box px, score)."""
    pairs = [match(r, r64, 1.0, 1e-3) for r, r64 in zip(torch_detections(images), torch_detections(images, np.float64))]
    return tuple(max(values) for values in zip(*pairs))


@functools.lru_cache(maxsize=None)
def own_differences_at_three_sizes():
    return own_differences(test_images(SIZES, seed=0))


def check_detections(images, paths=("fast",), dtype=np.float32):
    """npmnv3's detections equal torchvision's for one list of images (torch tensors; see ``match``).

    float32: the boxes within 1e-3 px and the scores within 1e-5, or within 3x torchvision's own
    float32-vs-float64 difference where that is larger -- the largest on these images and on three
    others of the three sizes (which image shows the largest rounding is chance: on one image npmnv3's,
    on another torchvision's float32 boxes lie further from float64's). float64: 1e-8 px and 1e-10.
    """
    ref = torch_detections(images, dtype)
    if dtype == np.float32:
        box, score = (max(a, b) for a, b in zip(own_differences(images), own_differences_at_three_sizes()))
        box_tol, score_tol = max(1e-3, 3 * box), max(1e-5, 3 * score)
    else:
        box_tol, score_tol = 1e-8, 1e-10
    arrays = [image.numpy().astype(dtype) for image in images]
    for path in paths:
        found = (model(dtype) if path == "fast" else model(dtype).forward_reference)(arrays)
        assert len(found) == len(images)
        for image, ours, theirs in zip(images, found, ref):
            assert ours["boxes"].dtype == ours["scores"].dtype == dtype
            box_err, score_err = match(ours, theirs, box_tol, score_tol)
            record(f"detector {np.dtype(dtype).name} {path} box px", box_err)
            record(f"detector {np.dtype(dtype).name} {path} score", score_err)
            (h, w), boxes = image.shape[1:], ours["boxes"]
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert 50 <= len(ours["scores"]) <= 300 and len(np.unique(ours["labels"])) >= 10


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_detections_of_one_image_equal_torchvisions(size):
    check_detections(test_images([size], seed=1))


@pytest.mark.slow
def test_detections_of_three_images_equal_torchvisions_on_both_paths():
    check_detections(test_images(SIZES, seed=2), paths=("fast", "reference"))


def test_detections_in_float64_equal_torchvisions():
    check_detections(test_images(SIZES, seed=3), dtype=np.float64)


def heads_and_anchors(seed, logit_std, boxes=3234, classes=91):
    """Random head outputs (cls_logits (boxes, classes) of std ``logit_std``, box offsets) and the model's anchors."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((boxes, classes)) * logit_std).astype(np.float32)
    codes = rng.standard_normal((boxes, 4)).astype(np.float32)
    return logits, codes, model().anchors


@pytest.mark.parametrize("logit_std,background", [(1.0, 0.0), (4.0, 24.0)], ids=("27000-candidates", "402"))
def test_postprocess_alone_equals_torchvisions(logit_std, background):
    """The same head outputs through torchvision's ``postprocess_detections`` and ``transform.postprocess``:
    with flat scores every class has its 300 candidates (torchvision's NMS then goes class by class),
    with a large background logit a few hundred candidates in all (NMS over boxes moved apart by class)."""
    logits, codes, anchors = heads_and_anchors(7, logit_std)
    logits[:, 0] += background
    tm = torch_model()
    with torch.no_grad():
        ref = tm.postprocess_detections({"cls_logits": torch.from_numpy(logits)[None],
                                         "bbox_regression": torch.from_numpy(codes)[None]},
                                        [torch.from_numpy(anchors)], [(320, 320)])
        ref = tm.transform.postprocess(ref, [(320, 320)], [(333, 200)])[0]
    ref = {k: v.numpy() for k, v in ref.items()}
    scores = D.softmax(logits.copy())
    count = sum(min(300, int((scores[:, c] > 0.001).sum())) for c in range(1, 91))
    assert count == (27000 if background == 0 else 402)
    fast = D.postprocess_fast(logits, codes, anchors, (333, 200))
    plain = D.postprocess(logits, codes, anchors, (333, 200))
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(fast[key], plain[key])
    match(fast, ref, 1e-4, 1e-6)


def test_candidates_tied_at_a_classes_cut_are_taken_in_box_order():
    logits, codes, anchors = heads_and_anchors(8, 1.0)
    logits[:, 0] += 12.0                                 # few candidates...
    logits[100, 7] = 14.0
    logits[101:600] = logits[100]                        # ...but 500 boxes of class 7 with equal scores
    logits[50, 7] = 15.0                                 # and one better
    fast = D.postprocess_fast(logits, codes, anchors, (320, 320))
    plain = D.postprocess(logits, codes, anchors, (320, 320))
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(fast[key], plain[key])
    index, labels = D.candidates(D.softmax(logits.copy()))
    assert index[labels == 7].tolist() == [50] + list(range(100, 399))


@pytest.mark.parametrize("images,error,message", [
    (np.zeros((3, 32, 32), np.float32), TypeError,
     "images: expected a list of (3, H, W) float arrays, got ndarray (for one image use [image])"),
    ((i for i in []), TypeError, "images: expected a list of (3, H, W) float arrays, got generator"),
    ([], ValueError, "images: expected a non-empty list of (3, H, W) float arrays, got an empty list"),
    ([np.zeros((3, 8, 8), np.float32), "image.png"], TypeError,
     "images[1]: expected a numpy array of shape (3, H, W), got str"),
    ([np.zeros((8, 8, 3), np.float32)], ValueError, "images[0]: expected shape (3, H, W), got (8, 8, 3)"),
    ([np.zeros((3, 0, 8), np.float32)], ValueError, "images[0]: expected a non-empty image, got shape (3, 0, 8)"),
    ([np.zeros((3, 8, 8), np.uint8)], ValueError,
     "images[0]: expected a float array with values in [0, 1] (uint8 pixels / 255), got dtype uint8"),
])
def test_bad_images_are_refused(images, error, message):
    net = model()
    for call in (net, net.forward_reference):
        with pytest.raises(error) as info:
            call(images)
        assert str(info.value) == message


def test_any_image_size_down_to_one_pixel_is_detected_in():
    found = model()([np.full((3, 1, 1), 0.5, np.float32), np.random.default_rng(0).random((3, 7, 900))])
    assert [d["boxes"].dtype for d in found] == [np.float32] * 2
    assert (found[0]["boxes"] <= 1).all() and (found[1]["boxes"][:, 2] <= 900).all()


def test_builder_takes_the_classes_and_the_dtype_from_the_weights(tmp_path):
    net = npmnv3.ssdlite320_mobilenet_v3_large(num_classes=5, dtype="float64", seed=3)
    assert net.num_classes == 5 and net.anchors.dtype == np.float64
    net.save(tmp_path / "d.npz")
    again = npmnv3.ssdlite320_mobilenet_v3_large(weights=tmp_path / "d.npz")
    assert again.num_classes == 5 and again.dtype == np.float64
    for key, value in net.params.items():
        np.testing.assert_array_equal(again.params[key], value)
    torch.save(torch_model().state_dict(), tmp_path / "d.pth")
    from_pth = npmnv3.ssdlite320_mobilenet_v3_large(weights=tmp_path / "d.pth")
    assert from_pth.num_classes == 91
    np.testing.assert_array_equal(from_pth.params["head.classification_head.module_list.0.1.bias"],
                                  torch_model().state_dict()["head.classification_head.module_list.0.1.bias"].numpy())
    with pytest.raises(ValueError, match="num_classes: expected a positive integer, got 0"):
        npmnv3.ssdlite320_mobilenet_v3_large(num_classes=0)


def test_the_detector_runs_with_torch_unimportable(tmp_path):
    script = f"""
import sys
sys.modules["torch"] = None
sys.modules["torchvision"] = None
import numpy as np, npmnv3
npmnv3.ssdlite320_mobilenet_v3_large(seed=1).save({str(tmp_path / "d.npz")!r})
model = npmnv3.ssdlite320_mobilenet_v3_large(weights={str(tmp_path / "d.npz")!r})
print(len(npmnv3.detect(np.zeros((40, 50, 3), np.uint8), model=model, score_threshold=0)))
print(sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "torchvision") and sys.modules[k] is not None))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["300", "[]"]       # torchvision's init: flat scores, 300 detections


def test_random_weights_are_torchvisions_init():
    net = npmnv3.ssdlite320_mobilenet_v3_large(seed=4)
    for key, value in net.params.items():
        if key.endswith(".weight") and value.ndim == 4:
            assert abs(value.std() - 0.03) < (0.01 if value.size < 1000 else 0.002), key


def test_summary_totals_and_map_shapes_are_torchvisions(capsys):
    tm, net = torch_model(), model()
    result = npmnv3.summary(net, 320, print_table=False)
    assert result["total_params"] == sum(p.numel() for p in tm.parameters())
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights as Weights
    meta = Weights.COCO_V1.meta
    assert result["total_params"] == meta["num_params"]
    assert round(result["total_macs"] / 1e9, 3) == meta["_ops"]        # torchvision's "GFLOPS" are MACs
    rows = {r["name"]: r for r in result["rows"]}
    with torch.no_grad():
        maps = list(tm.backbone(torch.zeros(1, 3, 320, 320)).values())
    assert [rows[name]["output_shape"] for name in net.taps] == [tuple(m.shape[1:]) for m in maps]
    assert rows["head.classification_head.module_list.0"]["output_shape"] == (6 * 91, 20, 20)
    assert rows["backbone.features.0.13"]["params"] == 112 * 672 + 2 * 672
    from npmnv3.cli import main
    assert main(["summary", "--arch", ARCH, "--size", "320"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[1:] == ["3,440,060", "583,171,904"]


# --------------------------------------------------------------------------- detect() and the command line

def photo(seed, size):
    """A textured random PIL image of ``size`` = (W, H)."""
    x = torchref.textured_images(1, size[1], size[0], seed)[0].numpy()
    return Image.fromarray(np.round(x.transpose(1, 2, 0) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def coco_model():
    """The random detector with the official weights' class names."""
    net = npmnv3.ssdlite320_mobilenet_v3_large()
    net.load_state_dict(torchref.numpy_state_dict(torch_model()))
    net.meta = W.OFFICIAL[(ARCH, "COCO_V1")].meta()
    return net


def test_detect_equals_torchvisions_pipeline(coco_model):
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights as Weights
    transform = Weights.COCO_V1.transforms()
    images = [photo(1, (250, 333)), photo(2, (160, 120))]
    results = npmnv3.detect(images, model=coco_model, score_threshold=0.01)
    names = Weights.COCO_V1.meta["categories"]
    for image, found in zip(images, results):
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in torch_model()([transform(image)])[0].items()}
        above = ref["scores"] > 0.01
        assert 5 <= len(found) == above.sum() < len(ref["scores"])
        assert [d["label"] for d in found] == [names[k] for k in ref["labels"][above]]
        assert [d["index"] for d in found] == ref["labels"][above].tolist()
        np.testing.assert_allclose([d["box"] for d in found], ref["boxes"][above], atol=1e-2)
        np.testing.assert_allclose([d["score"] for d in found], ref["scores"][above], atol=1e-4)
        assert all(isinstance(d["box"][0], float) and isinstance(d["score"], float) for d in found)
    single = npmnv3.detect(images[0], model=coco_model, score_threshold=0.01)
    assert single == results[0]


def test_detect_names_bad_images_and_arguments(coco_model, tmp_path):
    with pytest.raises(npmnv3.ImageError, match=r"^image 1 \(file '.*missing.png'\): no such file"):
        npmnv3.detect([photo(1, (64, 64)), str(tmp_path / "missing.png")], model=coco_model)
    with pytest.raises(npmnv3.ImageError, match="images: expected an image or a non-empty list of images, got an "
                                                "empty list"):
        npmnv3.detect([], model=coco_model)
    with pytest.raises(ValueError, match="score_threshold: expected a number from 0 to 1, got 1.5"):
        npmnv3.detect(photo(1, (64, 64)), model=coco_model, score_threshold=1.5)
    with pytest.raises(TypeError, match="model: expected an SSDLite instance, got MobileNetV3"):
        npmnv3.detect(photo(1, (64, 64)), model=npmnv3.mobilenet_v3_small())


@pytest.mark.slow
def test_cli_detect_prints_and_draws_the_detections(coco_model, tmp_path):
    coco_model.save(tmp_path / "ssdlite.npz")
    photo(3, (200, 150)).save(tmp_path / "street.png")
    argv = [sys.executable, "-m", "npmnv3", "detect", str(tmp_path / "street.png"), "--weights",
            str(tmp_path / "ssdlite.npz"), "--threshold", "0.1"]
    env = dict(os.environ, NPMNV3_OFFLINE="1")
    run = subprocess.run(argv + ["--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    entry, = json.loads(run.stdout)
    expected = npmnv3.detect(str(tmp_path / "street.png"), model=coco_model, score_threshold=0.1)
    assert len(expected) >= 3 and entry["detections"] == expected
    drawing = Image.open(entry["drawing"])
    assert drawing.size == (200, 150) and drawing.mode == "RGB"
    changed = np.asarray(drawing) != np.asarray(Image.open(tmp_path / "street.png"))
    x1, y1, x2, y2 = (int(v) for v in expected[-1]["box"])       # drawn last: nothing covers its left edge
    assert changed.any(axis=2)[y1 + 12:y2, x1:x1 + 2].any(axis=1).mean() > 0.8     # (12: below the label)
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = run.stdout.splitlines()
    assert lines[0] == f"{tmp_path / 'street.png'}: {len(expected)} detections above 0.1"
    top = expected[0]
    assert lines[1] == f"    1. {top['label']:<16} {top['score']:.3f}  [{', '.join(f'{v:.1f}' for v in top['box'])}]"
    assert len(lines) == 1 + len(expected)
    run = subprocess.run(argv[:-2] + ["--threshold", "2"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "argument --threshold: expected a number from 0 to 1, got 2" in run.stderr
