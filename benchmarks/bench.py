"""Time npmnv3's ``model(x)`` against torchvision eager (and ONNX Runtime when installed).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench.py [--repeats 15] [--cases large1,small32]

Each case (architecture x batch size, 224x224, random weights) loads the *same* weights into both
models (npmnv3 from torchvision's state_dict as NumPy arrays), checks that the logits agree, then
times npmnv3 and torch interleaved in one process (round r times npmnv3, then torch), so that the
machine's noise hits them alike: only ratios from one run mean anything. In every round each system
first runs untimed for ``--settle-ms`` (50): torch's OpenMP workers keep spinning after each call
(libgomp's spin count, long on this CPU), and without the settle calls they took the second core from
npmnv3's timed call at N == 1 (which uses two threads; measured after a torch call: 19, 13, then 9 ms).
ONNX Runtime, when installed, is timed after them in its own rounds (its idle threads spin for
> 50 ms after each run), from a model exported in a child process (see ``ort_session``).

Reported per case: median ms per image (min-max over the repeats), the ratio npmnv3 / torch eager
of the medians, and npmnv3's peak memory measured with ``tracemalloc`` (NumPy reports its buffers
to it): "first" is the first call (it builds the per-shape plan and its buffers), "steady" a later
call (temporaries only). Then the time to build Large from an ``.npz``: ``np.load`` +
``MobileNetV3(...)`` + ``load_state_dict`` + building the fast engine (``FastEngine(model)``).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

import npmnv3
from npmnv3.fast import FastEngine

CASES = {"large1": ("mobilenet_v3_large", 1), "large32": ("mobilenet_v3_large", 32),
         "small1": ("mobilenet_v3_small", 1), "small32": ("mobilenet_v3_small", 32)}


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def torch_model(arch, seed=0):
    import torch
    import torchvision
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)().eval()
    with torch.no_grad():       # non-trivial BN statistics and biases, as a trained net has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export_onnx(arch, path, batch):
    """Write torch_model(arch) (the same weights: fixed seed) as ONNX to ``path`` (run in a child process)."""
    import torch
    model = torch_model(arch)
    x = torch.zeros((batch, 3, 224, 224))
    args = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    try:    # the TorchScript exporter needs only `onnx` (the default dynamo one also `onnxscript`)
        torch.onnx.export(model, x, path, dynamo=False, **args)
    except TypeError:   # a torch without the `dynamo` argument
        torch.onnx.export(model, x, path, **args)


def ort_session(arch, batch):
    """An ONNX Runtime session for torch_model(arch), or None when onnxruntime (or the exporter) is missing.

    The export runs in a child process: measured, exporting in this process (TorchScript tracing)
    made torch eager 2x faster at batch 32 for the rest of the process (Large: 13-15 -> 7 ms/img),
    which would change the torch column depending on whether onnxruntime is installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench; bench.export_onnx({arch!r}, {path!r}, {batch})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:    # e.g. a missing optional exporter dependency
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  (ONNX Runtime skipped: export failed: {last})", file=sys.stderr)
        return None
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def peak_mb(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def stats(times, batch):
    ms = [t * 1e3 / batch for t in times]
    return statistics.median(ms), min(ms), max(ms)


def run_case(name, repeats, settle_ms=50.0):
    import torch
    arch, batch = CASES[name]
    tmodel = torch_model(arch)
    state = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    model = getattr(npmnv3, arch)()
    model.load_state_dict(state)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x)

    first = peak_mb(lambda: model(x))           # builds the plan (buffers) for this shape
    steady = peak_mb(lambda: model(x))
    with torch.inference_mode():
        ref = tmodel(xt).numpy()
    err = rel_err(model(x), ref)
    assert err <= 1e-4, f"{name}: npmnv3 and torchvision disagree (rel err {err:.2e})"
    session = ort_session(arch, batch)
    if session is not None:
        assert rel_err(session.run(None, {"x": x})[0], ref) <= 1e-4

    # npmnv3 and torch interleaved; ONNX Runtime afterwards in its own rounds: its idle worker
    # threads keep spinning for > 50 ms after each run (measured), taking the core that the next
    # system timed would use (npmnv3's helper thread at N == 1: 12.8 instead of 9.1 ms/img)
    phases = [{"npmnv3": lambda: model(x), "torch": lambda: tmodel(xt)}]
    if session is not None:
        phases.append({"ort": lambda: session.run(None, {"x": x})})
    times = {k: [] for systems in phases for k in systems}
    with torch.inference_mode():
        for systems in phases:
            for fn in systems.values():     # warm-up: torch's first calls can be 100x slower
                t0 = time.perf_counter()
                for i in range(100):
                    fn()
                    if i >= 3 and time.perf_counter() - t0 > 1.0:
                        break
            for _ in range(repeats):
                for key, fn in systems.items():
                    t0 = time.perf_counter()    # untimed calls: absorb what the previous system
                    while time.perf_counter() - t0 < settle_ms / 1e3:  # left behind (torch's
                        fn()                                           # spinning OpenMP threads)
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
    result = {k: stats(v, batch) for k, v in times.items()}
    result["ratio"] = result["npmnv3"][0] / result["torch"][0]
    result["mem"] = (first, steady)
    result["err"] = err
    return result


def build_time(repeats=5):
    """np.load of an .npz + MobileNetV3(...) + load_state_dict + FastEngine build, for Large."""
    model = npmnv3.mobilenet_v3_large()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "large.npz")
        np.savez(path, **model.state_dict())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with np.load(path, allow_pickle=False) as f:
                state = {k: f[k] for k in f.files}
            m = npmnv3.mobilenet_v3_large()
            m.load_state_dict(state)
            m._engine = FastEngine(m)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def fmt(s):
    return f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per case (default 15)")
    parser.add_argument("--settle-ms", type=float, default=50.0,
                        help="in every round, untimed calls of each system for this long before its timed "
                             "call (default 50; 0: none, the previous system's leftovers, e.g. torch's or "
                             "ONNX Runtime's still-spinning worker threads, then run into the timed call)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    args = parser.parse_args(argv)
    import torch
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    print(f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"repeats {args.repeats}, settle {args.settle_ms:g} ms, 224x224, float32\n")
    rows = []
    for case in cases:
        r = run_case(case, args.repeats, args.settle_ms)
        rows.append((case, r))
        print(f"  {case}: done (ratio {r['ratio']:.2f})", file=sys.stderr)
    has_ort = any("ort" in r for _, r in rows)
    head = "| case | npmnv3 ms/img median (min-max) | torch eager ms/img | ratio npmnv3/torch |"
    head += " ORT ms/img |" if has_ort else ""
    head += " npmnv3 peak MB first / steady (tracemalloc) | max rel err |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for case, r in rows:
        line = f"| {case} | {fmt(r['npmnv3'])} | {fmt(r['torch'])} | {r['ratio']:.2f} |"
        if has_ort:
            line += f" {fmt(r['ort']) if 'ort' in r else 'n/a'} |"
        line += f" {r['mem'][0]:.1f} / {r['mem'][1]:.1f} | {r['err']:.1e} |"
        print(line)
    if not has_ort:
        print("\n(ONNX Runtime not installed or its export failed: skipped)")
    b = build_time()
    print(f"\nbuild Large from .npz (np.load + MobileNetV3 + load_state_dict + FastEngine): "
          f"median {b[0] * 1e3:.0f} ms (min {b[1] * 1e3:.0f}, max {b[2] * 1e3:.0f})")


if __name__ == "__main__":
    main()
