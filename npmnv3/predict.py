"""predict(): from images to ImageNet labels; evaluate(): accuracy over a folder of labelled images."""

import sys
from pathlib import Path

import numpy as np

from .config import ARCHS
from .errors import ImageError
from .images import DEFAULT_CROP, DEFAULT_RESIZE, IMAGENET_MEAN, IMAGENET_STD, preprocess
from .imagenet import class_index
from .model import MobileNetV3
from .weights import build

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def softmax(logits):
    """Row-wise softmax, stable for any logits: exp(z - max z) / sum exp(z - max z).

    Computed in float64 so that small probabilities keep their digits.
    """
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def get_model(model="mobilenet_v3_large", weights="DEFAULT", offline=None):
    """A ``MobileNetV3`` for predict(): ``model`` itself if it is one, else a new one built with ``weights``.

    Nothing is kept between calls: a name builds the network again (reading and checking its
    weights file). To classify many images, pass them as one list, or build the model once and
    pass it as ``model``.
    """
    if isinstance(model, MobileNetV3):
        return model
    if model not in ARCHS:
        raise ValueError(f"model: expected one of {', '.join(ARCHS)} or a MobileNetV3 instance, got {model!r}")
    return build(model, weights, offline=offline)


def _labels(net):
    names = net.meta.get("categories")
    if names is None or len(names) != net.num_classes:
        names = [f"class {i}" for i in range(net.num_classes)]
    return names


def _preprocess_kwargs(net):
    meta = net.meta
    return dict(resize_size=meta.get("resize_size", DEFAULT_RESIZE), crop_size=meta.get("crop_size", DEFAULT_CROP),
                mean=tuple(meta.get("mean", IMAGENET_MEAN)), std=tuple(meta.get("std", IMAGENET_STD)))


def predict(images, model="mobilenet_v3_large", weights="DEFAULT", topk=5, batch_size=16,
            exif_transpose=False, offline=None):
    """Top-k ImageNet predictions for one image or a list of images.

    images: a path, bytes, a binary file object, a PIL image, an HWC uint8 RGB or HW grey array,
        or a list of any of these (run in batches of ``batch_size``).
    model: "mobilenet_v3_large", "mobilenet_v3_small", or a ``MobileNetV3`` instance (then
        ``weights`` is ignored and its own preprocessing metadata, if any, is used). A name builds
        the network for this call only (see ``get_model``).
    weights: "DEFAULT", an official weights name, or a path (see ``npmnv3.mobilenet_v3_large``).
    topk: how many predictions per image, 1 <= topk <= number of classes.

    Returns, for one image, a list of ``topk`` dicts ``{"index", "label", "probability"}`` sorted by
    probability, highest first; for a list, one such list per image. Preprocessing follows the
    weights' recipe (resize 232 for Large IMAGENET1K_V2, 256 otherwise; centre crop 224).
    Bad images raise ``ImageError`` naming the image (its path or its index in the list).
    """
    single = not isinstance(images, (list, tuple))
    batch = [images] if single else list(images)
    if not batch:
        raise ImageError("images: expected an image or a non-empty list of images, got an empty list")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    net = get_model(model, weights, offline=offline)
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk <= net.num_classes:
        raise ValueError(f"topk: expected an integer from 1 to {net.num_classes}, got {topk!r}")
    labels, kwargs = _labels(net), _preprocess_kwargs(net)
    results = []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        x = np.stack([preprocess(img, exif_transpose=exif_transpose, name=None if single else f"image {start + i}",
                                 **kwargs) for i, img in enumerate(chunk)])
        probs = softmax(net(x))
        for row in probs:
            order = np.argsort(-row, kind="stable")[:topk]
            results.append([dict(index=int(k), label=labels[k], probability=float(row[k])) for k in order])
    return results[0] if single else results


# --------------------------------------------------------------------------- evaluate

def find_labelled_images(folder):
    """``[(path, class_index), ...]`` from a folder with one sub-folder per class.

    Sub-folder names are WordNet IDs (``n01440764``) or ImageNet class names (``tench``).
    Files whose suffix is not an image suffix are ignored; sub-folders are searched recursively.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r}: expected a directory with one sub-folder per class")
    samples = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            label = class_index(sub.name)
        except KeyError as exc:
            raise ValueError(f"folder {str(sub)!r}: its name is neither an ImageNet WordNet ID nor a class name "
                             f"({exc.args[0]})") from exc
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        samples.extend((p, label) for p in files)
    if not samples:
        raise ValueError(f"folder {str(root)!r}: found no images in class sub-folders "
                         f"(expected e.g. {root / 'n01440764' / 'image.jpg'})")
    return samples


def _progress(done, total, stream):
    width = 30
    filled = width * done // total
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images")
    if done == total:
        stream.write("\n")
    stream.flush()


def evaluate(folder, model="mobilenet_v3_large", weights="DEFAULT", batch_size=32, progress=None,
             offline=None):
    """Top-1 and top-5 accuracy over a folder laid out one sub-folder per class.

    Returns ``{"top1", "top5", "count", "correct1", "correct5"}`` (accuracies as fractions).
    A progress bar goes to stderr when it is a terminal (``progress=True/False`` forces it).
    A bad image raises ``ImageError`` naming its path; none is skipped silently.
    """
    samples = find_labelled_images(folder)
    net = get_model(model, weights, offline=offline)
    kwargs = _preprocess_kwargs(net)
    show = sys.stderr.isatty() if progress is None else progress
    correct1 = correct5 = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        x = np.stack([preprocess(path, name=str(path), **kwargs) for path, _ in chunk])
        logits = net(x)
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        for (_, label), best in zip(chunk, top5):
            correct1 += int(best[0] == label)
            correct5 += int(label in best)
        if show:
            _progress(start + len(chunk), len(samples), sys.stderr)
    count = len(samples)
    return dict(top1=correct1 / count, top5=correct5 / count, count=count, correct1=correct1, correct5=correct5)
