"""Compute the reference outputs with torch and torchvision and write them into tests/reference/ (needs torch).

From the repository root, in the environment with torch and torchvision (``pip install -e ".[dev]"``)::

    python tests/reference/make_reference.py           # (re)write the fixtures
    python tests/reference/make_reference.py --check   # only say whether the committed ones are current

The inputs come from ``cases.py`` (NumPy and Pillow only), so only outputs are written:

``kernels.npz``
    ``torch.nn.functional`` (and torchvision's ``SqueezeExcitation``) on every ``cases.kernel_cases()``.
``models.npz``
    torchvision's MobileNetV3 with ``cases.model_weights``: logits and every ``features.i`` output
    (``<model>/<input>/<dtype>/<name>``) on ``cases.MODEL_INPUTS`` in float32 and float64, and the
    weights' checksums (``<model>/weight_checksums``).
``files/*.pth``, ``files.npz``, ``files.json``
    Small ``torch.save`` files (committed as they are), the arrays ``torch.load`` gives for them
    (negative bits resolved, bfloat16 widened to float32; ``<file>/<key>``), and each file's SHA-256
    and key order.
``images.json``
    SHA-256 of torchvision's ``weights.transforms()`` output (float32, C order) for every
    ``cases.IMAGE_CASES`` image at each of ``cases.RESIZES``, and of the input image.
``versions.json``
    torch, torchvision, numpy, Pillow and Python versions, and the date, of the run that wrote them.

The ``.npz`` files are ``np.savez_compressed``'s format written with fixed timestamps, so a run that
computes the same outputs leaves every file (and the date) unchanged. ``stale()`` is what
``tests/test_reference.py`` runs, with torch installed, to check the committed fixtures are current.
"""

import argparse
import datetime
import hashlib
import io
import json
import platform
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision

if __package__ in (None, ""):           # run as a script: make ``reference`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import cases as C  # noqa: E402

import torchref  # noqa: E402

HERE = C.HERE
COMMAND = "python tests/reference/make_reference.py"
KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5}   # as tests/test_kernels.py
MODEL_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}    # as tests/test_model.py


def versions():
    """The versions of everything that computed the outputs (without the date)."""
    return OrderedDict(torch=torch.__version__, torchvision=torchvision.__version__, numpy=np.__version__,
                       Pillow=PIL.__version__, python=platform.python_version())


# --------------------------------------------------------------------------- kernels

def torch_kernel(case):
    """What torch computes for one ``cases.KernelCase``, as a NumPy array."""
    a = {name: torch.from_numpy(v) for name, v in case.arrays.items()}
    p = case.params
    x = a["x"]
    with torch.no_grad():
        if case.op == "conv2d":
            y = F.conv2d(x, a["weight"], a.get("bias"), p.get("stride", 1), p.get("padding", 0), p.get("dilation", 1))
        elif case.op == "depthwise_conv2d":
            y = F.conv2d(x, a["weight"], None, p["stride"], p["padding"], p["dilation"], groups=x.shape[1])
        elif case.op == "batch_norm":
            y = F.batch_norm(x, a["running_mean"], a["running_var"], a["weight"], a["bias"], training=False,
                             eps=p["eps"])
        elif case.op in ("relu", "relu6", "hard_sigmoid", "hard_swish", "sigmoid"):
            y = {"relu": F.relu, "relu6": F.relu6, "hard_sigmoid": F.hardsigmoid, "hard_swish": F.hardswish,
                 "sigmoid": torch.sigmoid}[case.op](x)
        elif case.op == "global_avg_pool":
            y = F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif case.op == "linear":
            y = F.linear(x, a["weight"], a["bias"])
        elif case.op == "squeeze_excite":
            squeeze, channels = a["fc1_weight"].shape[:2]
            se = torchvision.ops.SqueezeExcitation(channels, squeeze, scale_activation=torch.nn.Hardsigmoid)
            se = se.to(x.dtype)             # before loading: a float32 module would round float64 weights
            se.load_state_dict({"fc1.weight": a["fc1_weight"], "fc1.bias": a["fc1_bias"],
                                "fc2.weight": a["fc2_weight"], "fc2.bias": a["fc2_bias"]})
            y = se(x)
        elif case.op == "interpolate":
            y = F.interpolate(x, size=p["size"], mode="bilinear", align_corners=p["align_corners"])
        else:
            raise ValueError(f"no torch function for kernel {case.op!r}")
    return y.numpy().copy()


def compute_kernels():
    return OrderedDict((case.id, torch_kernel(case)) for case in C.kernel_cases())


# --------------------------------------------------------------------------- models

def torch_model(case):
    """torchvision's ``case.arch`` with ``case.options``, holding ``cases.model_weights(case)``, in eval mode."""
    model = getattr(torchvision.models, case.arch)(**case.kwargs)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in C.model_weights(case).items()})
    return model.eval()


def compute_models():
    out = OrderedDict()
    for case in C.MODEL_CASES:
        model = torch_model(case)
        out[f"{case.id}/weight_checksums"] = C.weight_checksums(C.model_weights(case))
        for name in C.MODEL_INPUTS:
            for dtype in (np.float32, np.float64):
                prefix = f"{case.id}/{name}/{np.dtype(dtype).name}/"
                logits, feats = torchref.features_and_logits(model, C.model_input(name, dtype), dtype)
                for key, value in feats.items():
                    out[prefix + key] = value
                out[prefix + "logits"] = logits
    return out


# --------------------------------------------------------------------------- torch.save files

def checkpoint():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, generator=g)
    state = OrderedDict([("x", x), ("x_view", x[1:4]), ("w", torch.randn(2, 3, generator=g).t()),
                         ("counter", torch.tensor(17))])
    return {"epoch": 3, "state_dict": state, "best": 0.5, "names": ["a", "b"]}


def parameters():
    g = torch.Generator().manual_seed(3)
    return OrderedDict([("weight", torch.nn.Parameter(torch.randn(2, 3, generator=g))),
                        ("bias", torch.nn.Parameter(torch.zeros(3))),
                        ("frozen", torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False))])


def file_objects():
    """name -> (the object torch.save writes, its keyword arguments)."""
    legacy = {"_use_new_zipfile_serialization": False}
    return OrderedDict([
        ("tensors_zip.pth", (torchref.edge_case_tensors(), {})),
        ("tensors_zip_protocol4.pth", (torchref.edge_case_tensors(), {"pickle_protocol": 4})),
        ("tensors_legacy.pth", (torchref.edge_case_tensors(), legacy)),
        ("parameters.pth", (parameters(), {})),
        ("checkpoint.pth", (checkpoint(), {})),
        ("checkpoint_legacy.pth", (checkpoint(), legacy)),
    ])


def is_legacy(name):
    return "legacy" in name


def torch_to_numpy(t):
    """What read_torch_file promises for a tensor: its values with the negative bit resolved, bfloat16
    widened (exactly) to float32, as a C-contiguous array."""
    t = t.detach().resolve_neg().resolve_conj()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy().copy()


def state_of(obj):
    """The flat mapping of tensors read_torch_file returns for a saved object (nested under 'state_dict')."""
    return obj["state_dict"] if "state_dict" in obj else obj


def torch_load(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(data), weights_only=False)     # trusted: written by this script


def compute_files():
    """name -> {"bytes", "object", "arrays"}: the file torch.save writes under that name (legacy files
    differ from run to run in their storage keys), what was saved, and torch.load's arrays."""
    out = OrderedDict()
    assert list(file_objects()) == list(C.FILE_CASES)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (obj, kwargs) in file_objects().items():
            path = Path(tmp) / name                 # the zip's record prefix is the file's name
            torch.save(obj, path, **kwargs)
            data = path.read_bytes()
            arrays = OrderedDict((k, torch_to_numpy(v)) for k, v in state_of(torch_load(data)).items())
            out[name] = {"bytes": data, "object": obj, "arrays": arrays}
    return out


# --------------------------------------------------------------------------- images

TRANSFORMS = {256: torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
              232: torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V2}


def reference_rgb(image):
    """The RGB image torchvision is given: ``convert("RGB")``, except 16-bit grey, which npmnv3 documents
    as scaled by round(v / 257) and replicated (Pillow's convert would clip it)."""
    if image.mode == "I;16":
        a8 = ((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8)
        return PIL.Image.fromarray(a8).convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # "Palette images with Transparency ..."
        return image.convert("RGB")


def compute_images():
    out = OrderedDict()
    for case in C.IMAGE_CASES:
        image = C.make_image(case)
        outputs = OrderedDict()
        for resize in C.RESIZES:
            transform = TRANSFORMS[resize].transforms()
            assert list(transform.resize_size) == [resize] and list(transform.crop_size) == [224]
            y = transform(reference_rgb(image)).numpy()
            assert y.dtype == np.float32 and y.shape == (3, 224, 224)
            outputs[str(resize)] = C.array_digest(y)
        out[case.id] = OrderedDict(mode=case.mode, size=[case.width, case.height],
                                   input_sha256=C.image_digest(image), outputs=outputs)
    return out


# --------------------------------------------------------------------------- writing

def compute():
    """Everything, in memory: {"kernels", "models", "files", "images"}.

    torch runs on one thread: the work is small, and torch's OpenMP workers, which spin between
    calls, slow everything down many times over on a busy machine (torch's thread count is restored).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return OrderedDict(kernels=compute_kernels(), models=compute_models(), files=compute_files(),
                           images=compute_images())
    finally:
        torch.set_num_threads(threads)


def npz_bytes(arrays):
    """``np.savez_compressed``'s format (``np.load`` reads it) with fixed timestamps: same arrays, same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(obj):
    return (json.dumps(obj, indent=1) + "\n").encode()


def fixture_bytes(ref):
    """relative path -> bytes of every fixture file except versions.json."""
    files = OrderedDict()
    files["kernels.npz"] = npz_bytes(ref["kernels"])
    files["models.npz"] = npz_bytes(ref["models"])
    index, arrays = OrderedDict(), OrderedDict()
    for name, entry in ref["files"].items():
        old = C.FILES_DIR / name
        data = entry["bytes"]
        if is_legacy(name) and old.exists() and same_contents(torch_load(old.read_bytes()), entry["object"]):
            data = old.read_bytes()     # legacy files differ in storage keys only: keep the committed one
        files[f"files/{name}"] = data
        index[name] = OrderedDict(what=C.FILE_CASES[name], sha256=sha256(data), keys=list(entry["arrays"]))
        arrays.update((f"{name}/{k}", v) for k, v in entry["arrays"].items())
    files["files.npz"] = npz_bytes(arrays)
    files["files.json"] = json_bytes(index)
    files["images.json"] = json_bytes(ref["images"])
    return files


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def write(ref, directory=HERE):
    """Write the fixtures into ``directory``; versions.json only when something else changed (or it is
    missing or its versions differ). Returns the paths written."""
    written = []
    for rel, data in fixture_bytes(ref).items():
        path = directory / rel
        if not path.exists() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(path)
    versions_path = directory / "versions.json"
    old = json.loads(versions_path.read_text()) if versions_path.exists() else {}
    new = versions()
    if written or {k: v for k, v in old.items() if k != "date"} != dict(new, command=COMMAND):
        new.update(date=datetime.date.today().isoformat(), command=COMMAND)
        versions_path.write_text(json.dumps(new, indent=1) + "\n")
        written.append(versions_path)
    return written


# --------------------------------------------------------------------------- checking

def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max()))) if ref.size else 0.0


def same_contents(loaded, saved):
    """Whether torch.load's object has the same tensors (keys, dtypes, shapes, bits) as the saved one."""
    a, b = state_of(loaded), state_of(saved)
    if list(a) != list(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape
               and torch_to_numpy(x).tobytes() == torch_to_numpy(y).tobytes() for x, y in zip(a.values(), b.values()))


def _compare_floats(fixture, committed, fresh, tol_of, measure):
    problems = []
    if list(committed) != list(fresh):
        missing, extra = set(fresh) - set(committed), set(committed) - set(fresh)
        return [f"{fixture}: entries differ (missing {sorted(missing)[:5]}, no longer made {sorted(extra)[:5]})"]
    for key, ref in fresh.items():
        got = committed[key]
        if got.dtype != ref.dtype or got.shape != ref.shape:
            problems.append(f"{fixture}: {key} is {got.dtype}{got.shape}, torch now gives {ref.dtype}{ref.shape}")
            continue
        tol = tol_of(key, ref)
        err = measure(got, ref)
        if not err <= tol:
            problems.append(f"{fixture}: {key} differs from what torch computes now ({err:.2e} > {tol:g})")
    return problems


def stale(directory=HERE, ref=None):
    """What in ``directory``'s fixtures differs from what the installed torch computes now.

    Hashes and files are compared exactly (legacy-format files, whose storage keys change from run
    to run, by their tensors), float outputs within the tests' tolerances. Returns a list of lines,
    empty when everything is current; each names the fixture, and the last the recorded and the
    installed versions.
    """
    ref = compute() if ref is None else ref
    problems = []

    def load_npz(name):
        with np.load(directory / name) as f:
            return OrderedDict((k, f[k]) for k in f.files)

    def kernel_tol(key, value):
        return KERNEL_TOL[value.dtype]

    def kernel_err(got, want):      # np.testing.assert_allclose(got, want, rtol=tol, atol=tol) holds iff <= tol
        return float(np.max(np.abs(got.astype(np.float64) - want) / (1 + np.abs(want.astype(np.float64)))))

    problems += _compare_floats("kernels.npz", load_npz("kernels.npz"), ref["kernels"], kernel_tol, kernel_err)

    def model_tol(key, value):
        return 1e-6 if key.endswith("weight_checksums") else MODEL_TOL[value.dtype]

    problems += _compare_floats("models.npz", load_npz("models.npz"), ref["models"], model_tol, rel_err)

    index = json.loads((directory / "files.json").read_text())
    arrays = load_npz("files.npz")
    if list(index) != list(ref["files"]):
        problems.append(f"files.json: files {list(index)}, now made: {list(ref['files'])}")
    for name, entry in ref["files"].items():
        path = directory / "files" / name
        if name not in index or not path.exists():
            problems.append(f"files/{name}: missing")
            continue
        data = path.read_bytes()
        if sha256(data) != index[name]["sha256"]:
            problems.append(f"files/{name}: its SHA-256 is not the one files.json records")
        if not is_legacy(name) and data != entry["bytes"]:
            problems.append(f"files/{name}: torch.save now writes other bytes")
        try:
            loaded = torch_load(data)
        except Exception as exc:  # noqa: BLE001 - any failure means the committed file is unusable
            problems.append(f"files/{name}: torch.load cannot read it ({type(exc).__name__})")
            continue
        if is_legacy(name) and not same_contents(loaded, entry["object"]):
            problems.append(f"files/{name}: torch.load gives other tensors than the ones it should hold")
        want = OrderedDict((k, torch_to_numpy(v)) for k, v in state_of(loaded).items())
        if index[name]["keys"] != list(want):
            problems.append(f"files.json: keys of {name} are not torch.load's")
        for key, value in want.items():
            got = arrays.get(f"{name}/{key}")
            if got is None or got.dtype != value.dtype or got.shape != value.shape or got.tobytes() != value.tobytes():
                problems.append(f"files.npz: {name}/{key} is not what torch.load gives")

    images = json.loads((directory / "images.json").read_text())
    if images != ref["images"]:
        changed = [k for k in set(images) | set(ref["images"]) if images.get(k) != ref["images"].get(k)]
        problems.append(f"images.json: entries differ from torchvision's output now: {sorted(changed)}")

    if problems:
        recorded = json.loads((directory / "versions.json").read_text())
        installed = versions()
        problems.append("fixtures made with " + ", ".join(f"{k} {recorded.get(k)}" for k in installed)
                        + "; installed: " + ", ".join(f"{k} {v}" for k, v in installed.items())
                        + f"; regenerate with `{COMMAND}`")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the fixtures are not current")
    args = parser.parse_args(argv)
    ref = compute()
    if args.check:
        problems = stale(HERE, ref)
        print("\n".join(problems) if problems else "the reference fixtures are current")
        return 1 if problems else 0
    written = write(ref)
    for path in written:
        print(f"wrote {path.relative_to(HERE.parents[1])}")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file() and p.suffix in (".npz", ".json", ".pth"))
    print(f"{len(written)} files changed; the fixtures hold {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
