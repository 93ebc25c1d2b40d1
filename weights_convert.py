#!/usr/bin/env python3
"""Convert torchvision MobileNetV3 weights to npmnv3's .npz format -- torch is not needed.

    python weights_convert.py SRC.pth OUT.npz                 # any torch.save'd state dict
    python weights_convert.py --arch mobilenet_v3_large --weights IMAGENET1K_V2 OUT.npz
    python weights_convert.py SRC.pth OUT.npz --float16       # half the size; loads back as float32

The file is read by npmnv3's safe reader (nothing in it is executed), loaded into the matching
network (the architecture is recognised from the keys unless --arch is given), and written with its
architecture, options and preprocessing as JSON metadata. When torch and torchvision are
importable, torchvision's model and npmnv3's are run on one random input and the largest
difference of their logits is printed, absolute and relative to the largest logit.
"""

import argparse
import sys

import numpy as np

import npmnv3
from npmnv3 import weights as W
from npmnv3.config import ARCHS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="SRC.pth OUT.npz, or OUT.npz with --weights")
    p.add_argument("--arch", choices=list(ARCHS), help="architecture (default: recognised from the keys)")
    p.add_argument("--weights", metavar="NAME", help="official weights to fetch: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--reduced-tail", action="store_true")
    p.add_argument("--dilated", action="store_true")
    p.add_argument("--float16", action="store_true", help="store floating-point arrays as float16")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with torchvision")
    args = p.parse_args(argv)
    if args.weights:
        if len(args.paths) != 1:
            p.error("with --weights give only OUT.npz")
        if not args.arch:
            p.error("--weights needs --arch")
    elif len(args.paths) != 2:
        p.error("expected SRC.pth OUT.npz")
    return args


def build_model(state_dict, meta, args):
    """The npmnv3 model these weights fit, trying both architectures unless --arch was given."""
    options = dict(width_mult=args.width_mult, reduced_tail=args.reduced_tail, dilated=args.dilated)
    num_classes = W.classes_in(state_dict)
    errors = []
    for arch in [args.arch] if args.arch else list(ARCHS):
        model = npmnv3.MobileNetV3(arch, num_classes=num_classes, **options)
        try:
            model.load_state_dict(state_dict)
        except npmnv3.StateDictError as exc:
            errors.append(str(exc))
            continue
        model.meta = dict(meta, arch=arch)
        return model
    raise npmnv3.StateDictError("the weights fit no MobileNetV3 with these options:\n" + "\n".join(errors))


def compare_with_torchvision(model):
    """(largest |logit difference| between torchvision and npmnv3 on one input, largest |logit|), or
    None without torch."""
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    reference = getattr(torchvision.models, model.arch)(**model.options).eval()
    reference.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in model.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    return float(np.abs(model(x) - expected).max()), float(np.abs(expected).max())


def main(argv=None):
    args = parse_args(argv)
    out = args.paths[-1]
    try:
        if args.weights:
            entry = W.get_weights(args.arch, args.weights)
            src = entry.fetch()
            meta = entry.meta()
        else:
            src = args.paths[0]
            meta = W.meta_for_file(src)
        state_dict = npmnv3.load_state_dict(src)
        model = build_model(state_dict, meta, args)
        stored = model.state_dict()
        if args.float16:
            stored = {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in stored.items()}
        metadata = dict(model.meta, arch=model.arch, **model.options, source=str(src),
                        stored_dtype="float16" if args.float16 else "float32")
        metadata.pop("categories", None)      # ImageNet's names are restored on load for 1000 classes
        npmnv3.save_state_dict(stored, out, metadata=metadata)
    except (ValueError, OSError) as exc:
        print(f"weights_convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {model.arch} ({len(stored)} tensors, {'float16' if args.float16 else 'float32'}) "
          f"from {src}")
    if not args.no_check:
        check = npmnv3.MobileNetV3(model.arch, **model.options)
        check.load_state_dict(npmnv3.load_state_dict(out))
        compared = compare_with_torchvision(check)
        if compared is None:
            print("torch is not installed: skipped the comparison with torchvision")
        else:
            diff, scale = compared
            print(f"npmnv3 (from {out}) vs torchvision: max |logit difference| {diff:.3g}, "
                  f"relative {diff / max(scale, 1e-30):.2g} (largest |logit| {scale:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
