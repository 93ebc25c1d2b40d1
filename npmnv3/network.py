"""What every npmnv3 network shares: parameters by torchvision's names, loading and saving them, the
input checks, and the fast engine kept for the current parameter version.

A network class sets ``arch`` and ``options`` (its builder's arguments), lists its layer records,
and calls ``Network.__init__``; ``forward_reference`` (readable) and ``__call__`` (fast) are its own.
"""

import numpy as np

from .config import parameter_list
from .parameters import Parameters
from .serialization import save_state_dict
from .threads import check_threads


def check_dtype(dtype):
    """``dtype`` as a NumPy dtype, float32 or float64 (ValueError otherwise)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
    return dtype


def check_positive(value, what):
    """Raise ValueError naming ``what`` unless ``value`` is a positive integer (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")


def check_input(x, dtype, min_size=1):
    """Validate a batch ``x`` and return it as a C-contiguous (N, 3, H, W) array of ``dtype``."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy array of shape (N, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected shape (N, 3, H, W), got {x.shape}"
                         + (" (for one image use x[None])" if x.ndim == 3 else ""))
    if 0 in x.shape:
        raise ValueError(f"x: expected a non-empty batch, got shape {x.shape}")
    if min(x.shape[2:]) < min_size:
        raise ValueError(f"x: expected H and W of at least {min_size}, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x: expected a float array (use npmnv3.preprocess for images), got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=dtype)


class Network:
    """Parameters, state dict, saving and the fast engine of one network (see the module docstring).

    Attributes
    ----------
    params : Parameters
        Read-only arrays by torchvision's keys (minus the BN counters), in ``dtype``; change them
        with ``load_state_dict``.
    dtype : numpy dtype
        float32 (default) or float64 (a reference mode).
    threads : int
        How many threads a forward pass may use (see ``npmnv3.threads``).
    meta : dict
        What came with the weights: preprocessing recipe, class names.
    """

    arch = ""
    options = {}

    def __init__(self, layers, *, dtype=np.float32, seed=0, threads=None, conv_std=None, optional=frozenset()):
        self.dtype = check_dtype(dtype)
        self.threads = check_threads(threads)
        self.params = Parameters(parameter_list(layers), self.dtype, seed, owner=repr(self), conv_std=conv_std,
                                 optional=optional)
        self.meta = {}
        self._engine = None

    def __repr__(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.arch!r}{opts}, dtype={self.dtype.name})"

    def recognise(self, state_dict):
        """``(found, description)`` of a state dict that does not fit, for the error (None, None: unknown)."""
        return None, None

    def state_dict(self):
        """torchvision's state_dict as NumPy arrays: same keys, order and shapes (new arrays).

        ``num_batches_tracked`` entries are 0-d int64 zeros (they play no part at inference).
        """
        return self.params.state_dict()

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters by torchvision's names, casting them to the model's dtype.

        Raises ``StateDictError`` (a ValueError) once, listing every missing, unexpected and
        mis-shaped key; nothing is loaded then. With ``strict=False`` missing and unexpected keys
        are allowed (as in PyTorch), mis-shaped ones never are. ``num_batches_tracked`` keys are
        optional and ignored. The error's first line says what the weights are, when npmnv3 can tell.
        """
        self.params.load(state_dict, strict, recognise=self.recognise)

    def save(self, path):
        """Write the weights to npmnv3's ``.npz`` format, with the architecture, options, dtype and
        ``meta`` as JSON; the builder of the same name reads it back (in the same dtype)."""
        metadata = dict(self.meta, arch=self.arch, dtype=self.dtype.name, **self.options)
        save_state_dict(self.state_dict(), path, metadata=metadata)

    def engine(self):
        """The fast engine for the current parameters (made again after ``load_state_dict``)."""
        engine = self._engine
        if engine is None or engine.version != self.params.version:
            engine = self._engine = self.make_engine()
        return engine

    def make_engine(self):
        raise NotImplementedError
