"""Object detection: SSDLite320 on MobileNetV3-Large (the paper's Section 6.2), as torchvision builds it
(``torchvision.models.detection.ssdlite320_mobilenet_v3_large``), from images to boxes.

The pipeline, in eval mode, is torchvision's:

1. transform: each image (3, H, W) in [0, 1] normalised with mean = std = 0.5 (to [-1, 1]), resized
   to 320 x 320 (bilinear, as ``F.interpolate``), batched;
2. backbone: MobileNetV3-Large with the reduced tail (its last stage halved, the paper's Table 6), cut
   in two inside the C4 block (``features.13``, the first block at 1/32): the first feature map is
   the output of that block's 1x1 expansion (672 channels at 1/16), the second the backbone's last
   conv (480 channels at 1/32);
3. four extra blocks (1x1 conv -> 3x3 depthwise stride 2 -> 1x1 conv, each BN + ReLU6) halve the
   resolution four more times: six feature maps, 20x20 ... 1x1 at 320 x 320;
4. heads: on each map a 3x3 depthwise conv (BN, ReLU6) and a 1x1 conv give, for each of the six
   default boxes of every position, ``num_classes`` class logits and 4 box offsets: (N, 3234, C)
   and (N, 3234, 4) at 320 x 320;
5. postprocess, per image: softmax scores; the boxes decoded from the offsets around the default
   boxes (``boxes.decode_boxes``) and clipped to the image; per class the boxes scoring above 0.001,
   the best 300 of them; class-wise NMS at IoU 0.55; the best 300 kept; boxes rescaled to the
   image's own size.

In torchvision's state_dict the backbone is ``backbone.features.0`` (the stem, blocks 1-12 and, as
``backbone.features.0.13``, the C4 block's expansion conv) and ``backbone.features.1`` (the rest of
that block as ``backbone.features.1.0.{1,2,3}``, then the later blocks and the last conv). Here the
C4 block stays one ``config.Block`` whose sub-layer records carry those names, so the readable
``bneck`` and the fast engine run it whole and the first map is the tap of its expand conv.

``model(images)`` runs the backbone and extras on the fast engine and the heads with the fast kernels;
``model.forward_reference(images)`` computes the same with the readable functions of this module.
``model.forward_raw(x)`` / ``forward_raw_reference(x)`` stop at the heads' outputs.
"""

from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from . import boxes as B
from . import fast_kernels as F
from . import kernels as K
from .config import Block, Conv, bneck_block, bneck_settings, mobilenet_v3_features, stage_starts
from .engine import Engine
from .engine.parallel import run_tasks
from .model import bneck, conv_bn_act, forward_features
from .network import Network, check_input, check_positive
from .segmentation import _pointwise, _to_nchw, plain_conv
from .summary import layer_costs
from .threads import blas_threads

BACKBONE = "mobilenet_v3_large"
IMAGE_SIZE = (320, 320)         # every image is resized to this (height, width)
IMAGE_MEAN = IMAGE_STD = 0.5    # then normalised: (x - 0.5) / 0.5, from [0, 1] to [-1, 1]
EXTRA_CHANNELS = (512, 256, 256, 128)
ASPECT_RATIOS = [[2, 3]] * 6    # per map: boxes of aspect ratios 1 (two sizes), 2, 1/2, 3, 1/3
MIN_RATIO, MAX_RATIO = 0.2, 0.95
BOXES_PER_LOCATION = 2 + 2 * len(ASPECT_RATIOS[0])     # 6
INIT_STD = 0.03                 # torchvision's _normal_init of every conv of the detector
SCORE_THRESHOLD = 0.001         # postprocess defaults (torchvision's for this model)
TOPK_CANDIDATES = 300
NMS_THRESHOLD = 0.55
DETECTIONS_PER_IMAGE = 300


# --------------------------------------------------------------------------- the layer records

def ssdlite_backbone():
    """The backbone's records with torchvision's SSDLite names: ``backbone.features.0.0`` ... ``.12``, the
    C4 block (its expand conv ``backbone.features.0.13``, its depthwise conv, SE and projection
    ``backbone.features.1.0.1`` / ``.2`` / ``.3``; the Block itself is called ``backbone.features.1.0``),
    then ``backbone.features.1.1`` ... ``.3``. Returns (records, index of the C4 block)."""
    rows, _ = bneck_settings(BACKBONE, reduced_tail=True)
    c4 = stage_starts(rows)[-1]          # C4: the last block whose table stride is 2 (13 in Large)
    features, _ = mobilenet_v3_features(BACKBONE, reduced_tail=True, prefix="backbone.features.0")
    rest = "backbone.features.1"
    block = bneck_block(rows[c4 - 1], f"{rest}.0")
    block = replace(block, expand=replace(block.expand, name=f"backbone.features.0.{c4}"),
                    depthwise=replace(block.depthwise, name=f"{rest}.0.1"), se=replace(block.se, name=f"{rest}.0.2"),
                    project=replace(block.project, name=f"{rest}.0.3"))
    later = [bneck_block(row, f"{rest}.{k}") for k, row in enumerate(rows[c4:], start=1)]
    last = replace(features[-1], name=f"{rest}.{len(later) + 1}")
    return features[:c4] + [block] + later + [last], c4


def extra_block(name, in_channels, out_channels):
    """One extra block as a Block record: 1x1 conv to out/2 channels, 3x3 depthwise stride 2, 1x1 conv to
    out, each with BN and ReLU6 (the projection too), no SE, no residual (torchvision's ``_extra_block``)."""
    mid = out_channels // 2
    return Block(name, Conv(f"{name}.0", in_channels, mid, activation="RE6"),
                 Conv(f"{name}.1", mid, mid, 3, stride=2, groups=mid, activation="RE6"), None,
                 Conv(f"{name}.2", mid, out_channels, activation="RE6"), residual=False)


def extra_blocks(in_channels, channels=EXTRA_CHANNELS):
    ins = (in_channels,) + tuple(channels[:-1])
    return [extra_block(f"backbone.extra.{k}", c_in, c_out) for k, (c_in, c_out) in enumerate(zip(ins, channels))]


@dataclass(frozen=True)
class PredictionBlock:
    """torchvision's ``_prediction_block`` on one feature map: a 3x3 depthwise conv (BN, ReLU6), then a
    1x1 conv with bias to ``boxes * columns`` channels: for each default box of a position, ``columns``
    numbers (the class logits, or the 4 box offsets)."""

    name: str
    depthwise: Conv
    conv: Conv
    columns: int

    @property
    def layers(self):
        return [self.depthwise, self.conv]


def prediction_block(name, in_channels, boxes, columns):
    return PredictionBlock(name, Conv(f"{name}.0", in_channels, in_channels, 3, groups=in_channels, activation="RE6"),
                           plain_conv(name, in_channels, boxes * columns, part="1"), columns)


def scoring_head(name, channels, columns, boxes=BOXES_PER_LOCATION):
    """``name.module_list.k`` for each feature map's channels: a list of PredictionBlocks."""
    return [prediction_block(f"{name}.module_list.{k}", c, boxes, columns) for k, c in enumerate(channels)]


# --------------------------------------------------------------------------- the readable path

def transform(images, dtype, size=IMAGE_SIZE):
    """torchvision's ``GeneralizedRCNNTransform`` for SSD: each (3, H, W) image normalised, then resized
    to ``size`` (bilinear, align_corners=False, no antialiasing), into one (N, 3, h, w) batch::

        x = resize((image - 0.5) / 0.5, size)
    """
    batch = np.empty((len(images), 3, *size), dtype)
    mean, std = np.dtype(dtype).type(IMAGE_MEAN), np.dtype(dtype).type(IMAGE_STD)
    for i, image in enumerate(images):
        x = image.astype(dtype)             # a copy, normalised in place
        x -= mean
        x /= std
        batch[i] = K.interpolate(x[None], size)[0]
    return batch


def feature_maps(x, backbone, extras, params, tap, outputs=None):
    """The six maps the heads read, NCHW: the output of layer ``tap`` inside the backbone (the C4 block's
    expansion conv), the backbone's output, and each extra block's output."""
    outputs = {} if outputs is None else outputs
    y = forward_features(x, backbone, params, outputs)       # records every layer's output in ``outputs``
    maps = [outputs[tap], y]
    for block in extras:
        y = bneck(y, block, params, outputs)
        maps.append(y)
    return maps


def head_outputs(maps, head, params, outputs=None):
    """One head on every map: (N, sum of H W A, columns). Map k's (N, A * columns, H, W) output is listed
    position by position (row-major), and the A default boxes of a position one after the other --
    torchvision's view (N, A, columns, H, W) permuted to (N, H, W, A, columns)."""
    parts = []
    for x, block in zip(maps, head):
        y = conv_bn_act(conv_bn_act(x, block.depthwise, params, outputs), block.conv, params, outputs)
        n, _, h, w = y.shape
        parts.append(y.reshape(n, -1, block.columns, h, w).transpose(0, 3, 4, 1, 2).reshape(n, -1, block.columns))
    return np.concatenate(parts, axis=1)


def softmax(logits):
    """Scores over the last axis, in the logits' dtype: exp(z - max z) / sum exp(z - max z)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def postprocess(cls_logits, bbox_regression, anchors, original_size, size=IMAGE_SIZE,
                score_threshold=SCORE_THRESHOLD, topk=TOPK_CANDIDATES, iou_threshold=NMS_THRESHOLD,
                detections=DETECTIONS_PER_IMAGE):
    """One image's detections from the heads' outputs, as torchvision's ``postprocess_detections`` and
    ``transform.postprocess``: cls_logits (A, C), bbox_regression (A, 4), anchors (A, 4) ->
    ``{"boxes": (K, 4), "scores": (K,), "labels": (K,) int64}``, best score first, in the pixels of an
    image of ``original_size`` = (H, W).

    Class 0 is the background: for each other class the boxes scoring above ``score_threshold``, the
    ``topk`` best of them (ties in box order); then NMS within each class; the best ``detections``.
    """
    scores = softmax(cls_logits)
    boxes = B.clip_boxes(B.decode_boxes(bbox_regression, anchors), size)
    picked, labels = [], []
    for label in range(1, scores.shape[1]):
        score = scores[:, label]
        index = np.flatnonzero(score > score_threshold)
        index = index[np.argsort(-score[index], kind="stable")[:topk]]
        picked.append(index)
        labels.append(np.full(len(index), label, np.int64))
    return _select(boxes, scores, np.concatenate(picked), np.concatenate(labels), original_size, size,
                   iou_threshold, detections)


def _select(boxes, scores, anchor_index, labels, original_size, size, iou_threshold, detections):
    """NMS over the candidates (anchor ``anchor_index[i]`` for class ``labels[i]``), the best ``detections``
    kept, boxes rescaled to ``original_size``."""
    candidate_boxes, candidate_scores = boxes[anchor_index], scores[anchor_index, labels]
    keep = B.batched_nms(candidate_boxes, candidate_scores, labels, iou_threshold)[:detections]
    return dict(boxes=B.rescale_boxes(candidate_boxes[keep], size, original_size), scores=candidate_scores[keep],
                labels=labels[keep])


# --------------------------------------------------------------------------- the fast path

def head_outputs_fast(maps, heads, prepared, threads=1):
    """``head_outputs`` of every head on NHWC maps with the fast kernels (BN folded): ``{key: (N, B, columns)}``.

    An NHWC output already lists position by position and box by box, so each (head, map) pair is
    written straight into its rows of the result. The pairs run as tasks on ``threads`` threads, the
    costliest first (the classification of the 20x20 map is most of the work).
    """
    n, dtype = len(maps[0]), maps[0].dtype
    out, tasks = {}, []
    for key, head in heads.items():
        boxes = [x.shape[1] * x.shape[2] * block.conv.out_channels // block.columns for x, block in zip(maps, head)]
        out[key] = np.empty((n, sum(boxes), head[0].columns), dtype)
        for x, block, start, count in zip(maps, head, np.cumsum([0] + boxes), boxes):
            macs = x[0].size * (block.depthwise.kernel ** 2 + block.conv.out_channels)
            tasks.append((macs, partial(_predict_fast, x, block, prepared, out[key][:, start:start + count])))
    with blas_threads(1):
        run_tasks([task for _, task in sorted(tasks, key=lambda t: -t[0])], threads)
    return out


def _predict_fast(x, block, prepared, out):
    """One PredictionBlock on NHWC x: 3x3 depthwise + bias + ReLU6, 1x1 conv + bias, into out (N, H W A, columns)."""
    weight, bias = prepared.depthwise(block.depthwise)
    y = F.depthwise_conv2d(x, weight, padding=block.depthwise.padding)
    y += bias
    F.relu6(y, y)
    out[...] = _pointwise(prepared, block.conv, y).reshape(out.shape)


def candidates(scores, score_threshold=SCORE_THRESHOLD, topk=TOPK_CANDIDATES):
    """``postprocess``'s candidates at once: (anchor index, label) of each box of each class (not 0)
    scoring above ``score_threshold`` and among the ``topk`` best of its class (ties in box order),
    label by label and box by box. scores (A, C)."""
    above = scores[:, 1:].T > score_threshold                     # (C - 1, A)
    crowded = np.flatnonzero(above.sum(axis=1) > topk)
    if crowded.size:                                              # keep the best topk of those classes
        values = scores[:, 1 + crowded].T
        cut = -np.partition(-values, topk - 1, axis=1)[:, topk - 1:topk]      # each class's topk-th score
        higher = values > cut
        ties = values == cut                                      # of those, the first ones (box order)
        room = topk - higher.sum(axis=1, keepdims=True)
        above[crowded] = higher | (ties & (np.cumsum(ties, axis=1) <= room))
    labels, anchor_index = np.nonzero(above)
    return anchor_index, labels + 1


def postprocess_fast(cls_logits, bbox_regression, anchors, original_size, size=IMAGE_SIZE,
                     score_threshold=SCORE_THRESHOLD, topk=TOPK_CANDIDATES, iou_threshold=NMS_THRESHOLD,
                     detections=DETECTIONS_PER_IMAGE):
    """``postprocess`` with the candidates chosen by whole-array operations (``candidates``) instead of a
    loop over the classes: the same boxes, in the same order."""
    scores = softmax(cls_logits)
    boxes = B.clip_boxes(B.decode_boxes(bbox_regression, anchors), size)
    anchor_index, labels = candidates(scores, score_threshold, topk)
    return _select(boxes, scores, anchor_index, labels, original_size, size, iou_threshold, detections)


# --------------------------------------------------------------------------- checking the input

def check_images(images):
    """Validate a list of (3, H, W) float images (values in [0, 1]); returns it as a list."""
    if not isinstance(images, (list, tuple)):
        hint = " (for one image use [image])" if isinstance(images, np.ndarray) else ""
        raise TypeError(f"images: expected a list of (3, H, W) float arrays, got {type(images).__name__}{hint}")
    if not images:
        raise ValueError("images: expected a non-empty list of (3, H, W) float arrays, got an empty list")
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise TypeError(f"images[{i}]: expected a numpy array of shape (3, H, W), got {type(image).__name__}")
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}]: expected shape (3, H, W), got {image.shape}")
        if 0 in image.shape:
            raise ValueError(f"images[{i}]: expected a non-empty image, got shape {image.shape}")
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"images[{i}]: expected a float array with values in [0, 1] (uint8 pixels / 255), "
                             f"got dtype {image.dtype}")
    return list(images)


# --------------------------------------------------------------------------- the network

class SSDLite(Network):
    """SSDLite320 on MobileNetV3-Large (torchvision's ``ssdlite320_mobilenet_v3_large``); see the module docstring.

    Build with ``npmnv3.ssdlite320_mobilenet_v3_large(...)``.

    Attributes
    ----------
    backbone : list
        The backbone's records (the C4 block one Block; see ``ssdlite_backbone``).
    extras : list
        The four extra blocks ``backbone.extra.0`` ... ``.3`` (Block records).
    heads : dict
        ``{"cls_logits": [PredictionBlock] * 6, "bbox_regression": [PredictionBlock] * 6}``.
    taps : list of str
        The names of the six layers whose outputs the heads read.
    grid_sizes : list of (int, int)
        The six maps' (H, W) at 320 x 320.
    anchors : ndarray
        The default boxes at 320 x 320: (3234, 4) xyxy in the model's dtype.
    """

    arch = "ssdlite320_mobilenet_v3_large"

    def __init__(self, *, num_classes=91, dtype=np.float32, seed=0, threads=None):
        check_positive(num_classes, "num_classes")
        self.num_classes = int(num_classes)
        self.options = dict(num_classes=self.num_classes)
        self.backbone, self.c4 = ssdlite_backbone()
        self.extras = extra_blocks(self.backbone[-1].out_channels)
        expand = self.backbone[self.c4].expand
        self.taps = [expand.name, self.backbone[-1].name] + [block.name for block in self.extras]
        channels = [expand.out_channels, self.backbone[-1].out_channels] + [b.out_channels for b in self.extras]
        self.heads = {"cls_logits": scoring_head("head.classification_head", channels, self.num_classes),
                      "bbox_regression": scoring_head("head.regression_head", channels, 4)}
        head_layers = [layer for head in self.heads.values() for block in head for layer in block.layers]
        super().__init__(self.backbone + self.extras + head_layers, dtype=dtype, seed=seed, threads=threads,
                         conv_std=INIT_STD)
        self.grid_sizes = [shape[1:] for shape in self.map_shapes(*IMAGE_SIZE)]
        self.anchors = B.default_boxes(self.grid_sizes, IMAGE_SIZE, ASPECT_RATIOS, MIN_RATIO, MAX_RATIO, self.dtype)

    def map_shapes(self, height, width):
        """(C, H, W) of the six feature maps for an (H, W) input."""
        rows = {row["name"]: row["output_shape"] for row in self.layer_table(height, width)}
        return [rows[name] for name in self.taps]

    def layer_table(self, height, width):
        """``summary``'s rows at an (H, W) input: each backbone layer (the C4 block's expansion a row of
        its own, as ``backbone.features.0.13``), each extra block, each prediction block."""
        c4 = self.backbone[self.c4]
        layers = self.backbone[:self.c4] + [c4.expand, replace(c4, expand=None)] + self.backbone[self.c4 + 1:]
        rows, _ = layer_costs(layers, height, width)
        rows += layer_costs(self.extras, *rows[-1]["output_shape"][1:])[0]
        shapes = {row["name"]: row["output_shape"] for row in rows}
        for head in self.heads.values():
            for name, block in zip(self.taps, head):
                parts, _ = layer_costs(block.layers, *shapes[name][1:])
                rows.append(dict(name=block.name, output_shape=parts[-1]["output_shape"],
                                 params=sum(p["params"] for p in parts), macs=sum(p["macs"] for p in parts)))
        return rows

    def make_engine(self):
        return Engine(self.backbone + self.extras, self.params)

    # ------------------------------------------------------------------ the raw network

    def forward_raw(self, x, return_intermediates=False):
        """The heads' outputs for a normalised batch, the backbone and extras on the fast engine and the
        heads with the fast kernels.

        x: (N, 3, H, W) float array, normalised as ``transform`` does (320 x 320 in the pipeline).
        Returns ``{"cls_logits": (N, B, num_classes), "bbox_regression": (N, B, 4)}`` with B = 3234 at
        320 x 320, or ``(that, maps)`` with the six feature maps (NCHW) by layer name (``taps``).
        """
        x = check_input(x, self.dtype)
        engine = self.engine()
        outputs = engine.run(x, taps=self.taps, threads=self.threads, layout="NHWC")
        maps = [outputs[name] for name in self.taps]
        raw = head_outputs_fast(maps, self.heads, engine.prepared, self.threads)
        if not return_intermediates:
            return raw
        return raw, {name: _to_nchw(m) for name, m in zip(self.taps, maps)}

    def forward_raw_reference(self, x, return_intermediates=False):
        """``forward_raw`` written plainly: NCHW, BN unfused, the readable layers (``feature_maps``,
        ``head_outputs``)."""
        x = check_input(x, self.dtype)
        with blas_threads(self.threads):
            maps = feature_maps(x, self.backbone, self.extras, self.params, self.taps[0])
            raw = {key: head_outputs(maps, head, self.params) for key, head in self.heads.items()}
        if not return_intermediates:
            return raw
        return raw, dict(zip(self.taps, maps))

    # ------------------------------------------------------------------ images to detections

    def __call__(self, images):
        """Detections for a list of images, with the fast path (see the module docstring).

        images: a list of (3, H, W) float arrays with values in [0, 1], of any sizes.
        Returns one dict per image: ``"boxes"`` (K, 4) xyxy in that image's pixels, ``"scores"`` (K,)
        and ``"labels"`` (K,) int64 class indices, best score first (K <= 300).
        """
        images = check_images(images)
        raw = self.forward_raw(transform(images, self.dtype))
        return [postprocess_fast(logits, codes, self.anchors, image.shape[1:])
                for logits, codes, image in zip(raw["cls_logits"], raw["bbox_regression"], images)]

    def forward_reference(self, images):
        """``model(images)`` with the readable functions: ``transform``, ``forward_raw_reference``,
        ``postprocess``."""
        images = check_images(images)
        raw = self.forward_raw_reference(transform(images, self.dtype))
        return [postprocess(logits, codes, self.anchors, image.shape[1:])
                for logits, codes, image in zip(raw["cls_logits"], raw["bbox_regression"], images)]
