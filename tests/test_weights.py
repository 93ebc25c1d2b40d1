"""Official weights registry, builders' weights= argument, .npz round trips, weights_convert.py."""

import dataclasses
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import npmnv3
from npmnv3 import weights as W
from conftest import numpy_state_dict, random_torch_model, rel_err

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
ROOT = Path(__file__).resolve().parent.parent


def torchvision_enums():
    import torchvision.models.detection as det
    import torchvision.models.segmentation as seg
    from torchvision.models import quantization
    return {"mobilenet_v3_large": torchvision.models.MobileNet_V3_Large_Weights,
            "mobilenet_v3_small": torchvision.models.MobileNet_V3_Small_Weights,
            "lraspp_mobilenet_v3_large": seg.LRASPP_MobileNet_V3_Large_Weights,
            "deeplabv3_mobilenet_v3_large": seg.DeepLabV3_MobileNet_V3_Large_Weights,
            "quantized_mobilenet_v3_large": quantization.MobileNet_V3_Large_QuantizedWeights,
            "ssdlite320_mobilenet_v3_large": det.SSDLite320_MobileNet_V3_Large_Weights}


def test_registry_matches_torchvision():
    enums = torchvision_enums()
    assert set(W.OFFICIAL) == {(a, w.name) for a, e in enums.items() for w in e}
    for (arch, name), entry in W.OFFICIAL.items():
        tv = enums[arch][name]
        transforms = tv.transforms()
        assert entry.url == tv.url
        prefix = tv.url.rsplit("-", 1)[1][:8]                            # torchvision's 8-hex prefix
        assert (entry.sha256 or npmnv3.hub.hash_prefix(entry.filename)).startswith(prefix)
        assert (entry.sha256 is None) == (entry.size is None)          # a size is pinned only with the full hash
        if hasattr(transforms, "resize_size"):
            assert entry.resize_size == transforms.resize_size[0]
            assert entry.crop_size == (transforms.crop_size[0] if hasattr(transforms, "crop_size") else None)
            assert entry.mean == tuple(transforms.mean) and entry.std == tuple(transforms.std)
        else:       # the detector's transforms only scale to [0, 1]: the model resizes and normalises
            assert type(transforms).__name__ == "ObjectDetection"
            assert (entry.resize_size, entry.crop_size, entry.mean, entry.std) == (320, None, (0.0,) * 3, (1.0,) * 3)
        (dataset, published), = tv.meta["_metrics"].items()
        assert dict(entry.metrics) == published, dataset
        assert entry.meta()["categories"] == tv.meta["categories"]
        assert W.get_weights(arch).name == enums[arch].DEFAULT.name
    assert W.get_weights("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1").resize_size == 256


def test_unknown_weight_names():
    with pytest.raises(ValueError, match=r"weights: 'IMAGENET1K_V2' is not an official mobilenet_v3_small weights "
                                         r"name; expected one of DEFAULT, IMAGENET1K_V1, a path"):
        npmnv3.mobilenet_v3_small(weights="IMAGENET1K_V2")
    with pytest.raises(TypeError, match="weights: expected None, 'DEFAULT', a weights name or a path, got int"):
        npmnv3.mobilenet_v3_small(weights=3)
    with pytest.raises(ValueError, match="weights: mobilenet_v3_large IMAGENET1K_V1 weights do not fit mobilenet_v3_small"):
        npmnv3.mobilenet_v3_small(weights=W.get_weights("mobilenet_v3_large", "IMAGENET1K_V1"))
    with pytest.raises(npmnv3.WeightsFormatError, match=r"nope\.pth"):
        npmnv3.mobilenet_v3_small(weights="/nonexistent/nope.pth")


@pytest.mark.parametrize("arch", ("mobilenet_v3_large", "mobilenet_v3_small"))
def test_pth_file_loads_without_torch_and_casts(arch, tmp_path):
    torch_model = random_torch_model(arch, seed=21)
    torch.save(torch_model.state_dict(), tmp_path / "w.pth")
    for dtype in ("float32", "float64"):
        model = getattr(npmnv3, arch)(weights=tmp_path / "w.pth", dtype=dtype)
        assert all(v.dtype == np.dtype(dtype) for v in model.params.values())
        for k, v in numpy_state_dict(torch_model).items():
            if not k.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(model.params[k], v.astype(dtype))


def test_model_save_round_trip_keeps_metadata(tmp_path):
    model = npmnv3.mobilenet_v3_small(seed=3, num_classes=10)
    model.meta = dict(resize_size=240, crop_size=200, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                      categories=[f"c{i}" for i in range(10)])
    model.save(tmp_path / "m.npz")
    assert not [p for p in tmp_path.iterdir() if p.name != "m.npz"]     # no temp files left
    again = npmnv3.mobilenet_v3_small(weights=tmp_path / "m.npz")
    assert again.num_classes == 10 and again.meta["resize_size"] == 240 and again.meta["categories"][3] == "c3"
    for k, v in model.params.items():
        np.testing.assert_array_equal(again.params[k], v)
    assert npmnv3.serialization.load_metadata(tmp_path / "m.npz")["arch"] == "mobilenet_v3_small"


# --------------------------------------------------------------------------- official weights via the downloader

class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}
    requests = []

    def do_GET(self):
        self.requests.append(self.path)
        body = self.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    """A 127.0.0.1 server standing in for download.pytorch.org, with registry entries pointing at
    files made here by torch.save (the real ones are unreachable from the test machines)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.files, _Handler.requests = {}, []
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", f"http://127.0.0.1:{server.server_address[1]}/models/")
    monkeypatch.setenv("NPMNV3_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("NPMNV3_OFFLINE", raising=False)

    def publish(arch, name, torch_model):
        path = tmp_path / "publish.pth"
        torch.save(torch_model.state_dict(), path)
        data = path.read_bytes()
        old = W.OFFICIAL[(arch, name)]
        entry = dataclasses.replace(old, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        monkeypatch.setitem(W.OFFICIAL, (arch, name), entry)
        _Handler.files[old.filename] = data
        return entry

    yield publish
    server.shutdown()
    server.server_close()


def test_default_weights_are_downloaded_cached_and_agree(mirror, tmp_path):
    torch_model = random_torch_model("mobilenet_v3_small", seed=22)
    entry = mirror("mobilenet_v3_small", "IMAGENET1K_V1", torch_model)
    model = npmnv3.mobilenet_v3_small(weights="DEFAULT", progress=False)
    assert (tmp_path / "cache" / entry.filename).stat().st_size == entry.size
    assert model.meta["weights"] == "IMAGENET1K_V1" and model.meta["resize_size"] == 256
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 80)).astype(np.float32)
    with torch.no_grad():
        assert rel_err(model(x), torch_model(torch.from_numpy(x)).numpy()) < 1e-4
    npmnv3.mobilenet_v3_small(weights="IMAGENET1K_V1")           # from the cache: no second request
    assert len(_Handler.requests) == 1
    # a file given by path that is an official file is recognised by its SHA-256
    assert npmnv3.mobilenet_v3_small(weights=tmp_path / "cache" / entry.filename).meta["weights"] == "IMAGENET1K_V1"


@pytest.mark.slow
def test_official_segmentation_weights_are_downloaded_with_their_recipe(mirror):
    import torchref
    lraspp = torchref.random_segmentation_model("lraspp_mobilenet_v3_large", seed=5)
    deeplab = torchref.random_segmentation_model("deeplabv3_mobilenet_v3_large", seed=6, aux_loss=True)
    mirror("lraspp_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1", lraspp)
    mirror("deeplabv3_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1", deeplab)
    model = npmnv3.lraspp_mobilenet_v3_large(weights="DEFAULT", progress=False)
    assert model.meta["resize_size"] == 520 and model.meta["crop_size"] is None
    assert model.meta["categories"][15] == "person" and model.meta["miou"] == 57.9
    model = npmnv3.deeplabv3_mobilenet_v3_large(weights="COCO_WITH_VOC_LABELS_V1", progress=False)
    assert "aux" in model.heads and model.num_classes == 21       # the official file holds the aux head
    x = torchref.smooth_images(1, 64, 80).numpy()
    with torch.no_grad():
        ref = deeplab(torch.from_numpy(x))
    out = model(x)
    assert rel_err(out["out"], ref["out"].numpy()) < 1e-4 and rel_err(out["aux"], ref["aux"].numpy()) < 1e-4


@pytest.mark.slow
def test_official_detection_weights_are_downloaded_with_their_class_names(mirror, tmp_path):
    import torchref
    detector = torchref.random_detection_model(seed=5)
    entry = mirror("ssdlite320_mobilenet_v3_large", "COCO_V1", detector)
    assert entry.filename == "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"
    model = npmnv3.ssdlite320_mobilenet_v3_large(weights="DEFAULT", progress=False)
    assert model.meta["weights"] == "COCO_V1" and model.meta["box_map"] == 21.3 and model.num_classes == 91
    assert model.meta["categories"][:2] == ["__background__", "person"] and model.meta["categories"][12] == "N/A"
    assert _Handler.requests == [f"/models/{entry.filename}"]
    assert npmnv3.ssdlite320_mobilenet_v3_large(weights="COCO_V1").meta["weights"] == "COCO_V1"   # from the cache
    assert len(_Handler.requests) == 1
    images = list(torchref.textured_images(1, 120, 90))
    with torch.no_grad():
        ref = detector(images)[0]
    ours = model([images[0].numpy()])[0]
    assert ours["labels"].tolist() == ref["labels"].tolist()
    np.testing.assert_allclose(ours["boxes"], ref["boxes"].numpy(), atol=1e-2)


def test_large_v1_and_v2_carry_their_preprocessing(mirror):
    torch_model = random_torch_model("mobilenet_v3_large", seed=23)
    mirror("mobilenet_v3_large", "IMAGENET1K_V1", torch_model)
    mirror("mobilenet_v3_large", "IMAGENET1K_V2", torch_model)
    assert npmnv3.mobilenet_v3_large(weights="IMAGENET1K_V1", progress=False).meta["resize_size"] == 256
    assert npmnv3.mobilenet_v3_large(weights="DEFAULT", progress=False).meta["resize_size"] == 232


# --------------------------------------------------------------------------- weights_convert.py

def run_convert(*argv, env=None):
    return subprocess.run([sys.executable, str(ROOT / "weights_convert.py"), *map(str, argv)],
                          capture_output=True, text=True, env=dict(os.environ, **(env or {})))


@pytest.mark.slow
@pytest.mark.parametrize("float16", (False, True))
def test_convert_pth_to_npz(tmp_path, float16):
    torch_model = random_torch_model("mobilenet_v3_large", seed=24)
    torch.save(torch_model.state_dict(), tmp_path / "src.pth")
    run = run_convert(tmp_path / "src.pth", tmp_path / "out.npz", *(["--float16"] if float16 else []))
    assert run.returncode == 0, run.stderr
    assert f"wrote {tmp_path / 'out.npz'}: mobilenet_v3_large (312 tensors" in run.stdout
    diff = float(run.stdout.split("max |logit difference| ")[1].split(",")[0])
    relative = float(run.stdout.split("relative ")[1].split(" ")[0])
    largest = float(run.stdout.split("largest |logit| ")[1].rstrip(")\n"))
    assert diff < 1e-3 and relative == pytest.approx(diff / largest, rel=0.05) and largest > 0.5
    sd = npmnv3.load_state_dict(tmp_path / "out.npz")
    assert {v.dtype for k, v in sd.items() if not k.endswith("tracked")} == {np.dtype(np.float16 if float16 else np.float32)}
    model = npmnv3.mobilenet_v3_large(weights=tmp_path / "out.npz")
    assert model.dtype == np.float32
    x = np.random.default_rng(1).standard_normal((1, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    assert rel_err(model(x), ref) < (5e-2 if float16 else 1e-4)


def test_convert_fetches_official_weights(tmp_path, mirror):
    torch_model = random_torch_model("mobilenet_v3_small", seed=25)
    mirror("mobilenet_v3_small", "IMAGENET1K_V1", torch_model)
    import importlib.util
    spec = importlib.util.spec_from_file_location("weights_convert", ROOT / "weights_convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    assert convert.main(["--arch", "mobilenet_v3_small", "--weights", "DEFAULT", str(tmp_path / "o.npz")]) == 0
    assert npmnv3.mobilenet_v3_small(weights=tmp_path / "o.npz").meta["weights"] == "IMAGENET1K_V1"
    assert len(_Handler.requests) == 1


def test_convert_says_where_official_weights_were_expected_offline(tmp_path):
    env = {"NPMNV3_OFFLINE": "1", "NPMNV3_HOME": str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "torch")}
    run = run_convert("--arch", "mobilenet_v3_small", "--weights", "DEFAULT", tmp_path / "o.npz", "--no-check", env=env)
    assert run.returncode == 1
    assert run.stderr.startswith("weights_convert: error: cannot fetch mobilenet_v3_small-047dcff4.pth")
    assert str(tmp_path / "cache" / "mobilenet_v3_small-047dcff4.pth") in run.stderr
    assert not (tmp_path / "o.npz").exists()


def test_convert_errors(tmp_path):
    run = run_convert(tmp_path / "missing.pth", tmp_path / "o.npz")
    assert run.returncode == 1 and run.stderr.startswith("weights_convert: error: ") and "missing.pth" in run.stderr
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    run = run_convert(tmp_path / "other.npz", tmp_path / "o.npz")
    assert run.returncode == 1 and "the weights fit no MobileNetV3 with these options" in run.stderr
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.slow
def test_quantized_weights_are_downloaded_from_their_folder_and_checked_by_their_name(mirror, monkeypatch, tmp_path):
    """The registry entry of the int8 network has only the hash prefix of its name: a file published under
    a name carrying its own prefix downloads from models/quantized/ and loads; one whose hash does not begin
    with that prefix is refused."""
    import torchref
    qat, _ = torchref.quantized_model(seed=5)
    path = tmp_path / "qat.pth"
    torch.save(qat.state_dict(), path)
    data = path.read_bytes()
    key = ("quantized_mobilenet_v3_large", "IMAGENET1K_QNNPACK_V1")
    entry = dataclasses.replace(W.OFFICIAL[key], filename=f"mobilenet_v3_large_qnnpack-{hashlib.sha256(data).hexdigest()[:8]}.pth")
    assert entry.sha256 is None and entry.size is None
    monkeypatch.setitem(W.OFFICIAL, key, entry)
    _Handler.files[entry.filename] = data
    model = npmnv3.quantized_mobilenet_v3_large(weights="DEFAULT", progress=False)
    assert _Handler.requests == [f"/models/quantized/{entry.filename}"]
    assert model.meta["weights"] == "IMAGENET1K_QNNPACK_V1" and model.meta["resize_size"] == 256
    assert model.meta["acc@1"] == 73.004 and len(model.meta["categories"]) == 1000
    assert W.meta_for_file(tmp_path / "cache" / entry.filename)["weights"] == "IMAGENET1K_QNNPACK_V1"
    (tmp_path / "cache" / entry.filename).unlink()
    _Handler.files[entry.filename] = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(npmnv3.DownloadError, match="instead of one beginning with"):
        npmnv3.quantized_mobilenet_v3_large(weights="IMAGENET1K_QNNPACK_V1", progress=False)
