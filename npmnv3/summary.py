"""Per-layer table of output shapes, parameters and multiply-accumulates (MACs).

MACs count the multiplications of convolutions and linear layers (the SE block's two 1x1 convs
included), as torchvision's published "GFLOPS" do: a conv costs
``H_out * W_out * C_out * (C_in / groups) * kh * kw``, a linear layer ``in * out``.
BatchNorm, activations, pooling, resizing and the residual adds are not counted. Parameters are
the weights and biases (BatchNorm's weight and bias included, its running statistics not).
For the int8 network the rows also give the bytes of each layer's weights as it runs them (int8
weights, int32 biases, a float32 scale; BatchNorm folded in) and as float32 weights and biases.
"""

import math

from .config import BUFFER_KINDS, Block, Conv, Linear, SqueezeExcite

BYTE_COLUMNS = ("int8_bytes", "float32_bytes")


def _params(layer):
    return sum(math.prod(shape) for _, shape, kind in layer.parameters() if kind not in BUFFER_KINDS)


def layer_costs(layers, height, width):
    """Rows ``{name, output_shape, params, macs}`` for a chain of layer records on an (H, W) input,
    one per record (a Block's sub-layers are summed into its row). Returns (rows, (H, W) after)."""
    rows = []
    for layer in layers:
        macs = 0
        if isinstance(layer, Block):
            for sub in layer.layers:
                macs += sub.macs(height, width)
                if isinstance(sub, Conv):
                    height, width = sub.output_size(height, width)
            channels = layer.out_channels
        elif isinstance(layer, Conv):
            macs = layer.macs(height, width)
            height, width = layer.output_size(height, width)
            channels = layer.out_channels
        elif isinstance(layer, Linear):
            macs, channels, height, width = layer.macs(), layer.out_features, None, None
        elif isinstance(layer, SqueezeExcite):
            macs, channels = layer.macs(height, width), layer.channels
        else:
            raise TypeError(f"not a layer record: {layer!r}")
        shape = (channels,) if height is None else (channels, height, width)
        rows.append(dict(name=layer.name, output_shape=shape, params=_params(layer), macs=macs))
    return rows, (height, width)


def summary(model, input_size=224, file=None, print_table=True):
    """Print and return a table with one row per layer record of ``model`` (each ``features.i``, each
    classifier layer, each head layer of the segmentation and detection models).

    input_size: an int (square) or (H, W). Returns a dict with ``rows`` (name, output shape, params,
    macs), ``total_params`` and ``total_macs``. Pass ``print_table=False`` to only compute.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    rows = model.layer_table(height, width)
    totals = dict(total_params=sum(r["params"] for r in rows), total_macs=sum(r["macs"] for r in rows))
    totals.update({f"total_{c}": sum(r[c] for r in rows) for c in BYTE_COLUMNS if rows and c in rows[0]})
    if print_table:
        print(format_table(model, rows, totals, f"{height}x{width}"), file=file)
    return dict(rows=rows, **totals)


def format_table(model, rows, totals, size):
    """The printed table, columns as wide as their widest entry (byte columns when the rows have them)."""
    extra = [c for c in BYTE_COLUMNS if rows and c in rows[0]]
    columns = ["params", "macs"] + extra
    shapes = ["x".join(map(str, r["output_shape"])) for r in rows]
    cells = [(r["name"], s, *(f"{r[c]:,}" for c in columns)) for r, s in zip(rows, shapes)]
    cells.append(("total", "", *(f"{totals['total_' + c]:,}" for c in columns)))
    header = ("layer", "output shape", "params", "MACs", *(c.replace("_", " ") for c in extra))
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(len(header))]
    lines = [f"{model!r} at input {size}"]
    for row in [header] + cells:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)))
    return "\n".join(lines)
