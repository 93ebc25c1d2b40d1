"""predict(): from images to ImageNet labels; evaluate(): accuracy over a folder of labelled images."""

import sys
from pathlib import Path

import numpy as np

from .config import ARCHS
from .errors import ImageError
from .images import DEFAULT_CROP, DEFAULT_RESIZE, IMAGENET_MEAN, IMAGENET_STD, preprocess
from .imagenet import class_index
from .model import MobileNetV3
from .network import check_positive
from .quantized import QuantizedMobileNetV3
from .serialization import load_state_dict
from .weights import assemble, build, build_quantized, file_options, meta_for_file, names_a_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
DEFAULT_ARCH = "mobilenet_v3_large"


def softmax(logits):
    """Row-wise softmax, stable for any logits: exp(z - max z) / sum exp(z - max z).

    Computed in float64 so that small probabilities keep their digits.
    """
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def get_model(model=None, weights="DEFAULT", offline=None, quantized=False):
    """A ``MobileNetV3`` for predict(): ``model`` itself if it is one, else a new one built with ``weights``.

    ``model`` None takes the architecture from a weights file (its ``.npz`` metadata, or its keys
    and shapes), else Large. With ``quantized`` it is the int8 ``QuantizedMobileNetV3`` (``weights``:
    "DEFAULT" = IMAGENET1K_QNNPACK_V1, or a QAT state dict's path). Nothing is kept between calls: a
    name builds the network again (reading and checking its weights file). To classify many images,
    pass them as one list, or build the model once and pass it as ``model``.
    """
    if isinstance(model, (MobileNetV3, QuantizedMobileNetV3)):
        return model
    if quantized:
        if model not in (None, DEFAULT_ARCH):
            raise ValueError(f"model: the quantized network is {DEFAULT_ARCH} only, got {model!r}")
        return build_quantized(weights, offline=offline)
    if model is not None and model not in ARCHS:
        raise ValueError(f"model: expected one of {', '.join(ARCHS)} or a MobileNetV3 instance, got {model!r}")
    if model is None and names_a_file(DEFAULT_ARCH, weights):
        state_dict, meta = load_state_dict(weights), meta_for_file(weights)
        arch, options = file_options(state_dict, meta)
        return assemble(arch or DEFAULT_ARCH, state_dict, meta, **options)
    return build(model or DEFAULT_ARCH, weights, offline=offline)


def labels(net):
    """Class names of ``net``: its weights' categories, else "class 0", "class 1", ..."""
    names = net.meta.get("categories")
    if names is None or len(names) != net.num_classes:
        names = [f"class {i}" for i in range(net.num_classes)]
    return names


def recipe(net, resize_size=None, crop_size=None, default_resize=DEFAULT_RESIZE, default_crop=DEFAULT_CROP):
    """``preprocess`` arguments for ``net``: its weights' recipe, or the defaults (torchvision's
    classification recipe; a segmenter's: 520, no crop); the given sizes replace the recipe's."""
    meta = net.meta
    return dict(resize_size=resize_size or meta.get("resize_size", default_resize),
                crop_size=crop_size or meta.get("crop_size", default_crop),
                mean=tuple(meta.get("mean", IMAGENET_MEAN)), std=tuple(meta.get("std", IMAGENET_STD)))


def as_batch(images):
    """``(single, batch)``: whether ``images`` is one image rather than a list (or tuple) of them, and the
    images as a list. An empty list raises ImageError."""
    single = not isinstance(images, (list, tuple))
    batch = [images] if single else list(images)
    if not batch:
        raise ImageError("images: expected an image or a non-empty list of images, got an empty list")
    return single, batch


def progress_bar(done, total, stream):
    """One ``\\r`` line: ``[#####.....] done/total images``, ended by a newline when complete."""
    width = 30
    filled = width * done // total
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images")
    if done == total:
        stream.write("\n")
    stream.flush()


def classify(net, images, names, topk=5, batch_size=16, exif_transpose=False, keep_going=False,
             progress=False, resize_size=None, crop_size=None):
    """Top-k results per image, in batches; with ``keep_going`` a bad image's entry is its ImageError.

    ``names[i]`` is how image i is called in messages (None: its path or kind).
    """
    kwargs = recipe(net, resize_size, crop_size)
    labels_ = labels(net)
    results = [None] * len(images)
    pending = []        # (index, preprocessed image)

    def run(batch):
        probs = softmax(net(np.stack([x for _, x in batch])))
        for (i, _), row in zip(batch, probs):
            order = np.argsort(-row, kind="stable")[:topk]
            results[i] = [dict(index=int(k), label=labels_[k], probability=float(row[k])) for k in order]

    for i, image in enumerate(images):
        try:
            pending.append((i, preprocess(image, exif_transpose=exif_transpose, name=names[i], **kwargs)))
        except ImageError as exc:
            if not keep_going:
                raise
            results[i] = exc
        if len(pending) == batch_size or (i == len(images) - 1 and pending):
            run(pending)
            pending = []
        if progress:
            progress_bar(i + 1, len(images), sys.stderr)
    return results


def predict(images, model=None, weights="DEFAULT", topk=5, batch_size=16, exif_transpose=False, offline=None,
            progress=None, resize_size=None, crop_size=None, quantized=False):
    """Top-k ImageNet predictions for one image or a list of images.

    Parameters
    ----------
    images : image or list of images
        A path, bytes, a binary file object, a PIL image, an HWC uint8 RGB or HW grey array, or a
        list of any of these (run in batches of ``batch_size``).
    model : None, str, MobileNetV3 or QuantizedMobileNetV3
        "mobilenet_v3_large", "mobilenet_v3_small", a network instance (then ``weights``
        is ignored and its own preprocessing metadata, if any, is used), or None: the architecture
        of the weights file, else Large. A name builds the network for this call only.
    weights : str or path
        "DEFAULT", an official weights name, or a path (see ``npmnv3.mobilenet_v3_large``).
    topk : int
        How many predictions per image, 1 <= topk <= number of classes.
    progress : bool or None
        A progress bar on stderr; None: when stderr is a terminal and there is more than one batch.
    resize_size, crop_size : int or None
        Replace the weights' preprocessing recipe (resize 232 for Large IMAGENET1K_V2, 256 otherwise;
        centre crop 224).
    quantized : bool
        Use torchvision's int8 MobileNetV3-Large (``npmnv3.quantized_mobilenet_v3_large``) with
        ``weights`` ("DEFAULT" = IMAGENET1K_QNNPACK_V1, or a QAT state dict) and its recipe.

    Returns
    -------
    predictions : list
        For one image, ``topk`` dicts ``{"index", "label", "probability"}`` sorted by probability,
        highest first; for a list, one such list per image.

    Raises
    ------
    ImageError
        A bad image, named by its path or its index in the list.
    """
    single, batch = as_batch(images)
    check_positive(batch_size, "batch_size")
    net = get_model(model, weights, offline=offline, quantized=quantized)
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk <= net.num_classes:
        raise ValueError(f"topk: expected an integer from 1 to {net.num_classes}, got {topk!r}")
    if progress is None:
        progress = len(batch) > batch_size and sys.stderr.isatty()
    names = [None] if single else [f"image {i}" for i in range(len(batch))]
    results = classify(net, batch, names, topk, batch_size, exif_transpose, progress=progress,
                       resize_size=resize_size, crop_size=crop_size)
    return results[0] if single else results


# --------------------------------------------------------------------------- evaluate

def find_labelled_images(folder):
    """``[(path, class_index), ...]`` from a folder with one sub-folder per class.

    Sub-folder names are WordNet IDs (``n01440764``) or ImageNet class names (``tench``).
    Files whose suffix is not an image suffix are ignored; sub-folders are searched recursively.
    """
    root = Path(folder)
    if not root.exists():
        raise ValueError(f"folder {str(root)!r}: does not exist")
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r}: is a file, expected a directory with one sub-folder per class")
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


def evaluate(folder, model=None, weights="DEFAULT", batch_size=32, progress=None, offline=None,
             resize_size=None, crop_size=None):
    """Top-1 and top-5 accuracy over a folder laid out one sub-folder per class.

    Returns ``{"top1", "top5", "count", "correct1", "correct5"}`` (accuracies as fractions).
    A progress bar goes to stderr when it is a terminal (``progress=True/False`` forces it).
    A bad image raises ``ImageError`` naming its path; none is skipped silently. ``model``,
    ``weights``, ``resize_size`` and ``crop_size`` as for ``predict``.
    """
    check_positive(batch_size, "batch_size")
    samples = find_labelled_images(folder)
    net = get_model(model, weights, offline=offline)
    kwargs = recipe(net, resize_size, crop_size)
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
            progress_bar(start + len(chunk), len(samples), sys.stderr)
    count = len(samples)
    return dict(top1=correct1 / count, top5=correct5 / count, count=count, correct1=correct1, correct5=correct5)
