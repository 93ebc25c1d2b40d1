"""torchvision reference models for npmnv3's tests, notebooks and benchmarks (needs torch).

npmnv3 itself never imports torch; this package is what the comparisons run on the torch side:
torchvision's own networks with random weights under which every layer matters, and helpers to
run them and to hand their weights to npmnv3.
"""

import collections
import contextlib
import copy
import warnings

import numpy as np
import torch
import torchvision


def fresh_batch_norms(model):
    """Give every BatchNorm2d of ``model`` random affine parameters (weight in [0.5, 1.5], bias N(0, 0.25))
    and reset its statistics to be measured as a cumulative average (one batch in train mode sets
    them exactly). Returns the BatchNorms."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.copy_(torch.empty(bn.num_features).uniform_(0.5, 1.5))
        bn.bias.copy_(0.25 * torch.randn(bn.num_features))
        bn.momentum = None
        bn.reset_running_stats()
    return bns


def perturb_statistics(bns):
    """Shift measured running means by 0.1 std and scale the variances by 0.8-1.25 at random (so that
    they are not exactly the batch's), and give each a random ``num_batches_tracked``."""
    for bn in bns:
        c = bn.num_features
        bn.running_mean += 0.1 * bn.running_var.sqrt() * torch.randn(c)
        bn.running_var *= torch.empty(c).uniform_(0.8, 1.25)
        bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))


def random_model(arch, seed=0, **options):
    """A torchvision MobileNetV3 (``arch``: "mobilenet_v3_large" or "mobilenet_v3_small") in eval mode,
    with random weights that make every layer matter.

    Conv weights keep torchvision's Kaiming init; BN weight in [0.5, 1.5], BN bias and SE biases
    random. BatchNorm statistics are then measured on a random 64x64 batch (with torchvision's
    untrained statistics the activations would shrink about 10^8-fold through the depth; measured
    ones keep them within a few orders of magnitude of 1 on other inputs too), and perturbed at
    random (mean shifted by 0.1 std, var scaled by 0.8-1.25) so that they are not the identity. The classifier gets N(0, 1/fan_in) weights and
    random biases so that logits are O(1) and the top-5 order means something.
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(**options)
    with torch.no_grad():
        bns = fresh_batch_norms(model)
        for name, p in model.named_parameters():
            if ".fc1.bias" in name or ".fc2.bias" in name:
                p.normal_(0.0, 0.5)
        for linear in (model.classifier[0], model.classifier[3]):
            linear.weight.normal_(0.0, linear.in_features ** -0.5)
            linear.bias.normal_(0.0, 0.5)
        model.train()
        model(torch.randn(8, 3, 64, 64))
        model.eval()
        perturb_statistics(bns)
    return model


def numpy_state_dict(model):
    """The model's state_dict as NumPy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def features_and_logits(model, x, dtype=np.float32):
    """(logits, {"features.i": output}) of a torchvision MobileNetV3 on NCHW ``x``, as NumPy arrays
    (in float64 on a float64 copy of the model; the model itself is left as it is)."""
    model = copy.deepcopy(model).double() if np.dtype(dtype) == np.float64 else model
    feats = {}
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype))
        for i, layer in enumerate(model.features):
            t = layer(t)
            feats[f"features.{i}"] = t.numpy().copy()
        logits = model.classifier(torch.flatten(model.avgpool(t), 1)).numpy()
    return logits, feats


def smooth_images(count, height, width, seed=0):
    """A batch (count, 3, height, width) of smooth random images, normalised roughly as ImageNet
    images are: a few random colours per image, upsampled bicubically (noise would make every
    position look alike to a network)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 5, 6, generator=g) * 4 - 2
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)


def calibrate(model, inputs, seed=0):
    """Give every BatchNorm of ``model`` random affine parameters and running statistics measured on
    ``inputs`` (each BN's real input), then perturbed; conv and linear biases random too. Returns the
    model in eval mode. With statistics set so, the output depends on the image (randomised
    statistics alone make the network ignore its input and give every pixel the same class)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        bns = fresh_batch_norms(model)
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0.0, 0.5)
        model.train()
        model(inputs)
        model.eval()
        perturb_statistics(bns)
    return model


def random_segmentation_model(arch, seed=0, **options):
    """torchvision's ``arch`` ("lraspp_mobilenet_v3_large" or "deeplabv3_mobilenet_v3_large") with
    random weights whose BatchNorm statistics come from smooth images (``calibrate``), in eval mode."""
    from torchvision.models import segmentation
    torch.manual_seed(seed)
    model = getattr(segmentation, arch)(weights=None, weights_backbone=None, **options)
    return calibrate(model, smooth_images(4, 96, 112, seed), seed)


# --------------------------------------------------------------------------- torch's quantized MobileNetV3

QUANTIZED_LOGIT_LEVELS = 200    # ``random_quantizable_model`` scales the classifier so logits span about this many steps


@contextlib.contextmanager
def quiet_quantization():
    """Silence torch's warnings that eager-mode quantization is deprecated and that unused observers
    (a block's residual add without a residual) were never run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", ".*quantized tensor creation functions", UserWarning)
        warnings.filterwarnings("ignore", "must run observer before calling calculate_qparams", UserWarning)
        yield


@contextlib.contextmanager
def quantized_engine(name):
    """Set ``torch.backends.quantized.engine`` to ``name`` ("qnnpack", "fbgemm", "x86") inside the block only."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def random_quantizable_model(seed=0, images=None):
    """torchvision's quantizable MobileNetV3-Large (``quantization.mobilenet_v3_large(quantize=False)``) with
    random float weights under which every layer matters, in eval mode.

    BatchNorm statistics are measured on ``images`` (default: smooth random images, see ``calibrate``), and
    the last classifier layer is scaled so that on those images the logits spread over a range that int8
    output steps resolve (about ``QUANTIZED_LOGIT_LEVELS`` levels between their smallest and largest value).
    """
    from torchvision.models.quantization import mobilenet_v3_large
    torch.manual_seed(seed)
    images = smooth_images(4, 96, 112, seed) if images is None else images
    model = calibrate(mobilenet_v3_large(weights=None, quantize=False), images, seed)
    with torch.no_grad():
        logits = model(images)
        spread = float(logits.max() - logits.min())
        head = model.classifier[3]
        head.weight.mul_(QUANTIZED_LOGIT_LEVELS / 20 / spread)     # logits in about +-5 at ~0.05 a step
        head.bias.mul_(QUANTIZED_LOGIT_LEVELS / 20 / spread)
    return model


def prepare_qat(float_model):
    """A copy of a quantizable ``float_model`` prepared as torchvision prepares it for quantization-aware
    training: ``fuse_model(is_qat=True)``, ``get_default_qat_qconfig("qnnpack")``, ``prepare_qat``."""
    model = copy.deepcopy(float_model)
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("qnnpack")
    model.train()
    with quiet_quantization():
        torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


def observe(qat_model, images):
    """Run ``images`` through ``qat_model`` in train mode (no gradients): the fake-quant observers record
    every activation's range, as they do during training. Returns the model in eval mode."""
    qat_model.train()
    with torch.no_grad():
        qat_model(images)
    return qat_model.eval()


def end_of_training(qat_model, seed=0, step=0.02):
    """Put an observed ``qat_model`` into the state QAT ends in: observers disabled, BatchNorm statistics
    frozen, and then the weights trained on (here: moved by ``step`` of their std at random), so the
    observed weight ranges are no longer the weights' own. Returns the model in eval mode."""
    qat_model.apply(torch.ao.quantization.disable_observer)
    qat_model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in qat_model.named_parameters():
            if name.endswith("weight") and p.ndim >= 2:
                p.add_(step * p.std() * torch.randn(p.shape, generator=g))
    return qat_model.eval()


def convert(qat_model, engine="qnnpack"):
    """``torch.ao.quantization.convert`` of a copy of ``qat_model`` (in eval mode) under ``engine``."""
    with quantized_engine(engine), quiet_quantization():
        model = copy.deepcopy(qat_model).eval()
        return torch.ao.quantization.convert(model, inplace=False)


def quantized_model(seed=0, images=None, engine="qnnpack"):
    """``(qat_model, quantized_model)``: torch's int8 MobileNetV3-Large built from a random float model as
    torchvision builds it (``random_quantizable_model``, ``prepare_qat``, ``observe`` on ``images`` in train
    mode, ``convert`` under ``engine``). The QAT model's state_dict is what a weights file holds."""
    images = smooth_images(4, 96, 112, seed) if images is None else images
    qat = observe(prepare_qat(random_quantizable_model(seed, images)), images)
    return qat, convert(qat, engine)


def quantized_features_and_logits(qmodel, x, engine="qnnpack"):
    """Run torch's quantized MobileNetV3 on float NCHW ``x`` under ``engine``.

    Returns ``(logits, features)``: the dequantized float logits, and for every ``features.i`` a tuple
    ``(integer values as uint8 NCHW, scale, zero_point)``.
    """
    feats = {}
    with quantized_engine(engine), torch.no_grad():
        t = qmodel.quant(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        for i, layer in enumerate(qmodel.features):
            t = layer(t)
            feats[f"features.{i}"] = (t.int_repr().numpy().copy(), t.q_scale(), t.q_zero_point())
        t = qmodel.classifier(torch.flatten(qmodel.avgpool(t), 1))
        logits = qmodel.dequant(t).numpy().copy()
    return logits, feats


def textured_images(count, height, width, seed=0, noise=0.3):
    """A batch (count, 3, height, width) of images in [0, 1] for a detector: ``smooth_images`` mapped into
    [0, 1], plus uniform pixel noise of amplitude ``noise`` (texture: on smooth images alone a random
    depthwise conv mostly cancels itself, and float32 rounding grows through the layers)."""
    g = torch.Generator().manual_seed(seed + 1)
    texture = noise * (torch.rand(count, 3, height, width, generator=g) - 0.5)
    return ((smooth_images(count, height, width, seed) + 2) / 4 + texture).clamp(0, 1)


class DetectorHeads(torch.nn.Module):
    """A torchvision SSD's backbone and heads as one module: normalised (N, 3, H, W) batch -> the heads'
    ``{"bbox_regression", "cls_logits"}`` (no transform, no postprocess; runs in train mode too)."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return self.detector.head(list(self.detector.backbone(x).values()))


def random_detection_model(seed=0, num_classes=91, logit_std=4.0, background=20.0, calibration_images=16):
    """torchvision's ``ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)`` in eval mode, with
    random weights under which the detections depend on the image.

    torchvision's own init (every conv N(0, 0.03), BN statistics 0 and 1) makes the head outputs
    nearly the same for every image (they vary by about 1e-8). Here the conv weights are drawn
    variance-preserving instead (N(0, 2 / fan_in)), and the BatchNorm statistics are measured on
    ``calibration_images`` textured images at 320 x 320 (``textured_images``; the 1x1 last map needs
    many to give its BatchNorms a variance) and perturbed (``calibrate``). The classification head's
    last convs are then scaled so that its logits have a standard deviation of ``logit_std`` on those
    images, and ``background`` is added to the background logit of every default box: as in a trained
    detector most boxes are background, a few hundred (box, class) pairs per image score above
    torchvision's 0.001, and their scores are peaked rather than all near 1 / num_classes.
    """
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    torch.manual_seed(seed)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
        images = model.transform(list(textured_images(calibration_images, 320, 320, seed)))[0].tensors
        heads = calibrate(DetectorHeads(model), images, seed)
        factor = logit_std / float(heads(images)["cls_logits"].std())
        for block in model.head.classification_head.module_list:
            block[1].weight *= factor
            block[1].bias *= factor
            block[1].bias[::num_classes] += background       # channel a * num_classes: box a's background
    return model.eval()


def edge_case_tensors():
    """Tensors that exercise a torch.save reader: views with offsets and steps, transposes, shared
    storages, stride-0 expands, empty tensors (one at the end of its storage), a negative-bit view,
    rank 8, and every dtype npmnv3 reads (float16/bfloat16/float64, ints, bool, 0-d)."""
    g = torch.Generator().manual_seed(1)
    flat = torch.arange(20, dtype=torch.float32)
    base = torch.randn(4, 5, generator=g)
    half = torch.randn(3, 4, generator=g).half()
    bf16 = torch.randn(3, 4, generator=g).bfloat16()
    flags = torch.tensor([True, False, True, True])
    return collections.OrderedDict([
        ("flat", flat),
        ("view_with_offset", flat[5:11].view(2, 3)),          # shares flat's storage
        ("step_slice", flat[1::3]),
        ("transposed", base.t()),
        ("column", base[:, 2]),
        ("base", base),
        ("expand_stride0", torch.tensor([[1.5], [2.5]]).expand(2, 4)),
        ("scalar_expand", torch.tensor(7.25).expand(3, 3)),
        ("float16", half),
        ("float16_transposed", half.t()),
        ("bfloat16", bf16),
        ("bfloat16_view", bf16[1:, ::2]),
        ("float64", torch.randn(2, 2, generator=g, dtype=torch.float64)),
        ("int64_0d", torch.tensor(42)),
        ("int64", torch.tensor([-(2 ** 62), 2 ** 62 + 1])),
        ("int32", torch.tensor([-(2 ** 31), 2 ** 31 - 1], dtype=torch.int32)),
        ("int16", torch.tensor([-3, 4], dtype=torch.int16)),
        ("int8", torch.tensor([-128, 127], dtype=torch.int8)),
        ("uint8", torch.tensor([0, 255, 7], dtype=torch.uint8)),
        ("bool", flags),
        ("bool_view", flags[1:]),
        ("bool_0d", torch.tensor(True)),
        ("empty", torch.empty(0, 3)),
        ("empty_at_end", flat[20:]),
        ("specials", torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])),
        ("negative_bit", torch.randn(3, generator=g, dtype=torch.cfloat).conj().imag),
        ("rank8", torch.randn(1, 2, 1, 2, 1, 2, 1, 2, generator=g)),
    ])
