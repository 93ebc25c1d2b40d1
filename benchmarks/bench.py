"""Time npmnv3's ``model(x)`` against torchvision eager (and ONNX Runtime when installed).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench.py [--cases large1,small32] [--rounds 5]

Each system runs in its own process: in one process, each library's idle worker threads keep
spinning after a call and slow whatever runs next (torch's OpenMP workers, OpenBLAS's, ONNX
Runtime's). The driver (this script without ``--worker``) makes the weights once, then for each
case runs ``--rounds`` rounds, each round one fresh process per system, in turn; a process warms
up for a second, times single calls for ``--seconds`` and reports their median. Reported: the
median over rounds of those medians (min-max of the rounds), and the ratio npmnv3 / torch of the
two medians. Before timing, every system's output on one input is checked against torchvision's.

Weights: random, made by ``torchref`` with non-trivial BatchNorm statistics (as a trained network
has), written to an ``.npz`` for npmnv3 (whose process never imports torch) and a ``.pth`` for
torch. ``--npmnv3 DIR`` times the npmnv3 found in another checkout instead (before / after
comparisons). Results are recorded in ``benchmarks/README.md``.

The int8 cases (``int8_1``, ``int8_32``) time npmnv3's quantized MobileNetV3-Large against torch's quantized
model under the QNNPACK engine (the same QAT state dict, made by ``torchref.quantized_model``) and against
npmnv3's own float model on that state dict's float weights ("npmnv3-float"); npmnv3's int8 output must
equal torch's before anything is timed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# case: (model, batch, input size); the detector's (H, W) is a photograph's, which it resizes to 320 x 320 itself
CASES = {
    "large1": ("mobilenet_v3_large", 1, 224),
    "large32": ("mobilenet_v3_large", 32, 224),
    "small1": ("mobilenet_v3_small", 1, 224),
    "small32": ("mobilenet_v3_small", 32, 224),
    "lraspp1": ("lraspp_mobilenet_v3_large", 1, 520),
    "deeplabv3_1": ("deeplabv3_mobilenet_v3_large", 1, 520),
    "int8_1": ("quantized_mobilenet_v3_large", 1, 224),
    "int8_32": ("quantized_mobilenet_v3_large", 32, 224),
    "detect1": ("ssdlite320_mobilenet_v3_large", 1, (480, 640)),
}
QUANTIZED = "quantized_mobilenet_v3_large"
SEGMENTERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
DETECTOR = "ssdlite320_mobilenet_v3_large"    # timed from image to boxes: transform, network, postprocess
TOLERANCE = 1e-4        # max |diff| / max(1, max |torchvision|) before anything is timed


# --------------------------------------------------------------------------- workers (one per process)

def segmenter_options(arch):
    """The official layout of a segmentation network: DeepLabV3's file carries the aux head."""
    return {"aux_loss": True} if arch.startswith("deeplab") else {}


def torch_network(arch):
    """torchvision's network ``arch`` without weights (the segmentation ones: the official layout, aux head included)."""
    import torchvision
    if arch == DETECTOR:
        return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    if arch in SEGMENTERS:
        return getattr(torchvision.models.segmentation, arch)(weights=None, weights_backbone=None,
                                                              **segmenter_options(arch))
    return getattr(torchvision.models, arch)()


def torch_model(arch, folder):
    """torchvision's ``arch`` in eval mode with the weights ``make_weights`` wrote to ``folder``."""
    import torch
    model = torch_network(arch).eval()
    model.load_state_dict(torch.load(os.path.join(folder, f"{arch}.pth")))
    return model


def make_weights(arch, folder):
    """Random torchvision weights with meaningful BN statistics, as .pth (torch) and .npz (npmnv3)."""
    import numpy as np
    import torch
    import torchref
    if arch == QUANTIZED:
        return make_quantized_weights(folder)
    if arch == DETECTOR:
        model = torchref.random_detection_model(seed=0)
    elif arch in SEGMENTERS:
        model = torchref.random_segmentation_model(arch, seed=0, **segmenter_options(arch))
    else:
        model = torchref.random_model(arch, seed=0)
    pth, npz = os.path.join(folder, f"{arch}.pth"), os.path.join(folder, f"{arch}.npz")
    torch.save(model.state_dict(), pth)
    np.savez(npz, **torchref.numpy_state_dict(model))
    return pth, npz


def make_quantized_weights(folder):
    """A QAT state dict (random weights, observers calibrated) as .pth and .npz, and its float weights as
    ``quantized_mobilenet_v3_large-float.npz`` for npmnv3's float model."""
    import numpy as np
    import torch
    import torchref
    from npmnv3.quantized import QuantizedMobileNetV3, float_state_dict
    qat, _ = torchref.quantized_model(seed=0)
    pth, npz = os.path.join(folder, f"{QUANTIZED}.pth"), os.path.join(folder, f"{QUANTIZED}.npz")
    torch.save(qat.state_dict(), pth)
    state = torchref.numpy_state_dict(qat)
    np.savez(npz, **state)
    layout = QuantizedMobileNetV3()
    np.savez(os.path.join(folder, f"{QUANTIZED}-float.npz"), **float_state_dict(state, layout.features, layout.classifier))
    return pth, npz


def torch_quantized(folder):
    """torch's int8 MobileNetV3-Large from the QAT state dict, converted under QNNPACK."""
    import torch
    import torchref
    qat = torchref.prepare_qat(torchref.random_quantizable_model(seed=1)).eval()
    qat.load_state_dict(torch.load(os.path.join(folder, f"{QUANTIZED}.pth")))
    return torchref.convert(qat, "qnnpack")


def example_input(batch, size):
    """Noise for the classifiers; smooth random images (a few colours, interpolated) for the
    segmenters, whose BatchNorm statistics come from such images: on noise their activations run
    into the ten thousands, where float32 rounding differs visibly between implementations."""
    import numpy as np
    rng = np.random.default_rng(0)
    if size == 224:
        return rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    from npmnv3.kernels import interpolate
    return interpolate(rng.uniform(-2, 2, (batch, 3, 5, 6)), (size, size)).astype(np.float32)


def example_image(size):
    """The detector's input: a (3, H, W) float32 image in [0, 1], smooth random colours with pixel noise
    (as ``torchref.textured_images``, made with NumPy: npmnv3's process never imports torch)."""
    import numpy as np
    from npmnv3.kernels import interpolate
    rng = np.random.default_rng(0)
    smooth = interpolate(rng.uniform(0, 1, (1, 3, 5, 6)), size)[0]
    return np.clip(smooth + 0.3 * (rng.random((3, *size)) - 0.5), 0, 1).astype(np.float32)


def detections(found):
    """One image's detections as one (K, 6) array: box, score, label."""
    import numpy as np
    return np.concatenate([np.asarray(found["boxes"]), np.asarray(found["scores"])[:, None],
                           np.asarray(found["labels"])[:, None]], axis=1)


def build_detector(system, folder, size):
    """A callable running ``system``'s detector from one image to its boxes."""
    image = example_image(size)
    if system == "npmnv3":
        import npmnv3
        model = npmnv3.ssdlite320_mobilenet_v3_large(weights=os.path.join(folder, f"{DETECTOR}.npz"))
        return (lambda: detections(model([image])[0])), model
    import torch
    model = torch_model(DETECTOR, folder)
    images = [torch.from_numpy(image)]

    def forward():
        with torch.inference_mode():
            return detections(model(images)[0])
    return forward, model


def build(system, arch, folder, batch, size):
    """A callable running one forward pass of ``system`` on the case's input."""
    if arch == DETECTOR:
        return build_detector(system, folder, size)
    x = example_input(batch, size)
    if system == "npmnv3-float":
        import npmnv3
        model = npmnv3.mobilenet_v3_large(weights=os.path.join(folder, f"{arch}-float.npz"))
        return (lambda: model(x)), model
    if system == "torch" and arch == QUANTIZED:
        import torch
        import torchref
        model, xt = torch_quantized(folder), torch.from_numpy(x)

        def forward():
            with torchref.quantized_engine("qnnpack"), torch.inference_mode():
                return model(xt).numpy()
        return forward, model
    if system == "npmnv3":
        import npmnv3
        model = getattr(npmnv3, arch)(weights=os.path.join(folder, f"{arch}.npz"))
        if arch in SEGMENTERS:
            return (lambda: model(x)["out"]), model
        return (lambda: model(x)), model
    if system == "torch":
        import torch
        model = torch_model(arch, folder)
        xt = torch.from_numpy(x)

        def forward():
            with torch.inference_mode():
                out = model(xt)
                return (out["out"] if arch in SEGMENTERS else out).numpy()
        return forward, model
    if system == "ort":
        import onnxruntime
        session = onnxruntime.InferenceSession(os.path.join(folder, f"{arch}.onnx"), providers=["CPUExecutionProvider"])
        return (lambda: session.run(None, {"x": x})[0]), session
    raise ValueError(system)


def export_onnx(arch, folder):
    """The torch weights as ONNX (in its own process: tracing changed torch eager's speed afterwards)."""
    import torch
    model = torch_model(arch, folder)
    args = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    size = next(case[2] for case in CASES.values() if case[0] == arch)
    torch.onnx.export(model, torch.zeros((1, 3, size, size)), os.path.join(folder, f"{arch}.onnx"), dynamo=False,
                      **args)


def worker(args):
    arch, batch, size = CASES[args.case]
    if args.case_build:
        return build_times(arch, args.folder)
    forward, _ = build(args.system, arch, args.folder, batch, size)
    out = forward()
    import numpy as np
    np.save(os.path.join(args.folder, f"out-{args.system}-{args.case}.npy"), np.asarray(out, np.float32))
    t_end = time.perf_counter() + args.warmup
    while time.perf_counter() < t_end:
        forward()
    times, t_end = [], time.perf_counter() + args.seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        forward()
        times.append((time.perf_counter() - t0) * 1e3 / batch)
    return {"median": statistics.median(times), "calls": len(times)}


def build_times(arch, folder, repeats=5):
    """Building from the .npz (reading, checking, loading), and that plus the first forward at 224."""
    import npmnv3
    builds, firsts = [], []
    x = example_input(1, 224)
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = getattr(npmnv3, arch)(weights=os.path.join(folder, f"{arch}.npz"))
        t1 = time.perf_counter()
        model(x)
        t2 = time.perf_counter()
        builds.append((t1 - t0) * 1e3)
        firsts.append((t2 - t0) * 1e3)
    return {"build": statistics.median(builds), "first": statistics.median(firsts)}


# --------------------------------------------------------------------------- driver

def run_worker(system, case, folder, args, npmnv3_path=None, build_case=False):
    env = dict(os.environ)
    if system == "npmnv3" and npmnv3_path:
        env["PYTHONPATH"] = os.pathsep.join([npmnv3_path, env.get("PYTHONPATH", "")])
    command = [sys.executable, os.path.abspath(__file__), "--worker", system, "--case", case, "--folder", folder,
               "--seconds", str(args.seconds), "--warmup", str(args.warmup)] + (["--case-build"] if build_case else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{system} {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rel_err(got, ref):
    import numpy as np
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def fmt(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="large1,large32,small1,small32",
                        help=f"comma-separated, from {','.join(CASES)} (default: the four classifier cases)")
    parser.add_argument("--rounds", type=int, default=5, help="processes per system and case (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed calls per process, in seconds (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed calls first, in seconds (default 1)")
    parser.add_argument("--npmnv3", metavar="DIR", help="time the npmnv3 package found in this folder instead")
    parser.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out even when it is installed")
    parser.add_argument("--no-build", action="store_true", help="leave out the build-from-.npz timing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--case-build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.system = args.worker
        print(json.dumps(worker(args)))
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    systems = ["npmnv3", "torch"]
    try:
        import onnxruntime  # noqa: F401
        if not args.no_ort:
            systems.append("ort")
    except ImportError:
        pass
    import numpy as np
    import torch
    print(f"numpy {np.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"npmnv3 from {args.npmnv3 or ROOT}; {args.rounds} rounds x {args.seconds:g} s per process, float32\n")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in sorted({CASES[c][0] for c in cases}):
            code = f"import sys; sys.path.insert(0, {HERE!r}); import bench; bench.make_weights({arch!r}, {folder!r})"
            subprocess.run([sys.executable, "-c", code], check=True)
            if "ort" in systems and arch not in (DETECTOR, QUANTIZED):     # (neither is timed with ORT)
                code = f"import sys; sys.path.insert(0, {HERE!r}); import bench; bench.export_onnx({arch!r}, {folder!r})"
                if subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0:
                    print("(ONNX Runtime left out: the export failed)", file=sys.stderr)
                    systems.remove("ort")
        int8_rows = []
        for case in cases:
            quantized = CASES[case][0] == QUANTIZED
            case_systems = ["npmnv3", "torch", "npmnv3-float"] if quantized else \
                [s for s in systems if not (s == "ort" and CASES[case][0] == DETECTOR)]
            medians = {s: [] for s in case_systems}
            for r in range(args.rounds):
                for system in case_systems:
                    medians[system].append(run_worker(system, case, folder, args, args.npmnv3)["median"])
                if r == 0:      # every system's output on the case's input, against torchvision's
                    ref = np.load(os.path.join(folder, f"out-torch-{case}.npy"))
                    for system in (s for s in case_systems if s != "npmnv3-float"):
                        out = np.load(os.path.join(folder, f"out-{system}-{case}.npy"))
                        err = rel_err(out, ref) if out.shape == ref.shape else float("inf")
                        if err > TOLERANCE:
                            raise SystemExit(f"{case}: {system} disagrees with torchvision ({err:.1e})")
            ratio = statistics.median(medians["npmnv3"]) / statistics.median(medians["torch"])
            (int8_rows if quantized else rows).append((case, medians, ratio))
            print(f"  {case}: npmnv3 / torch {ratio:.2f}", file=sys.stderr)
        builds = None
        if not args.no_build and any(CASES[c][0] == "mobilenet_v3_large" for c in cases):
            builds = [run_worker("npmnv3", "large1", folder, args, args.npmnv3, build_case=True) for _ in range(3)]
    head = "| case | npmnv3 ms/img | torch eager ms/img | npmnv3 / torch |" + (" ORT ms/img |" if "ort" in systems else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for case, medians, ratio in rows:
        line = f"| {case} | {fmt(medians['npmnv3'])} | {fmt(medians['torch'])} | {ratio:.2f} |"
        if "ort" in systems:
            line += f" {fmt(medians['ort'])} |" if medians.get("ort") else " - |"
        print(line)
    if int8_rows:
        print("\n| case | npmnv3 int8 ms/img | torch int8 (qnnpack) ms/img | npmnv3 float ms/img | int8 / torch | "
              "int8 / float |\n|---|---|---|---|---|---|")
        for case, medians, ratio in int8_rows:
            to_float = statistics.median(medians["npmnv3"]) / statistics.median(medians["npmnv3-float"])
            print(f"| {case} | {fmt(medians['npmnv3'])} | {fmt(medians['torch'])} | {fmt(medians['npmnv3-float'])} | "
                  f"{ratio:.2f} | {to_float:.2f} |")
    if builds:
        print(f"\nbuild Large from .npz: median {statistics.median(b['build'] for b in builds):.0f} ms; "
              f"with its first forward (plans made) at 224: {statistics.median(b['first'] for b in builds):.0f} ms")


if __name__ == "__main__":
    main()
