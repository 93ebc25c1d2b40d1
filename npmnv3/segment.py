"""segment(): from images to per-pixel class masks, with torchvision's pipeline for its segmentation
weights; and the colours and overlays the command line draws them with.

For each image: preprocess as the weights' recipe says (short side 520, no crop), run the model,
resize its ``"out"`` class scores (bilinear, ``kernels.interpolate``) from the preprocessed size to
the image's own size, and take the class of the highest score at each pixel -- exactly what
``F.interpolate(model(x)["out"], size=(H, W), mode="bilinear").argmax(1)`` gives in torchvision.
"""

import numpy as np
from PIL import Image

from . import kernels as K
from .images import SEGMENTATION_RESIZE, load_image, preprocess
from .predict import labels, recipe
from .segmentation import DeepLabV3, LRASPP
from .weights import build_segmenter

ARCHS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
ROWS_AT_A_TIME = 256        # the class scores are resized to the image's size this many rows at a time


def mask_of(scores, size, rows=ROWS_AT_A_TIME):
    """``argmax`` over classes of ``scores`` (C, h, w) resized (bilinear) to ``size`` = (H, W): an (H, W)
    int array. Resized a band of rows at a time, so a large photograph never holds all its scores."""
    height, width = size
    h0, h1, wh0, wh1 = K.resize_source(scores.shape[1], height, scores.dtype)
    w0, w1, ww0, ww1 = K.resize_source(scores.shape[2], width, scores.dtype)
    mask = np.empty((height, width), np.int64)
    for a in range(0, height, rows):
        b = min(a + rows, height)
        top, bottom = scores[:, h0[a:b]], scores[:, h1[a:b]]
        top = top[..., w0] * ww0 + top[..., w1] * ww1            # along W, as kernels.interpolate
        bottom = bottom[..., w0] * ww0 + bottom[..., w1] * ww1
        band = top * wh0[a:b, None] + bottom * wh1[a:b, None]    # then along H
        mask[a:b] = band.argmax(axis=0)
    return mask


def get_segmenter(arch="lraspp_mobilenet_v3_large", weights="DEFAULT", model=None, offline=None):
    """``model`` itself if it is one, else ``arch`` built with ``weights`` for this call."""
    if isinstance(model, (LRASPP, DeepLabV3)):
        return model
    if model is not None:
        raise TypeError(f"model: expected an LRASPP or DeepLabV3 instance, got {type(model).__name__}")
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    return build_segmenter(arch, weights, offline=offline)


def segment(images, *, arch="lraspp_mobilenet_v3_large", weights="DEFAULT", model=None, offline=None,
            exif_transpose=False):
    """Per-pixel classes for one image or a list of images.

    Parameters
    ----------
    images : image or list of images
        Anything ``npmnv3.load_image`` accepts, or a list of them.
    arch, weights : str
        The network ("lraspp_mobilenet_v3_large" or "deeplabv3_mobilenet_v3_large") and its weights
        ("DEFAULT", "COCO_WITH_VOC_LABELS_V1", or a path), built for this call; or
    model : LRASPP or DeepLabV3
        A network built already (then ``arch`` and ``weights`` are ignored).

    Returns
    -------
    result : dict or list of dict
        Per image: ``"mask"``, an (H, W) int array of class indices at the image's own size;
        ``"labels"``, the names of the classes present, most pixels first; ``"fractions"``, the
        share of the pixels of each of them.

    Raises
    ------
    ImageError
        A bad image, named by its path or its index in the list.
    """
    single = not isinstance(images, (list, tuple))
    batch = [images] if single else list(images)
    net = get_segmenter(arch, weights, model, offline)
    names = labels(net)
    kwargs = recipe(net, default_resize=SEGMENTATION_RESIZE, default_crop=None)
    results = []
    for i, image in enumerate(batch):
        label = None if single else f"image {i}"
        img = load_image(image, name=label, exif_transpose=exif_transpose)
        try:
            x = preprocess(img, name=label, **kwargs)
            size = (img.size[1], img.size[0])
        finally:
            img.close()
        mask = mask_of(net(x[None])["out"][0], size)
        counts = np.bincount(mask.ravel(), minlength=net.num_classes)
        present = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
        results.append(dict(mask=mask, labels=[names[k] for k in present],
                            fractions={names[k]: float(counts[k] / mask.size) for k in present}))
    return results[0] if single else results


# --------------------------------------------------------------------------- pictures of masks

def voc_palette(count=256):
    """The Pascal VOC colour map: (count, 3) uint8, colour k spreading the bits of k over R, G and B
    (class 0, background, is black; 1 is dark red, 15, person, pink-ish)."""
    palette = np.zeros((count, 3), np.uint8)
    for k in range(count):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[k] = r, g, b
    return palette


def mask_image(mask):
    """A palette ("P" mode) PIL image of a mask, in the VOC colours."""
    picture = Image.fromarray(mask.astype(np.uint8), mode="P")
    picture.putpalette(voc_palette().ravel().tolist())
    return picture


def overlay(image, mask, alpha=0.5):
    """An RGB PIL image: ``image`` with the mask's colours blended in (background left as it is)."""
    rgb = np.asarray(load_image(image), np.float32)
    colours = voc_palette()[mask].astype(np.float32)
    blend = np.where(mask[..., None] > 0, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), mode="RGB")
