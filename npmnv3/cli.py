"""The ``npmnv3`` command line: ``predict``, ``summary``, ``evaluate``."""

import argparse
import sys

import npmnv3

ARCH_CHOICES = ("mobilenet_v3_large", "mobilenet_v3_small")


def build_parser():
    parser = argparse.ArgumentParser(prog="npmnv3", description="MobileNetV3 in pure NumPy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("summary", help="print the per-layer table: output shape, params, MACs",
                            description="Print the per-layer table of output shapes, parameters and MACs.")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="mobilenet_v3_large")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.set_defaults(run=run_summary)
    return parser


def run_summary(args):
    if args.size < 1:
        raise ValueError(f"--size: expected a positive integer, got {args.size}")
    model = getattr(npmnv3, args.arch)()
    npmnv3.summary(model, input_size=args.size)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        print(f"npmnv3 {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("npmnv3: interrupted", file=sys.stderr)
        return 130
