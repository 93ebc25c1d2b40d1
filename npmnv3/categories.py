"""Class names of the label sets the official weights use, in class-index order.

* ``"imagenet"``: ImageNet-1k's 1000 classes (``npmnv3.imagenet``);
* ``"voc"``: the 21 Pascal VOC classes, background first, of the segmentation weights (trained on
  the part of COCO that shows them);
* ``"coco"``: the 91 COCO category slots of the detection weights, background first, with "N/A"
  for the ids COCO leaves unused.

The names are torchvision's (``torchvision.models._meta``), kept as data files in ``npmnv3/data/``.
"""

import functools
from importlib import resources

from .imagenet import categories as imagenet_categories

_FILES = {"voc": ("voc_classes.txt", 21), "coco": ("coco_classes.txt", 91)}


@functools.lru_cache(maxsize=None)
def _read(filename, count):
    lines = tuple(resources.files(__package__).joinpath("data", filename).read_text(encoding="utf-8").splitlines())
    if len(lines) != count or any(not line for line in lines):
        raise RuntimeError(f"npmnv3 data file data/{filename} is damaged: expected {count} names; reinstall npmnv3")
    return lines


def label_set(name):
    """The class names of label set ``name`` ("imagenet", "voc", "coco"), as a new list."""
    if name == "imagenet":
        return imagenet_categories()
    if name not in _FILES:
        raise ValueError(f"label set: expected one of imagenet, {', '.join(_FILES)}, got {name!r}")
    return list(_read(*_FILES[name]))
