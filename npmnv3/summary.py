"""Per-layer table of output shapes, parameters and multiply-accumulates (MACs).

MACs count the multiplications of convolutions and linear layers (the SE block's two 1x1 convs
included), as torchvision's published "GFLOPS" do: a conv costs
``H_out * W_out * C_out * (C_in / groups) * kh * kw``, a linear layer ``in * out``.
BatchNorm, activations, pooling and the residual adds are not counted.
"""

from .kernels import conv_output_size


def layer_costs(model, input_size=224):
    """Rows of dicts, one per conv / SE / linear layer, in order.

    Each row: ``name``, ``feature`` (i of features.i or None), ``kind``, ``output_shape``
    (C, H, W) or (features,) for one image, ``params`` (its weights incl. BN parameters, not the
    running statistics), ``macs``.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    rows = []
    for layer in model.layers:
        kind, cin, cout = layer["kind"], layer["cin"], layer["cout"]
        if kind in ("conv", "dwconv"):
            k, groups = layer["k"], (cin if kind == "dwconv" else 1)
            height = conv_output_size(height, k, layer["stride"], layer["padding"], layer["dilation"])
            width = conv_output_size(width, k, layer["stride"], layer["padding"], layer["dilation"])
            weights = cout * (cin // groups) * k * k
            params, macs, shape = weights + 2 * cout, weights * height * width, (cout, height, width)
        elif kind == "se":
            s = layer["squeeze"]
            params, macs, shape = 2 * cin * s + s + cin, 2 * cin * s, (cout, height, width)
        else:
            params, macs, shape = cin * cout + cout, cin * cout, (cout,)
        rows.append(dict(name=layer["name"], feature=layer["feature"], kind=kind,
                         output_shape=shape, params=params, macs=macs))
    return rows


def summary(model, input_size=224, file=None, print_table=True):
    """Print and return a table with one row per ``features.i`` and per classifier layer.

    input_size: an int (square) or (H, W). Returns a dict with ``rows`` (name, output shape,
    params, macs), ``total_params`` and ``total_macs``. Pass ``print_table=False`` to only compute.
    """
    rows = []
    for row in layer_costs(model, input_size):
        name = f"features.{row['feature']}" if row["feature"] is not None else row["name"]
        if rows and rows[-1]["name"] == name:
            rows[-1].update(output_shape=row["output_shape"], params=rows[-1]["params"] + row["params"],
                            macs=rows[-1]["macs"] + row["macs"])
        else:
            rows.append(dict(name=name, output_shape=row["output_shape"], params=row["params"],
                             macs=row["macs"]))
    total_params = sum(r["params"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    if print_table:
        size = input_size if isinstance(input_size, int) else "x".join(map(str, input_size))
        lines = [f"{model!r} at input {size}",
                 f"{'layer':<14}{'output shape':>18}{'params':>12}{'MACs':>15}"]
        for r in rows:
            shape = "x".join(map(str, r["output_shape"]))
            lines.append(f"{r['name']:<14}{shape:>18}{r['params']:>12,}{r['macs']:>15,}")
        lines.append(f"{'total':<14}{'':>18}{total_params:>12,}{total_macs:>15,}")
        print("\n".join(lines), file=file)
    return dict(rows=rows, total_params=total_params, total_macs=total_macs)
