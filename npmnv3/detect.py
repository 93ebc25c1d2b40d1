"""detect(): from images to the objects in them (boxes, labels, scores), with torchvision's pipeline for
its detection weights; and the picture of them the command line draws.

Each image is loaded as ``npmnv3.load_image`` loads it (RGB, 8 bits), turned into a (3, H, W) float32
array in [0, 1] as torchvision's ``weights.transforms()`` does (``pil_to_tensor`` then / 255), and
given to the detector, which resizes and normalises it itself.
"""

import numpy as np
from PIL import ImageDraw

from .detection import SSDLite
from .images import load_image
from .predict import as_batch, labels
from .segment import voc_palette
from .weights import build_detector


def get_detector(weights="DEFAULT", model=None, offline=None):
    """``model`` itself if it is one, else the detector built with ``weights`` for this call."""
    if isinstance(model, SSDLite):
        return model
    if model is not None:
        raise TypeError(f"model: expected an SSDLite instance, got {type(model).__name__}")
    return build_detector(weights, offline=offline)


def image_array(image, name=None, exif_transpose=False):
    """``image`` (anything ``load_image`` accepts) as a (3, H, W) float32 array in [0, 1]: its RGB pixels / 255."""
    picture = load_image(image, name=name, exif_transpose=exif_transpose)
    try:
        pixels = np.asarray(picture)
    finally:
        picture.close()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)


def _check_threshold(score_threshold):
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float, np.floating)) \
            or not 0 <= score_threshold <= 1:
        raise ValueError(f"score_threshold: expected a number from 0 to 1, got {score_threshold!r}")
    return float(score_threshold)


def detect(images, *, weights="DEFAULT", model=None, score_threshold=0.5, offline=None, exif_transpose=False):
    """The objects in one image or a list of images.

    Parameters
    ----------
    images : image or list of images
        Anything ``npmnv3.load_image`` accepts (a path, bytes, a binary file object, a PIL image, an
        HWC uint8 RGB or HW grey array), or a list of them.
    weights : str or path
        "DEFAULT" (= "COCO_V1") or a path to a weights file, built for this call; or
    model : SSDLite
        A detector built already (then ``weights`` is ignored).
    score_threshold : float
        Only detections scoring above this are returned (the model keeps up to 300 above 0.001).

    Returns
    -------
    detections : list of dict, or a list of them for a list of images
        Per detection ``{"box": [x1, y1, x2, y2], "label": name, "index": class index, "score": float}``,
        best score first, the box in the image's own pixels.

    Raises
    ------
    ImageError
        A bad image, named by its path or its index in the list.
    """
    single, batch = as_batch(images)
    threshold = _check_threshold(score_threshold)
    net = get_detector(weights, model, offline)
    names = labels(net)
    results = []
    for i, image in enumerate(batch):
        x = image_array(image, name=None if single else f"image {i}", exif_transpose=exif_transpose)
        found = net([x])[0]
        results.append([dict(box=[float(v) for v in box], label=names[label], index=int(label), score=float(score))
                        for box, score, label in zip(found["boxes"], found["scores"], found["labels"])
                        if score > threshold])
    return results[0] if single else results


def draw_detections(image, detections, width=2):
    """An RGB PIL image: ``image`` with each detection's box drawn and labelled ("label 0.87"), one
    colour per class (the VOC colour map of ``segment.voc_palette``)."""
    picture = load_image(image)
    draw = ImageDraw.Draw(picture)
    colours = voc_palette()
    for found in detections:
        colour = tuple(int(v) for v in colours[found["index"] % len(colours)])
        x1, y1, x2, y2 = found["box"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{found['label']} {found['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        up = min(bottom - top + 2, y1)            # above the box where there is room, else inside it
        draw.rectangle((left, top - up, right + 2, bottom - up), fill=colour)
        draw.text((x1 + 1, y1 - up), text, fill=(255, 255, 255) if sum(colour) < 384 else (0, 0, 0))
    return picture
