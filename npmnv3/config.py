"""The MobileNetV3 architectures as data: the paper's Tables 1 and 2.

Each row is one bneck block (inverted residual) of torchvision's ``features`` list,
``features.1`` first. Columns, as in the paper:

    in    input channels            k     depthwise kernel size
    exp   expanded channels         out   output channels
    SE    squeeze-and-excite?       NL    non-linearity: RE = ReLU, HS = hard-swish
    s     stride

The stem (``features.0``: 3x3 conv, stride 2, 3 -> 16, hard-swish) comes before the rows, and
the head (``features.N``: 1x1 conv to 6 * out, hard-swish; global average pool; Linear -> last
channel, hard-swish, dropout, Linear -> classes) after them. Channel counts below are for
width 1.0; ``bneck_settings`` applies ``width_mult``, ``reduced_tail`` and ``dilated`` exactly as
torchvision does.
"""

from dataclasses import dataclass

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


def make_divisible(v, divisor=8):
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``divisor``), never dropping more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class Bneck:
    """One bneck block with its final channel counts (width multiplier applied)."""

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
    """Return ``(blocks, last_channel)`` for ``arch`` with torchvision's options applied.

    - ``width_mult`` scales every channel count c to ``make_divisible(c * width_mult, 8)``;
    - ``reduced_tail`` halves the channels of the last stage (and the classifier's hidden layer);
    - ``dilated`` gives the last three blocks dilation 2; their depthwise convs then use stride 1
      (output stride 16), see ``Bneck.depthwise_stride``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    if not width_mult > 0:
        raise ValueError(f"width_mult: expected a positive number, got {width_mult!r}")
    rows, last_channel = ARCHS[arch]
    divider = 2 if reduced_tail else 1
    tail_start = len(rows) - TAIL_BLOCKS

    def adjust(c):
        return make_divisible(c * width_mult, 8)

    blocks = []
    for i, (cin, k, exp, cout, se, nl, s) in enumerate(rows):
        dilation = 1
        if i >= tail_start:
            # The first tail block keeps its input width; the rest are reduced throughout.
            if i > tail_start:
                cin, exp = cin // divider, exp // divider
            cout = cout // divider
            if dilated:
                dilation = 2
        blocks.append(Bneck(adjust(cin), k, adjust(exp), adjust(cout), se, nl, s, dilation))
    return blocks, adjust(last_channel // divider)
