"""predict() and evaluate() against torchvision on the same weights and images; the CLI."""

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import npmnv3
from npmnv3 import ImageError, weights as W
from npmnv3.cli import main
from npmnv3.predict import softmax
from conftest import random_torch_model

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    """A torch.save'd Small state dict with random non-trivial weights, and its torch model."""
    torch_model = random_torch_model("mobilenet_v3_small", seed=11)
    path = tmp_path_factory.mktemp("w") / "small.pth"
    torch.save(torch_model.state_dict(), path)
    return path, torch_model


def photo(seed, size=(300, 241)):
    """A smooth random colour image (a noise image would make every class look alike)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def torch_top(torch_model, image, weights_enum, k=5):
    x = weights_enum.transforms()(image.convert("RGB"))[None]
    with torch.no_grad():
        p = torch.softmax(torch_model.float()(x).double(), dim=1)[0].numpy()
    order = np.argsort(-p)[:k]
    return order, p[order]


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert np.isfinite(softmax(np.array([[3.4e38, -3.4e38]], np.float32))).all()


def test_predict_matches_torchvision(small_pth):
    path, torch_model = small_pth
    model = npmnv3.mobilenet_v3_small(weights=path)
    assert model.meta["resize_size"] == 256
    images = [photo(s) for s in range(4)]
    results = npmnv3.predict(images, model=model, topk=5, batch_size=3)
    assert len(results) == 4
    for image, preds in zip(images, results):
        order, probs = torch_top(torch_model, image, torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1)
        assert [p["index"] for p in preds] == list(order)
        np.testing.assert_allclose([p["probability"] for p in preds], probs, rtol=0, atol=2e-4)
        assert [p["label"] for p in preds] == [npmnv3.imagenet.categories()[i] for i in order]
    # one image in, one list out; the same answer as in the batch
    single = npmnv3.predict(images[0], model=model, topk=3)
    assert [p["index"] for p in single] == [p["index"] for p in results[0][:3]]


def test_predict_every_input_kind_gives_the_same_answer(small_pth, tmp_path):
    model = npmnv3.mobilenet_v3_small(weights=small_pth[0])
    image = photo(7)
    file = tmp_path / "p.png"
    image.save(file)
    kinds = [str(file), file, file.read_bytes(), io.BytesIO(file.read_bytes()), image, np.asarray(image)]
    answers = [[p["index"] for p in npmnv3.predict(k, model=model)] for k in kinds]
    assert all(a == answers[0] for a in answers)


def test_predict_large_v2_uses_resize_232(tmp_path, monkeypatch):
    """Official weights (stood in for by a local file with its hash registered) preprocess as torchvision's
    IMAGENET1K_V2 transforms: resize 232, crop 224."""
    torch_model = random_torch_model("mobilenet_v3_large", seed=12)
    home = tmp_path / "home"
    home.mkdir()
    fake = W.OFFICIAL[("mobilenet_v3_large", "IMAGENET1K_V2")]
    torch.save(torch_model.state_dict(), home / fake.filename)
    data = (home / fake.filename).read_bytes()
    entry = dataclasses.replace(fake, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(W.OFFICIAL, ("mobilenet_v3_large", "IMAGENET1K_V2"), entry)
    monkeypatch.setenv("NPMNV3_HOME", str(home))
    monkeypatch.setenv("NPMNV3_OFFLINE", "1")
    image = photo(3, (333, 250))
    preds = npmnv3.predict(image, weights="DEFAULT", topk=5)
    order, probs = torch_top(torch_model, image, torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V2)
    assert [p["index"] for p in preds] == list(order)
    np.testing.assert_allclose([p["probability"] for p in preds], probs, rtol=0, atol=2e-4)
    # torchvision's spelling of the name is a name too, not a file
    assert npmnv3.predict(image, weights="MobileNet_V3_Large_Weights.IMAGENET1K_V2", topk=5) == preds


def test_predict_errors_name_the_input(small_pth, tmp_path):
    model = npmnv3.mobilenet_v3_small(weights=small_pth[0])
    good = photo(1)
    with pytest.raises(ImageError, match=r"^image 1 \(file '.*missing.jpg'\): no such file"):
        npmnv3.predict([good, str(tmp_path / "missing.jpg")], model=model)
    with pytest.raises(ImageError, match=r"^image file '.*missing.jpg': no such file"):
        npmnv3.predict(str(tmp_path / "missing.jpg"), model=model)
    with pytest.raises(ImageError, match=r"^image 2: numpy array has dtype float64"):
        npmnv3.predict([good, good, np.zeros((9, 9, 3))], model=model)
    with pytest.raises(ImageError, match="images: expected an image or a non-empty list of images, got an empty list"):
        npmnv3.predict([], model=model)
    with pytest.raises(ValueError, match=r"topk: expected an integer from 1 to 1000, got 0"):
        npmnv3.predict(good, model=model, topk=0)
    with pytest.raises(ValueError, match=r"model: expected one of mobilenet_v3_large, mobilenet_v3_small "
                                         r"or a MobileNetV3 instance, got 'resnet50'"):
        npmnv3.predict(good, model="resnet50")


def test_custom_classes_and_fine_tuned_files(tmp_path):
    torch_model = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    torch.save(torch_model.state_dict(), tmp_path / "ft.pth")
    model = npmnv3.mobilenet_v3_small(weights=tmp_path / "ft.pth")      # num_classes read from the file
    assert model.num_classes == 7
    preds = npmnv3.predict(photo(2), model=model, topk=7)
    assert sorted(p["index"] for p in preds) == list(range(7))
    assert preds[0]["label"].startswith("class ")
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-9


# --------------------------------------------------------------------------- evaluate

def make_folder(root):
    """Two classes, one named by WordNet ID and one by name; labels chosen so accuracy is not trivial."""
    truth = {}
    for sub, label in (("n01440764", 0), ("goldfish", 1)):
        (root / sub).mkdir(parents=True)
        for i in range(3):
            path = root / sub / f"{i}.png"
            photo(100 * label + i).save(path)
            truth[path] = label
    (root / "goldfish" / "notes.txt").write_text("not an image, ignored by suffix")
    return truth


def test_evaluate_matches_torchvision(small_pth, tmp_path):
    path, torch_model = small_pth
    truth = make_folder(tmp_path / "val")
    model = npmnv3.mobilenet_v3_small(weights=path)
    result = npmnv3.evaluate(tmp_path / "val", model=model, batch_size=4, progress=False)
    c1 = c5 = 0
    for image_path, label in truth.items():
        order, _ = torch_top(torch_model, Image.open(image_path),
                             torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1)
        c1 += int(order[0] == label)
        c5 += int(label in order)
    assert result == dict(top1=c1 / 6, top5=c5 / 6, count=6, correct1=c1, correct5=c5)


def test_evaluate_errors(tmp_path):
    with pytest.raises(ValueError, match=r"folder '.*nowhere': does not exist"):
        npmnv3.evaluate(tmp_path / "nowhere", model=npmnv3.mobilenet_v3_small())
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=r"folder '.*file.txt': is a file, expected a directory with one sub-folder"):
        npmnv3.evaluate(tmp_path / "file.txt", model=npmnv3.mobilenet_v3_small())
    (tmp_path / "bad" / "not_a_class").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"folder '.*not_a_class': its name is neither an ImageNet WordNet ID nor a class name"):
        npmnv3.evaluate(tmp_path / "bad", model=npmnv3.mobilenet_v3_small())
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"found no images in class sub-folders"):
        npmnv3.evaluate(tmp_path / "empty", model=npmnv3.mobilenet_v3_small())


# --------------------------------------------------------------------------- command line

def test_cli_predict_sample_and_json(small_pth, capsys):
    path, torch_model = small_pth
    assert main(["predict", "--arch", "mobilenet_v3_small", "--weights", str(path), "--topk", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("grace_hopper.jpg") and len(out) == 4
    from matplotlib import cbook
    sample = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    order, probs = torch_top(torch_model, sample, torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1, 5)
    assert [f"(class {k})" in line for k, line in zip(order[:3], out[1:])] == [True] * 3
    assert main(["predict", "--arch", "mobilenet_v3_small", "--weights", str(path), "--json",
                 cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["index"] for p in data[0]["predictions"]] == list(order)          # the default top 5


@pytest.mark.slow
def test_cli_errors_are_one_line_without_traceback(small_pth, tmp_path):
    cases = [
        (["predict", str(tmp_path / "nope.jpg"), "--arch", "mobilenet_v3_small", "--weights", str(small_pth[0])],
         "npmnv3 predict: error: image file '"),
        (["predict", "--weights", str(tmp_path / "missing.pth")], "npmnv3 predict: error: "),
        (["predict", "--weights", "IMAGENET1K_V9"], "npmnv3 predict: error: weights: 'IMAGENET1K_V9' is not an official"),
        (["evaluate", str(tmp_path / "nowhere"), "--weights", str(small_pth[0]), "--arch", "mobilenet_v3_small"],
         "npmnv3 evaluate: error: folder '"),
    ]
    for argv, start in cases:
        run = subprocess.run([sys.executable, "-m", "npmnv3", *argv], capture_output=True, text=True,
                             env=dict(os.environ, NPMNV3_OFFLINE="1", NPMNV3_HOME=str(tmp_path / "cache")))
        assert run.returncode == 1, run.stderr
        assert run.stderr.startswith(start), run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
        assert run.stdout == ""


def test_cli_offline_without_weights_says_where_to_put_them(tmp_path):
    run = subprocess.run([sys.executable, "-m", "npmnv3", "predict", "--arch", "mobilenet_v3_small"],
                         capture_output=True, text=True,
                         env=dict(os.environ, NPMNV3_OFFLINE="1", NPMNV3_HOME=str(tmp_path / "cache"),
                                  TORCH_HOME=str(tmp_path / "torch")))
    assert run.returncode == 1
    assert "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth" in run.stderr
    assert str(tmp_path / "cache" / "mobilenet_v3_small-047dcff4.pth") in run.stderr
    assert "NPMNV3_OFFLINE=1" in run.stderr


@pytest.mark.parametrize("command", ["predict", "summary", "evaluate"])
def test_cli_help(command):
    run = subprocess.run([sys.executable, "-m", "npmnv3", command, "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and f"usage: npmnv3 {command}" in run.stdout


def test_installed_script_exists():
    import shutil
    script = shutil.which("npmnv3", path=os.path.dirname(sys.executable))
    assert script is not None, "the npmnv3 console script is not installed next to python"


def test_exif_transpose_option_reaches_preprocessing(small_pth, tmp_path, capsys):
    path = small_pth[0]
    image = photo(9, (320, 200))
    exif = Image.Exif()
    exif[0x0112] = 6                    # orientation: rotate 90 degrees to display
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    model = npmnv3.mobilenet_v3_small(weights=path)
    from PIL import ImageOps
    upright = npmnv3.predict(ImageOps.exif_transpose(Image.open(tmp_path / "r.jpg")), model=model, topk=5)
    as_stored = npmnv3.predict(Image.open(tmp_path / "r.jpg"), model=model, topk=5)
    rotated = npmnv3.predict(tmp_path / "r.jpg", model=model, topk=5, exif_transpose=True)
    assert [p["index"] for p in rotated] != [p["index"] for p in as_stored]
    assert rotated == upright
    assert main(["predict", str(tmp_path / "r.jpg"), "--arch", "mobilenet_v3_small", "--weights", str(path),
                 "--json", "--exif-transpose"]) == 0
    cli = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [p["index"] for p in cli] == [p["index"] for p in rotated]


def test_evaluate_progress_bar_goes_to_stderr(small_pth, tmp_path, capsys):
    make_folder(tmp_path / "val")
    model = npmnv3.mobilenet_v3_small(weights=small_pth[0])
    npmnv3.evaluate(tmp_path / "val", model=model, batch_size=4, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("] 6/6 images\n") and "\r[" in captured.err and "4/6 images" in captured.err
    npmnv3.evaluate(tmp_path / "val", model=model, batch_size=4)       # stderr is not a terminal here
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- the int8 network

@pytest.fixture(scope="module")
def qat_pth(tmp_path_factory):
    """A QAT state dict of torchvision's quantizable Large (random weights, calibrated), and torch's int8 model."""
    import torchref
    qat, quantized = torchref.quantized_model(seed=12)
    path = tmp_path_factory.mktemp("q") / "qat.pth"
    torch.save(qat.state_dict(), path)
    return path, quantized


@pytest.mark.slow
def test_predict_quantized_matches_torchs_int8_model(qat_pth):
    import torchref
    path, torch_model = qat_pth
    images = [photo(s) for s in range(3)]
    results = npmnv3.predict(images, weights=path, quantized=True, topk=3)
    model = npmnv3.quantized_mobilenet_v3_large(weights=path)
    assert npmnv3.predict(images, model=model, topk=3) == results
    from npmnv3.predict import recipe
    x = np.stack([npmnv3.preprocess(image, **recipe(model)) for image in images])   # the guessed recipe: 256, 224
    logits, _ = torchref.quantized_features_and_logits(torch_model, x)
    for preds, row in zip(results, logits):
        assert preds[0]["index"] == int(np.argmax(row))
        np.testing.assert_allclose([p["probability"] for p in preds], np.sort(softmax(row[None])[0])[::-1][:3],
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="model: the quantized network is mobilenet_v3_large only, got 'mobilenet_v3_small'"):
        npmnv3.predict(images[0], model="mobilenet_v3_small", quantized=True)


def test_cli_predict_quantized(qat_pth, capsys):
    path, _ = qat_pth
    from matplotlib import cbook
    sample = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    assert main(["predict", "--quantized", "--weights", str(path), "--json", sample]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = npmnv3.predict(sample, weights=path, quantized=True)
    assert data[0]["predictions"] == expected
    assert main(["predict", "--quantized", "--arch", "mobilenet_v3_small", "--weights", str(path), sample]) == 1
    assert capsys.readouterr().err.strip() == ("npmnv3 predict: error: --quantized: torchvision's quantized network "
                                               "is mobilenet_v3_large; drop --arch mobilenet_v3_small")
    small = npmnv3.mobilenet_v3_small()
    small.save(path.parent / "small.npz")
    assert main(["predict", "--quantized", "--weights", str(path.parent / "small.npz"), sample]) == 1
    assert capsys.readouterr().err.startswith(f"npmnv3 predict: error: --weights {path.parent / 'small.npz'}: "
                                              "state_dict does not fit QuantizedMobileNetV3")
