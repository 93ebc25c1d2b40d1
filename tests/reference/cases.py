"""The inputs of the reference fixtures, made with NumPy and Pillow only.

``make_reference.py`` (with torch) and ``tests/test_reference.py`` (without) both build their
inputs here, so only torch's outputs need to be stored. Every input comes from a seeded
``np.random.default_rng`` or from raw bytes handed to Pillow; nothing depends on the order in
which cases are built.

Four kinds of case:

``kernel_cases()``
    Arrays for the kernels of ``npmnv3.kernels``, in float64 and float32.
``MODEL_CASES`` / ``model_weights`` / ``model_input``
    MobileNetV3 networks with random weights under which every layer matters, and small odd inputs.
``IMAGE_CASES`` / ``make_image``
    PIL images of several sizes and modes, for ``npmnv3.preprocess`` at ``RESIZES``.
``FILE_CASES``
    The names of the committed ``torch.save`` files (their tensors are made by torch, in
    ``make_reference.py``; the files themselves are the input).
"""

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from npmnv3 import kernels as K
from npmnv3.config import Block, classifier_layers, mobilenet_v3_features, parameter_list

HERE = Path(__file__).resolve().parent
DTYPES = (np.float64, np.float32)


def case_rng(*parts):
    """A NumPy generator seeded by the text of ``parts``.

    Parameters
    ----------
    *parts : object
        What names the stream (case kind, case id, ...); joined with "/" and hashed.

    Returns
    -------
    numpy.random.Generator
        The same stream for the same parts, wherever and in whatever order cases are built.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------- kernels

@dataclass(frozen=True)
class KernelCase:
    """One call of a kernel of ``npmnv3.kernels``.

    Attributes
    ----------
    id : str
        Unique name; also the key of the output in ``kernels.npz``.
    op : str
        The vectorised kernel's name in ``npmnv3.kernels`` (``op + "_naive"`` is the plain one).
    arrays : dict
        Array arguments by name, in ``dtype``.
    params : dict
        Other keyword arguments (stride, padding, size, ...).
    small : bool
        Whether the plain loop version is quick enough to run on it too.
    """

    id: str
    op: str
    arrays: dict = field(compare=False)
    params: dict = field(compare=False)
    small: bool = True

    @property
    def dtype(self):
        return next(iter(self.arrays.values())).dtype


def _cast(arrays, dtype):
    return {name: np.ascontiguousarray(a, dtype) for name, a in arrays.items()}


# Values on and around the kinks of ReLU, ReLU6, hard-sigmoid and hard-swish (-3, 0, 3, 6), and large
# ones where sigmoid saturates (exp(800) overflows even in float64).
KINKS = [-3.0, 3.0, 0.0, -3.0001, 2.9999, -1e-9, 1e-9, 6.0, 5.9999, 6.0001, -2.5, 2.5,
         -40.0, 40.0, -800.0, 800.0, -88.5, 88.5]


def _conv_cases(dtype):
    for stride, k, dilation, n in itertools.product((1, 2), (3, 5), (1, 2), (1, 3)):
        name = f"s{stride}-k{k}-d{dilation}-n{n}-{np.dtype(dtype).name}"
        pad = (k - 1) // 2 * dilation
        r = case_rng("conv2d", name)
        arrays = dict(x=r.standard_normal((n, 3, 13, 11)), weight=r.standard_normal((5, 3, k, k)),
                      bias=r.standard_normal(5))
        yield KernelCase(f"conv2d-{name}", "conv2d", _cast(arrays, dtype),
                         dict(stride=stride, padding=pad, dilation=dilation))
        r = case_rng("depthwise", name)
        arrays = dict(x=r.standard_normal((n, 6, 15, 13)), weight=r.standard_normal((6, 1, k, k)))
        yield KernelCase(f"depthwise_conv2d-{name}", "depthwise_conv2d", _cast(arrays, dtype),
                         dict(stride=stride, padding=pad, dilation=dilation))
    d = np.dtype(dtype).name
    for n in (1, 3):
        r = case_rng("conv1x1", n, d)
        arrays = dict(x=r.standard_normal((n, 7, 9, 5)), weight=r.standard_normal((4, 7, 1, 1)))
        yield KernelCase(f"conv2d-1x1-n{n}-{d}", "conv2d", _cast(arrays, dtype), {})
    r = case_rng("stem", d)
    arrays = dict(x=r.standard_normal((2, 3, 23, 31)), weight=r.standard_normal((16, 3, 3, 3)))
    yield KernelCase(f"conv2d-stem-{d}", "conv2d", _cast(arrays, dtype), dict(stride=2, padding=1), small=False)
    r = case_rng("depthwise-wide", d)
    arrays = dict(x=r.standard_normal((2, 32, 17, 15)), weight=r.standard_normal((32, 1, 5, 5)))
    yield KernelCase(f"depthwise_conv2d-wide-{d}", "depthwise_conv2d", _cast(arrays, dtype),
                     dict(stride=2, padding=4, dilation=2), small=False)


def _elementwise_cases(dtype):
    d = np.dtype(dtype).name
    x = np.concatenate([KINKS, case_rng("activations", d).uniform(-8, 8, 220 - len(KINKS))]).reshape(1, 2, 10, 11)
    for op in ("relu", "relu6", "sigmoid", "hard_sigmoid", "hard_swish"):
        yield KernelCase(f"{op}-{d}", op, _cast(dict(x=x), dtype), {})
    for n, eps in ((1, 0.001), (3, 0.001), (3, 1e-5)):
        r = case_rng("batch_norm", n, eps, d)
        arrays = dict(x=r.standard_normal((n, 5, 7, 9)), running_mean=r.standard_normal(5),
                      running_var=r.uniform(0.2, 3.0, 5), weight=r.uniform(0.5, 1.5, 5), bias=r.standard_normal(5))
        yield KernelCase(f"batch_norm-n{n}-eps{eps:g}-{d}", "batch_norm", _cast(arrays, dtype), dict(eps=eps))
    for n in (1, 3):
        r = case_rng("pool-linear-se", n, d)
        yield KernelCase(f"global_avg_pool-n{n}-{d}", "global_avg_pool",
                         _cast(dict(x=r.standard_normal((n, 6, 5, 3))), dtype), {})
        arrays = dict(x=r.standard_normal((n, 6)), weight=r.standard_normal((4, 6)), bias=r.standard_normal(4))
        yield KernelCase(f"linear-n{n}-{d}", "linear", _cast(arrays, dtype), {})
        c, s = 24, 8
        arrays = dict(x=r.standard_normal((n, c, 5, 7)), fc1_weight=r.standard_normal((s, c, 1, 1)),
                      fc1_bias=r.standard_normal(s), fc2_weight=r.standard_normal((c, s, 1, 1)),
                      fc2_bias=r.standard_normal(c))
        yield KernelCase(f"squeeze_excite-n{n}-{d}", "squeeze_excite", _cast(arrays, dtype), {})


# (input shape, output size, small): up, down, mixed, from and to a single pixel, unchanged, odd sizes
RESIZE_CASES = [
    ((1, 2, 7, 5), (13, 11), True),
    ((2, 3, 17, 23), (9, 7), True),
    ((1, 1, 5, 8), (12, 3), True),
    ((1, 2, 1, 1), (4, 5), True),
    ((1, 1, 6, 7), (1, 1), True),
    ((3, 2, 9, 9), (9, 9), True),
    ((1, 3, 2, 3), (7, 11), True),
    ((1, 3, 97, 120), (31, 37), False),
    ((1, 2, 11, 9), (47, 39), False),
]


def _interpolate_cases(dtype):
    d = np.dtype(dtype).name
    for (shape, size, small), align_corners in itertools.product(RESIZE_CASES, (False, True)):
        name = f"interpolate-{'x'.join(map(str, shape))}-to-{size[0]}x{size[1]}-ac{int(align_corners)}-{d}"
        x = case_rng(name).standard_normal(shape)
        yield KernelCase(name, "interpolate", _cast(dict(x=x), dtype),
                         dict(size=size, align_corners=align_corners), small=small)


def kernel_cases():
    """Every kernel case.

    Returns
    -------
    list of KernelCase
        conv2d, depthwise_conv2d (strides 1/2, kernels 3/5, dilations 1/2, batches 1/3, odd sizes),
        batch_norm, the activations, global_avg_pool, linear, squeeze_excite and interpolate
        (align_corners both ways; up, down, odd sizes), each in float64 and float32; unique ids.
    """
    cases = [c for dtype in DTYPES
             for make in (_conv_cases, _elementwise_cases, _interpolate_cases) for c in make(dtype)]
    assert len({c.id for c in cases}) == len(cases)
    return cases


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelCase:
    """A MobileNetV3 (``arch`` with torchvision's ``options``) whose weights come from ``seed``."""

    id: str
    arch: str
    options: tuple
    seed: int

    @property
    def kwargs(self):
        return dict(self.options)


MODEL_CASES = [
    ModelCase("large", "mobilenet_v3_large", (), 1),
    ModelCase("small", "mobilenet_v3_small", (), 2),
    ModelCase("small-reduced_tail-dilated-10", "mobilenet_v3_small",
              (("reduced_tail", True), ("dilated", True), ("num_classes", 10)), 3),
    ModelCase("large-width0.75", "mobilenet_v3_large", (("width_mult", 0.75),), 4),
]
MODEL_INPUTS = {"1x3x33x45": (1, 3, 33, 45), "2x3x37x29": (2, 3, 37, 29)}
STATS_BATCH = (8, 3, 64, 64)     # the random batch BatchNorm statistics are measured on


def model_input(name, dtype):
    """The input ``name`` (a key of ``MODEL_INPUTS``): N(0, 1) values in ``dtype``."""
    return case_rng("model input", name).standard_normal(MODEL_INPUTS[name]).astype(dtype)


def model_layers(case):
    """(features, classifier) layer records of ``case``, as npmnv3 builds them."""
    options = case.kwargs
    features, last_channel = mobilenet_v3_features(case.arch, options.get("width_mult", 1.0),
                                                   options.get("reduced_tail", False), options.get("dilated", False))
    return features, classifier_layers(features[-1].out_channels, last_channel, options.get("num_classes", 1000))


def _f32(a):
    """``a`` rounded to float32, kept in float64 (the weights are float32 numbers in both dtypes)."""
    return np.asarray(a, np.float32).astype(np.float64)


def _initial_value(key, shape, kind, rng):
    if kind == "conv":                                  # Kaiming normal, fan-out (torchvision's init)
        return rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[2] * shape[3])), shape)
    if kind == "linear":                                # logits O(1), so that their order means something
        return rng.normal(0.0, shape[1] ** -0.5, shape)
    if kind == "ones":                                  # BatchNorm weight
        return rng.uniform(0.5, 1.5, shape)
    if kind == "zeros":                                 # SE and classifier biases; BatchNorm bias
        is_bn = not (key.startswith("classifier.") or key.endswith((".fc1.bias", ".fc2.bias")))
        return (0.25 if is_bn else 0.5) * rng.standard_normal(shape)
    if kind == "counter":
        return np.array(rng.integers(1, 1000), np.int64)
    return np.zeros(shape) if kind == "mean" else np.ones(shape)   # measured below


def _measure(x, conv, weights, rng):
    """Run ``conv`` (a ``config.Conv``) on ``x`` in float64, first setting its BatchNorm statistics to
    those of its own output, perturbed (mean moved by 0.1 std, variance scaled by 0.8-1.25) so that
    the BatchNorm is not just a standardisation."""
    weight = weights[conv.weight_key]
    if conv.depthwise:
        y = K.depthwise_conv2d(x, weight, conv.stride, conv.padding, conv.dilation)
    else:
        y = K.conv2d(x, weight, weights.get(conv.bias_key) if conv.bias else None,
                     conv.stride, conv.padding, conv.dilation)
    if conv.norm:
        mean_key, var_key = conv.batch_norm_keys()[:2]
        mean, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))
        weights[mean_key] = _f32(mean + 0.1 * np.sqrt(var) * rng.standard_normal(mean.shape))
        weights[var_key] = _f32(var * rng.uniform(0.8, 1.25, var.shape))
        y = K.batch_norm(y, *(weights[k] for k in conv.batch_norm_keys()), eps=conv.eps)
    if conv.activation == "RE":
        y = K.relu(y)
    elif conv.activation == "HS":
        y = K.hard_swish(y)
    return y


def model_weights(case):
    """The state_dict of a model case, with random weights under which every layer matters.

    Parameters
    ----------
    case : ModelCase

    Returns
    -------
    collections.OrderedDict
        torchvision's keys in its order: float32 arrays, and 0-d int64 ``num_batches_tracked``.

    Notes
    -----
    Conv weights: Kaiming normal (fan-out); BatchNorm weights in [0.5, 1.5], biases N(0, 0.25^2);
    SE and classifier biases N(0, 0.5^2); classifier weights N(0, 1/fan_in). BatchNorm running
    statistics are measured layer by layer with ``npmnv3.kernels`` on a random batch
    (``STATS_BATCH``; a wrong kernel shows up here as different weights, besides failing its own
    test) and then perturbed, which keeps every layer's output O(1) on other inputs
    too; with torchvision's untrained statistics activations would shrink about 10^8-fold and
    most layers would not matter. Every value is a float32 number, so the float32 and float64
    models hold the same weights.
    """
    features, classifier = model_layers(case)
    rng = case_rng("model weights", case.id, case.seed)
    weights = OrderedDict()
    for key, shape, kind in parameter_list(features + classifier):
        value = _initial_value(key, shape, kind, rng)
        weights[key] = value if kind == "counter" else _f32(value)
    stats_rng = case_rng("model statistics", case.id, case.seed)
    x = case_rng("model statistics input", case.id, case.seed).standard_normal(STATS_BATCH)
    for layer in features:
        if not isinstance(layer, Block):
            x = _measure(x, layer, weights, stats_rng)
            continue
        y = x
        for conv in (layer.expand, layer.depthwise):
            if conv is not None:
                y = _measure(y, conv, weights, stats_rng)
        if layer.se is not None:
            y = K.squeeze_excite(y, *(weights[f"{layer.se.name}.{p}"]
                                      for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))
        y = _measure(y, layer.project, weights, stats_rng)
        x = y + x if layer.residual else y
    return OrderedDict((k, v if v.dtype == np.int64 else v.astype(np.float32)) for k, v in weights.items())


def weight_checksums(weights):
    """(n_tensors, 2) float64: each tensor's sum and sum of absolute values, to tell whether two
    sets of weights made from the same case are the same."""
    return np.array([[np.sum(v, dtype=np.float64), np.sum(np.abs(v), dtype=np.float64)]
                     for v in weights.values()])


# --------------------------------------------------------------------------- images

@dataclass(frozen=True)
class ImageCase:
    """A ``width`` x ``height`` PIL image of ``mode`` with random pixels from ``seed``."""

    id: str
    width: int
    height: int
    mode: str
    seed: int


IMAGE_CASES = [
    ImageCase("rgb-1x1", 1, 1, "RGB", 1),
    ImageCase("rgb-7x5", 7, 5, "RGB", 2),
    ImageCase("rgb-257x300", 257, 300, "RGB", 3),
    ImageCase("rgb-500x7", 500, 7, "RGB", 4),
    ImageCase("rgb-224x224", 224, 224, "RGB", 5),
    ImageCase("rgb-233x231", 233, 231, "RGB", 6),
    ImageCase("l-261x190", 261, 190, "L", 7),
    ImageCase("p-190x261", 190, 261, "P", 8),
    ImageCase("p-transparency-99x101", 99, 101, "P+transparency", 9),
    ImageCase("rgba-301x255", 301, 255, "RGBA", 10),
    ImageCase("cmyk-101x77", 101, 77, "CMYK", 11),
    ImageCase("i16-150x170", 150, 170, "I;16", 12),
]
RESIZES = (256, 232)     # IMAGENET1K_V1 (and Small) and Large IMAGENET1K_V2; both crop 224
CHANNELS = {"RGB": 3, "L": 1, "P": 1, "P+transparency": 1, "RGBA": 4, "CMYK": 4}


def make_image(case):
    """The PIL image of an ``ImageCase``.

    Built from raw random bytes with ``Image.frombytes`` (and a random palette and transparency for
    P), so no Pillow conversion is involved in making it.

    Parameters
    ----------
    case : ImageCase

    Returns
    -------
    PIL.Image.Image
    """
    rng = case_rng("image", case.id, case.seed)
    size = (case.width, case.height)
    if case.mode == "I;16":
        values = rng.integers(0, 65536, (case.height, case.width), dtype=np.uint16)
        return Image.frombytes("I;16", size, values.astype("<u2").tobytes())
    channels = CHANNELS[case.mode]
    pixels = rng.integers(0, 256, (case.height, case.width, channels), dtype=np.uint8)
    image = Image.frombytes(case.mode.split("+")[0], size, pixels.tobytes())
    if case.mode.startswith("P"):
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    if case.mode == "P+transparency":
        image.info["transparency"] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
    return image


def image_digest(image):
    """SHA-256 of an image's mode, size, palette and pixel bytes: tells whether an input is the one
    the fixture was made from."""
    h = hashlib.sha256(f"{image.mode} {image.size}".encode())
    h.update(image.tobytes())
    palette = image.getpalette() if image.mode.startswith("P") else None
    if palette:
        h.update(bytes(palette))
    transparency = image.info.get("transparency")
    if transparency is not None:
        h.update(repr(transparency).encode())
    return h.hexdigest()


def array_digest(a):
    """SHA-256 of an array's float32 bytes in C order: what a bit-exact comparison compares."""
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


# --------------------------------------------------------------------------- torch.save files

# name -> what it exercises. The files are committed in files/; make_reference.py writes them.
FILE_CASES = {
    "tensors_zip.pth": "zip format: views, shared storages, stride 0, float16/bfloat16/float64, int64 0-d, bool, uint8",
    "tensors_zip_protocol4.pth": "the same tensors, zip format, pickle protocol 4",
    "tensors_legacy.pth": "the same tensors, legacy format (_use_new_zipfile_serialization=False)",
    "parameters.pth": "nn.Parameter values (torch._utils._rebuild_parameter)",
    "checkpoint.pth": "a checkpoint with the state dict nested under 'state_dict' beside other entries",
    "checkpoint_legacy.pth": "the checkpoint in the legacy format",
}
FILES_DIR = HERE / "files"
