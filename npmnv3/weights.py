"""The official torchvision weights, and loading weights into a network by name or path.

npmnv3 reads torchvision's files as they are, without torch, after checking their size and full
SHA-256 (``hub.fetch``; downloaded once into ``hub.cache_dir()`` or found in torch's hub cache):

    network                         weights                    file                                 resize
    mobilenet_v3_large              IMAGENET1K_V1              mobilenet_v3_large-8738ca79.pth      256
    mobilenet_v3_large              IMAGENET1K_V2 (DEFAULT)    mobilenet_v3_large-5c1a4163.pth      232
    mobilenet_v3_small              IMAGENET1K_V1 (DEFAULT)    mobilenet_v3_small-047dcff4.pth      256
    lraspp_mobilenet_v3_large       COCO_WITH_VOC_LABELS_V1    lraspp_mobilenet_v3_large-d234d4ea.pth        520, no crop
    deeplabv3_mobilenet_v3_large    COCO_WITH_VOC_LABELS_V1    deeplabv3_mobilenet_v3_large-fc3c493d.pth     520, no crop
    quantized_mobilenet_v3_large    IMAGENET1K_QNNPACK_V1      quantized/mobilenet_v3_large_qnnpack-5bcacf28.pth  256
    ssdlite320_mobilenet_v3_large   COCO_V1                    ssdlite320_mobilenet_v3_large_coco-a79551df.pth

The classifiers crop 224 after resizing; they and the segmenters use ImageNet's mean and std. The
detector takes images in [0, 1] as they are (no mean and std: ``mean`` 0, ``std`` 1): it resizes
them to 320 x 320 and normalises them itself (``detection.transform``). No full SHA-256 of the
quantized file is on record: it is checked as torch hub checks it, by the prefix in its name
(``5bcacf28``), its size not pinned.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import hub
from .categories import label_set
from .images import DEFAULT_CROP, DEFAULT_RESIZE, IMAGENET_MEAN, IMAGENET_STD, SEGMENTATION_RESIZE
from .imagenet import categories
from .model import MobileNetV3, recognise
from .serialization import load_metadata, load_state_dict

CLASSIFICATION_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification"
SEGMENTATION_RECIPE = "https://github.com/pytorch/vision/tree/main/references/segmentation"
DETECTION_RECIPE = "https://github.com/pytorch/vision/tree/main/references/detection#ssdlite320-mobilenetv3-large"
DETECTOR = "ssdlite320_mobilenet_v3_large"


@dataclass(frozen=True)
class Weights:
    """One official weights file and how to use it.

    ``metrics`` are the published numbers as ((name, value), ...); ``labels`` names the class-name
    list ("imagenet", "voc", "coco"); ``crop_size`` None means no crop (the segmentation recipe).
    ``resize_size`` is the short side the recipe resizes to (the detector: its fixed 320 x 320).
    """

    arch: str
    name: str
    filename: str
    size: object            # int, or None: not pinned (then ``sha256`` is None too, see ``hub.fetch``)
    sha256: object          # the full SHA-256, or None: the prefix in ``filename`` is checked
    resize_size: int
    metrics: tuple
    crop_size: object = DEFAULT_CROP
    labels: str = "imagenet"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    recipe: str = field(default=CLASSIFICATION_RECIPE)
    subfolder: str = ""     # below the base URL, e.g. "quantized/"

    @property
    def url(self):
        """Where torchvision publishes the file (``NPMNV3_WEIGHTS_URL`` replaces the base)."""
        return hub.DEFAULT_BASE_URL + self.subfolder + self.filename

    def matches(self, path, digest):
        """Whether the file at ``path`` with SHA-256 ``digest`` is this one (by full hash, or by the
        name and the hash prefix it carries)."""
        if self.sha256 is not None:
            return digest == self.sha256
        prefix = hub.hash_prefix(self.filename)
        return Path(path).name == self.filename and digest.startswith(prefix)

    @property
    def acc1(self):
        return dict(self.metrics).get("acc@1")

    @property
    def acc5(self):
        return dict(self.metrics).get("acc@5")

    def fetch(self, offline=None, progress=None):
        """Path of the verified local file, downloading it on first use (see ``hub.fetch``)."""
        return hub.fetch(self.filename, self.sha256, self.size, subfolder=self.subfolder, offline=offline,
                         progress=progress)

    def meta(self):
        """What predict() and segment() need: preprocessing, class names and the published numbers."""
        return dict(arch=self.arch, weights=self.name, resize_size=self.resize_size,
                    crop_size=self.crop_size, mean=list(self.mean), std=list(self.std),
                    categories=label_set(self.labels), **dict(self.metrics))


def _segmentation(arch, filename, size, sha256, miou, pixel_acc):
    return Weights(arch, "COCO_WITH_VOC_LABELS_V1", filename, size, sha256, SEGMENTATION_RESIZE,
                   (("miou", miou), ("pixel_acc", pixel_acc)), crop_size=None, labels="voc",
                   recipe=SEGMENTATION_RECIPE)


OFFICIAL = {
    ("mobilenet_v3_large", "IMAGENET1K_V1"): Weights(
        "mobilenet_v3_large", "IMAGENET1K_V1", "mobilenet_v3_large-8738ca79.pth", 22_139_423,
        "8738ca797c879b547d18bbd15da5736ff2557b2036a9af72225393ca61759a04", 256,
        (("acc@1", 74.042), ("acc@5", 91.340))),
    ("mobilenet_v3_large", "IMAGENET1K_V2"): Weights(
        "mobilenet_v3_large", "IMAGENET1K_V2", "mobilenet_v3_large-5c1a4163.pth", 22_132_113,
        "5c1a416349c4cf298f2a6a5e2600ed0ee55e604713578f5e74e6bc8bcaef7997", 232,
        (("acc@1", 75.274), ("acc@5", 92.566))),
    ("mobilenet_v3_small", "IMAGENET1K_V1"): Weights(
        "mobilenet_v3_small", "IMAGENET1K_V1", "mobilenet_v3_small-047dcff4.pth", 10_306_551,
        "047dcff4addef86ea5bc2eff13c9614dc11f47ab1160d0a71a25e7db994f4e1f", 256,
        (("acc@1", 67.668), ("acc@5", 87.402))),
    ("lraspp_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1"): _segmentation(
        "lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_large-d234d4ea.pth", 13_097_061,
        "d234d4eae9d55d5f76de18b77cf0dc62c66fe5c5482758209d00f950c92bb280", 57.9, 91.2),
    ("deeplabv3_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1"): _segmentation(
        "deeplabv3_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large-fc3c493d.pth", 44_356_159,
        "fc3c493d68e89cc31ef488c803d5d7dd2f3190fb570598faa49fef69be8e5e70", 60.3, 91.2),
    ("quantized_mobilenet_v3_large", "IMAGENET1K_QNNPACK_V1"): Weights(
        "quantized_mobilenet_v3_large", "IMAGENET1K_QNNPACK_V1", "mobilenet_v3_large_qnnpack-5bcacf28.pth", None,
        None, 256, (("acc@1", 73.004), ("acc@5", 90.858)), subfolder="quantized/",
        recipe="https://github.com/pytorch/vision/tree/main/references/classification#qat-mobilenetv3"),
    (DETECTOR, "COCO_V1"): Weights(
        DETECTOR, "COCO_V1", "ssdlite320_mobilenet_v3_large_coco-a79551df.pth", 14_069_355,
        "a79551df90c79834bcd3bb3845ef9d966b5449a3a9b2833ae8404778ca5d65d2", 320, (("box_map", 21.3),),
        crop_size=None, labels="coco", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), recipe=DETECTION_RECIPE),
}
DEFAULT = {"mobilenet_v3_large": "IMAGENET1K_V2", "mobilenet_v3_small": "IMAGENET1K_V1",
           "lraspp_mobilenet_v3_large": "COCO_WITH_VOC_LABELS_V1",
           "deeplabv3_mobilenet_v3_large": "COCO_WITH_VOC_LABELS_V1", DETECTOR: "COCO_V1",
           "quantized_mobilenet_v3_large": "IMAGENET1K_QNNPACK_V1"}


def get_weights(arch, name="DEFAULT"):
    """The official ``Weights`` for ``arch`` called ``name`` ("DEFAULT", "IMAGENET1K_V1", ...).

    torchvision's spelling "MobileNet_V3_Large_Weights.IMAGENET1K_V2" is accepted too.
    """
    key = name.rsplit(".", 1)[-1].upper()
    if key == "DEFAULT" and arch in DEFAULT:
        key = DEFAULT[arch]
    if (arch, key) not in OFFICIAL:
        known = ", ".join(["DEFAULT"] + [n for a, n in OFFICIAL if a == arch])
        raise ValueError(f"weights: {name!r} is not an official {arch} weights name; expected one of "
                         f"{known}, a path to a weights file (.pth or .npz), or None")
    return OFFICIAL[(arch, key)]


def is_official_name(arch, weights):
    """True when the string ``weights`` names official weights rather than a file."""
    try:
        get_weights(arch, weights)
    except ValueError:
        return False
    return True


def names_a_file(arch, weights):
    """Whether a ``weights`` argument names a file rather than ``arch``'s official weights: a path
    object, or a string that is no official name and is a file or looks like one (has a "." in its
    name or a directory in it)."""
    if isinstance(weights, str):
        if is_official_name(arch, weights):
            return False
        return Path(weights).exists() or "." in Path(weights).name or "/" in weights or os.sep in weights
    return hasattr(weights, "__fspath__")     # a Path or any other path object


def default_recipe():
    """torchvision's classification recipe when nothing says otherwise: resize 256, crop 224, ImageNet
    mean and std (``recipe_guessed`` marks it as a guess)."""
    return dict(resize_size=DEFAULT_RESIZE, crop_size=DEFAULT_CROP, mean=list(IMAGENET_MEAN),
                std=list(IMAGENET_STD), recipe_guessed=True)


def meta_for_file(path):
    """Preprocessing and class names for a weights file given by path.

    An official file (recognised by its size and SHA-256) gets its registry entry; a ``.npz``
    written by npmnv3 carries its own metadata (architecture, options, dtype and, when it was saved
    from official weights, their recipe); anything else gets ``default_recipe()``, marked as a guess.
    """
    path = Path(path)
    stored = load_metadata(path)
    if stored.get("arch"):
        meta = dict(stored) if stored.get("resize_size") else dict(default_recipe(), **stored)
        meta.setdefault("categories", categories() if stored.get("num_classes", 1000) == 1000 else None)
        return meta
    if path.stat().st_size in {w.size for w in OFFICIAL.values()} or path.name in {w.filename for w in OFFICIAL.values()}:
        digest = hub.sha256_of(path)
        for w in OFFICIAL.values():
            if w.matches(path, digest):
                return w.meta()
    return dict(default_recipe(), weights=str(path), categories=categories())


def options_in(state_dict, meta):
    """What network ``state_dict`` fits: ``{"arch", "width_mult", "reduced_tail", "num_classes", ...}`` or None.

    From ``meta`` when it records an architecture (an npmnv3 ``.npz``, official weights), else
    recognised from the keys and shapes (``model.recognise``).
    """
    if meta.get("arch"):        # recorded with the weights (a file of unknown origin has none)
        keys = ("width_mult", "reduced_tail", "dilated", "num_classes", "dtype")
        return dict({k: meta[k] for k in keys if k in meta}, arch=meta["arch"])
    return recognise(state_dict)


def file_options(state_dict, meta):
    """``(arch, options)`` of the network a weights file holds (``options_in``): its architecture
    (None when neither recorded nor recognised) and the builder options to rebuild it with."""
    found = dict(options_in(state_dict, meta) or {})
    return found.pop("arch", None), found


def resolve(arch, weights, offline=None, progress=None):
    """``(state_dict, meta)`` for a builder's ``weights`` argument, or ``(None, {})`` for None.

    ``weights`` may be None, "DEFAULT", an official name, a ``Weights`` entry, or a path to a
    ``.pth`` (torch.save) or ``.npz`` (npmnv3) file.
    """
    if weights is None:
        return None, {}
    if isinstance(weights, Weights):
        if weights.arch != arch:
            raise ValueError(f"weights: {weights.arch} {weights.name} weights do not fit {arch}")
        entry = weights
    elif names_a_file(arch, weights):
        path = Path(weights)
        return load_state_dict(path), meta_for_file(path)
    elif isinstance(weights, str):
        entry = get_weights(arch, weights)      # an official name, or a mistyped one: the known names
    else:
        raise TypeError(f"weights: expected None, 'DEFAULT', a weights name or a path, got {type(weights).__name__}")
    path = entry.fetch(offline=offline, progress=progress)
    return load_state_dict(path), entry.meta()


def classes_in(state_dict, default=1000, key="classifier.3.weight"):
    """Number of classes of the classifier in ``state_dict`` (the rows of ``key``), else ``default``."""
    head = None if state_dict is None else state_dict.get(key)
    return int(head.shape[0]) if head is not None and getattr(head, "ndim", 0) >= 2 else default


def build(arch, weights=None, *, width_mult=1.0, reduced_tail=False, dilated=False, num_classes=None,
          dtype=None, seed=0, threads=None, offline=None, progress=None):
    """Build ``arch`` and load ``weights`` into it (see ``resolve``); the builders call this.

    ``num_classes`` defaults to the weights' classifier size (1000 for the official weights,
    or whatever a fine-tuned file holds), else 1000. ``dtype`` defaults to what an npmnv3 ``.npz``
    records, else float32.
    """
    state_dict, meta = resolve(arch, weights, offline=offline, progress=progress)
    return assemble(arch, state_dict, meta, width_mult=width_mult, reduced_tail=reduced_tail, dilated=dilated,
                    num_classes=num_classes, dtype=dtype, seed=seed, threads=threads)


def assemble(arch, state_dict, meta, *, width_mult=1.0, reduced_tail=False, dilated=False, num_classes=None,
             dtype=None, seed=0, threads=None):
    """A ``MobileNetV3`` of ``arch`` holding ``state_dict`` (None: random) with ``meta``; see ``build``."""
    if num_classes is None:
        num_classes = classes_in(state_dict)
    model = MobileNetV3(arch, width_mult=width_mult, reduced_tail=reduced_tail, dilated=dilated,
                        num_classes=num_classes, dtype=dtype_of(meta, dtype), seed=seed, threads=threads)
    return load_into(model, state_dict, meta)


def dtype_of(meta, dtype=None):
    """``dtype``, else what an npmnv3 ``.npz``'s metadata records, else float32."""
    return dtype if dtype is not None else meta.get("dtype", "float32")


def load_into(model, state_dict, meta):
    """Load ``state_dict`` (None: keep the random weights) into ``model`` and give it ``meta``
    (class names dropped when their number does not match the model's classes)."""
    if state_dict is not None:
        model.load_state_dict(state_dict)
        if meta.get("categories") is not None and len(meta["categories"]) != model.num_classes:
            meta = dict(meta, categories=None)
        model.meta = meta
    return model


def build_segmenter(arch, weights=None, *, num_classes=None, aux_loss=None, dtype=None, seed=0, threads=None,
                    offline=None, progress=None):
    """Build ``"lraspp_mobilenet_v3_large"`` or ``"deeplabv3_mobilenet_v3_large"`` and load ``weights``
    (as ``resolve`` takes them). ``num_classes`` defaults to the weights' (21 for the official ones);
    DeepLabV3's ``aux_loss`` to whether the weights hold the auxiliary head (the official file does)."""
    from .segmentation import DeepLabV3, LRASPP
    state_dict, meta = resolve(arch, weights, offline=offline, progress=progress)
    key = "classifier.low_classifier.weight" if arch == "lraspp_mobilenet_v3_large" else "classifier.4.weight"
    num_classes = num_classes if num_classes is not None else classes_in(state_dict, 21, key)
    dtype = dtype_of(meta, dtype)
    if arch == "lraspp_mobilenet_v3_large":
        model = LRASPP(num_classes=num_classes, dtype=dtype, seed=seed, threads=threads)
    else:
        if aux_loss is None:
            aux_loss = state_dict is not None and "aux_classifier.4.weight" in state_dict
        model = DeepLabV3(num_classes=num_classes, aux_loss=aux_loss, dtype=dtype, seed=seed, threads=threads)
    return load_into(model, state_dict, meta)


def build_quantized(weights=None, *, num_classes=None, seed=0, threads=None, offline=None, progress=None):
    """Build the int8 ``QuantizedMobileNetV3`` and load a QAT state dict ``weights`` (as ``resolve`` takes
    them: None, "DEFAULT" = "IMAGENET1K_QNNPACK_V1", or a path); ``num_classes`` defaults to the weights'."""
    from .quantized import QuantizedMobileNetV3
    state_dict, meta = resolve("quantized_mobilenet_v3_large", weights, offline=offline, progress=progress)
    model = QuantizedMobileNetV3(num_classes=num_classes or classes_in(state_dict), seed=seed, threads=threads)
    return load_into(model, state_dict, meta)


def build_detector(weights=None, *, num_classes=None, dtype=None, seed=0, threads=None, offline=None,
                   progress=None):
    """Build ``"ssdlite320_mobilenet_v3_large"`` and load ``weights`` (as ``resolve`` takes them).
    ``num_classes`` defaults to the weights' (91 for the official ones, background and "N/A" slots
    included), else 91."""
    from .detection import BOXES_PER_LOCATION, SSDLite
    state_dict, meta = resolve(DETECTOR, weights, offline=offline, progress=progress)
    if num_classes is None:
        rows = classes_in(state_dict, 91 * BOXES_PER_LOCATION, "head.classification_head.module_list.0.1.weight")
        num_classes = rows // BOXES_PER_LOCATION
    model = SSDLite(num_classes=num_classes, dtype=dtype_of(meta, dtype), seed=seed, threads=threads)
    return load_into(model, state_dict, meta)
