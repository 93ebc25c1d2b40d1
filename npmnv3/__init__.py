"""npmnv3: MobileNetV3 (Large and Small) in pure NumPy, forward-only, matching torchvision.

    model = npmnv3.mobilenet_v3_large(weights="DEFAULT")   # official ImageNet weights, no torch
    npmnv3.predict("photo.jpg")                            # top-5 labels and probabilities
    npmnv3.quantized_mobilenet_v3_large(weights="DEFAULT") # torchvision's int8 network, in integers
    npmnv3.detect("photo.jpg")                             # COCO objects: boxes, labels, scores
"""

from .errors import DownloadError, ImageError, StateDictError, WeightsFormatError
from .images import load_image, preprocess
from .model import MobileNetV3
from .quantized import QuantizedMobileNetV3
from .predict import evaluate, predict
from .serialization import load_state_dict, save_state_dict
from .summary import summary
from .segment import segment
from .segmentation import LRASPP, DeepLabV3
from .detect import detect
from .detection import SSDLite
from .weights import OFFICIAL as OFFICIAL_WEIGHTS, build, build_detector, build_quantized, build_segmenter, get_weights

__version__ = "0.1.0"


def mobilenet_v3_large(weights=None, *, width_mult=1.0, reduced_tail=False, dilated=False,
                       num_classes=None, dtype=None, seed=0, threads=None, offline=None,
                       progress=None):
    """MobileNetV3-Large, as torchvision's ``mobilenet_v3_large``.

    weights: None (random, torchvision's init with ``seed``), "DEFAULT" (= "IMAGENET1K_V2"),
    "IMAGENET1K_V1", or a path to a ``.pth`` (torch.save) or ``.npz`` (npmnv3) file.
    Official weights are downloaded once to the cache (see ``npmnv3.hub``); ``offline=True`` or
    ``NPMNV3_OFFLINE=1`` forbids the network. ``dtype`` is "float32" or "float64" (default: what an
    npmnv3 ``.npz`` records, else float32). ``threads``: how many threads a forward pass may use
    (default: the number of cores; 1 starts none).
    """
    return build("mobilenet_v3_large", weights, width_mult=width_mult, reduced_tail=reduced_tail,
                 dilated=dilated, num_classes=num_classes, dtype=dtype, seed=seed, threads=threads,
                 offline=offline, progress=progress)


def mobilenet_v3_small(weights=None, *, width_mult=1.0, reduced_tail=False, dilated=False,
                       num_classes=None, dtype=None, seed=0, threads=None, offline=None,
                       progress=None):
    """MobileNetV3-Small, as torchvision's ``mobilenet_v3_small``.

    weights: None (random), "DEFAULT" (= "IMAGENET1K_V1"), "IMAGENET1K_V1", or a path to a
    ``.pth`` or ``.npz`` file. Other arguments as for ``mobilenet_v3_large``.
    """
    return build("mobilenet_v3_small", weights, width_mult=width_mult, reduced_tail=reduced_tail,
                 dilated=dilated, num_classes=num_classes, dtype=dtype, seed=seed, threads=threads,
                 offline=offline, progress=progress)


def lraspp_mobilenet_v3_large(weights=None, *, num_classes=None, dtype=None, seed=0, threads=None, offline=None,
                              progress=None):
    """Lite R-ASPP segmentation on MobileNetV3-Large (the paper's Figure 10), as torchvision's
    ``lraspp_mobilenet_v3_large``.

    weights: None (random), "DEFAULT" (= "COCO_WITH_VOC_LABELS_V1": the 21 Pascal VOC classes), or a
    path to a ``.pth`` or ``.npz`` file. ``num_classes`` defaults to the weights' (else 21); other
    arguments as for ``mobilenet_v3_large``. ``model(x)`` returns ``{"out": (N, classes, H, W)}``.
    """
    return build_segmenter("lraspp_mobilenet_v3_large", weights, num_classes=num_classes, dtype=dtype, seed=seed,
                           threads=threads, offline=offline, progress=progress)


def deeplabv3_mobilenet_v3_large(weights=None, *, num_classes=None, aux_loss=None, dtype=None, seed=0, threads=None,
                                 offline=None, progress=None):
    """DeepLabV3 segmentation on MobileNetV3-Large, as torchvision's ``deeplabv3_mobilenet_v3_large``.

    weights: as for ``lraspp_mobilenet_v3_large``. ``aux_loss``: build the auxiliary FCN head (default:
    when the weights hold it, as the official file does; False without weights). ``model(x)``
    returns ``{"out": ..., "aux": ...}``.
    """
    return build_segmenter("deeplabv3_mobilenet_v3_large", weights, num_classes=num_classes, aux_loss=aux_loss,
                           dtype=dtype, seed=seed, threads=threads, offline=offline, progress=progress)


def quantized_mobilenet_v3_large(weights=None, *, num_classes=None, seed=0, threads=None, offline=None,
                                 progress=None):
    """torchvision's quantized MobileNetV3-Large (``quantization.mobilenet_v3_large(quantize=True)``), run in
    integers as PyTorch's QNNPACK kernels run it (see ``npmnv3.quantized``).

    weights: None (random float weights and untouched observers, as torchvision's builder gives without
    weights: every activation at scale 1, good for shapes and timing only), "DEFAULT" (=
    "IMAGENET1K_QNNPACK_V1"), or a path to a QAT state dict (a ``.pth`` saved from a model prepared as
    torchvision prepares it, or an npmnv3 ``.npz``). ``model(x)`` takes float images and returns float logits.
    Other arguments as for ``mobilenet_v3_large``.
    """
    return build_quantized(weights, num_classes=num_classes, seed=seed, threads=threads, offline=offline,
                           progress=progress)


def ssdlite320_mobilenet_v3_large(weights=None, *, num_classes=None, dtype=None, seed=0, threads=None, offline=None,
                                  progress=None):
    """SSDLite320 object detection on MobileNetV3-Large (the paper's Section 6.2), as torchvision's
    ``ssdlite320_mobilenet_v3_large(weights_backbone=None)`` builds it (reduced tail, BN eps 0.001).

    weights: None (random: torchvision's init, every conv N(0, 0.03)), "DEFAULT" (= "COCO_V1": the 91
    COCO category slots), or a path to a ``.pth`` or ``.npz`` file. ``num_classes`` defaults to the
    weights' (else 91); other arguments as for ``mobilenet_v3_large``. ``model(images)`` takes a list
    of (3, H, W) float arrays in [0, 1] and returns per image ``{"boxes", "scores", "labels"}``;
    ``model.forward_raw(x)`` the heads' outputs on a normalised (N, 3, 320, 320) batch.
    """
    return build_detector(weights, num_classes=num_classes, dtype=dtype, seed=seed, threads=threads, offline=offline,
                          progress=progress)
