"""The ``npmnv3`` command line (also ``python -m npmnv3``): ``predict``, ``summary``, ``evaluate``.

Errors print one line naming the file or argument at fault and exit with status 1, no traceback.
"""

import argparse
import json
import sys

import npmnv3
from npmnv3.config import ARCHS

ARCH_CHOICES = list(ARCHS)
SAMPLE = "grace_hopper.jpg"


def sample_image():
    """Path of the sample photograph (Grace Hopper) from matplotlib's sample data."""
    try:
        from matplotlib import cbook
    except ImportError as exc:
        raise ValueError("no IMAGE given, and the sample photograph comes with matplotlib, which is not "
                         "installed: pip install matplotlib, or name an image") from exc
    return cbook.get_sample_data(SAMPLE, asfileobj=False)


def _add_model_arguments(p):
    p.add_argument("--arch", choices=ARCH_CHOICES, default="mobilenet_v3_large",
                   help="network (default mobilenet_v3_large)")
    p.add_argument("--weights", default="DEFAULT", metavar="NAME|PATH",
                   help="DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2 (Large only), or a .pth / .npz file")
    p.add_argument("--offline", action="store_true", help="never use the network (as NPMNV3_OFFLINE=1)")


def build_parser():
    parser = argparse.ArgumentParser(prog="npmnv3", description="MobileNetV3 in pure NumPy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("predict", help="top-k ImageNet labels for images",
                            description="Print the top-k ImageNet labels for each image. With no IMAGE, "
                                        "uses matplotlib's sample photograph of Grace Hopper. The first run "
                                        "downloads the official weights (10-22 MB) to the cache.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    _add_model_arguments(p)
    p.add_argument("--topk", type=int, default=5, help="predictions per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--exif-transpose", action="store_true",
                   help="rotate images as their EXIF orientation says (torchvision does not)")
    p.set_defaults(run=run_predict)

    p = commands.add_parser("summary", help="per-layer table: output shape, params, MACs",
                            description="Print the per-layer table of output shapes, parameters and MACs.")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="mobilenet_v3_large")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.set_defaults(run=run_summary)

    p = commands.add_parser("evaluate", help="top-1 / top-5 accuracy over a labelled folder",
                            description="Top-1 and top-5 accuracy over FOLDER, laid out one sub-folder per "
                                        "class (WordNet IDs like n01440764, or class names).")
    p.add_argument("folder", metavar="FOLDER")
    _add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_evaluate)
    return parser


def run_predict(args):
    images = args.images or [sample_image()]
    results = npmnv3.predict(images, model=args.arch, weights=args.weights, topk=args.topk,
                             exif_transpose=args.exif_transpose, offline=args.offline or None)
    if args.json:
        print(json.dumps([dict(image=str(img), predictions=preds) for img, preds in zip(images, results)],
                         indent=2))
        return 0
    for img, preds in zip(images, results):
        print(img)
        for rank, p in enumerate(preds, 1):
            print(f"  {rank:2d}. {p['label']:<32} {100 * p['probability']:6.2f}%  (class {p['index']})")
    return 0


def run_summary(args):
    if args.size < 1:
        raise ValueError(f"--size: expected a positive integer, got {args.size}")
    npmnv3.summary(getattr(npmnv3, args.arch)(), input_size=args.size)
    return 0


def run_evaluate(args):
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    result = npmnv3.evaluate(args.folder, model=args.arch, weights=args.weights, batch_size=args.batch_size,
                             offline=args.offline or None)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.folder}: {result['count']} images, top-1 {100 * result['top1']:.2f}% "
              f"({result['correct1']}), top-5 {100 * result['top5']:.2f}% ({result['correct5']})")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:      # ImageError, WeightsFormatError, DownloadError, ...
        message = str(exc).replace("\n", " ")
        print(f"npmnv3 {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("npmnv3: interrupted", file=sys.stderr)
        return 130
