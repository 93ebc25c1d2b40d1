"""Tests for npmnv3.serialization: the .npz format, atomic saving and load dispatch."""

import gzip
import json
import os
import pickle
import stat
import warnings
import zipfile

import numpy as np
import pytest

from npmnv3.errors import WeightsFormatError
from npmnv3.serialization import METADATA_KEY, load_metadata, load_state_dict, save_state_dict


class Evil:
    """Unpickling runs os.system("touch <marker>")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def sample_state_dict():
    rng = np.random.default_rng(0)
    return {
        "features.0.0.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "features.0.1.num_batches_tracked": np.array(7, dtype=np.int64),
        "half": rng.standard_normal(5).astype(np.float16),
        "double": rng.standard_normal((2, 2)),
        "flags": np.array([True, False]),
        "bytes": np.arange(4, dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
        "file": np.ones(1, np.float32),  # would clash with np.savez's own parameters
        "allow_pickle": np.ones(1, np.float32),
    }


def assert_same(loaded, expected):
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        value = np.asarray(value)
        got = loaded[key]
        assert got.dtype == value.dtype.newbyteorder("="), key
        assert got.shape == value.shape, key
        np.testing.assert_array_equal(got, value)
        assert got.flags.c_contiguous, key


def leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------
# Saving and round trips
# --------------------------------------------------------------------------


def test_round_trip_with_metadata(tmp_path):
    sd = sample_state_dict()
    path = tmp_path / "weights.npz"
    meta = {"arch": "mobilenet_v3_small", "num_classes": 1000, "mean": [0.485, 0.456, 0.406], "note": "naïve ✓"}
    save_state_dict(sd, path, metadata=meta)
    loaded = load_state_dict(path)
    assert METADATA_KEY not in loaded
    assert_same(loaded, sd)
    assert load_metadata(path) == meta
    # A plain NumPy reader without pickle sees the same archive; metadata is a uint8 array.
    with np.load(path, allow_pickle=False) as npz:
        assert npz[METADATA_KEY].dtype == np.uint8
        assert json.loads(npz[METADATA_KEY].tobytes()) == meta
        np.testing.assert_array_equal(npz["features.0.0.weight"], sd["features.0.0.weight"])


def test_no_metadata_and_exact_path(tmp_path):
    path = tmp_path / "weights.bin"  # no .npz appended
    save_state_dict({"a": np.arange(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    assert load_metadata(path) == {}
    assert_same(load_state_dict(str(path)), {"a": np.arange(3)})


def test_fortran_and_big_endian_arrays_come_back_native_c_order(tmp_path):
    a = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    b = np.arange(5, dtype=">i4")
    save_state_dict({"a": a, "b": b}, tmp_path / "w.npz")
    loaded = load_state_dict(tmp_path / "w.npz")
    assert_same(loaded, {"a": a, "b": b})
    assert loaded["b"].dtype.isnative


def test_overwrite_and_permissions(tmp_path):
    path = tmp_path / "w.npz"
    save_state_dict({"a": np.zeros(2)}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    os.chmod(path, 0o640)
    save_state_dict({"a": np.ones(2)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert_same(load_state_dict(path), {"a": np.ones(2)})


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch, exc_type):
    path = tmp_path / "w.npz"
    save_state_dict({"old": np.zeros(3)}, path)
    before = path.read_bytes()
    real_write = np.lib.format.write_array
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc_type("interrupted mid-write")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(exc_type):
        save_state_dict({"a": np.ones(1000), "b": np.ones(1000)}, path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path, {"w.npz"}) == []


def test_failed_replace_removes_temp_file(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise PermissionError("read-only destination")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        save_state_dict({"a": np.ones(3)}, tmp_path / "w.npz")
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize(
    "state_dict, metadata, exc_type, fragment",
    [
        ({"a": np.array([object()], dtype=object)}, None, ValueError, "only bool and numeric arrays"),
        ({"a": np.array(["x"])}, None, ValueError, "only bool and numeric arrays"),
        ({METADATA_KEY: np.zeros(1)}, None, ValueError, "reserved"),
        ({3: np.zeros(1)}, None, ValueError, "non-empty strings"),
        ({"": np.zeros(1)}, None, ValueError, "non-empty strings"),
        ([("a", np.zeros(1))], None, TypeError, "must be a mapping"),
        ({"a": np.zeros(1)}, {"x": object()}, TypeError, "JSON-serialisable"),
        ({"a": np.zeros(1)}, {"x": float("nan")}, TypeError, "JSON-serialisable"),
        ({"a": np.zeros(1)}, ["not", "a", "dict"], TypeError, "metadata must be a mapping"),
    ],
)
def test_save_refuses_bad_input_before_writing(tmp_path, state_dict, metadata, exc_type, fragment):
    with pytest.raises(exc_type, match=fragment):
        save_state_dict(state_dict, tmp_path / "w.npz", metadata=metadata)
    assert leftovers(tmp_path, set()) == []


# --------------------------------------------------------------------------
# Dispatch and refusals
# --------------------------------------------------------------------------


def test_missing_file_is_a_weights_format_error_chained_to_file_not_found(tmp_path):
    path = tmp_path / "nope.pth"
    for func in (load_state_dict, load_metadata):
        with pytest.raises(WeightsFormatError, match="no such file") as excinfo:
            func(path)
        assert str(path) in str(excinfo.value)
        assert isinstance(excinfo.value.__cause__, FileNotFoundError)


def _image(tmp_path, fmt):
    Image = pytest.importorskip("PIL.Image")

    path = tmp_path / f"image-{fmt}.pth"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path, format=fmt)
    return path.read_bytes()


def _npz_with(entries):
    """Raw zip bytes with the given (name, bytes) entries, duplicates allowed."""
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def _npy(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


FOREIGN_FILES = [
    ("empty", lambda d: b"", "file is empty (0 bytes)"),
    ("html", lambda d: b"\xef\xbb\xbf\n  <!DOCTYPE html>\n<html><body>404</body></html>", "file is an HTML page"),
    ("html-no-doctype", lambda d: b"<head><title>Error</title></head><html></html>", "file is an HTML page"),
    ("xml error", lambda d: b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>', "file is an XML document"),
    ("jpeg", lambda d: _image(d, "JPEG"), "file is a JPEG image"),
    ("png", lambda d: _image(d, "PNG"), "file is a PNG image"),
    ("gif", lambda d: _image(d, "GIF"), "file is a GIF image"),
    ("gzip", lambda d: gzip.compress(b"data"), "gzip-compressed"),
    ("git lfs pointer", lambda d: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 10306551\n", "Git LFS pointer"),
    ("npy", lambda d: _npy(np.zeros(3)), "single NumPy .npy array"),
    ("bare pickle", lambda d: pickle.dumps(Evil(d / "PWNED"), protocol=2), "plain pickle"),
    ("unknown", lambda d: b"\x00\x01garbage", "unrecognised file format (first bytes b'\\x00\\x01garbage')"),
    ("other zip", lambda d: _npz_with([("readme.txt", b"hi")]), "neither a NumPy .npz nor a torch.save file"),
    ("corrupt zip", lambda d: b"PK\x03\x04" + b"\x00" * 40, "corrupt zip archive: BadZipFile"),
    ("npz duplicate entries", lambda d: _npz_with([("a.npy", _npy(np.zeros(2))), ("a.npy", _npy(np.ones(2)))]),
     "duplicate entries named 'a.npy'"),
    ("npz string array", lambda d: _npz_with([("a.npy", _npy(np.array(["x"])))]), "array 'a' has dtype <U1"),
    ("npz truncated", lambda d: _npz_with([("a.npy", _npy(np.zeros(100)))])[:-30], "corrupt zip archive"),
]  # fmt: skip


@pytest.mark.parametrize("case", FOREIGN_FILES, ids=[c[0] for c in FOREIGN_FILES])
def test_foreign_files_are_refused_with_a_reason(tmp_path, case):
    _, make, fragment = case
    path = tmp_path / "weights.pth"
    path.write_bytes(make(tmp_path))
    with pytest.raises(WeightsFormatError) as excinfo:
        load_state_dict(path)
    assert fragment in str(excinfo.value)
    assert repr(str(path)) in str(excinfo.value)
    assert not (tmp_path / "PWNED").exists()


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npz"
    np.savez(path, w=np.ones(2), evil=np.array([Evil(marker)], dtype=object))
    with pytest.raises(WeightsFormatError, match="Object arrays cannot be loaded when allow_pickle=False") as excinfo:
        load_state_dict(path)
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert not marker.exists()


def test_npz_object_array_as_metadata_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil_meta.npz"
    np.savez(path, **{METADATA_KEY: np.array([Evil(marker)], dtype=object)})
    with pytest.raises(WeightsFormatError, match="Object arrays cannot be loaded"):
        load_metadata(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (np.frombuffer(b"{not json", np.uint8), "not valid UTF-8 JSON"),
        (np.frombuffer(b"[1, 2]", np.uint8), "not a JSON object"),
        (np.zeros(3, np.float32), "must be a 1-D uint8 array"),
    ],
)
def test_malformed_metadata(tmp_path, raw, fragment):
    path = tmp_path / "w.npz"
    np.savez(path, **{METADATA_KEY: raw, "a": np.zeros(1)})
    with pytest.raises(WeightsFormatError, match=fragment):
        load_metadata(path)
    assert list(load_state_dict(path)) == ["a"]  # load_state_dict ignores metadata


def test_torch_files_are_dispatched(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"w": torch.randn(3, 2), "n": torch.tensor(5)}
    for name, kwargs in [("zip.pth", {}), ("legacy.pth", {"_use_new_zipfile_serialization": False})]:
        path = tmp_path / name
        torch.save(sd, path, **kwargs)
        loaded = load_state_dict(path)
        assert list(loaded) == ["w", "n"]
        assert loaded["w"].tobytes() == sd["w"].numpy().tobytes()
        assert loaded["n"].dtype == np.int64 and loaded["n"] == 5
        assert load_metadata(path) == {}


def test_npz_renamed_pth_is_detected_by_content(tmp_path):
    path = tmp_path / "actually_npz.pth"
    save_state_dict({"a": np.arange(3.0)}, path, metadata={"k": 1})
    assert_same(load_state_dict(path), {"a": np.arange(3.0)})
    assert load_metadata(path) == {"k": 1}


def test_torchscript_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "scripted.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(path))
    for func in (load_state_dict, load_metadata):
        with pytest.raises(WeightsFormatError, match="TorchScript archive"):
            func(path)


def test_hostile_torch_file_is_refused_through_dispatch(tmp_path):
    pytest.importorskip("torch")
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil(marker)}, protocol=2))
    with pytest.raises(WeightsFormatError, match="system, which is not allowed"):
        load_state_dict(path)
    assert not marker.exists()
