"""npmnv3 against outputs that torch and torchvision computed: kernels, networks, torch.save files, images.

The outputs are committed in ``tests/reference/`` (written by ``tests/reference/make_reference.py``,
with the versions that computed them in ``versions.json``); the inputs are rebuilt here by
``tests/reference/cases.py`` with NumPy and Pillow alone, so these tests run without torch. The
last test, which needs torch, checks that the committed outputs are what the installed torch
computes now.
"""

import functools
import hashlib
import json
import shutil

import numpy as np
import PIL
import pytest

import npmnv3
from conftest import record, rel_err
from npmnv3 import kernels as K
from npmnv3.images import preprocess
from npmnv3.torchfile import read_torch_file
from reference import cases as C

REF = C.HERE
VERSIONS = json.loads((REF / "versions.json").read_text())
KERNEL_CASES = C.kernel_cases()
KERNEL_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5}    # as tests/test_kernels.py
MODEL_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}     # as tests/test_model.py
DTYPE_IDS = ("float32", "float64")


@functools.lru_cache(maxsize=None)
def load_npz(name):
    """A committed ``.npz`` fixture as a dict of arrays (read once)."""
    with np.load(REF / name) as f:
        return {key: f[key] for key in f.files}


@functools.lru_cache(maxsize=None)
def load_json(name):
    return json.loads((REF / name).read_text())


def made_with(*names):
    """For a failure message: the versions of ``names`` that made the fixtures (from versions.json),
    with the installed ones for numpy and Pillow, e.g. ``"torchvision 0.29.1, Pillow 13.0.0 (installed: 12.1.0)"``."""
    installed = {"numpy": np.__version__, "Pillow": PIL.__version__}
    return ", ".join(f"{n} {VERSIONS.get(n)}" + (f" (installed: {installed[n]})" if n in installed else "")
                     for n in names)


def test_fixtures_hold_an_output_for_every_case_and_record_their_versions():
    assert set(load_npz("kernels.npz")) == {case.id for case in KERNEL_CASES}
    expected = {f"{case.id}/weight_checksums" for case in C.MODEL_CASES}
    for case in C.MODEL_CASES:
        n_features = len(C.model_layers(case)[0])
        for name in C.MODEL_INPUTS:
            for dtype in DTYPE_IDS:
                prefix = f"{case.id}/{name}/{dtype}/"
                expected |= {prefix + "logits"} | {prefix + f"features.{i}" for i in range(n_features)}
    assert set(load_npz("models.npz")) == expected
    assert list(load_json("files.json")) == list(C.FILE_CASES)
    assert list(load_json("images.json")) == [case.id for case in C.IMAGE_CASES]
    assert all(VERSIONS.get(k) for k in ("torch", "torchvision", "numpy", "Pillow", "date"))


# --------------------------------------------------------------------------- kernels

def run_kernel(case, plain=False):
    """Call ``npmnv3.kernels.<case.op>`` (or its ``_naive`` plain version) on the case's arguments."""
    fn = getattr(K, case.op + ("_naive" if plain else ""))
    a, p = case.arrays, case.params
    if case.op == "conv2d":
        return fn(a["x"], a["weight"], a.get("bias"), p.get("stride", 1), p.get("padding", 0), p.get("dilation", 1))
    if case.op == "depthwise_conv2d":
        return fn(a["x"], a["weight"], p["stride"], p["padding"], p["dilation"])
    if case.op == "batch_norm":
        return fn(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"], eps=p["eps"])
    if case.op == "interpolate":
        return fn(a["x"], p["size"], align_corners=p["align_corners"])
    return fn(**a)


def check_kernel(case, got):
    ref = load_npz("kernels.npz")[case.id]
    tol = KERNEL_TOL[case.dtype]
    assert got.dtype == case.dtype, "the kernel changed the dtype"
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=f"{case.id}; reference by {made_with('torch')}")


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.id for c in KERNEL_CASES])
def test_vectorised_kernel_matches_torch(case):
    check_kernel(case, run_kernel(case))


SMALL_KERNEL_CASES = [c for c in KERNEL_CASES if c.small]


@pytest.mark.parametrize("case", SMALL_KERNEL_CASES, ids=[c.id for c in SMALL_KERNEL_CASES])
def test_plain_kernel_matches_torch(case):
    check_kernel(case, run_kernel(case, plain=True))


# --------------------------------------------------------------------------- networks

@functools.lru_cache(maxsize=None)
def model_weights(case):
    return C.model_weights(case)


@functools.lru_cache(maxsize=None)
def npmnv3_model(case, dtype):
    model = getattr(npmnv3, case.arch)(dtype=dtype, **case.kwargs)
    model.load_state_dict(model_weights(case))
    return model


@pytest.mark.parametrize("case", C.MODEL_CASES, ids=[c.id for c in C.MODEL_CASES])
def test_model_weights_made_from_the_seed_are_the_reference_ones(case):
    """The weights rebuilt here are those torchvision ran (else every output below would differ)."""
    np.testing.assert_allclose(C.weight_checksums(model_weights(case)),
                               load_npz("models.npz")[f"{case.id}/weight_checksums"], rtol=1e-6, atol=1e-6,
                               err_msg=f"weights of {case.id} rebuilt from seed {case.seed} differ from the "
                                       f"reference's; made with {made_with('numpy')}")


@pytest.mark.parametrize("path", ("engine", "readable"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=DTYPE_IDS)
@pytest.mark.parametrize("case", C.MODEL_CASES, ids=[c.id for c in C.MODEL_CASES])
def test_model_matches_torchvision_logits_and_every_feature(case, dtype, path):
    """``model(x)`` (the fast engine) and ``model.forward_reference(x)`` (the readable path) against
    torchvision's logits and ``features.i`` outputs, on odd-sized inputs, batch 1 and 2."""
    model = npmnv3_model(case, dtype)
    forward = model if path == "engine" else model.forward_reference
    outputs = load_npz("models.npz")
    tol = MODEL_TOL[np.dtype(dtype)]
    label = f"reference {np.dtype(dtype).name} {path}"
    for name in C.MODEL_INPUTS:
        prefix = f"{case.id}/{name}/{np.dtype(dtype).name}/"
        logits, feats = forward(C.model_input(name, dtype), return_intermediates=True)
        assert list(feats) == [layer.name for layer in model.features]
        for key, got in [*feats.items(), ("logits", logits)]:
            ref = outputs[prefix + key]
            assert got.dtype == dtype and got.shape == ref.shape, prefix + key
            err = record(f"{label} {'logits' if key == 'logits' else 'features'}", rel_err(got, ref))
            assert err <= tol, f"{prefix}{key}: {err:.2e} > {tol:g}; reference by {made_with('torch', 'torchvision')}"
        assert np.abs(outputs[prefix + "logits"]).max() > 0.5, "logits too small for the test to mean anything"


# --------------------------------------------------------------------------- torch.save files

@pytest.mark.parametrize("name", list(C.FILE_CASES))
def test_torch_file_reads_bit_exactly_as_torch_load(name):
    entry = load_json("files.json")[name]
    path = C.FILES_DIR / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == entry["sha256"], f"{name} is not the file the reference arrays came from"
    arrays = load_npz("files.npz")
    ours = read_torch_file(path)
    assert list(ours) == entry["keys"]
    for key, got in ours.items():
        expected = arrays[f"{name}/{key}"]
        assert isinstance(got, np.ndarray), key
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), key
        assert got.tobytes() == expected.tobytes(), key
        assert got.flags.c_contiguous and got.flags.owndata and got.flags.writeable, key


# --------------------------------------------------------------------------- images

@pytest.mark.parametrize("resize", C.RESIZES)
@pytest.mark.parametrize("case", C.IMAGE_CASES, ids=[c.id for c in C.IMAGE_CASES])
def test_preprocess_is_bit_exact_with_torchvision_transforms(case, resize):
    """``preprocess`` equals torchvision's ``weights.transforms()`` (resize ``resize``, crop 224) bit for bit:
    the SHA-256 of its float32 output is the one torchvision's output had."""
    entry = load_json("images.json")[case.id]
    image = C.make_image(case)
    assert C.image_digest(image) == entry["input_sha256"], f"{case.id}: the input image is not the reference's"
    got = preprocess(image, resize)
    assert got.dtype == np.float32 and got.shape == (3, 224, 224) and got.flags.c_contiguous
    assert C.array_digest(got) == entry["outputs"][str(resize)], (
        f"{case.id} at resize {resize}: not torchvision's output bit for bit; "
        f"reference by {made_with('torchvision', 'Pillow')}")


# --------------------------------------------------------------------------- the fixtures are current

@pytest.fixture(scope="module")
def fresh_reference():
    """Every fixture recomputed in memory by the installed torch and torchvision (needs torch)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from reference import make_reference

    return make_reference, make_reference.compute()


@pytest.mark.slow
def test_committed_reference_outputs_are_what_torch_computes_now(fresh_reference):
    """Hashes and files equal, float outputs within the tolerances above (needs torch)."""
    make_reference, fresh = fresh_reference
    problems = make_reference.stale(REF, fresh)
    assert not problems, "\n".join(problems)


def test_outdated_fixtures_are_reported_by_name_with_the_versions(fresh_reference, tmp_path):
    make_reference, fresh = fresh_reference
    shutil.copytree(REF, tmp_path / "ref", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    ref = tmp_path / "ref"
    kernels = dict(load_npz("kernels.npz"))
    kernels["relu-float32"] = kernels["relu-float32"] + np.float32(1e-3)
    (ref / "kernels.npz").write_bytes(make_reference.npz_bytes(kernels))
    images = load_json("images.json")
    (ref / "images.json").write_text(json.dumps(dict(images, **{"rgb-1x1": dict(images["rgb-1x1"], outputs={})})))
    data = bytearray((ref / "files" / "parameters.pth").read_bytes())
    data[-30] ^= 1
    (ref / "files" / "parameters.pth").write_bytes(bytes(data))
    (ref / "versions.json").write_text(json.dumps(dict(VERSIONS, torch="1.0.0")))

    problems = make_reference.stale(ref, fresh)
    assert problems[0].startswith("kernels.npz: relu-float32 differs from what torch computes now")
    assert any(p.startswith("files/parameters.pth: its SHA-256 is not the one files.json records") for p in problems)
    assert any(p.startswith("images.json:") and "rgb-1x1" in p for p in problems)
    assert problems[-1].startswith("fixtures made with torch 1.0.0, ")
    assert f"installed: torch {make_reference.torch.__version__}, " in problems[-1]
    assert len([p for p in problems if p.startswith("kernels.npz")]) == 1
