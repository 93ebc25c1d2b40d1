"""The box kernels (IoU, NMS, class-wise NMS, decoding, clipping, default boxes): the plain loop version ==
the vectorised version == torchvision's ops and classes, with ties, empty inputs and thresholds met exactly."""

import numpy as np
import pytest

from npmnv3 import boxes as B

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import _utils as det_utils  # noqa: E402
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.models.detection.transform import resize_boxes  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("float32", "float64"))


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def random_boxes(n, seed, dtype=np.float32, extent=100.0):
    """n boxes in [0, extent]^2 of sides 1 to extent / 3, many of them overlapping."""
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, extent, (n, 2))
    return np.concatenate([corner, corner + rng.uniform(1, extent / 3, (n, 2))], axis=1).astype(dtype)


def tied_scores(n, seed, dtype=np.float32):
    """Scores in [0, 1], every fourth one equal to 0.5 (ties)."""
    scores = np.random.default_rng(seed).random(n).astype(dtype)
    scores[::4] = 0.5
    return scores


# --------------------------------------------------------------------------- IoU

@DTYPES
def test_iou_equals_torchvision_with_empty_and_degenerate_boxes(dtype):
    a, b = random_boxes(23, 0, dtype), random_boxes(17, 1, dtype)
    a[3] = b[5] = [7, 7, 7, 9]                      # zero width: IoU 0 with others, 0 / 0 = NaN together
    ref = torchvision.ops.box_iou(t(a), t(b)).numpy()
    assert np.isnan(ref[3, 5]) and np.isfinite(np.delete(ref, 3, 0)).all()
    np.testing.assert_array_equal(B.box_iou(a, b), ref)
    np.testing.assert_array_equal(B.box_iou_naive(a, b), ref)
    empty = np.zeros((0, 4), dtype)
    assert B.box_iou(empty, b).shape == B.box_iou_naive(empty, b).shape == (0, 17)
    assert B.box_iou(a, empty).shape == (23, 0)


# --------------------------------------------------------------------------- NMS

@DTYPES
@pytest.mark.parametrize("n,threshold", [(1, 0.5), (60, 0.3), (400, 0.55), (400, 0.8)])
def test_nms_equals_torchvision_with_tied_scores(dtype, n, threshold):
    boxes, scores = random_boxes(n, n, dtype), tied_scores(n, n, dtype)
    ref = torchvision.ops.nms(t(boxes), t(scores), threshold).numpy()
    for nms in (B.nms, B.nms_naive):
        keep = nms(boxes, scores, threshold)
        assert keep.dtype == np.int64
        np.testing.assert_array_equal(keep, ref)
    assert len(ref) == 1 if n == 1 else 1 < len(ref) < n      # some boxes suppressed, some kept


def test_nms_of_identical_boxes_with_equal_scores_keeps_the_first():
    boxes = np.tile(np.float32([[2, 3, 12, 13]]), (5, 1))
    scores = np.float32([0.2, 0.7, 0.7, 0.7, 0.1])
    assert torchvision.ops.nms(t(boxes), t(scores), 0.5).tolist() == [1]
    for nms in (B.nms, B.nms_naive):
        assert nms(boxes, scores, 0.5).tolist() == [1]


def test_nms_compares_the_iou_with_the_threshold_in_float64():
    """An IoU of 11 / 20 is float32(0.55) = 0.55000001..., greater than the double 0.55: suppressed, as in
    torchvision (compared in float32 it would be kept); 1 / 2 is exactly 0.5, not greater than 0.5: kept."""
    assert np.float32(11) / np.float32(20) == np.float32(0.55)
    scores = np.float32([0.9, 0.8])
    cases = [([[0, 0, 20, 1], [0, 0, 11, 1]], 0.55, [0]), ([[0, 0, 2, 1], [0, 0, 1, 1]], 0.5, [0, 1])]
    for boxes, threshold, kept in cases:
        boxes = np.float32(boxes)
        assert torchvision.ops.nms(t(boxes), t(scores), threshold).tolist() == kept
        for nms in (B.nms, B.nms_naive):
            assert nms(boxes, scores, threshold).tolist() == kept


@pytest.mark.parametrize("nms", (B.nms, B.nms_naive), ids=("vectorised", "plain"))
def test_nms_of_nothing_is_an_empty_int64_array(nms):
    keep = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert keep.shape == (0,) and keep.dtype == np.int64
    assert torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)


@pytest.mark.parametrize("nms", (B.nms, B.batched_nms, B.nms_naive), ids=("nms", "batched", "plain"))
def test_nms_refuses_mismatched_shapes(nms):
    args = (np.zeros((3, 4)), np.zeros(2)) + ((np.zeros(3, int),) if nms is B.batched_nms else ())
    message = r"boxes, scores: expected shapes \(N, 4\) and \(N,\), got \(3, 4\) and \(2,\)"
    with pytest.raises(ValueError, match=message):
        nms(*args, 0.5)


@DTYPES
@pytest.mark.parametrize("n", [0, 1, 300, 1000])
def test_batched_nms_offsetting_boxes_by_class_equals_torchvision(dtype, n):
    """Up to 1,000 boxes torchvision moves each class's boxes apart and runs one NMS: the same rounding,
    and (its sort being stable) the same order of tied scores."""
    boxes, scores = random_boxes(n, n + 1, dtype), tied_scores(n, n + 1, dtype)
    classes = np.random.default_rng(n).integers(0, 7, n)
    ref = torchvision.ops.batched_nms(t(boxes), t(scores), t(classes), 0.5).numpy()
    for nms in (B.batched_nms, B.batched_nms_naive):
        np.testing.assert_array_equal(nms(boxes, scores, classes, 0.5), ref)
    if n > 1:
        assert len(ref) > len(torchvision.ops.nms(t(boxes), t(scores), 0.5))    # classes do not suppress each other


@DTYPES
def test_batched_nms_class_by_class_equals_torchvision(dtype):
    """Above 1,000 boxes torchvision runs one NMS per class, then sorts what is kept by score (not stably:
    boxes of equal scores may come in any order there)."""
    n = 1500
    boxes, scores = random_boxes(n, 7, dtype, extent=300), tied_scores(n, 7, dtype)
    classes = np.random.default_rng(8).integers(0, 5, n)
    ref = torchvision.ops.batched_nms(t(boxes), t(scores), t(classes), 0.5).numpy()
    for keep in (B.batched_nms(boxes, scores, classes, 0.5), B.batched_nms_naive(boxes, scores, classes, 0.5)):
        assert sorted(keep) == sorted(ref)
        np.testing.assert_array_equal(scores[keep], scores[ref])
        untied = scores[keep] != 0.5
        np.testing.assert_array_equal(keep[untied], ref[untied])
    per_class = np.concatenate([np.flatnonzero(classes == c)[B.nms(boxes[classes == c], scores[classes == c], 0.5)]
                                for c in range(5)])
    assert sorted(per_class) == sorted(ref)


# --------------------------------------------------------------------------- decoding, clipping, rescaling

@DTYPES
def test_decoding_equals_torchvisions_box_coder_with_its_clamp(dtype):
    anchors = random_boxes(500, 3, dtype)
    codes = (np.random.default_rng(4).standard_normal((500, 4)) * 4).astype(dtype)
    codes[:5, 2:] = [[30, -2], [1, 40], [300, 300], [-30, -30], [20.6, 20.7]]    # dw, dh clamped at log(62.5)
    ref = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(t(codes), t(anchors)).numpy()
    tol = dict(rtol=0, atol=4 * np.finfo(dtype).eps * np.abs(ref).max())     # exp may differ in its last bit
    for decode in (B.decode_boxes, B.decode_boxes_naive):
        got = decode(codes, anchors)
        assert got.dtype == dtype and got.shape == (500, 4)
        np.testing.assert_allclose(got, ref, **tol)
    widths = ref[:3, 2] - ref[:3, 0]
    np.testing.assert_allclose(widths[[0, 2]] / (anchors[[0, 2], 2] - anchors[[0, 2], 0]), 62.5, rtol=1e-5)
    assert B.decode_boxes(codes[:0], anchors[:0]).shape == (0, 4)


@DTYPES
def test_clipping_equals_torchvision(dtype):
    boxes = random_boxes(200, 5, dtype, extent=400) - dtype(50)
    ref = torchvision.ops.clip_boxes_to_image(t(boxes), (240, 333)).numpy()
    assert (ref != boxes).any()
    np.testing.assert_array_equal(B.clip_boxes(boxes, (240, 333)), ref)
    np.testing.assert_array_equal(B.clip_boxes_naive(boxes, (240, 333)), ref)


@DTYPES
@pytest.mark.parametrize("size", [(200, 333), (360, 480), (320, 320), (1, 7)])
def test_rescaling_equals_torchvisions_float32_ratios(dtype, size):
    boxes = random_boxes(50, 6, dtype, extent=320)
    ref = resize_boxes(t(boxes), [320, 320], list(size)).numpy()
    got = B.rescale_boxes(boxes, (320, 320), size)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref)


# --------------------------------------------------------------------------- default boxes

@DTYPES
@pytest.mark.parametrize("grids,image_size", [
    ([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], (320, 320)),
    ([(7, 9), (4, 5), (2, 3)], (100, 140)),
])
def test_default_boxes_equal_torchvisions_generator(dtype, grids, image_size):
    ratios = [[2, 3]] * len(grids)
    generator = DefaultBoxGenerator(ratios, min_ratio=0.2, max_ratio=0.95)
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    images = ImageList(torch.zeros(1, 3, *image_size, dtype=tdtype), [image_size])
    ref = generator(images, [torch.zeros(1, 1, h, w, dtype=tdtype) for h, w in grids])[0].numpy()
    assert ref.shape == (6 * sum(h * w for h, w in grids), 4)
    for make in (B.default_boxes, B.default_boxes_naive):
        got = make(grids, image_size, ratios, 0.2, 0.95, dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, ref)
    if image_size == (320, 320):
        assert len(ref) == 3234
    assert B.box_scales(len(grids), 0.2, 0.95) == generator.scales
