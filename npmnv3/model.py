"""MobileNetV3 as torchvision defines it, forward-only, in NumPy: the readable network.

The network is the list of layer records of ``config.mobilenet_v3_features`` and
``config.classifier_layers``, named exactly as torchvision's modules so that its state_dict loads
unchanged::

    features.0                    stem: 3x3 conv stride 2 -> BN -> hard-swish          (a Conv)
    features.1 ... features.N-1   bneck blocks, one per row of config.LARGE / SMALL   (Blocks)
    features.N                    head: 1x1 conv to 6 * out -> BN -> hard-swish       (a Conv)
    avgpool -> classifier.0 (Linear) -> hard-swish -> dropout (identity) -> classifier.3 (Linear)

Four functions compute it on NCHW arrays with the plain kernels of ``kernels.py``, one layer each:

    conv_bn_act(x, conv, params)       a Conv record: convolution -> BatchNorm -> activation
    squeeze_excite(x, se, params)      a SqueezeExcite record
    bneck(x, block, params)            a Block record: the paper's Figure 4
    linear(x, layer, params)           a Linear record

and ``forward_features`` chains them over ``features.0 ... features.N``. Each takes an optional
``outputs`` dict that receives every layer's output under the layer's name, so that any point of
the network (a ``features.i``, or the expansion conv inside a block) can be looked at.

``model.forward_reference(x)`` is this readable path. ``model(x)`` computes the same with the fast
engine (``engine/``: weights prepared once, BN folded, NHWC layouts); tests hold both to torchvision.
"""

import numpy as np

from . import kernels as K
from .config import ARCHS, Block, classifier_layers, mobilenet_v3_features, parameter_list
from .engine import Engine
from .network import Network, check_input, check_positive
from .parameters import is_counter
from .summary import layer_costs
from .threads import blas_threads

ACTIVATIONS = {"RE": K.relu, "RE6": K.relu6, "HS": K.hard_swish, "SIG": K.sigmoid}


# --------------------------------------------------------------------------- the readable layers

def keep(outputs, name, y):
    """Record ``y`` as the output of layer ``name`` when an ``outputs`` dict is given; return ``y``."""
    if outputs is not None:
        outputs[name] = y
    return y


def conv_bn_act(x, conv, params, outputs=None):
    """One ``config.Conv``: convolution, then BatchNorm, then the activation (each only if the record has it).

    x: (N, C_in, H, W) -> (N, C_out, H_out, W_out). A depthwise conv (groups = C) convolves each
    channel with its own kernel; BatchNorm uses the running statistics::

        y = act((conv(x, W) + b - running_mean) / sqrt(running_var + eps) * gamma + beta)
    """
    weight = params[conv.weight_key]
    if conv.depthwise:
        y = K.depthwise_conv2d(x, weight, conv.stride, conv.padding, conv.dilation)
    elif conv.groups == 1:
        bias = params[conv.bias_key] if conv.bias else None
        y = K.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
    else:
        raise ValueError(f"{conv.name}: grouped convolutions other than depthwise are not supported")
    if conv.norm:
        y = K.batch_norm(y, *(params[key] for key in conv.batch_norm_keys()), eps=conv.eps)
    if conv.activation:
        y = ACTIVATIONS[conv.activation](y)
    return keep(outputs, conv.name, y)


def squeeze_excite(x, se, params, outputs=None):
    """One ``config.SqueezeExcite``: each channel of x (N, C, H, W) scaled by a gate in [0, 1] computed
    from all channels' means (``kernels.squeeze_excite``)."""
    y = K.squeeze_excite(x, *(params[f"{se.name}.{p}"] for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))
    return keep(outputs, se.name, y)


def bneck(x, block, params, outputs=None):
    """One bneck block (``config.Block``), the paper's Figure 4.

    x: (N, C_in, H, W) -> (N, C_out, H / s, W / s). A 1x1 conv expands the channels, a k x k
    depthwise conv filters each channel on its own (with the block's stride), squeeze-and-excite
    reweights the channels, and a 1x1 conv without activation projects them down; when stride
    and channels allow, the input is added back::

        y = project(se(depthwise(expand(x))))  (+ x)
    """
    y = x
    if block.expand is not None:                # only when it changes the channel count
        y = conv_bn_act(y, block.expand, params, outputs)
    y = conv_bn_act(y, block.depthwise, params, outputs)
    if block.se is not None:
        y = squeeze_excite(y, block.se, params, outputs)
    y = conv_bn_act(y, block.project, params, outputs)       # linear: no activation
    if block.residual:                          # stride 1 and C_in == C_out
        y = y + x
    return keep(outputs, block.name, y)


def linear(x, layer, params, outputs=None):
    """One ``config.Linear``: (N, in) -> (N, out), y = act(x W^T + b)."""
    y = K.linear(x, params[f"{layer.name}.weight"], params[f"{layer.name}.bias"])
    if layer.activation:
        y = ACTIVATIONS[layer.activation](y)
    return keep(outputs, layer.name, y)


def forward_features(x, features, params, outputs=None):
    """Run the ``features`` records (Conv and Block) one after the other on NCHW ``x``."""
    for layer in features:
        x = bneck(x, layer, params, outputs) if isinstance(layer, Block) else conv_bn_act(x, layer, params, outputs)
    return x


def classify(x, classifier, params, outputs=None):
    """Global average pooling, then the classifier's Linear records: (N, C, H, W) -> (N, classes).
    Dropout, between them in torchvision, is the identity at inference."""
    x = K.global_avg_pool(x)
    for layer in classifier:
        x = linear(x, layer, params, outputs)
    return x


# --------------------------------------------------------------------------- recognising weights

RECOGNISED_WIDTHS = (1.0, 0.75, 0.5, 1.25, 1.5, 0.35)     # width multipliers ``recognise`` tries


def recognise(state_dict):
    """What MobileNetV3 a state dict is: ``{"arch", "width_mult", "reduced_tail", "num_classes"}`` or None.

    The keys and shapes are matched against both architectures with torchvision's options (width
    multipliers ``RECOGNISED_WIDTHS``, reduced tail or not; ``dilated`` changes no shape, so it
    cannot be told and is taken as False). ``num_batches_tracked`` counters are ignored.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not is_counter(k)}
    head, stem = shapes.get("classifier.3.weight"), shapes.get("features.0.0.weight")
    if head is None or stem is None or len(head) != 2 or len(stem) != 4:
        return None
    for arch in ARCHS:
        for reduced_tail in (False, True):
            for width_mult in RECOGNISED_WIDTHS:
                features, last_channel = mobilenet_v3_features(arch, width_mult, reduced_tail)
                if features[0].out_channels != stem[0]:
                    continue
                layers = features + classifier_layers(features[-1].out_channels, last_channel, head[0])
                expected = {key: tuple(shape) for key, shape, kind in parameter_list(layers) if kind != "counter"}
                if expected == shapes:
                    return dict(arch=arch, width_mult=width_mult, reduced_tail=reduced_tail, num_classes=head[0])
    return None


def describe_weights(state_dict):
    """``(recognise(state_dict), "these weights are ...")``: what a state dict is, in one phrase."""
    found = recognise(state_dict)
    count = f"{len(state_dict)} tensors"
    if found is None:
        return None, f"these weights are no MobileNetV3 npmnv3 knows ({count})"
    options = [f"width_mult={found['width_mult']}"] if found["width_mult"] != 1.0 else []
    options += ["reduced_tail=True"] if found["reduced_tail"] else []
    options += [f"num_classes={found['num_classes']}"] if found["num_classes"] != 1000 else []
    return found, f"these weights are {found['arch']}" + (f" ({', '.join(options)})" if options else "") + f" ({count})"


# --------------------------------------------------------------------------- the network

class MobileNetV3(Network):
    """MobileNetV3-Large or -Small with torchvision's module names and state_dict.

    Build with ``npmnv3.mobilenet_v3_large(...)`` / ``npmnv3.mobilenet_v3_small(...)``.

    Attributes
    ----------
    arch : str
        "mobilenet_v3_large" or "mobilenet_v3_small".
    features : list
        ``features.0 ... features.N`` as layer records (``config.Conv`` and ``config.Block``).
    classifier : list
        The two ``config.Linear`` records.
    params, dtype, threads, meta
        See ``network.Network``.
    """

    def __init__(self, arch="mobilenet_v3_large", *, width_mult=1.0, reduced_tail=False,
                 dilated=False, num_classes=1000, dtype=np.float32, seed=0, threads=None):
        check_positive(num_classes, "num_classes")
        self.arch = arch
        self.options = dict(width_mult=width_mult, reduced_tail=reduced_tail, dilated=dilated,
                            num_classes=int(num_classes))
        self.features, last_channel = mobilenet_v3_features(arch, width_mult, reduced_tail, dilated)
        self.classifier = classifier_layers(self.features[-1].out_channels, last_channel, int(num_classes))
        self.num_classes = int(num_classes)
        super().__init__(self.features + self.classifier, dtype=dtype, seed=seed, threads=threads)

    def recognise(self, state_dict):
        return describe_weights(state_dict)

    def layer_table(self, height, width):
        """``summary``'s rows: one per features.i and per classifier layer at an (H, W) input."""
        return layer_costs(self.features + self.classifier, height, width)[0]

    def make_engine(self):
        return Engine(self.features, self.params, classifier=self.classifier)

    def __call__(self, x, return_intermediates=False):
        """Logits for a batch of images, computed by the fast engine.

        x: (N, 3, H, W) float array (normalised as ``npmnv3.preprocess`` does), N >= 1.
        Returns logits (N, num_classes) in the model's dtype, or ``(logits, features)`` when
        ``return_intermediates`` is true, where ``features`` maps ``"features.i"`` to that block's
        NCHW output.
        """
        x = check_input(x, self.dtype)
        taps = [layer.name for layer in self.features] if return_intermediates else []
        out = self.engine().run(x, taps=taps, threads=self.threads)
        logits = out.pop("logits")
        return (logits, out) if return_intermediates else logits

    def forward_reference(self, x, return_intermediates=False):
        """The forward pass written plainly: NCHW, BN unfused, one kernel call per operation."""
        x = check_input(x, self.dtype)
        outputs = {} if return_intermediates else None
        with blas_threads(self.threads):
            y = forward_features(x, self.features, self.params, outputs)
            logits = classify(y, self.classifier, self.params)
        if not return_intermediates:
            return logits
        return logits, {layer.name: outputs[layer.name] for layer in self.features}
