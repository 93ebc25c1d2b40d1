"""The MobileNetV3 architectures as data: the paper's Tables 1 and 2, and the layers they make.

Each row of ``LARGE`` / ``SMALL`` is one bneck block (inverted residual) of torchvision's
``features`` list, ``features.1`` first. Columns, as in the paper:

    in    input channels            k     depthwise kernel size
    exp   expanded channels         out   output channels
    SE    squeeze-and-excite?       NL    non-linearity: RE = ReLU, HS = hard-swish
    s     stride

The stem (``features.0``: 3x3 conv, stride 2, 3 -> 16, hard-swish) comes before the rows, and
the head (``features.N``: 1x1 conv to 6 * out, hard-swish; global average pool; Linear -> last
channel, hard-swish, dropout, Linear -> classes) after them. Channel counts below are for
width 1.0; ``bneck_settings`` applies ``width_mult``, ``reduced_tail`` and ``dilated`` exactly as
torchvision does.

The rows become typed, frozen layer records that everything else reads -- the readable forward
pass (``model.py``), the fast engine (``engine/``), ``summary``, the notebooks and the other
networks built on this backbone:

    Conv           a convolution, optionally followed by BatchNorm and an activation
    SqueezeExcite  the squeeze-and-excite of a block
    Block          one bneck: expand Conv (or None), depthwise Conv, SqueezeExcite (or None),
                   project Conv, and whether the input is added back
    Linear         a fully connected layer of the classifier

Each record carries torchvision's module name, so its parameters are named as in torchvision's
state_dict. ``mobilenet_v3_features`` builds the list of ``features.i`` records; it is the one
place where torchvision's numbering inside a block (``block.0`` ... ``block.3``, shifting down
when a block has no expand conv or no SE) is written.
"""

from dataclasses import dataclass
from typing import Optional

from .kernels import conv_output_size

#         in   k  exp  out   SE     NL   s
LARGE = [
    (16,  3,  16,  16, False, "RE", 1),
    (16,  3,  64,  24, False, "RE", 2),   # C1: 1/4 resolution
    (24,  3,  72,  24, False, "RE", 1),
    (24,  5,  72,  40, True,  "RE", 2),   # C2: 1/8
    (40,  5, 120,  40, True,  "RE", 1),
    (40,  5, 120,  40, True,  "RE", 1),
    (40,  3, 240,  80, False, "HS", 2),   # C3: 1/16
    (80,  3, 200,  80, False, "HS", 1),
    (80,  3, 184,  80, False, "HS", 1),
    (80,  3, 184,  80, False, "HS", 1),
    (80,  3, 480, 112, True,  "HS", 1),
    (112, 3, 672, 112, True,  "HS", 1),
    (112, 5, 672, 160, True,  "HS", 2),   # C4: 1/32 -- the "tail": last 3 rows
    (160, 5, 960, 160, True,  "HS", 1),
    (160, 5, 960, 160, True,  "HS", 1),
]
LARGE_LAST_CHANNEL = 1280

#         in   k  exp  out   SE     NL   s
SMALL = [
    (16,  3,  16,  16, True,  "RE", 2),   # C1: 1/4
    (16,  3,  72,  24, False, "RE", 2),   # C2: 1/8
    (24,  3,  88,  24, False, "RE", 1),
    (24,  5,  96,  40, True,  "HS", 2),   # C3: 1/16
    (40,  5, 240,  40, True,  "HS", 1),
    (40,  5, 240,  40, True,  "HS", 1),
    (40,  5, 120,  48, True,  "HS", 1),
    (48,  5, 144,  48, True,  "HS", 1),
    (48,  5, 288,  96, True,  "HS", 2),   # C4: 1/32 -- the tail
    (96,  5, 576,  96, True,  "HS", 1),
    (96,  5, 576,  96, True,  "HS", 1),
]
SMALL_LAST_CHANNEL = 1024

ARCHS = {
    "mobilenet_v3_large": (LARGE, LARGE_LAST_CHANNEL),
    "mobilenet_v3_small": (SMALL, SMALL_LAST_CHANNEL),
}
TAIL_BLOCKS = 3        # reduced_tail and dilated change the last three rows
BN_EPS = 0.001         # torchvision's MobileNetV3 BatchNorm eps (not the usual 1e-5)
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")   # a BatchNorm's tensors, in state_dict order
BUFFER_KINDS = ("mean", "var", "counter")                         # of those (and num_batches_tracked): not learned
STEM_CHANNELS = 16     # features.0: 3 -> 16 (before the width multiplier)
HEAD_EXPANSION = 6     # the head conv widens the last block's output 6 times (160 -> 960, 96 -> 576)


def make_divisible(v, divisor=8):
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``divisor``), never dropping more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# --------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Bneck:
    """One row of the paper's table with its final channel counts (width multiplier applied)."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    activation: str      # "RE" or "HS"
    stride: int
    dilation: int = 1

    @property
    def squeeze(self):
        """SE bottleneck channels, torchvision's rule: make_divisible(expanded // 4, 8)."""
        return make_divisible(self.expanded // 4, 8)

    @property
    def has_expand(self):
        """The 1x1 expansion conv exists only when it changes the channel count."""
        return self.expanded != self.in_channels

    @property
    def depthwise_stride(self):
        """The depthwise conv's stride: a dilated block keeps its resolution (stride 1)."""
        return 1 if self.dilation > 1 else self.stride

    @property
    def use_residual(self):
        """Add the input to the output. As in torchvision this looks at the table's stride, so a
        dilated block that was a stride-2 row never gets a residual, even when its shapes match."""
        return self.stride == 1 and self.in_channels == self.out_channels


def bneck_settings(arch, width_mult=1.0, reduced_tail=False, dilated=False):
    """Return ``(rows, last_channel)`` for ``arch`` with torchvision's options applied.

    - ``width_mult`` scales every channel count c to ``make_divisible(c * width_mult, 8)``;
    - ``reduced_tail`` halves the channels of the last stage (and the classifier's hidden layer);
    - ``dilated`` gives the last three blocks dilation 2; their depthwise convs then use stride 1
      (output stride 16), see ``Bneck.depthwise_stride``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    if not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise ValueError(f"width_mult: expected a positive number, got {width_mult!r}")
    table, last_channel = ARCHS[arch]
    divider = 2 if reduced_tail else 1
    tail_start = len(table) - TAIL_BLOCKS

    def adjust(c):
        return make_divisible(c * width_mult, 8)

    rows = []
    for i, (cin, k, exp, cout, se, nl, s) in enumerate(table):
        dilation = 1
        if i >= tail_start:
            # The first tail block keeps its input width; the rest are reduced throughout.
            if i > tail_start:
                cin, exp = cin // divider, exp // divider
            cout = cout // divider
            if dilated:
                dilation = 2
        rows.append(Bneck(adjust(cin), k, adjust(exp), adjust(cout), se, nl, s, dilation))
    return rows, adjust(last_channel // divider)


# --------------------------------------------------------------------------- the layer records


def _key(module, part):
    """State_dict prefix of sub-module ``part`` of ``module`` ('' = the module itself)."""
    return f"{module}.{part}" if part else module


@dataclass(frozen=True)
class Conv:
    """A 2-D convolution, then (optionally) BatchNorm, then (optionally) an activation.

    ``name`` is torchvision's module, e.g. ``"features.1.block.0"`` (a ``Conv2dNormActivation``,
    whose conv is its sub-module ``0`` and whose BatchNorm is ``1``: ``parts = ("0", "1")``). A plain
    ``nn.Conv2d`` has ``parts = ("", None)`` and ``norm=False``. ``activation`` is "RE" (ReLU),
    "RE6" (ReLU6), "HS" (hard-swish), "SIG" (sigmoid) or None. The conv has a bias only when
    ``bias`` (torchvision's convs before a BatchNorm have none). Padding is always
    ``(kernel - 1) // 2 * dilation`` ("same" for stride 1). ``eps`` is the BatchNorm's (torchvision's
    MobileNetV3 and SSDLite use 0.001, the segmentation heads PyTorch's default 1e-5).
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    activation: Optional[str] = None
    norm: bool = True
    bias: bool = False
    parts: tuple = ("0", "1")
    eps: float = BN_EPS

    @property
    def padding(self):
        return (self.kernel - 1) // 2 * self.dilation

    @property
    def depthwise(self):
        """One kernel per channel (groups = channels)."""
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def weight_key(self):
        return _key(self.name, self.parts[0]) + ".weight"

    @property
    def bias_key(self):
        return _key(self.name, self.parts[0]) + ".bias" if self.bias else None

    def norm_key(self, field):
        """State_dict key of one of the BatchNorm's tensors (``BN_FIELDS`` or num_batches_tracked)."""
        return f"{_key(self.name, self.parts[1])}.{field}"

    def batch_norm_keys(self):
        """The BatchNorm's keys in the order ``kernels.batch_norm`` takes them: mean, variance, weight, bias."""
        return [self.norm_key(f) for f in ("running_mean", "running_var", "weight", "bias")]

    def parameters(self):
        """``[(key, shape, kind)]`` in state_dict order. kind: "conv" / "linear" weights, "zeros" / "ones"
        (biases, BN weights), and BatchNorm's buffers, which are not learned: "mean", "var", "counter"."""
        out = [(self.weight_key, (self.out_channels, self.in_channels // self.groups, self.kernel, self.kernel),
                "conv")]
        if self.bias:
            out.append((self.bias_key, (self.out_channels,), "zeros"))
        if self.norm:
            out += [(self.norm_key(f), (self.out_channels,), kind)
                    for f, kind in zip(BN_FIELDS, ("ones", "zeros", "mean", "var"))]
            out.append((self.norm_key("num_batches_tracked"), (), "counter"))
        return out

    def output_size(self, height, width):
        """(H_out, W_out) for an (H, W) input: PyTorch's rule, ``kernels.conv_output_size``."""
        return tuple(conv_output_size(n, self.kernel, self.stride, self.padding, self.dilation) for n in (height, width))

    def macs(self, height, width):
        """Multiply-accumulates on an (H, W) input: H_out * W_out * C_out * (C_in / groups) * k * k."""
        ho, wo = self.output_size(height, width)
        return ho * wo * self.out_channels * (self.in_channels // self.groups) * self.kernel ** 2


@dataclass(frozen=True)
class SqueezeExcite:
    """torchvision's SqueezeExcitation: mean -> fc1 (1x1 conv) -> ReLU -> fc2 -> hard-sigmoid -> scale."""

    name: str
    channels: int
    squeeze: int

    def parameters(self):
        c, s = self.channels, self.squeeze
        return [(f"{self.name}.fc1.weight", (s, c, 1, 1), "conv"), (f"{self.name}.fc1.bias", (s,), "zeros"),
                (f"{self.name}.fc2.weight", (c, s, 1, 1), "conv"), (f"{self.name}.fc2.bias", (c,), "zeros")]

    def macs(self, height, width):
        return 2 * self.channels * self.squeeze


@dataclass(frozen=True)
class Block:
    """One bneck block (``features.i``): the paper's Figure 4.

    expand (1x1, or None when it would not change the channel count) -> depthwise (k x k, stride s)
    -> se (or None) -> project (1x1, linear) -> + input when ``residual``.
    """

    name: str
    expand: Optional[Conv]
    depthwise: Conv
    se: Optional[SqueezeExcite]
    project: Conv
    residual: bool

    @property
    def layers(self):
        """The sub-layers in order (Conv and SqueezeExcite records)."""
        return [layer for layer in (self.expand, self.depthwise, self.se, self.project) if layer is not None]

    @property
    def in_channels(self):
        return (self.expand or self.depthwise).in_channels

    @property
    def out_channels(self):
        return self.project.out_channels

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]


@dataclass(frozen=True)
class Linear:
    """A fully connected layer (y = x W^T + b), then (optionally) an activation."""

    name: str
    in_features: int
    out_features: int
    activation: Optional[str] = None

    def parameters(self):
        return [(f"{self.name}.weight", (self.out_features, self.in_features), "linear"),
                (f"{self.name}.bias", (self.out_features,), "zeros")]

    def macs(self, height=1, width=1):
        return self.in_features * self.out_features


def bneck_block(row, name):
    """The ``Block`` record of one table row, its sub-layers named as torchvision numbers them.

    torchvision's ``InvertedResidual`` keeps its layers in ``block``, a Sequential that holds only
    the layers the row has: ``block.0`` is the expand conv when there is one, else the depthwise
    conv, and so on.
    """
    act = row.activation
    number = iter(f"{name}.block.{j}" for j in range(4))     # the next name goes to the next layer that exists
    expand = Conv(next(number), row.in_channels, row.expanded, activation=act) if row.has_expand else None
    depthwise = Conv(next(number), row.expanded, row.expanded, row.kernel, row.depthwise_stride, row.dilation,
                     groups=row.expanded, activation=act)
    se = SqueezeExcite(next(number), row.expanded, row.squeeze) if row.use_se else None
    project = Conv(next(number), row.expanded, row.out_channels)
    return Block(name, expand, depthwise, se, project, row.use_residual)


def stage_starts(rows):
    """Indices in ``features`` (row i is ``features.i``) of the blocks whose table stride is 2: where
    torchvision's stages start, the rule its segmentation and detection models take their taps by."""
    return [i for i, row in enumerate(rows, start=1) if row.stride > 1]


def mobilenet_v3_features(arch, width_mult=1.0, reduced_tail=False, dilated=False, prefix="features"):
    """``features.0`` ... ``features.N`` of ``arch`` as layer records: [stem Conv, Block, ..., head Conv].

    Returns ``(features, last_channel)``; ``last_channel`` is the classifier's hidden width.
    ``prefix`` replaces ``"features"`` in every name (the segmentation models call it ``"backbone"``).
    """
    rows, last_channel = bneck_settings(arch, width_mult, reduced_tail, dilated)
    stem = Conv(f"{prefix}.0", 3, make_divisible(STEM_CHANNELS * width_mult, 8), 3, stride=2, activation="HS")
    blocks = [bneck_block(row, f"{prefix}.{i}") for i, row in enumerate(rows, start=1)]
    head_in = rows[-1].out_channels
    head = Conv(f"{prefix}.{len(rows) + 1}", head_in, HEAD_EXPANSION * head_in, activation="HS")
    return [stem, *blocks, head], last_channel


def classifier_layers(in_features, last_channel, num_classes):
    """torchvision's classifier: Linear -> hard-swish -> Dropout (the identity at inference) -> Linear."""
    return [Linear("classifier.0", in_features, last_channel, activation="HS"),
            Linear("classifier.3", last_channel, num_classes)]


def parameter_list(layers):
    """``[(key, shape, kind)]`` of every layer record in ``layers``, in order."""
    return [p for layer in layers for p in layer.parameters()]
