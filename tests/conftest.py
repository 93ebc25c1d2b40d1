"""Shared test helpers: torchvision models with random, non-trivial weights."""

import numpy as np
import pytest

ARCHS = ("mobilenet_v3_large", "mobilenet_v3_small")


def rel_err(got, ref):
    """max |got - ref| / max(1, max |ref|): the agreement measure the tests bound."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def random_torch_model(arch, seed=0, **options):
    """A torchvision MobileNetV3 in eval mode whose weights make every layer matter.

    Conv weights keep torchvision's Kaiming init; BN weight in [0.5, 1.5], BN bias and SE biases
    random. BatchNorm statistics are then measured on a random batch, so that activations stay
    O(1) through the depth, and perturbed at random (mean shifted by 0.1 std, var scaled by
    0.8-1.25) so that they are not the identity. The classifier gets N(0, 1/fan_in) weights and
    random biases so that logits are O(1) and the top-5 order means something.
    """
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(**options)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.empty(bn.num_features).uniform_(0.5, 1.5))
            bn.bias.copy_(0.25 * torch.randn(bn.num_features))
            bn.momentum = None      # cumulative average: one batch sets the statistics exactly
            bn.reset_running_stats()
        for name, p in model.named_parameters():
            if ".fc1.bias" in name or ".fc2.bias" in name:
                p.normal_(0.0, 0.5)
        for linear in (model.classifier[0], model.classifier[3]):
            linear.weight.normal_(0.0, linear.in_features ** -0.5)
            linear.bias.normal_(0.0, 0.5)
        model.train()
        model(torch.randn(8, 3, 64, 64))
        model.eval()
        for bn in bns:
            c = bn.num_features
            bn.running_mean += 0.1 * bn.running_var.sqrt() * torch.randn(c)
            bn.running_var *= torch.empty(c).uniform_(0.8, 1.25)
            bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
    return model


def numpy_state_dict(torch_model):
    return {k: v.detach().cpu().numpy().copy() for k, v in torch_model.state_dict().items()}


def npmnv3_model(arch, torch_model, dtype, **options):
    """npmnv3's ``arch`` in ``dtype`` holding ``torch_model``'s weights."""
    import npmnv3
    model = getattr(npmnv3, arch)(dtype=dtype, **options)
    model.load_state_dict(numpy_state_dict(torch_model))
    return model


def torch_forward(torch_model, x, dtype=np.float32):
    """Logits and every features.i output of the torchvision model, as numpy arrays."""
    import torch
    model = torch_model.double() if dtype == np.float64 else torch_model.float()
    feats = {}
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype))
        for i, layer in enumerate(model.features):
            t = layer(t)
            feats[f"features.{i}"] = t.numpy().copy()
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype))).numpy()
    return logits, feats


# Worst agreement errors seen in this run, printed at the end (the issue notes quote them).
WORST = {}


def record(kind, err):
    WORST[kind] = max(WORST.get(kind, 0.0), err)
    return err


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.write_line("worst relative errors against torchvision: " + ", ".join(
            f"{k} {v:.2e}" for k, v in sorted(WORST.items())))
