"""Semantic segmentation on MobileNetV3-Large: the paper's Lite R-ASPP (Section 6.3, Figure 10) and
torchvision's DeepLabV3, as torchvision builds them (``torchvision.models.segmentation``).

Both sit on the dilated Large backbone (``config.mobilenet_v3_features(..., dilated=True)``: its
last stage keeps 1/16 of the resolution), named ``backbone.0`` ... ``backbone.16`` as in
torchvision's state_dict, and read two of its outputs:

    LR-ASPP    low = backbone.4 (C2, 40 channels at 1/8), high = backbone.16 (960 channels at 1/16)
    DeepLabV3  out = backbone.16, aux = backbone.4 (the auxiliary FCN head, when there is one)

Lite R-ASPP (``lraspp``): a 1x1 conv (BN, ReLU) on ``high`` gives 128 channels, which a gate
computed from ``high``'s global average (a 1x1 conv and a sigmoid: one weight in [0, 1] per
channel, like squeeze-and-excite) scales; the result is resized to ``low``'s size and classified
by a 1x1 conv, and added to a 1x1 conv classifying ``low`` directly (the stride-8 skip). DeepLabV3
(``deeplab_head``): ASPP, i.e. a 1x1 conv, three 3x3 convs dilated 12, 24 and 36, and the global
average (a 1x1 conv, broadcast back), concatenated and projected, then a 3x3 conv and a 1x1
classifier. Both outputs are resized (bilinear) to the input's size.

``model.forward_reference(x)`` computes this with the plain kernels; ``model(x)`` runs the backbone
on the fast engine and the head with the fast kernels. Both return torchvision's dict: ``{"out":
(N, classes, H, W)}``, plus ``"aux"`` for DeepLabV3 with its auxiliary head.
"""

from dataclasses import dataclass
from functools import partial

import numpy as np

from . import fast_kernels as F
from . import kernels as K
from .config import Conv, bneck_settings, mobilenet_v3_features, stage_starts
from .engine import Engine
from .engine.parallel import run_tasks
from .model import conv_bn_act, forward_features
from .network import Network, check_input, check_positive
from .summary import layer_costs
from .threads import blas_threads

TORCH_BN_EPS = 1e-5             # the heads use PyTorch's default BatchNorm eps (the backbone 0.001)
MIN_SIZE = 32                   # smallest input height and width


def plain_conv(name, in_channels, out_channels, kernel=1, activation=None, bias=True, part=""):
    """A bare ``nn.Conv2d`` (no BatchNorm) as a Conv record; ``part``: its index inside ``name``."""
    return Conv(name, in_channels, out_channels, kernel, activation=activation, norm=False, bias=bias,
                parts=(part, None))


def conv_bn_relu(name, in_channels, out_channels, kernel=1, dilation=1, parts=("0", "1")):
    """Conv (no bias) -> BatchNorm (eps 1e-5) -> ReLU, as the segmentation heads' Sequentials hold them."""
    return Conv(name, in_channels, out_channels, kernel, dilation=dilation, activation="RE", parts=parts,
                eps=TORCH_BN_EPS)


def dilated_backbone():
    """(records ``backbone.0`` ... ``backbone.16``, index of C2 (stride 8), index of the last) of the
    dilated Large backbone, with torchvision's rule for the taps: the stages start at the blocks whose
    table stride is 2, and C2 is the fourth stage from the end."""
    features, _ = mobilenet_v3_features("mobilenet_v3_large", dilated=True, prefix="backbone")
    rows, _ = bneck_settings("mobilenet_v3_large", dilated=True)
    stages = [0] + stage_starts(rows) + [len(features) - 1]
    return features, stages[-4], stages[-1]


# --------------------------------------------------------------------------- the heads

@dataclass(frozen=True)
class LRASPPHead:
    """torchvision's LRASPPHead: ``classifier.cbr``, ``.scale``, ``.low_classifier``, ``.high_classifier``."""

    cbr: Conv
    scale: Conv
    low_classifier: Conv
    high_classifier: Conv

    @property
    def layers(self):
        return [self.cbr, self.scale, self.low_classifier, self.high_classifier]


def lraspp_head(low_channels, high_channels, num_classes, inter_channels=128):
    return LRASPPHead(conv_bn_relu("classifier.cbr", high_channels, inter_channels),
                      plain_conv("classifier.scale", high_channels, inter_channels, activation="SIG", bias=False,
                                 part="1"),
                      plain_conv("classifier.low_classifier", low_channels, num_classes),
                      plain_conv("classifier.high_classifier", inter_channels, num_classes))


def lraspp(low, high, head, params, outputs=None):
    """Lite R-ASPP (the paper's Figure 10): low (N, 40, H/8, W/8), high (N, 960, H/16, W/16) ->
    class scores (N, classes, H/8, W/8)::

        x    = relu(BN(conv1x1(high)))                       128 channels at 1/16
        gate = sigmoid(conv1x1(mean over (h, w) of high))    (N, 128, 1, 1)
        out  = conv1x1(low) + conv1x1(resize(x * gate, size of low))
    """
    x = conv_bn_act(high, head.cbr, params, outputs)
    gate = conv_bn_act(K.global_avg_pool(high)[:, :, None, None], head.scale, params, outputs)
    x = K.interpolate(x * gate, low.shape[2:])
    return conv_bn_act(low, head.low_classifier, params, outputs) + conv_bn_act(x, head.high_classifier, params,
                                                                                  outputs)


@dataclass(frozen=True)
class DeepLabHead:
    """torchvision's DeepLabHead: ASPP (``classifier.0``: ``convs.0`` 1x1, ``convs.1-3`` dilated 3x3,
    ``convs.4`` the pooled branch, ``project``), then a 3x3 conv (``classifier.1``, BN ``.2``) and the
    classifier (``classifier.4``)."""

    branches: tuple
    pooling: Conv
    project: Conv
    conv: Conv
    classifier: Conv

    @property
    def layers(self):
        return [*self.branches, self.pooling, self.project, self.conv, self.classifier]


def deeplab_head(in_channels, num_classes, rates=(12, 24, 36), channels=256):
    branches = [conv_bn_relu("classifier.0.convs.0", in_channels, channels)]
    branches += [conv_bn_relu(f"classifier.0.convs.{k}", in_channels, channels, 3, dilation=rate)
                 for k, rate in enumerate(rates, start=1)]
    pooling = conv_bn_relu(f"classifier.0.convs.{len(rates) + 1}", in_channels, channels, parts=("1", "2"))
    project = conv_bn_relu("classifier.0.project", (len(rates) + 2) * channels, channels)
    return DeepLabHead(tuple(branches), pooling, project, conv_bn_relu("classifier", channels, channels, 3,
                                                                          parts=("1", "2")),
                       plain_conv("classifier.4", channels, num_classes))


@dataclass(frozen=True)
class FCNHead:
    """torchvision's FCNHead (the auxiliary classifier): a 3x3 conv to in/4 channels, BN, ReLU, a 1x1 classifier."""

    conv: Conv
    classifier: Conv

    @property
    def layers(self):
        return [self.conv, self.classifier]


def fcn_head(in_channels, num_classes):
    return FCNHead(conv_bn_relu("aux_classifier", in_channels, in_channels // 4, 3),
                   plain_conv("aux_classifier.4", in_channels // 4, num_classes))


def aspp(x, head, params, outputs=None):
    """Atrous spatial pyramid pooling: x (N, C, h, w) -> (N, 256, h, w)::

        branches = [conv1x1(x), conv3x3(x, dilation 12), ... 24, ... 36, resize(conv1x1(mean(x)), (h, w))]
        out = relu(BN(conv1x1(concatenate(branches))))       (dropout: the identity at inference)
    """
    branches = [conv_bn_act(x, conv, params, outputs) for conv in head.branches]
    pooled = conv_bn_act(K.global_avg_pool(x)[:, :, None, None], head.pooling, params, outputs)
    branches.append(K.interpolate(pooled, x.shape[2:]))        # a 1x1 map: the same value everywhere
    return conv_bn_act(np.concatenate(branches, axis=1), head.project, params, outputs)


def deeplab(x, head, params, outputs=None):
    """DeepLabV3's head: ASPP, a 3x3 conv (BN, ReLU), a 1x1 classifier: (N, C, h, w) -> (N, classes, h, w)."""
    y = conv_bn_act(aspp(x, head, params, outputs), head.conv, params, outputs)
    return conv_bn_act(y, head.classifier, params, outputs)


def fcn(x, head, params, outputs=None):
    """The auxiliary FCN head: (N, C, h, w) -> (N, classes, h, w)."""
    return conv_bn_act(conv_bn_act(x, head.conv, params, outputs), head.classifier, params, outputs)


# --------------------------------------------------------------------------- the fast heads (NHWC)

def _pointwise(prepared, conv, x):
    """A 1x1 Conv record on NHWC x with the engine's prepared (BN-folded) weights, and its activation."""
    weight, bias, _ = prepared.pointwise(conv)
    y = F.conv1x1(x, weight, bias)
    return _activate(y, conv.activation)


def _activate(y, activation):
    if activation == "RE":
        F.relu(y, y)
    elif activation == "SIG":
        y = K.sigmoid(y)
    elif activation is not None:
        raise NotImplementedError(activation)
    return y


def _dense(prepared, conv, x):
    """A k x k Conv record (BN folded) on NHWC x, one GEMM per kernel tap over the part of the map that
    tap reaches (``fast_kernels.conv2d_by_taps``: a dilated tap that falls wholly in the padding costs
    nothing), then its activation."""
    taps, bias = prepared.conv_taps(conv)
    y = F.conv2d_by_taps(x, taps, bias, conv.dilation)
    return _activate(y, conv.activation)


def resize_on_threads(x, size, threads):
    """``fast_kernels.resize_nchw`` of x (N, C, h, w) to ``size``, its channels shared out over ``threads``
    threads (the same floats: each channel is resized on its own)."""
    n, c = x.shape[:2]
    out = np.empty((n, c, *size), x.dtype)
    count = min(threads, c)
    cuts = [c * i // count for i in range(count + 1)]
    run_tasks([partial(F.resize_nchw, x[:, a:b], size, out=out[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])],
              count)
    return out


def _to_nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def lraspp_fast(low, high, head, prepared):
    """``lraspp`` on NHWC maps with the fast kernels: (N, H/8, W/8, classes)."""
    x = _pointwise(prepared, head.cbr, high)
    gate = _pointwise(prepared, head.scale, F.global_avg_pool(high)[:, None, None, :])
    x = F.resize(x * gate, low.shape[1:3])
    return _pointwise(prepared, head.low_classifier, low) + _pointwise(prepared, head.high_classifier, x)


def deeplab_fast(x, head, prepared):
    """``deeplab`` on an NHWC map with the fast kernels: (N, h, w, classes)."""
    n, h, w, _ = x.shape
    channels = head.project.in_channels
    width = channels // (len(head.branches) + 1)
    cat = np.empty((n, h, w, channels), x.dtype)
    for k, conv in enumerate(head.branches):
        part = _pointwise(prepared, conv, x) if conv.kernel == 1 else _dense(prepared, conv, x)
        cat[..., k * width:(k + 1) * width] = part
    pooled = _pointwise(prepared, head.pooling, F.global_avg_pool(x)[:, None, None, :])
    cat[..., len(head.branches) * width:] = pooled          # resized from 1x1: the same everywhere
    y = _dense(prepared, head.conv, _pointwise(prepared, head.project, cat))
    return _pointwise(prepared, head.classifier, y)


def fcn_fast(x, head, prepared):
    return _pointwise(prepared, head.classifier, _dense(prepared, head.conv, x))


# --------------------------------------------------------------------------- the networks

class _Segmenter(Network):
    """What LR-ASPP and DeepLabV3 share: the dilated backbone, the taps, the two forward paths."""

    def _setup(self, num_classes, heads, dtype, seed, threads):
        check_positive(num_classes, "num_classes")
        self.num_classes = int(num_classes)
        self.backbone, self.low, self.high = dilated_backbone()
        self.heads = heads(self.backbone[self.low].out_channels, self.backbone[self.high].out_channels)
        super().__init__(self.backbone + [layer for head in self.heads.values() for layer in head.layers],
                         dtype=dtype, seed=seed, threads=threads)

    @property
    def taps(self):
        """The backbone outputs the heads read: (name of C2, name of the last)."""
        return self.backbone[self.low].name, self.backbone[self.high].name

    def make_engine(self):
        return Engine(self.backbone, self.params)

    def __call__(self, x, return_intermediates=False):
        """Class scores for a batch, the backbone on the fast engine and the heads with the fast kernels.

        x: (N, 3, H, W) float array (normalised as ``npmnv3.preprocess`` does), N >= 1, H, W >= 32.
        Returns ``{"out": (N, classes, H, W)}`` (plus ``"aux"``), or ``(that, features)`` with the two
        backbone outputs the heads read (NCHW) when ``return_intermediates`` is true.
        """
        x = check_input(x, self.dtype, MIN_SIZE)
        engine = self.engine()
        taps = engine.run(x, taps=self.taps, threads=self.threads, layout="NHWC")
        low, high = (taps[name] for name in self.taps)
        with blas_threads(1):
            result = {name: resize_on_threads(_to_nchw(y), x.shape[2:], self.threads)
                      for name, y in self._heads_fast(low, high, engine.prepared).items()}
        if not return_intermediates:
            return result
        return result, {name: _to_nchw(taps[name]) for name in self.taps}

    def forward_reference(self, x, return_intermediates=False):
        """The forward pass written plainly: NCHW, BN unfused, the plain kernels."""
        x = check_input(x, self.dtype, MIN_SIZE)
        outputs = {}
        with blas_threads(self.threads):
            forward_features(x, self.backbone, self.params, outputs)
            low, high = (outputs[name] for name in self.taps)
            result = {name: K.interpolate(y, x.shape[2:]) for name, y in self._heads(low, high, outputs).items()}
        if not return_intermediates:
            return result
        return result, {name: outputs[name] for name in self.taps}


class LRASPP(_Segmenter):
    """Lite R-ASPP on MobileNetV3-Large (torchvision's ``lraspp_mobilenet_v3_large``); see the module docstring.

    Attributes
    ----------
    backbone : list
        ``backbone.0`` ... ``backbone.16`` as layer records.
    heads : dict
        ``{"out": LRASPPHead}``.
    """

    arch = "lraspp_mobilenet_v3_large"

    def __init__(self, *, num_classes=21, dtype=np.float32, seed=0, threads=None):
        self.options = dict(num_classes=num_classes)
        self._setup(num_classes, lambda low, high: {"out": lraspp_head(low, high, num_classes)}, dtype, seed, threads)

    def layer_table(self, height, width):
        rows, (h16, w16) = layer_costs(self.backbone, height, width)
        h8, w8 = rows[self.low]["output_shape"][1:]          # the low-level tap's map
        head = self.heads["out"]
        for layer, at in ((head.cbr, (h16, w16)), (head.scale, (1, 1)), (head.low_classifier, (h8, w8)),
                          (head.high_classifier, (h8, w8))):
            rows += layer_costs([layer], *at)[0]
        return rows

    def _heads(self, low, high, outputs=None):
        return {"out": lraspp(low, high, self.heads["out"], self.params, outputs)}

    def _heads_fast(self, low, high, prepared):
        return {"out": lraspp_fast(low, high, self.heads["out"], prepared)}


class DeepLabV3(_Segmenter):
    """DeepLabV3 on MobileNetV3-Large (torchvision's ``deeplabv3_mobilenet_v3_large``), with the
    auxiliary FCN head when ``aux_loss``; see the module docstring."""

    arch = "deeplabv3_mobilenet_v3_large"

    def __init__(self, *, num_classes=21, aux_loss=False, dtype=np.float32, seed=0, threads=None):
        self.options = dict(num_classes=num_classes, aux_loss=bool(aux_loss))

        def heads(low, high):
            out = {"out": deeplab_head(high, num_classes)}
            if aux_loss:
                out["aux"] = fcn_head(low, num_classes)
            return out
        self._setup(num_classes, heads, dtype, seed, threads)

    def layer_table(self, height, width):
        rows, (h16, w16) = layer_costs(self.backbone, height, width)
        h8, w8 = rows[self.low]["output_shape"][1:]          # the low-level tap's map
        head = self.heads["out"]
        for layer in head.layers:
            rows += layer_costs([layer], *((1, 1) if layer is head.pooling else (h16, w16)))[0]
        if "aux" in self.heads:
            for layer in self.heads["aux"].layers:
                rows += layer_costs([layer], h8, w8)[0]
        return rows

    def _heads(self, low, high, outputs=None):
        out = {"out": deeplab(high, self.heads["out"], self.params, outputs)}
        if "aux" in self.heads:
            out["aux"] = fcn(low, self.heads["aux"], self.params, outputs)
        return out

    def _heads_fast(self, low, high, prepared):
        out = {"out": deeplab_fast(high, self.heads["out"], prepared)}
        if "aux" in self.heads:
            out["aux"] = fcn_fast(low, self.heads["aux"], prepared)
        return out
