"""MobileNetV3 as torchvision defines it, forward-only, in NumPy.

The network is a list of blocks, named exactly as torchvision's modules so that its state_dict
loads unchanged::

    features.0                    stem: 3x3 conv stride 2 -> BN -> hard-swish
    features.1 ... features.N-1   bneck blocks (config.LARGE / config.SMALL rows):
        block.0  1x1 expand conv -> BN -> act     (only when expanded != in channels)
        block.1  kxk depthwise conv -> BN -> act
        block.2  squeeze-and-excite               (only when SE)
        block.3  1x1 project conv -> BN           (no activation; + input when shapes allow)
    features.N                    head: 1x1 conv to 6 * out -> BN -> hard-swish
    avgpool -> classifier.0 (Linear) -> hard-swish -> dropout (identity) -> classifier.3 (Linear)

(The block indices shift down when a block has no expand conv or no SE, as in torchvision.)

``model.forward_reference(x)`` is the computation written plainly, with the readable kernels of
``kernels.py`` and the parameters as stored. ``model(x)`` computes the same with the fast engine of
``fast.py`` (weights prepared once: BN folded, layouts changed); tests hold both to torchvision.
"""

from collections import OrderedDict

import numpy as np

from . import kernels as K
from .config import BN_EPS, bneck_settings
from .errors import StateDictError
from .fast import FastEngine
from .serialization import save_state_dict

ACTIVATIONS = {"RE": K.relu, "HS": K.hard_swish}
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


# --------------------------------------------------------------------------- layout

def conv_layers(blocks, last_channel, num_classes):
    """The network's layers in order as dicts; the single source of names, shapes and sizes.

    Each layer: ``name`` (module prefix), ``kind`` ("conv", "dwconv", "se", "linear"), channel
    counts, kernel, stride, padding, dilation, activation, and ``feature`` (index i of the
    ``features.i`` it belongs to, or None for the classifier), ``ends_feature`` (the last layer of
    its ``features.i``).
    """
    layers = []

    def conv(name, feature, cin, cout, k, stride=1, dilation=1, act=None, depthwise=False):
        layers.append(dict(name=name, kind="dwconv" if depthwise else "conv", feature=feature,
                           cin=cin, cout=cout, k=k, stride=stride, dilation=dilation,
                           padding=(k - 1) // 2 * dilation, act=act))

    conv("features.0", 0, 3, blocks[0].in_channels, 3, stride=2, act="HS")
    for i, b in enumerate(blocks, start=1):
        prefix, j = f"features.{i}.block", 0
        if b.has_expand:
            conv(f"{prefix}.{j}", i, b.in_channels, b.expanded, 1, act=b.activation)
            j += 1
        conv(f"{prefix}.{j}", i, b.expanded, b.expanded, b.kernel, stride=b.depthwise_stride,
             dilation=b.dilation, act=b.activation, depthwise=True)
        j += 1
        if b.use_se:
            layers.append(dict(name=f"{prefix}.{j}", kind="se", feature=i, cin=b.expanded,
                               cout=b.expanded, squeeze=b.squeeze))
            j += 1
        conv(f"{prefix}.{j}", i, b.expanded, b.out_channels, 1, act=None)
    head_in = blocks[-1].out_channels
    conv(f"features.{len(blocks) + 1}", len(blocks) + 1, head_in, 6 * head_in, 1, act="HS")
    layers.append(dict(name="classifier.0", kind="linear", feature=None, cin=6 * head_in,
                       cout=last_channel, act="HS"))
    layers.append(dict(name="classifier.3", kind="linear", feature=None, cin=last_channel,
                       cout=num_classes, act=None))
    for layer, following in zip(layers, layers[1:] + [None]):
        layer["ends_feature"] = layer["feature"] is not None and (
            following is None or following["feature"] != layer["feature"])
    return layers


def parameter_shapes(layers):
    """OrderedDict of torchvision's state_dict keys -> shapes, in torchvision's order.

    ``num_batches_tracked`` counters are listed with shape () too; they are not used at inference.
    """
    shapes = OrderedDict()
    for layer in layers:
        name, kind = layer["name"], layer["kind"]
        if kind in ("conv", "dwconv"):
            cin = 1 if kind == "dwconv" else layer["cin"]
            shapes[f"{name}.0.weight"] = (layer["cout"], cin, layer["k"], layer["k"])
            for field in BN_FIELDS:
                shapes[f"{name}.1.{field}"] = (layer["cout"],)
            shapes[f"{name}.1.num_batches_tracked"] = ()
        elif kind == "se":
            c, s = layer["cin"], layer["squeeze"]
            shapes[f"{name}.fc1.weight"] = (s, c, 1, 1)
            shapes[f"{name}.fc1.bias"] = (s,)
            shapes[f"{name}.fc2.weight"] = (c, s, 1, 1)
            shapes[f"{name}.fc2.bias"] = (c,)
        else:
            shapes[f"{name}.weight"] = (layer["cout"], layer["cin"])
            shapes[f"{name}.bias"] = (layer["cout"],)
    return shapes


def _is_counter(key):
    return key.endswith("num_batches_tracked")


def random_parameters(shapes, dtype=np.float32, seed=0):
    """Parameters initialised as torchvision initialises them.

    Convs: Kaiming normal, fan-out mode (std = sqrt(2 / (out_channels * kh * kw))); conv biases 0;
    BN weight 1, bias 0, running mean 0, running var 1; Linear weight N(0, 0.01), bias 0.
    """
    rng = np.random.default_rng(seed)
    params = OrderedDict()
    for key, shape in shapes.items():
        if _is_counter(key):
            continue
        if key.endswith("running_var") or (key.endswith(".1.weight") and len(shape) == 1):
            value = np.ones(shape)
        elif len(shape) == 4:
            fan_out = shape[0] * shape[2] * shape[3]
            value = rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
        elif len(shape) == 2:
            value = rng.normal(0.0, 0.01, shape)
        else:
            value = np.zeros(shape)
        params[key] = value.astype(dtype)
    return params


# --------------------------------------------------------------------------- the network

class MobileNetV3:
    """MobileNetV3-Large or -Small with torchvision's module names and state_dict.

    Build with ``npmnv3.mobilenet_v3_large(...)`` / ``npmnv3.mobilenet_v3_small(...)``.

    Attributes:
        arch: "mobilenet_v3_large" or "mobilenet_v3_small".
        blocks: the bneck rows (``config.Bneck``) after the options were applied.
        layers: every conv / SE / linear layer in order (see ``conv_layers``).
        params: OrderedDict name -> array in ``dtype``; torchvision's keys minus the BN counters.
        dtype: float32 (default) or float64 (a reference mode).
    """

    def __init__(self, arch="mobilenet_v3_large", *, width_mult=1.0, reduced_tail=False,
                 dilated=False, num_classes=1000, dtype=np.float32, seed=0):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
        if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        self.arch = arch
        self.options = dict(width_mult=width_mult, reduced_tail=reduced_tail, dilated=dilated,
                            num_classes=int(num_classes))
        self.blocks, self.last_channel = bneck_settings(arch, width_mult, reduced_tail, dilated)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.layers = conv_layers(self.blocks, self.last_channel, self.num_classes)
        self.shapes = parameter_shapes(self.layers)
        self.params = random_parameters(self.shapes, dtype, seed)
        self.meta = {}          # e.g. the official weights' categories and preprocessing
        self._engine = None     # the fast path's prepared weights (fast.FastEngine), built on first call

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"MobileNetV3({self.arch!r}, {opts}, dtype={self.dtype.name})"

    # ----------------------------------------------------------------- state dict

    def state_dict(self):
        """torchvision's state_dict as NumPy arrays: same keys, order and shapes.

        ``num_batches_tracked`` entries are 0-d int64 zeros (they play no part at inference).
        """
        out = OrderedDict()
        for key in self.shapes:
            out[key] = np.zeros((), np.int64) if _is_counter(key) else self.params[key].copy()
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters by torchvision's names, casting them to the model's dtype.

        Raises ``StateDictError`` (a ValueError) once, listing every missing, unexpected and
        mis-shaped key. With ``strict=False`` missing and unexpected keys are allowed (as in
        PyTorch), mis-shaped ones never are. ``num_batches_tracked`` keys are optional and ignored.
        """
        problems = []
        missing = [k for k in self.shapes if not _is_counter(k) and k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.shapes]
        if strict and missing:
            problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if strict and unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(map(str, unexpected)))
        wrong = []
        for key, shape in self.shapes.items():
            if key in state_dict and not _is_counter(key):
                got = np.shape(state_dict[key])
                if tuple(got) != shape:
                    wrong.append(f"{key}: expected {shape}, got {tuple(got)}")
                elif not np.issubdtype(np.asarray(state_dict[key]).dtype, np.number):
                    wrong.append(f"{key}: expected a numeric array, got dtype {np.asarray(state_dict[key]).dtype}")
        if wrong:
            problems.append(f"mis-shaped keys ({len(wrong)}): " + "; ".join(wrong))
        if problems:
            raise StateDictError(f"state_dict does not fit {self!r}:\n  " + "\n  ".join(problems))
        for key in self.params:
            if key in state_dict:
                self.params[key] = np.array(state_dict[key], dtype=self.dtype, copy=True)
        self._engine = None

    def save(self, path):
        """Write the weights to npmnv3's ``.npz`` format, with the architecture and ``meta`` as JSON.

        ``npmnv3.mobilenet_v3_large(weights=path)`` (or ``_small``) reads it back.
        """
        metadata = dict(self.meta, arch=self.arch, **self.options)
        save_state_dict(self.state_dict(), path, metadata=metadata)

    # ----------------------------------------------------------------- forward

    def __call__(self, x, return_intermediates=False):
        """Logits for a batch of images.

        x: (N, 3, H, W) float array (normalised as ``npmnv3.preprocess`` does), N >= 1.
        Returns logits (N, num_classes) in the model's dtype, or ``(logits, features)`` when
        ``return_intermediates`` is true, where ``features`` maps ``"features.i"`` to that block's
        NCHW output.
        """
        x = self.check_input(x)
        if self._engine is None:
            self._engine = FastEngine(self)       # weights prepared once, until the next load
        return self._engine.forward(x, return_intermediates)

    def check_input(self, x):
        """Validate ``x`` and return it as a C-contiguous array of the model's dtype."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x: expected a numpy array of shape (N, 3, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected shape (N, 3, H, W), got {x.shape}"
                             + (" (for one image use x[None])" if x.ndim == 3 else ""))
        if 0 in x.shape:
            raise ValueError(f"x: expected a non-empty batch, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x: expected a float array (use npmnv3.preprocess for images), got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _conv_bn(self, x, layer):
        """conv (standard or depthwise) -> BN -> activation, with the readable kernels."""
        p, name = self.params, layer["name"]
        weight = p[f"{name}.0.weight"]
        if layer["kind"] == "dwconv":
            x = K.depthwise_conv2d(x, weight, layer["stride"], layer["padding"], layer["dilation"])
        else:
            x = K.conv2d(x, weight, None, layer["stride"], layer["padding"], layer["dilation"])
        x = K.batch_norm(x, *(p[f"{name}.1.{f}"] for f in ("running_mean", "running_var", "weight", "bias")),
                         eps=BN_EPS)
        return ACTIVATIONS[layer["act"]](x) if layer["act"] else x

    def forward_reference(self, x, return_intermediates=False):
        """The forward pass written plainly: NCHW, BN unfused, one kernel call per operation."""
        x = self.check_input(x)
        p = self.params
        features = OrderedDict()
        block_input = x
        for layer in self.layers:
            i = layer["feature"]
            if layer["kind"] == "se":
                name = layer["name"]
                x = K.squeeze_excite(x, p[f"{name}.fc1.weight"], p[f"{name}.fc1.bias"],
                                     p[f"{name}.fc2.weight"], p[f"{name}.fc2.bias"])
            elif layer["kind"] == "linear":
                if layer["name"] == "classifier.0":
                    x = K.global_avg_pool(x)                  # avgpool + flatten
                x = K.linear(x, p[f"{layer['name']}.weight"], p[f"{layer['name']}.bias"])
                if layer["act"]:
                    x = ACTIVATIONS[layer["act"]](x)          # dropout is the identity at inference
            else:
                x = self._conv_bn(x, layer)
            if layer["ends_feature"]:
                if 1 <= i <= len(self.blocks) and self.blocks[i - 1].use_residual:
                    x = x + block_input
                features[f"features.{i}"] = x
                block_input = x
        return (x, features) if return_intermediates else x
