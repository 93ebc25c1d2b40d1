"""A network's parameters by torchvision's state_dict names, as read-only NumPy arrays.

Every npmnv3 network keeps its weights in a ``Parameters`` mapping built from its layer records
(``config.Conv``, ``config.Block``, ...): ``model.params["features.0.0.weight"]`` is an array of
the model's dtype that cannot be written to. The only way to change parameters is
``model.load_state_dict(...)``, which replaces the arrays and bumps ``version``; the fast engine
compares ``version`` with the one it was prepared from, so it never runs on stale weights.

BatchNorm's ``num_batches_tracked`` counters are part of the state_dict (0-d int64, as torchvision
writes them) but play no part at inference: they are not stored, are optional when loading, and
come back as zeros from ``state_dict()``.
"""

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .errors import StateDictError


def is_counter(key):
    """Whether a state dict ``key`` is a BatchNorm's ``num_batches_tracked`` (any key type: hostile
    state dicts may hold others)."""
    return str(key).endswith("num_batches_tracked")


OBSERVER_START = {"min": np.inf, "max": -np.inf, "eps": float(np.finfo(np.float32).eps), "gate_scale": 1 / 256}


def random_value(shape, kind, rng, conv_std=None):
    """One parameter initialised as torchvision initialises MobileNetV3 (float64).

    conv: Kaiming normal in fan-out mode, std = sqrt(2 / (out_channels * kh * kw)) (or ``conv_std``);
    linear: N(0, 0.01); BatchNorm weight and running variance ("var"): ones; biases and running
    means ("mean"): zeros. A fake-quant observer's buffers (the int8 network) start as PyTorch's:
    "min" +inf and "max" -inf (nothing observed yet), "eps" float32's machine epsilon, "gate_scale" 1/256
    (the hard-sigmoid's fixed output scale).
    """
    if kind == "conv":
        std = np.sqrt(2.0 / (shape[0] * shape[2] * shape[3])) if conv_std is None else conv_std
        return rng.normal(0.0, std, shape)
    if kind == "linear":
        return rng.normal(0.0, 0.01, shape)
    if kind in OBSERVER_START:
        return np.full(shape, OBSERVER_START[kind])
    return np.ones(shape) if kind in ("ones", "var") else np.zeros(shape)


class Parameters(Mapping):
    """Read-only parameter arrays named by torchvision's state_dict keys.

    Parameters
    ----------
    specs : list of (key, shape, kind)
        What the network holds, in state_dict order (``config.parameter_list(layers)``).
    dtype : numpy dtype
        float32 or float64; every array is kept in it.
    seed : int
        Seed of the random initialisation (``random_value``), drawn only when a key is read that
        no load has set.
    owner : str
        How error messages name the network, e.g. ``"MobileNetV3('mobilenet_v3_small', ...)"``.
    conv_std : float or None
        Standard deviation of conv weights instead of Kaiming's (SSDLite initialises with 0.03).
    optional : set of str
        Keys that a state dict may leave out (they keep their value); BN counters always may.
    """

    def __init__(self, specs, dtype, seed=0, owner="the model", conv_std=None, optional=frozenset()):
        self.dtype = np.dtype(dtype)
        self.owner = owner
        self.optional = frozenset(optional)
        self.shapes = OrderedDict((key, tuple(shape)) for key, shape, _ in specs)
        self.version = 0
        self._specs = [(key, shape, kind) for key, shape, kind in specs if not is_counter(key)]
        self._seed, self._conv_std = seed, conv_std
        self._values = {}     # the arrays set so far: by load(), or all of them once drawn

    def _complete(self):
        """Every array by key. The random initialisation is drawn (all of it, in state_dict order, so
        that a seed always gives the same values) only when a key is read that no load has set: a
        builder that loads every key from a weights file never draws it."""
        if len(self._values) < len(self._specs):
            rng = np.random.default_rng(self._seed)
            drawn = {key: self._frozen(random_value(shape, kind, rng, self._conv_std))
                     for key, shape, kind in self._specs}
            self._values = drawn | self._values
        return self._values

    def _frozen(self, value):
        array = np.array(value, dtype=self.dtype, copy=True)
        array.flags.writeable = False
        return array

    def __getitem__(self, key):
        values = self._values
        if key in values:
            return values[key]
        if key not in self:
            raise KeyError(key)
        return self._complete()[key]

    def __contains__(self, key):
        return key in self.shapes and not is_counter(key)

    def __iter__(self):
        return (key for key, _, _ in self._specs)

    def __len__(self):
        return len(self._specs)

    def __setitem__(self, key, value):
        raise TypeError("parameters are read-only; change them with model.load_state_dict({key: array}, "
                        "strict=False)")

    def state_dict(self):
        """torchvision's state_dict: every key in order, as new writable arrays (counters: 0-d int64 zeros)."""
        return OrderedDict((key, np.zeros((), np.int64) if is_counter(key) else self._complete()[key].copy())
                           for key in self.shapes)

    def problems(self, state_dict, strict=True):
        """The lines of the error ``load`` would raise for ``state_dict`` (empty when it fits)."""
        problems = []
        missing = [k for k in self.shapes if not is_counter(k) and k not in self.optional and k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.shapes]
        if strict and missing:
            problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if strict and unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(map(str, unexpected)))
        wrong = []
        for key, shape in self.shapes.items():
            if key in state_dict and not is_counter(key):
                value = np.asarray(state_dict[key])
                if value.shape != shape:
                    wrong.append(f"{key}: expected {shape}, got {value.shape}")
                elif not np.issubdtype(value.dtype, np.number):
                    wrong.append(f"{key}: expected a numeric array, got dtype {value.dtype}")
        if wrong:
            problems.append(f"mis-shaped keys ({len(wrong)}): " + "; ".join(wrong))
        return problems

    def load(self, state_dict, strict=True, recognise=None):
        """Replace parameters by those of ``state_dict`` (cast to ``dtype``), all or nothing.

        Raises ``StateDictError`` once, listing every missing, unexpected and mis-shaped key; with
        ``strict=False`` missing and unexpected keys are allowed (as in PyTorch), mis-shaped ones never.
        ``recognise(state_dict)``, when given, returns ``(found, description)``: what the weights are,
        for the error's first line.
        """
        problems = self.problems(state_dict, strict)
        if problems:
            found, description = recognise(state_dict) if recognise else (None, None)
            summary = f"state_dict does not fit {self.owner}" + (f": {description}" if description else "")
            raise StateDictError(summary + "\n  " + "\n  ".join(problems), found=found)
        values = dict(self._values)
        for key, _, _ in self._specs:
            if key in state_dict:
                values[key] = self._frozen(state_dict[key])
        self._values = values
        self.version += 1
