"""Shared test helpers: torchvision models with random, non-trivial weights."""

import numpy as np
import pytest

ARCHS = ("mobilenet_v3_large", "mobilenet_v3_small")


def rel_err(got, ref):
    """max |got - ref| / max(1, max |ref|): the agreement measure the tests bound."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def random_torch_model(arch, seed=0, **options):
    """torchref.random_model, skipping the test when torch is not installed."""
    pytest.importorskip("torch")
    import torchref
    return torchref.random_model(arch, seed, **options)


def numpy_state_dict(torch_model):
    import torchref
    return torchref.numpy_state_dict(torch_model)


def npmnv3_model(arch, torch_model, dtype, **options):
    """npmnv3's ``arch`` in ``dtype`` holding ``torch_model``'s weights."""
    import npmnv3
    model = getattr(npmnv3, arch)(dtype=dtype, **options)
    model.load_state_dict(numpy_state_dict(torch_model))
    return model


def torch_forward(torch_model, x, dtype=np.float32):
    """Logits and every features.i output of the torchvision model, as numpy arrays."""
    import torchref
    return torchref.features_and_logits(torch_model, x, dtype)


# The worst agreement errors seen in this run, printed at the end of the test session.
WORST = {}


def record(kind, err):
    WORST[kind] = max(WORST.get(kind, 0.0), err)
    return err


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.write_line("worst relative errors against torchvision: " + ", ".join(
            f"{k} {v:.2e}" for k, v in sorted(WORST.items())))
