"""npmnv3: MobileNetV3 (Large and Small) in pure NumPy, forward-only, matching torchvision."""

from .errors import DownloadError, ImageError, StateDictError, WeightsFormatError
from .model import MobileNetV3

__version__ = "0.1.0"


def mobilenet_v3_large(*, width_mult=1.0, reduced_tail=False, dilated=False, num_classes=1000,
                       dtype="float32", seed=0):
    """MobileNetV3-Large (torchvision's ``mobilenet_v3_large``), randomly initialised."""
    return MobileNetV3("mobilenet_v3_large", width_mult=width_mult, reduced_tail=reduced_tail,
                       dilated=dilated, num_classes=num_classes, dtype=dtype, seed=seed)


def mobilenet_v3_small(*, width_mult=1.0, reduced_tail=False, dilated=False, num_classes=1000,
                       dtype="float32", seed=0):
    """MobileNetV3-Small (torchvision's ``mobilenet_v3_small``), randomly initialised."""
    return MobileNetV3("mobilenet_v3_small", width_mult=width_mult, reduced_tail=reduced_tail,
                       dilated=dilated, num_classes=num_classes, dtype=dtype, seed=seed)


from .summary import summary  # noqa: E402
