"""The ``npmnv3`` command line (also ``python -m npmnv3``): ``predict``, ``segment``, ``detect``, ``summary``,
``evaluate``.

Errors print one line naming the file or argument at fault and exit with status 1, no traceback;
usage errors exit with status 2 (argparse's). Output cut short by a closed pipe (``| head``)
ends quietly.
"""

import argparse
import json
import os
import signal
import sys

import npmnv3
from npmnv3 import weights as W
from npmnv3.config import ARCHS
from npmnv3.errors import StateDictError
from npmnv3.detect import detect, draw_detections
from npmnv3.predict import DEFAULT_ARCH, classify, find_labelled_images, recipe
from npmnv3.segment import ARCHS as SEGMENTATION_ARCHS, mask_image, overlay, segment

ARCH_CHOICES = list(ARCHS)
SEGMENTERS = list(SEGMENTATION_ARCHS)
DETECTORS = [W.DETECTOR]
SAMPLE = "grace_hopper.jpg"


class CommandError(ValueError):
    """A one-line error for the user, printed as it is."""


def sample_image():
    """Path of the sample photograph (Grace Hopper) from matplotlib's sample data."""
    try:
        from matplotlib import cbook
    except ImportError as exc:
        raise CommandError("no IMAGE given, and the sample photograph comes with matplotlib, which is not "
                           "installed: pip install matplotlib, or name an image") from exc
    return cbook.get_sample_data(SAMPLE, asfileobj=False)


def unit_float(text):
    """argparse type: a number from 0 to 1 (a usage error, exit 2, otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --------------------------------------------------------------------------- arguments

def _add_model_arguments(p):
    p.add_argument("--arch", choices=ARCH_CHOICES,
                   help="network (default: the one the --weights file holds, else mobilenet_v3_large)")
    p.add_argument("--weights", default="DEFAULT", metavar="NAME|PATH",
                   help="DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2 (Large only), or a .pth / .npz file; with "
                        "--quantized: DEFAULT (IMAGENET1K_QNNPACK_V1) or a QAT state dict")
    p.add_argument("--offline", action="store_true", help="never use the network (as NPMNV3_OFFLINE=1)")
    p.add_argument("--quantized", action="store_true",
                   help="run torchvision's int8 MobileNetV3-Large in integers (Large only)")
    p.add_argument("--resize", type=positive_int, metavar="N",
                   help="resize the short side to N (default: the weights' recipe, e.g. 232 or 256)")
    p.add_argument("--crop", type=positive_int, metavar="N", help="centre crop N x N (default: 224)")


def build_parser():
    parser = argparse.ArgumentParser(prog="npmnv3", description="MobileNetV3 in pure NumPy.")
    parser.add_argument("--version", action="version", version=f"npmnv3 {npmnv3.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("predict", help="top-k ImageNet labels for images",
                            description="Print the top-k ImageNet labels for each image. With no IMAGE, "
                                        "uses matplotlib's sample photograph of Grace Hopper. The first run "
                                        "downloads the official weights (10-22 MB) to the cache.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    _add_model_arguments(p)
    p.add_argument("--topk", type=positive_int, default=5, help="predictions per image (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per forward pass (default 16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--exif-transpose", action="store_true",
                   help="rotate images as their EXIF orientation says (torchvision does not)")
    p.add_argument("--keep-going", action="store_true",
                   help="go on past images that cannot be read: report each on stderr (and as an \"error\" "
                        "entry with --json); the exit status is 1 if any failed")
    p.set_defaults(run=run_predict)

    p = commands.add_parser("segment", help="per-pixel classes (the 21 Pascal VOC classes) for images",
                            description="Segment each image: print the classes present and their share of "
                                        "the pixels; with --out, write a colour mask and an overlay per image. "
                                        "The first run downloads the official weights (13-44 MB) to the cache.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--arch", choices=SEGMENTERS, default=SEGMENTERS[0],
                   help=f"network (default {SEGMENTERS[0]})")
    p.add_argument("--weights", default="DEFAULT", metavar="NAME|PATH",
                   help="DEFAULT (COCO_WITH_VOC_LABELS_V1), or a .pth / .npz file")
    p.add_argument("--offline", action="store_true", help="never use the network (as NPMNV3_OFFLINE=1)")
    p.add_argument("--out", metavar="DIR",
                   help="write IMAGE.mask.png (a palette PNG, the VOC colours) and IMAGE.overlay.png here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_segment)

    p = commands.add_parser("detect", help="objects (the 80 COCO categories) in images: boxes, labels, scores",
                            description="Detect objects in each image with SSDLite320 on MobileNetV3-Large: print "
                                        "each detection's label, score and box (x1, y1, x2, y2 in the image's "
                                        "pixels); with --out, write each image with its boxes drawn. The first run "
                                        "downloads the official weights (14 MB) to the cache.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--threshold", type=unit_float, default=0.5, metavar="SCORE",
                   help="report detections scoring above this (default 0.5)")
    p.add_argument("--weights", default="DEFAULT", metavar="NAME|PATH", help="DEFAULT (COCO_V1), or a .pth / .npz file")
    p.add_argument("--offline", action="store_true", help="never use the network (as NPMNV3_OFFLINE=1)")
    p.add_argument("--out", metavar="DIR", help="write IMAGE.detections.png, the image with its boxes drawn, here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_detect)

    p = commands.add_parser("summary", help="per-layer table: output shape, params, MACs",
                            description="Print the per-layer table of output shapes, parameters and "
                                        "multiply-accumulates (random weights: only the shapes matter).")
    p.add_argument("--arch", choices=ARCH_CHOICES + SEGMENTERS + DETECTORS, default=DEFAULT_ARCH,
                   help="network (default mobilenet_v3_large)")
    p.add_argument("--size", type=positive_int, default=224, metavar="N", help="input height and width (default 224)")
    p.add_argument("--quantized", action="store_true",
                   help="the int8 MobileNetV3-Large, with each layer's weight bytes in int8 and in float32")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_summary)

    p = commands.add_parser("evaluate", help="top-1 / top-5 accuracy over a labelled folder",
                            description="Top-1 and top-5 accuracy over FOLDER, laid out one sub-folder per "
                                        "class (WordNet IDs like n01440764, or class names).")
    p.add_argument("folder", metavar="FOLDER",
                   help="a folder with one sub-folder of images per class, named n01440764/ or tench/")
    _add_model_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_evaluate)
    return parser


# --------------------------------------------------------------------------- the model a command uses

def _offline(args):
    return "--offline" if args.offline else None


def load_quantized_model(args):
    """The int8 network for --quantized (--arch, if given, must be mobilenet_v3_large)."""
    if args.arch not in (None, DEFAULT_ARCH):
        raise CommandError(f"--quantized: torchvision's quantized network is {DEFAULT_ARCH}; drop --arch {args.arch}")
    try:
        return W.build_quantized(args.weights, offline=_offline(args))
    except StateDictError as exc:
        raise CommandError(f"--weights {args.weights}: {exc.summary}") from exc


def load_model(args):
    """The network for --arch / --weights: a file's own architecture unless --arch says otherwise."""
    if args.quantized:
        return load_quantized_model(args)
    weights = args.weights
    if W.names_a_file(args.arch or DEFAULT_ARCH, weights):
        state_dict, meta = npmnv3.load_state_dict(weights), W.meta_for_file(weights)
        found, options = W.file_options(state_dict, meta)
        if args.arch and found and found != args.arch:
            raise CommandError(f"--arch {args.arch} does not fit --weights {weights}: these weights are {found} "
                               f"({len(state_dict)} tensors); drop --arch or pass --arch {found}")
        try:
            return W.assemble(args.arch or found or DEFAULT_ARCH, state_dict, meta, **options)
        except StateDictError as exc:
            raise CommandError(f"--weights {weights}: {exc.summary}") from exc
    return W.build(args.arch or DEFAULT_ARCH, weights, offline=_offline(args))


def say_recipe(net, args):
    """Tell once on stderr which preprocessing is used when it is a guess."""
    if net.meta.get("recipe_guessed") and not (args.resize and args.crop):
        r = recipe(net, args.resize, args.crop)
        resize, crop = r["resize_size"], r["crop_size"]
        if args.resize:
            used = f"resize {resize} (--resize) and torchvision's default crop {crop} (set --crop)"
        elif args.crop:
            used = f"torchvision's default resize {resize} (set --resize) and crop {crop} (--crop)"
        else:
            used = f"torchvision's default recipe: resize {resize}, crop {crop} (set --resize / --crop)"
        print(f"npmnv3: {args.weights} does not say how its images were preprocessed; using {used}", file=sys.stderr)


def check_images(paths):
    """[(path, ImageError or None)]: each input checked (it exists and its header opens) before any
    weights are loaded or downloaded."""
    return [(path, _image_problem(path)) for path in paths]


def require_images(paths):
    """Raise the first image's problem, if any (``check_images``)."""
    for _, problem in check_images(paths):
        if problem is not None:
            raise problem


def out_stem(folder, path):
    """Where a command writes what it made of image ``path`` in ``folder``: the folder and the image's stem."""
    return os.path.join(folder, os.path.splitext(os.path.basename(path))[0])


def _image_problem(path):
    try:
        npmnv3.images.check_image(path)
    except npmnv3.ImageError as exc:
        return exc
    return None


# --------------------------------------------------------------------------- commands

def probability_digits(probabilities):
    """Significant digits (4 to 15) that print ``probabilities`` (sorted, highest first) so that any two
    that differ look different: 4 for a trained network, more when they are close (random weights)."""
    for digits in range(4, 16):
        shown = [f"{100 * p:.{digits}g}" for p in probabilities]
        if all(a != b for a, b, p, q in zip(shown, shown[1:], probabilities, probabilities[1:]) if p != q):
            return digits
    return 15


def run_predict(args):
    paths = args.images or [sample_image()]
    checked = check_images(paths)
    bad = [(path, exc) for path, exc in checked if exc is not None]
    if bad and not args.keep_going:
        raise bad[0][1]
    net = load_model(args)
    if args.topk > net.num_classes:
        raise CommandError(f"--topk: expected at most {net.num_classes} (the number of classes), got {args.topk}")
    say_recipe(net, args)
    good = [path for path, exc in checked if exc is None]
    results = dict(bad)
    if good:
        progress = len(good) > args.batch_size and sys.stderr.isatty()
        out = classify(net, good, [None] * len(good), args.topk, args.batch_size, args.exif_transpose,
                       keep_going=args.keep_going, progress=progress, resize_size=args.resize, crop_size=args.crop)
        results.update(zip(good, out))
    failed = 0
    entries = []
    for path in paths:
        result = results[path]
        if isinstance(result, npmnv3.ImageError):
            failed += 1
            print(f"npmnv3 predict: error: {result}", file=sys.stderr)
            entries.append(dict(image=str(path), error=str(result)))
        else:
            entries.append(dict(image=str(path), predictions=result))
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for entry in entries:
            if "predictions" not in entry:
                continue
            print(entry["image"])
            digits = probability_digits([p["probability"] for p in entry["predictions"]])
            for rank, p in enumerate(entry["predictions"], 1):
                shown = f"{100 * p['probability']:.{digits}g}%"
                print(f"  {rank:2d}. {p['label']:<32} {shown:>{digits + 3}}  (class {p['index']})")
    return 1 if failed else 0


def run_segment(args):
    require_images(args.images)
    net = W.build_segmenter(args.arch, args.weights, offline=_offline(args))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    entries = []
    for path in args.images:
        image = npmnv3.load_image(path) if args.out else path      # decoded once for the mask and the overlay
        result = segment(image, model=net)
        entry = dict(image=str(path), labels=result["labels"], fractions=result["fractions"])
        if args.out:
            stem = out_stem(args.out, path)
            mask_image(result["mask"]).save(stem + ".mask.png")
            overlay(image, result["mask"]).save(stem + ".overlay.png")
            entry.update(mask=stem + ".mask.png", overlay=stem + ".overlay.png")
        entries.append(entry)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        print(entry["image"])
        for name in entry["labels"]:
            print(f"  {name:<16} {100 * entry['fractions'][name]:6.2f}%")
        if args.out:
            print(f"  wrote {entry['mask']} and {entry['overlay']}")
    return 0


def run_detect(args):
    require_images(args.images)
    net = W.build_detector(args.weights, offline=_offline(args))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    entries = []
    for path in args.images:
        image = npmnv3.load_image(path) if args.out else path      # decoded once for the boxes and the drawing
        entry = dict(image=str(path), detections=detect(image, model=net, score_threshold=args.threshold))
        if args.out:
            entry["drawing"] = out_stem(args.out, path) + ".detections.png"
            draw_detections(image, entry["detections"]).save(entry["drawing"])
        entries.append(entry)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        print(f"{entry['image']}: {len(entry['detections'])} detections above {args.threshold:g}")
        for rank, found in enumerate(entry["detections"], 1):
            box = ", ".join(f"{v:.1f}" for v in found["box"])
            print(f"  {rank:3d}. {found['label']:<16} {found['score']:.3f}  [{box}]")
        if args.out:
            print(f"  wrote {entry['drawing']}")
    return 0


def run_summary(args):
    if args.quantized and args.arch != DEFAULT_ARCH:
        raise CommandError(f"--quantized: torchvision's quantized network is {DEFAULT_ARCH}, not {args.arch}")
    arch = "quantized_mobilenet_v3_large" if args.quantized else args.arch
    model = getattr(npmnv3, arch)()
    result = npmnv3.summary(model, input_size=args.size, print_table=not args.json)
    if args.json:
        print(json.dumps(dict(arch=arch, input_size=args.size, **result), indent=2))
    return 0


def run_evaluate(args):
    find_labelled_images(args.folder)       # a bad folder is reported before any download
    net = load_model(args)
    say_recipe(net, args)
    result = npmnv3.evaluate(args.folder, model=net, batch_size=args.batch_size, resize_size=args.resize,
                             crop_size=args.crop)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.folder}: {result['count']} images, top-1 {100 * result['top1']:.2f}% "
              f"({result['correct1']}), top-5 {100 * result['top5']:.2f}% ({result['correct5']})")
    return 0


# --------------------------------------------------------------------------- entry points

def main(argv=None):
    """Run the command line in this process (the tests call this); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except StateDictError as exc:
        print(f"npmnv3 {args.command}: error: {exc.summary}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:      # ImageError, WeightsFormatError, DownloadError, ...
        message = str(exc).replace("\n", " ")
        print(f"npmnv3 {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("npmnv3: interrupted", file=sys.stderr)
        return 130


def console():
    """The ``npmnv3`` program: as ``main``, but a closed output pipe ends it quietly, as it does any
    Unix tool (the default action of SIGPIPE, restored for this process, which is the program)."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
