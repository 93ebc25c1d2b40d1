"""Int8 MobileNetV3-Large: torchvision's quantized network (``quantization.mobilenet_v3_large``) in integer NumPy.

The paper chose hard-swish and hard-sigmoid partly because they quantize well (section 5.2): a
piecewise-linear function of a uint8 input is exactly a 256-entry table, and nothing in it needs
``exp``. torchvision ships the proof, weights trained with quantization-aware training (QAT). This
module reads their file and runs the network as PyTorch's quantized kernels do (``qkernels.py``).

Reading. The weights file is a QAT state dict: torchvision's model after ``fuse_model(is_qat=True)``,
``qconfig = get_default_qat_qconfig("qnnpack")`` and ``prepare_qat``, i.e. the float weights (each
conv fused with its BatchNorm into ``name.0``, the BatchNorm as ``name.0.bn``) plus, for every
weight and every activation, a fake-quant observer's buffers (``weight_fake_quant.*``,
``activation_post_process.*``: the range it saw, ``min_val`` / ``max_val``, and the scale and zero
point of the last training step). ``qat_parameters`` lists those keys from the same layer records
the float network uses (``config.py``).

Converting, as ``torch.ao.quantization.convert`` does (``convert``):

- BatchNorm folded into the conv in float32 (``fold_batch_norm``);
- the weight observer sees the folded weights once more when it is enabled (``observe_weights``), then
  weight scale = max(-min, max) / 127.5 and int8 weights = rint(w / scale) (symmetric, zero point 0);
- every activation's uint8 scale and zero point from its observer's range (``qkernels.affine_qparams``);
- biases in the accumulator's units, and each layer's requantization multiplier, from the scale of
  the tensor that flows into it.

Running, readably (``QuantizedMobileNetV3.forward_reference``): float NCHW input is quantized with
the ``quant`` stub's scale and zero point; from there every layer takes and returns a
``qkernels.QTensor`` (uint8 values, scale, zero point) until the logits are dequantized. The
readable functions below mirror ``model.py``'s: ``quantized_conv``, ``quantized_squeeze_excite``,
``quantized_bneck`` (the paper's Figure 4), ``quantized_linear``. ``model(x)`` computes the same
integers by the fast path, ``qengine.py`` (NHWC, centred float32 values, float32 accumulation
where it is exact).
"""

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import numpy as np

from . import qengine as QE
from . import qkernels as QK
from .config import Block, Conv, Linear, SqueezeExcite, classifier_layers, mobilenet_v3_features
from .model import keep
from .engine import chunk_bounds
from .engine.parallel import run_tasks
from .network import Network, check_input, check_positive
from .summary import layer_costs
from .threads import blas_threads

F32 = np.float32
ARCH = "quantized_mobilenet_v3_large"
INPUT_STUB = "quant"                 # torchvision's QuantStub: the input's scale and zero point
AVERAGING_CONSTANT = F32(0.01)       # the moving-average observers' weight of a new observation


# --------------------------------------------------------------------------- the QAT state dict's keys

def fake_quant_parameters(prefix):
    """The buffers of one FusedMovingAvgObsFakeQuantize (``prefix`` e.g. ``"features.0.0.weight_fake_quant"``)."""
    observer = f"{prefix}.activation_post_process"
    return [(f"{prefix}.fake_quant_enabled", (1,), "ones"), (f"{prefix}.observer_enabled", (1,), "ones"),
            (f"{prefix}.scale", (1,), "ones"), (f"{prefix}.zero_point", (1,), "zeros"),
            (f"{observer}.eps", (1,), "eps"), (f"{observer}.min_val", (), "min"), (f"{observer}.max_val", (), "max")]


def fixed_qparams_parameters(prefix):
    """The buffers of the hard-sigmoid's FixedQParamsFakeQuantize: its output quantization is fixed
    (scale 1/256, zero point 0), so they play no part; files saved before torchvision added them lack them."""
    return [(f"{prefix}.fake_quant_enabled", (1,), "ones"), (f"{prefix}.observer_enabled", (1,), "ones"),
            (f"{prefix}.scale", (1,), "gate_scale"), (f"{prefix}.zero_point", (1,), "zeros"),
            (f"{prefix}.activation_post_process.scale", (1,), "gate_scale"),
            (f"{prefix}.activation_post_process.zero_point", (1,), "zeros")]


def activation_key(name, index):
    """Where torchvision's Sequential ``name`` keeps the activation module number ``index`` (hard-swish)."""
    return f"{name}.{index}"


def qat_key(conv, key):
    """The QAT state dict's key for the float key ``key`` of Conv ``conv``: a fused ConvBn2d /
    ConvBnReLU2d keeps the conv as ``name.0`` and its BatchNorm (float: ``name.1``) as ``name.0.bn``."""
    return key.replace(f"{conv.name}.1.", f"{conv.name}.0.bn.", 1)


def qat_parameters(layer):
    """``[(key, shape, kind)]`` of one layer record in the QAT state dict, in torchvision's order."""
    if isinstance(layer, Conv):
        fused = f"{layer.name}.0"
        out = [(qat_key(layer, key), shape, kind) for key, shape, kind in layer.parameters()]
        out += fake_quant_parameters(f"{fused}.weight_fake_quant") + fake_quant_parameters(f"{fused}.activation_post_process")
        if layer.activation == "HS":
            out += fake_quant_parameters(f"{activation_key(layer.name, 2)}.activation_post_process")
        return out
    if isinstance(layer, SqueezeExcite):
        out = []
        for fc in ("fc1", "fc2"):
            fc_out, fc_in = (layer.squeeze, layer.channels) if fc == "fc1" else (layer.channels, layer.squeeze)
            out += [(f"{layer.name}.{fc}.weight", (fc_out, fc_in, 1, 1), "conv"),
                    (f"{layer.name}.{fc}.bias", (fc_out,), "zeros")]
            out += fake_quant_parameters(f"{layer.name}.{fc}.weight_fake_quant")
            out += fake_quant_parameters(f"{layer.name}.{fc}.activation_post_process")
        return (out + fixed_qparams_parameters(f"{layer.name}.scale_activation.activation_post_process")
                + fake_quant_parameters(f"{layer.name}.skip_mul.activation_post_process"))
    if isinstance(layer, Block):
        return ([p for sub in layer.layers for p in qat_parameters(sub)]
                + fake_quant_parameters(f"{layer.name}.skip_add.activation_post_process"))
    if isinstance(layer, Linear):
        out = layer.parameters() + fake_quant_parameters(f"{layer.name}.weight_fake_quant")
        out += fake_quant_parameters(f"{layer.name}.activation_post_process")
        if layer.activation == "HS":
            out += fake_quant_parameters(f"{hard_swish_module(layer)}.activation_post_process")
        return out
    raise TypeError(f"not a layer record: {layer!r}")


def hard_swish_module(linear):
    """The classifier's hard-swish after Linear ``classifier.i`` is module ``classifier.(i+1)``."""
    head, index = linear.name.rsplit(".", 1)
    return activation_key(head, int(index) + 1)


@dataclass(frozen=True)
class QatLayer:
    """A layer record seen through its QAT state dict keys (what ``config.parameter_list`` reads)."""

    record: object

    def parameters(self):
        return qat_parameters(self.record)


@dataclass(frozen=True)
class InputStub:
    """torchvision's QuantStub (``quant``): only the observer of the network's input."""

    name: str = INPUT_STUB

    def parameters(self):
        return fake_quant_parameters(f"{self.name}.activation_post_process")


def optional_keys(specs):
    """The keys a QAT state dict may lack: the hard-sigmoid's fixed qparams (see ``fixed_qparams_parameters``)."""
    return frozenset(key for key, _, _ in specs if ".scale_activation." in key)


def float_state_dict(params, features, classifier):
    """The float network's state dict inside a QAT one: torchvision's ``mobilenet_v3_large`` keys
    (``name.1.*`` for a BatchNorm, no observers), for ``npmnv3.mobilenet_v3_large``. QAT trains these
    float weights; the int8 network is their quantized version."""
    convs = (c for layer in features for c in (layer.layers if isinstance(layer, Block) else [layer]))
    renamed = {key: qat_key(conv, key) for conv in convs if isinstance(conv, Conv) for key, _, _ in conv.parameters()}
    return {key: np.array(params[renamed.get(key, key)])
            for key, _, kind in (p for layer in features + classifier for p in layer.parameters()) if kind != "counter"}


# --------------------------------------------------------------------------- convert

class QParams(NamedTuple):
    """The scale (float32) and zero point of a quantized tensor."""

    scale: np.float32
    zero_point: int


@dataclass(frozen=True)
class QuantizedLayer:
    """A conv or linear layer converted to integers.

    weight: int8 (O, C, kh, kw) or (O, I); bias: (O,) int32 values (int64 array), in units of
    s_x * s_w; ``weight64`` / ``bias64``: the same integers in float64, as the kernels accumulate them; ``output``: the scale and zero point the accumulator is requantized to (with
    ``multiplier`` = (s_w * s_x) / s_y), clamped at the zero point when ``relu``. With a hard-swish,
    ``table`` maps the requantized integers to the activation's, quantized as ``activation``.
    """

    weight: np.ndarray
    weight_scale: np.float32
    bias: np.ndarray
    weight64: np.ndarray
    bias64: np.ndarray
    multiplier: np.float32
    output: QParams
    relu: bool = False
    table: Optional[np.ndarray] = None
    activation: Optional[QParams] = None

    @property
    def result(self):
        """The scale and zero point of what the layer hands on (after its activation)."""
        return self.activation or self.output


@dataclass(frozen=True)
class QuantizedNetwork:
    """Everything ``convert`` made from one version of the parameters: ``layers`` by record name
    (``QuantizedLayer``, the SE gate's and multiply's and the residual add's ``QParams``); ``fast``:
    the same network in the fast path's layout (``qengine.FastNetwork``, made by the model's ``engine()``)."""

    version: int
    input: QParams
    layers: dict
    fast: object = None


def fold_batch_norm(conv_weight, running_mean, running_var, weight, bias, eps):
    """BatchNorm folded into the conv before it, in float32 as ``torch.nn.utils.fuse_conv_bn_weights``::

        r = 1 / sqrt(running_var + eps)
        folded_weight = conv_weight * (weight * r)[:, None, None, None]
        folded_bias   = (0 - running_mean) * r * weight + bias
    """
    r = F32(1) / np.sqrt(np.asarray(running_var, F32) + F32(eps))
    folded_weight = np.asarray(conv_weight, F32) * (np.asarray(weight, F32) * r)[:, None, None, None]
    folded_bias = (F32(0) - np.asarray(running_mean, F32)) * r * np.asarray(weight, F32) + np.asarray(bias, F32)
    return folded_weight, folded_bias


def observer(params, prefix):
    """(min_val, max_val, eps, enabled) of the observer under ``prefix`` (a fake-quant module's name)."""
    inner = f"{prefix}.activation_post_process"
    return (F32(params[f"{inner}.min_val"]), F32(params[f"{inner}.max_val"]), F32(params[f"{inner}.eps"][0]),
            bool(params[f"{prefix}.observer_enabled"][0] == 1))


def observe_weights(weight, min_val, max_val, enabled):
    """The weight observer's range after ``convert`` shows it the (folded) weights once more.

    Disabled: unchanged. Enabled: a first observation sets the range; later ones move it by
    ``AVERAGING_CONSTANT`` towards the weights' own, in float32: min += 0.01 * (w.min() - min)."""
    if not enabled:
        return min_val, max_val
    low, high = F32(weight.min()), F32(weight.max())
    if np.isinf(min_val):
        return low, high
    return (F32(min_val + AVERAGING_CONSTANT * F32(low - min_val)),
            F32(max_val + AVERAGING_CONSTANT * F32(high - max_val)))


def activation_qparams(params, prefix):
    """The uint8 ``QParams`` ``convert`` takes from the activation observer under ``prefix``."""
    min_val, max_val, eps, _ = observer(params, prefix)
    return QParams(*QK.affine_qparams(min_val, max_val, eps))


def quantize_layer(name, weight, bias, params, weight_prefix, output_prefix, x, relu=False, hard_swish=None):
    """One conv or linear layer converted (see ``QuantizedLayer``); ``x``: the input's ``QParams``.

    Raises ValueError when an int32 accumulator could overflow for some input."""
    min_val, max_val, eps, enabled = observer(params, weight_prefix)
    weight_scale = QK.symmetric_weight_scale(*observe_weights(weight, min_val, max_val, enabled), eps=eps)
    w_q = QK.quantize_weight(weight, weight_scale)
    b_q = QK.quantize_bias(bias, x.scale, weight_scale)
    bound = QK.accumulator_bound(w_q, b_q).max()
    if bound > QK.INT32_MAX:
        raise ValueError(f"{name}: an int32 accumulator could reach {bound} (> 2**31 - 1) with these weights")
    output = activation_qparams(params, output_prefix)
    layer = dict(weight=w_q, weight_scale=weight_scale, bias=b_q, weight64=w_q.astype(np.float64),
                 bias64=b_q.astype(np.float64),
                 multiplier=QK.requantization_multiplier((weight_scale, x.scale), output.scale), output=output,
                 relu=relu)
    if hard_swish is not None:
        activation = activation_qparams(params, hard_swish)
        layer.update(table=QK.activation_table(QK.hard_swish_real, *output, *activation), activation=activation)
    return QuantizedLayer(**layer)


def convert_conv(conv, params, x):
    """A ``config.Conv`` (fused with its BatchNorm in the QAT state dict) converted; ``x``: input ``QParams``."""
    fused = f"{conv.name}.0"
    weight, bias = fold_batch_norm(params[f"{fused}.weight"],
                                   *(params[f"{fused}.bn.{f}"] for f in ("running_mean", "running_var", "weight", "bias")),
                                   eps=conv.eps)
    hard_swish = f"{activation_key(conv.name, 2)}.activation_post_process" if conv.activation == "HS" else None
    return quantize_layer(conv.name, weight, bias, params, f"{fused}.weight_fake_quant",
                          f"{fused}.activation_post_process", x, relu=conv.activation == "RE", hard_swish=hard_swish)


def convert_squeeze_excite(se, params, x, layers):
    """The SE block's fc1 (with ReLU), fc2, hard-sigmoid gate and multiply; returns the multiply's ``QParams``."""
    fc1 = layers[f"{se.name}.fc1"] = quantize_layer(
        f"{se.name}.fc1", params[f"{se.name}.fc1.weight"], params[f"{se.name}.fc1.bias"], params,
        f"{se.name}.fc1.weight_fake_quant", f"{se.name}.fc1.activation_post_process", x, relu=True)
    fc2 = layers[f"{se.name}.fc2"] = quantize_layer(
        f"{se.name}.fc2", params[f"{se.name}.fc2.weight"], params[f"{se.name}.fc2.bias"], params,
        f"{se.name}.fc2.weight_fake_quant", f"{se.name}.fc2.activation_post_process", fc1.result)
    layers[f"{se.name}.gate"] = QK.activation_table(QK.hard_sigmoid_real, *fc2.result, QK.HARD_SIGMOID_SCALE,
                                                    QK.HARD_SIGMOID_ZERO_POINT)
    out = layers[se.name] = activation_qparams(params, f"{se.name}.skip_mul.activation_post_process")
    return out


def convert_linear(layer, params, x):
    """A ``config.Linear`` converted; its hard-swish, if any, is the next module of the classifier."""
    hard_swish = f"{hard_swish_module(layer)}.activation_post_process" if layer.activation == "HS" else None
    return quantize_layer(layer.name, params[f"{layer.name}.weight"], params[f"{layer.name}.bias"], params,
                          f"{layer.name}.weight_fake_quant", f"{layer.name}.activation_post_process", x,
                          hard_swish=hard_swish)


def convert(features, classifier, params, version=0):
    """The int8 network of a QAT state dict (``params``), as ``torch.ao.quantization.convert`` makes it.

    Walks the layer records in order, so that each layer's bias and multiplier use the scale of the
    tensor flowing into it. Returns a ``QuantizedNetwork``."""
    x = activation_qparams(params, f"{INPUT_STUB}.activation_post_process")
    network_input, layers = x, {}
    for layer in features:
        for conv in (layer.layers if isinstance(layer, Block) else [layer]):
            if isinstance(conv, SqueezeExcite):
                x = convert_squeeze_excite(conv, params, x, layers)
            else:
                layers[conv.name] = convert_conv(conv, params, x)
                x = layers[conv.name].result
        if isinstance(layer, Block) and layer.residual:
            x = layers[layer.name] = activation_qparams(params, f"{layer.name}.skip_add.activation_post_process")
    for layer in classifier:          # the average pool keeps its input's scale and zero point
        layers[layer.name] = convert_linear(layer, params, x)
        x = layers[layer.name].result
    return QuantizedNetwork(version, network_input, layers)


# --------------------------------------------------------------------------- the integer forward pass

def requantized(acc, q):
    """A layer's accumulator requantized to its output (ReLU = the clamp at the zero point), then its
    hard-swish table when it has one: QTensor of the same shape."""
    y = QK.QTensor(QK.requantize(acc, q.multiplier, q.output.zero_point, relu=q.relu), *q.output)
    return QK.QTensor(q.table[y.values], *q.activation) if q.table is not None else y


def quantized_conv(x, conv, q, outputs=None):
    """One ``config.Conv`` in integers: accumulate, requantize, activation.

    x: QTensor (N, C_in, H, W) -> QTensor (N, C_out, H_out, W_out); ``q``: its ``QuantizedLayer``."""
    kernel = QK.depthwise_conv2d if conv.depthwise else QK.conv2d
    acc = kernel(x.values, x.zero_point, q.weight64, q.bias64, conv.stride, conv.padding, conv.dilation)
    return keep(outputs, conv.name, requantized(acc, q))


def quantized_squeeze_excite(x, se, layers, outputs=None):
    """One ``config.SqueezeExcite`` in integers: mean, fc1 + ReLU, fc2, hard-sigmoid table, multiply.

    x: QTensor (N, C, H, W) -> QTensor (N, C, H, W). fc1 and fc2 are 1x1 convs on a 1x1 map, i.e.
    linear layers on the (N, C) means."""
    pooled = QK.global_avg_pool(x.values, x.zero_point, x.scale)                       # (N, C), x's qparams
    fc1, fc2 = layers[f"{se.name}.fc1"], layers[f"{se.name}.fc2"]
    s = requantized(QK.linear(pooled, x.zero_point, fc1.weight64[:, :, 0, 0], fc1.bias64), fc1)        # (N, S)
    e = requantized(QK.linear(s.values, s.zero_point, fc2.weight64[:, :, 0, 0], fc2.bias64), fc2)      # (N, C)
    gate = layers[f"{se.name}.gate"][e.values][:, :, None, None]                     # scale 1/256, zero point 0
    out = layers[se.name]
    y = QK.mul(x.values, x.scale, x.zero_point, gate, QK.HARD_SIGMOID_SCALE, QK.HARD_SIGMOID_ZERO_POINT, *out)
    return keep(outputs, se.name, QK.QTensor(y, *out))


def quantized_bneck(x, block, layers, outputs=None):
    """One bneck block (``config.Block``, the paper's Figure 4) in integers, step by step as ``model.bneck``.

    x: QTensor (N, C_in, H, W) -> QTensor (N, C_out, H / s, W / s)::

        y = project(se(depthwise(expand(x))))  (+ x, QNNPACK's fixed-point add)
    """
    y = x
    if block.expand is not None:
        y = quantized_conv(y, block.expand, layers[block.expand.name], outputs)
    y = quantized_conv(y, block.depthwise, layers[block.depthwise.name], outputs)
    if block.se is not None:
        y = quantized_squeeze_excite(y, block.se, layers, outputs)
    y = quantized_conv(y, block.project, layers[block.project.name], outputs)
    if block.residual:
        out = layers[block.name]
        y = QK.QTensor(QK.add(x.values, x.scale, x.zero_point, y.values, y.scale, y.zero_point, *out), *out)
    return keep(outputs, block.name, y)


def quantized_linear(x, layer, q, outputs=None):
    """One ``config.Linear`` in integers: QTensor (N, in) -> QTensor (N, out)."""
    return keep(outputs, layer.name, requantized(QK.linear(x.values, x.zero_point, q.weight64, q.bias64), q))


def forward_features(x, features, layers, outputs=None):
    """The ``features`` records (Conv and Block) one after the other on a QTensor."""
    for layer in features:
        if isinstance(layer, Block):
            x = quantized_bneck(x, layer, layers, outputs)
        else:
            x = quantized_conv(x, layer, layers[layer.name], outputs)
    return x


def classify(x, classifier, layers, outputs=None):
    """Quantized global average pooling, then the classifier's Linear records: QTensor (N, C, H, W) -> (N, classes)."""
    x = QK.QTensor(QK.global_avg_pool(x.values, x.zero_point, x.scale), x.scale, x.zero_point)
    for layer in classifier:
        x = quantized_linear(x, layer, layers[layer.name], outputs)
    return x


# --------------------------------------------------------------------------- the network

class QuantizedMobileNetV3(Network):
    """torchvision's quantized MobileNetV3-Large in integers. Build with ``npmnv3.quantized_mobilenet_v3_large``.

    ``params`` holds the QAT state dict (float weights, BatchNorm, observers) by torchvision's names;
    the int8 network is converted from it once per parameter version (``engine()``, see ``convert``).

    Attributes
    ----------
    features, classifier : list
        The same layer records as the float ``MobileNetV3`` (``config.py``).
    params, threads, meta
        See ``network.Network`` (the QAT buffers are kept in float32, which holds them exactly).
    """

    arch = ARCH

    def __init__(self, *, num_classes=1000, seed=0, threads=None):
        check_positive(num_classes, "num_classes")
        self.num_classes = int(num_classes)
        self.options = dict(num_classes=self.num_classes)
        self.features, last_channel = mobilenet_v3_features("mobilenet_v3_large")
        self.classifier = classifier_layers(self.features[-1].out_channels, last_channel, self.num_classes)
        layers = [QatLayer(layer) for layer in self.features + self.classifier] + [InputStub()]
        specs = [p for layer in layers for p in layer.parameters()]
        super().__init__(layers, dtype=np.float32, seed=seed, threads=threads, optional=optional_keys(specs))

    def recognise(self, state_dict):
        shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
        if shapes.get("classifier.3.weight", (None,))[0] is not None and f"{INPUT_STUB}.activation_post_process.scale" not in shapes:
            return None, f"these weights are no QAT state dict (no {INPUT_STUB}.activation_post_process.*): " \
                         "a float model's weights go to npmnv3.mobilenet_v3_large"
        return None, None

    def make_engine(self):
        network = convert(self.features, self.classifier, self.params, self.params.version)
        return replace(network, fast=QE.prepare(self.features, self.classifier, network))

    def layer_table(self, height, width):
        """``summary``'s rows, each with the bytes of its weights in int8 (int32 biases, float32 scales) and in float32."""
        rows = layer_costs(self.features + self.classifier, height, width)[0]
        for row in rows:
            row["int8_bytes"], row["float32_bytes"] = layer_bytes(row["name"], self.engine())
        return rows

    def __call__(self, x, return_intermediates=False):
        """Dequantized logits for a batch of float images, computed in integers by the fast path.

        x: (N, 3, H, W) float array (normalised as ``npmnv3.preprocess`` does). Returns float32 logits
        (N, num_classes), or ``(logits, features)`` with ``return_intermediates``: ``features`` maps each
        ``"features.i"`` to its ``qkernels.QTensor`` (uint8 NCHW values, scale, zero point).

        The fast path (``qengine.py``: NHWC, centred float32 integers, float32 accumulation where it is
        exact) gives the same integers as ``forward_reference``. BLAS runs on one thread (the many
        small products gain nothing from more); with ``threads`` > 1 a batch of two or more images is
        cut into an even number of chunks of at most ``CHUNK`` images run on that many threads (one
        image runs on one thread: handing half of each layer's rows to a second thread costs about
        as much as it saves).
        """
        network = self.engine()
        return self._run_chunks(x, return_intermediates, lambda chunk, outputs: QE.run(
            chunk, self.features, self.classifier, network.fast, outputs))

    def forward_reference(self, x, return_intermediates=False):
        """The same as ``model(x)`` computed by the readable functions (NCHW, uint8 tensors, the
        vectorised ``qkernels``): ``quantized_conv``, ``quantized_bneck``, ... (see ``run_quantized``)."""
        network = self.engine()
        return self._run_chunks(x, return_intermediates, lambda chunk, outputs: run_quantized(
            chunk, self.features, self.classifier, network, outputs))

    def _run_chunks(self, x, return_intermediates, forward):
        """``forward(chunk, outputs)`` -> logits on chunks of the batch, on ``threads`` threads, BLAS on one;
        the logits and (with ``return_intermediates``) each ``features.i`` of all chunks joined."""
        x = check_input(x, np.float32)
        chunks = [x[start:stop] for start, stop in chunk_bounds(len(x), CHUNK)]
        results = [None] * len(chunks)

        def task(i):
            def run():
                outputs = {} if return_intermediates else None
                results[i] = forward(chunks[i], outputs), outputs
            return run

        with blas_threads(1):
            run_tasks([task(i) for i in range(len(chunks))], self.threads)
        logits = np.concatenate([r[0] for r in results])
        if not return_intermediates:
            return logits
        features = {name: QK.QTensor(np.concatenate([r[1][name].values for r in results]), *results[0][1][name][1:])
                    for name in results[0][1]}
        return logits, features


CHUNK = 3       # images per task at most (2 and 4 measured slower; at 4 the largest temporaries are
                # returned to the OS and faulted in again on every call)


def run_quantized(x, features, classifier, network, outputs=None):
    """The readable integer forward pass of one batch: x (N, 3, H, W) float32 -> dequantized float32
    logits (N, classes); ``outputs``, when given, receives each ``"features.i"`` QTensor."""
    q = QK.QTensor(QK.quantize(x, *network.input), *network.input)
    recorded = {} if outputs is not None else None
    q = forward_features(q, features, network.layers, recorded)
    if outputs is not None:
        outputs.update((layer.name, recorded[layer.name]) for layer in features)
    return classify(q, classifier, network.layers).dequantize()


def layer_bytes(name, network):
    """(int8 bytes, float32 bytes) of the weights of the layers named ``name`` or below it in ``network``:
    int8 weights, int32 biases and a float32 scale each, against float32 weights and biases."""
    int8 = float32 = 0
    for key, layer in network.layers.items():
        if isinstance(layer, QuantizedLayer) and (key == name or key.startswith(name + ".")):
            int8 += layer.weight.size + 4 * layer.bias.size + 4
            float32 += 4 * (layer.weight.size + layer.bias.size)
    return int8, float32
