"""summary(): totals equal torchvision's published counts; per-layer shapes equal torchvision's."""

import io

import numpy as np
import pytest

import npmnv3
from conftest import ARCHS


@pytest.mark.parametrize("arch,options,params,macs", [
    ("mobilenet_v3_large", {}, 5_483_032, 216_589_760),
    ("mobilenet_v3_small", {}, 2_542_856, 56_510_400),
    ("mobilenet_v3_large", {"width_mult": 0.75}, 3_377_576, None),
    ("mobilenet_v3_small", {"width_mult": 0.75}, 1_653_920, None),
    ("mobilenet_v3_large", {"reduced_tail": True}, 2_569_352, None),
    ("mobilenet_v3_small", {"reduced_tail": True}, 1_099_672, None),
    ("mobilenet_v3_large", {"dilated": True}, 5_483_032, None),
])
def test_totals(arch, options, params, macs):
    out = io.StringIO()
    result = npmnv3.summary(getattr(npmnv3, arch)(**options), input_size=224, file=out)
    assert result["total_params"] == params
    if macs is not None:
        assert result["total_macs"] == macs
    assert f"{params:,}" in out.getvalue().splitlines()[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_params_and_shapes_match_torchvision(arch):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    tm = getattr(torchvision.models, arch)().eval()
    model = getattr(npmnv3, arch)()
    result = npmnv3.summary(model, input_size=(61, 90), print_table=False)
    assert result["total_params"] == sum(p.numel() for p in tm.parameters())
    rows = {r["name"]: r for r in result["rows"]}
    t = torch.zeros(1, 3, 61, 90)
    with torch.no_grad():
        for i, layer in enumerate(tm.features):
            t = layer(t)
            row = rows[f"features.{i}"]
            assert row["output_shape"] == tuple(t.shape[1:])
            assert row["params"] == sum(p.numel() for p in layer.parameters())


def test_macs_by_hand_for_the_stem():
    rows = npmnv3.summary(npmnv3.mobilenet_v3_large(), print_table=False)["rows"]
    assert rows[0]["name"] == "features.0"
    assert rows[0]["macs"] == 112 * 112 * 16 * 3 * 3 * 3


def test_cli_summary(capsys):
    from npmnv3.cli import main
    assert main(["summary", "--arch", "mobilenet_v3_small", "--size", "224"]) == 0
    assert "2,542,856" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:       # a usage error, as argparse reports them
        main(["summary", "--size", "0"])
    assert info.value.code == 2
    assert "argument --size: expected a positive integer, got 0" in capsys.readouterr().err


def test_quantized_summary_counts_int8_bytes(capsys):
    from npmnv3.cli import main
    model = npmnv3.quantized_mobilenet_v3_large()
    result = npmnv3.summary(model, print_table=False)
    float_result = npmnv3.summary(npmnv3.mobilenet_v3_large(), print_table=False)
    assert (result["total_params"], result["total_macs"]) == (float_result["total_params"], float_result["total_macs"])
    network = model.engine()
    weights = sum(layer.weight.size for layer in network.layers.values() if hasattr(layer, "weight"))
    biases = sum(layer.bias.size for layer in network.layers.values() if hasattr(layer, "weight"))
    layers = sum(1 for layer in network.layers.values() if hasattr(layer, "weight"))
    assert result["total_int8_bytes"] == weights + 4 * biases + 4 * layers      # int8, int32, one float32 scale each
    assert result["total_float32_bytes"] == 4 * (weights + biases)
    assert main(["summary", "--quantized"]) == 0
    out = capsys.readouterr().out
    assert "int8 bytes" in out and "float32 bytes" in out and f"{result['total_int8_bytes']:,}" in out
    assert main(["summary", "--quantized", "--arch", "mobilenet_v3_small"]) == 1
    assert "--quantized: torchvision's quantized network is mobilenet_v3_large, not mobilenet_v3_small" in capsys.readouterr().err
