"""The box kernels of the SSDLite detector, each twice: a plain loop version to read, and the vectorised one to run.

Boxes are (N, 4) arrays of corners ``(x1, y1, x2, y2)`` in pixels (x to the right, y down), the layout
of ``torchvision.ops``. The kernels keep the dtype of their input and compute what torchvision
computes, operation for operation, so that float32 results agree to the last bit or two:

    box_iou          intersection over union of every pair        torchvision.ops.box_iou
    nms              greedy non-maximum suppression                torchvision.ops.nms
    batched_nms      the same, class by class                      torchvision.ops.batched_nms
    decode_boxes     regression outputs -> boxes around anchors    BoxCoder((10, 10, 5, 5)).decode_single
    clip_boxes       boxes cut at the image's border               torchvision.ops.clip_boxes_to_image
    default_boxes    SSD's anchors, six per position of each map   DefaultBoxGenerator([[2, 3]] * 6, 0.2, 0.95)

Non-maximum suppression keeps the highest-scoring box, drops every box whose IoU with it is greater
than the threshold, and repeats with the best box left. Scores that tie are taken in index order
(torchvision's NMS sorts stably too); the IoU is compared with the threshold in float64, as
torchvision's C++ kernel compares its float IoU with a double.
"""

import math

import numpy as np

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)   # SSD's BoxCoder: the regression outputs are 10 dx, 10 dy, 5 dw, 5 dh
BOX_XFORM_CLIP = math.log(1000.0 / 16)  # dw and dh are clamped here before exp: a box grows at most 62.5-fold
OFFSET_TRICK_MAX = 1000     # torchvision's batched_nms offsets up to this many boxes (on CPU), see batched_nms


def box_area(boxes):
    """(x2 - x1) * (y2 - y1) of each box: (N, 4) -> (N,)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# --------------------------------------------------------------------------- IoU

def box_iou_naive(boxes1, boxes2):
    """Intersection over union of every pair, one pair at a time: (N, 4), (M, 4) -> (N, M)::

        inter = max(0, min(x2, x2') - max(x1, x1')) * max(0, min(y2, y2') - max(y1, y1'))
        iou   = inter / (area + area' - inter)

    (0 / 0 = NaN for two empty boxes, as in torchvision.)
    """
    iou = np.empty((len(boxes1), len(boxes2)), dtype=np.result_type(boxes1, boxes2))
    with np.errstate(invalid="ignore", divide="ignore"):
        for i, a in enumerate(boxes1):
            for j, b in enumerate(boxes2):
                iou[i, j] = _pair_iou(a, b)
    return iou


def _pair_iou(a, b):
    """IoU of two boxes (x1, y1, x2, y2) of the same NumPy scalar type (see ``box_iou_naive``)."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a, b
    zero = type(ax1)(0)
    w = max(zero, min(ax2, bx2) - max(ax1, bx1))
    h = max(zero, min(ay2, by2) - max(ay1, by1))
    inter = w * h
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


def box_iou(boxes1, boxes2):
    """Vectorised ``box_iou_naive``: the corners of every intersection by broadcasting (N, 1, 2) against (M, 2)."""
    return _iou(boxes1[:, None], box_area(boxes1)[:, None], boxes2[None], box_area(boxes2)[None])


def _iou(a, area_a, b, area_b):
    """IoU of boxes a and b (any shapes that broadcast, corners on the last axis) with their areas."""
    lt = np.maximum(a[..., :2], b[..., :2])
    wh = np.minimum(a[..., 2:], b[..., 2:]) - lt
    np.maximum(wh, 0, out=wh)
    inter = wh[..., 0] * wh[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a + area_b - inter)


# --------------------------------------------------------------------------- non-maximum suppression

def _check_boxes(boxes, scores):
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),):
        raise ValueError(f"boxes, scores: expected shapes (N, 4) and (N,), got {boxes.shape} and {scores.shape}")
    return boxes, scores


def nms_naive(boxes, scores, iou_threshold):
    """Greedy non-maximum suppression, torchvision's loop: boxes (N, 4), scores (N,) -> kept indices (K,)
    int64, highest score first.

    In order of decreasing score (ties in index order): keep a box unless it was suppressed, then
    suppress every later box whose IoU with it is greater than ``iou_threshold``.
    """
    boxes, scores = _check_boxes(boxes, scores)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])        # sorted() is stable
    suppressed = [False] * len(order)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for a, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            for j in order[a + 1:]:
                if not suppressed[j] and float(_pair_iou(boxes[i], boxes[j])) > iou_threshold:
                    suppressed[j] = True
    return np.array(keep, dtype=np.int64)


def nms(boxes, scores, iou_threshold):
    """Vectorised ``nms_naive`` (``greedy_nms`` with one class)."""
    boxes, scores = _check_boxes(boxes, scores)
    return greedy_nms(boxes, scores, np.zeros(len(scores), np.int64), iou_threshold)


def offset_by_class(boxes, classes):
    """torchvision's trick for class-wise NMS in one pass: move the boxes of class c by c * (max + 1)
    along both axes (max: the largest coordinate of all boxes), so that boxes of different classes
    never overlap. (It assumes coordinates >= 0, as torchvision does.)"""
    if boxes.size == 0:
        return boxes
    dt = boxes.dtype.type
    offsets = classes.astype(boxes.dtype) * (boxes.max() + dt(1))
    return boxes + offsets[:, None]


def batched_nms_naive(boxes, scores, classes, iou_threshold):
    """Non-maximum suppression within each class (boxes of different classes never suppress each other),
    as ``torchvision.ops.batched_nms`` computes it on the CPU: up to ``OFFSET_TRICK_MAX`` boxes, one
    ``nms_naive`` over the boxes moved apart by class (``offset_by_class``); more, one ``nms_naive``
    per class. The two give the same boxes but for rounding (the moved coordinates are larger).

    boxes (N, 4), scores (N,), classes (N,) ints -> kept indices (K,) int64, highest score first
    (ties in index order).
    """
    boxes, scores = _check_boxes(boxes, scores)
    classes = np.asarray(classes)
    if len(scores) <= OFFSET_TRICK_MAX:
        return nms_naive(offset_by_class(boxes, classes), scores, iou_threshold)
    keep = []
    for c in sorted(set(classes.tolist())):
        members = [i for i in range(len(classes)) if classes[i] == c]
        keep += [members[k] for k in nms_naive(boxes[members], scores[members], iou_threshold)]
    keep.sort()
    keep.sort(key=lambda i: -scores[i])
    return np.array(keep, dtype=np.int64)


def batched_nms(boxes, scores, classes, iou_threshold):
    """Vectorised ``batched_nms_naive``: the same offsets up to ``OFFSET_TRICK_MAX`` boxes, then
    ``greedy_nms`` on every class at once."""
    boxes, scores = _check_boxes(boxes, scores)
    classes = np.asarray(classes)
    if len(scores) <= OFFSET_TRICK_MAX:
        boxes = offset_by_class(boxes, classes)
    return greedy_nms(boxes, scores, classes, iou_threshold)


def greedy_nms(boxes, scores, classes, iou_threshold):
    """Greedy NMS within each class, all classes in step: boxes (N, 4), scores (N,), classes (N,) ->
    kept indices (K,) int64, highest score first (ties in index order).

    The boxes are sorted by class, then by decreasing score. Each step keeps the best remaining box
    of every class -- nothing above it is left to suppress it -- and removes, in the same step, the
    boxes of its class whose IoU with it is greater than ``iou_threshold``: as many steps as the
    largest number of boxes one class keeps, each a few whole-array operations on the boxes left.
    """
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((-scores, classes))          # class, then score (descending); stable
    boxes, classes = boxes[order], np.asarray(classes)[order]
    areas = box_area(boxes)
    threshold = np.float64(iou_threshold)           # a float IoU compared in float64, as in torchvision
    left = np.arange(len(order))                    # positions (in sorted order) of the boxes left
    kept = []
    while left.size:
        first = np.ones(left.size, bool)            # the first box left of each class: its best
        first[1:] = classes[left[1:]] != classes[left[:-1]]
        kept.append(left[first])
        best = left[np.maximum.accumulate(np.where(first, np.arange(left.size), 0))]   # each box's class best
        iou = _iou(boxes[best], areas[best], boxes[left], areas[left])
        left = left[~first & ~(iou > threshold)]
    keep = np.sort(order[np.concatenate(kept)])
    return keep[np.argsort(-scores[keep], kind="stable")]


# --------------------------------------------------------------------------- decoding, clipping

def decode_boxes_naive(codes, anchors, weights=BOX_WEIGHTS, xform_clip=BOX_XFORM_CLIP):
    """Boxes from regression outputs, one box at a time: codes (N, 4), anchors (N, 4) xyxy -> boxes (N, 4).

    With the anchor's centre (cx, cy), width w and height h, and (wx, wy, ww, wh) = ``weights``::

        x, y = cx + (dx / wx) * w,  cy + (dy / wy) * h                     the new centre
        W, H = exp(min(dw / ww, clip)) * w,  exp(min(dh / wh, clip)) * h   the new size
        box  = (x - W / 2, y - H / 2, x + W / 2, y + H / 2)

    as torchvision's ``BoxCoder(weights).decode_single`` (clip = log(1000 / 16)).
    """
    dt = codes.dtype.type
    wx, wy, ww, wh = (dt(v) for v in weights)
    clip, half = dt(xform_clip), dt(0.5)
    out = np.empty_like(codes)
    for i, ((dx, dy, dw, dh), (x1, y1, x2, y2)) in enumerate(zip(codes, anchors.astype(codes.dtype))):
        w, h = x2 - x1, y2 - y1
        cx, cy = x1 + half * w, y1 + half * h
        x, y = dx / wx * w + cx, dy / wy * h + cy
        width, height = np.exp(min(dw / ww, clip)) * w, np.exp(min(dh / wh, clip)) * h
        out[i] = (x - half * width, y - half * height, x + half * width, y + half * height)
    return out


def decode_boxes(codes, anchors, weights=BOX_WEIGHTS, xform_clip=BOX_XFORM_CLIP):
    """Vectorised ``decode_boxes_naive``: each formula on whole columns."""
    dt = codes.dtype.type
    anchors = anchors.astype(codes.dtype, copy=False)
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + dt(0.5) * w, anchors[:, 1] + dt(0.5) * h
    x = codes[:, 0] / dt(weights[0]) * w + cx
    y = codes[:, 1] / dt(weights[1]) * h + cy
    half_w = dt(0.5) * (np.exp(np.minimum(codes[:, 2] / dt(weights[2]), dt(xform_clip))) * w)
    half_h = dt(0.5) * (np.exp(np.minimum(codes[:, 3] / dt(weights[3]), dt(xform_clip))) * h)
    return np.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=1)


def clip_boxes_naive(boxes, size):
    """Boxes cut at the border of an image of ``size`` = (height, width), one coordinate at a time:
    x into [0, width], y into [0, height]."""
    height, width = size
    out = np.empty_like(boxes)
    for i, box in enumerate(boxes):
        for k, v in enumerate(box):
            top = width if k % 2 == 0 else height
            out[i, k] = 0 if v < 0 else top if v > top else v
    return out


def clip_boxes(boxes, size):
    """Vectorised ``clip_boxes_naive``."""
    height, width = size
    return np.clip(boxes, 0, np.array([width, height, width, height], boxes.dtype))


def rescale_boxes(boxes, from_size, to_size):
    """Boxes on an image of ``from_size`` = (H, W) moved to one of ``to_size``: x times W' / W, y times H' / H.

    The ratios are float32 divisions, as torchvision's ``resize_boxes`` computes them, whatever the
    boxes' dtype."""
    ratio_h, ratio_w = (np.float32(new) / np.float32(old) for new, old in zip(to_size, from_size))
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h]).astype(boxes.dtype)


# --------------------------------------------------------------------------- default boxes

def box_scales(count, min_ratio, max_ratio):
    """SSD's box scales (fractions of the image side), one per feature map, and 1.0 after the last:
    evenly spaced from ``min_ratio`` to ``max_ratio`` (SSD paper, eq. 4)."""
    if count == 1:
        return [min_ratio, max_ratio]
    return [min_ratio + (max_ratio - min_ratio) * k / (count - 1.0) for k in range(count)] + [1.0]


def box_shapes(scales, aspect_ratios, k):
    """The (width, height) of map k's default boxes, fractions of the image: (2 + 2 * len(ratios), 2)
    float32, clipped to [0, 1]::

        (s, s), (s', s') with s' = sqrt(s_k * s_k+1), then for each ratio r:
        (s sqrt(r), s / sqrt(r)) and (s / sqrt(r), s sqrt(r))

    (float32 as torchvision keeps them, also for a float64 model).
    """
    s, s_prime = scales[k], math.sqrt(scales[k] * scales[k + 1])
    shapes = [[s, s], [s_prime, s_prime]]
    for ratio in aspect_ratios[k]:
        root = math.sqrt(ratio)
        shapes += [[s * root, s / root], [s / root, s * root]]
    return np.clip(np.array(shapes, np.float32), 0, 1)


def _centre(i, count):
    """Where cell i of ``count`` has its centre, as a fraction of the side: (i + 0.5) / count in float32."""
    return (np.float32(i) + np.float32(0.5)) / np.float32(count)


def default_boxes_naive(grid_sizes, image_size, aspect_ratios, min_ratio, max_ratio, dtype=np.float32):
    """SSD's default boxes (anchors), one at a time: (sum of H_k W_k A_k, 4) xyxy in pixels of ``image_size``.

    grid_sizes: the (H_k, W_k) of each feature map. For each map, row by row and cell by cell, the
    ``box_shapes`` of that map centred on the cell's centre ((j + 0.5) / W_k, (i + 0.5) / H_k)::

        box = ((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H)

    the order in which the heads' outputs list them. As torchvision's ``DefaultBoxGenerator``.
    """
    dt = np.dtype(dtype).type
    height, width = dt(image_size[0]), dt(image_size[1])
    scales = box_scales(len(grid_sizes), min_ratio, max_ratio)
    boxes = []
    for k, (rows, cols) in enumerate(grid_sizes):
        shapes = box_shapes(scales, aspect_ratios, k).astype(dtype)
        for i in range(rows):
            for j in range(cols):
                cx, cy = dt(_centre(j, cols)), dt(_centre(i, rows))
                for w, h in shapes:
                    half_w, half_h = dt(0.5) * w, dt(0.5) * h
                    boxes.append([(cx - half_w) * width, (cy - half_h) * height,
                                  (cx + half_w) * width, (cy + half_h) * height])
    return np.array(boxes, dtype)


def default_boxes(grid_sizes, image_size, aspect_ratios, min_ratio, max_ratio, dtype=np.float32):
    """Vectorised ``default_boxes_naive``: per map, every cell centre repeated for each shape, every shape
    tiled over the cells."""
    scales = box_scales(len(grid_sizes), min_ratio, max_ratio)
    scale = np.array([image_size[1], image_size[0]], dtype)             # (W, H)
    boxes = []
    for k, (rows, cols) in enumerate(grid_sizes):
        shapes = box_shapes(scales, aspect_ratios, k).astype(dtype)
        cy, cx = np.meshgrid(_centre(np.arange(rows), rows), _centre(np.arange(cols), cols), indexing="ij")
        centres = np.repeat(np.stack([cx.ravel(), cy.ravel()], axis=1).astype(dtype), len(shapes), axis=0)
        half = np.tile(np.dtype(dtype).type(0.5) * shapes, (rows * cols, 1))
        boxes.append(np.concatenate([(centres - half) * scale, (centres + half) * scale], axis=1))
    return np.concatenate(boxes)
