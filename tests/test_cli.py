"""The npmnv3 command as a user types it: subprocesses, their stdout, stderr and exit status."""

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import npmnv3
from npmnv3 import StateDictError


def npmnv3_cli(*argv, env=None, tmp=None, **kwargs):
    """Run ``python -m npmnv3 ARGV`` offline with an empty cache; returns the CompletedProcess."""
    base = dict(os.environ, NPMNV3_OFFLINE="1")
    if tmp is not None:
        base.update(NPMNV3_HOME=str(tmp / "cache"), TORCH_HOME=str(tmp / "torch"))
    return subprocess.run([sys.executable, "-m", "npmnv3", *map(str, argv)], capture_output=True, text=True,
                          env=dict(base, **(env or {})), **kwargs)


def one_line_error(run, start):
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert run.stderr.startswith(start), run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """npmnv3 .npz files of random Large and Small models, a float64 one, and two images."""
    folder = tmp_path_factory.mktemp("cli")
    recipe = dict(resize_size=256, crop_size=224, mean=list(npmnv3.images.IMAGENET_MEAN),
                  std=list(npmnv3.images.IMAGENET_STD))
    for name, model in (("large.npz", npmnv3.mobilenet_v3_large(seed=1)), ("small.npz", npmnv3.mobilenet_v3_small(seed=2))):
        model.meta = dict(recipe)       # as if saved from weights with a known recipe: no "guessed" note
        model.save(folder / name)
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (300, 241)), ("b.jpg", (200, 260))):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """torch.save'd Small and Large state dicts of torchvision's own models."""
    pytest.importorskip("torch")
    import torch
    import torchref
    folder = tmp_path_factory.mktemp("cli_torch")
    for arch in ("mobilenet_v3_small", "mobilenet_v3_large"):
        torch.save(torchref.random_model(arch, seed=3).state_dict(), folder / f"{arch.split('_')[-1]}.pth")
    return folder


# --------------------------------------------------------------------------- weights on the command line

@pytest.mark.slow
def test_the_architecture_is_taken_from_the_weights_file(files, torch_files, tmp_path):
    for weights in (torch_files / "small.pth", files / "small.npz"):
        run = npmnv3_cli("predict", files / "a.png", "--weights", weights, "--json", tmp=tmp_path)
        assert run.returncode == 0, run.stderr
        expected = npmnv3.predict(str(files / "a.png"), model=npmnv3.mobilenet_v3_small(weights=weights))
        assert [p["index"] for p in json.loads(run.stdout)[0]["predictions"]] == [p["index"] for p in expected]


def test_an_arch_that_contradicts_the_weights_is_one_short_line(files, torch_files, tmp_path):
    run = npmnv3_cli("predict", files / "a.png", "--arch", "mobilenet_v3_large", "--weights", torch_files / "small.pth",
                     tmp=tmp_path)
    one_line_error(run, f"npmnv3 predict: error: --arch mobilenet_v3_large does not fit --weights "
                        f"{torch_files / 'small.pth'}: these weights are mobilenet_v3_small (244 tensors); "
                        "drop --arch or pass --arch mobilenet_v3_small")
    run = npmnv3_cli("predict", files / "a.png", "--arch", "mobilenet_v3_small", "--weights", files / "large.npz",
                     tmp=tmp_path)
    one_line_error(run, f"npmnv3 predict: error: --arch mobilenet_v3_small does not fit --weights "
                        f"{files / 'large.npz'}: these weights are mobilenet_v3_large (312 tensors); "
                        "drop --arch or pass --arch mobilenet_v3_large")
    assert len(run.stderr) < 300


def test_in_python_the_full_listing_follows_the_same_summary(torch_files):
    with pytest.raises(StateDictError) as info:
        npmnv3.mobilenet_v3_large(weights=torch_files / "small.pth")
    lines = str(info.value).splitlines()
    assert lines[0].endswith(": these weights are mobilenet_v3_small (244 tensors)")
    assert info.value.summary == lines[0]
    assert info.value.found["arch"] == "mobilenet_v3_small"
    assert lines[1].startswith("  missing keys (") and any(line.startswith("  mis-shaped keys (") for line in lines)
    with pytest.raises(StateDictError, match=r"these weights are no MobileNetV3 npmnv3 knows \(1 tensors\)"):
        npmnv3.mobilenet_v3_small().load_state_dict({"x": np.zeros(3)})


def test_a_float64_model_reloads_as_float64(tmp_path):
    model = npmnv3.mobilenet_v3_small(seed=4, dtype="float64")
    model.save(tmp_path / "m64.npz")
    again = npmnv3.mobilenet_v3_small(weights=tmp_path / "m64.npz")
    assert again.dtype == np.float64
    for key, value in model.params.items():
        np.testing.assert_array_equal(again.params[key], value)
    assert npmnv3.mobilenet_v3_small(weights=tmp_path / "m64.npz", dtype="float32").dtype == np.float32


# --------------------------------------------------------------------------- images first, and --keep-going

def test_a_missing_image_is_reported_before_any_weights_are_fetched(tmp_path):
    run = npmnv3_cli("predict", tmp_path / "missing.jpg", tmp=tmp_path)     # offline, with no weights cached
    one_line_error(run, f"npmnv3 predict: error: image file '{tmp_path / 'missing.jpg'}': no such file")


@pytest.mark.slow
def test_keep_going_reports_bad_images_and_classifies_the_rest(files, tmp_path):
    argv = ["predict", files / "a.png", files / "broken.jpg", tmp_path / "missing.jpg", files / "b.jpg",
            "--weights", files / "small.npz"]
    run = npmnv3_cli(*argv, tmp=tmp_path)
    one_line_error(run, "npmnv3 predict: error: image file")              # without it: the first bad image
    assert run.stdout == ""
    run = npmnv3_cli(*argv, "--keep-going", tmp=tmp_path)
    assert run.returncode == 1
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "missing.jpg" in errors[1]
    assert all(line.startswith("npmnv3 predict: error: image file") for line in errors)
    printed = [line for line in run.stdout.splitlines() if not line.startswith(" ")]
    assert printed == [str(files / "a.png"), str(files / "b.jpg")]
    run = npmnv3_cli(*argv, "--keep-going", "--json", tmp=tmp_path)
    entries = json.loads(run.stdout)
    assert [sorted(e) for e in entries] == [["image", "predictions"], ["error", "image"], ["error", "image"],
                                            ["image", "predictions"]]
    assert "no such file" in entries[2]["error"] and run.returncode == 1
    assert npmnv3_cli("predict", files / "a.png", "--weights", files / "small.npz", "--keep-going",
                      tmp=tmp_path).returncode == 0


# --------------------------------------------------------------------------- the preprocessing recipe

@pytest.mark.slow
def test_resize_and_crop_options_and_the_guessed_recipe(files, torch_files, tmp_path):
    pytest.importorskip("torchvision")
    import torch
    import torchref
    from torchvision.transforms import v2
    run = npmnv3_cli("predict", files / "a.png", "--weights", torch_files / "small.pth", "--json", tmp=tmp_path)
    assert run.returncode == 0
    assert run.stderr == (f"npmnv3: {torch_files / 'small.pth'} does not say how its images were preprocessed; "
                          "using torchvision's default recipe: resize 256, crop 224 (set --resize / --crop)\n")
    guess = f"npmnv3: {torch_files / 'small.pth'} does not say how its images were preprocessed; using "
    run = npmnv3_cli("predict", files / "a.png", "--weights", torch_files / "small.pth", "--resize", 232, tmp=tmp_path)
    assert run.returncode == 0
    assert run.stderr == guess + "resize 232 (--resize) and torchvision's default crop 224 (set --crop)\n"
    run = npmnv3_cli("predict", files / "a.png", "--weights", torch_files / "small.pth", "--crop", 200, tmp=tmp_path)
    assert run.returncode == 0
    assert run.stderr == guess + "torchvision's default resize 256 (set --resize) and crop 200 (--crop)\n"
    run = npmnv3_cli("predict", files / "a.png", "--weights", torch_files / "small.pth", "--json",
                     "--resize", 232, "--crop", 200, tmp=tmp_path)
    assert run.returncode == 0 and run.stderr == ""
    got = [p["index"] for p in json.loads(run.stdout)[0]["predictions"]]
    model = torchref.random_model("mobilenet_v3_small", seed=3)
    transform = v2.Compose([v2.Resize(232, antialias=True), v2.CenterCrop(200), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(npmnv3.images.IMAGENET_MEAN,
                                                                              npmnv3.images.IMAGENET_STD)])
    with torch.no_grad():
        logits = model(transform(Image.open(files / "a.png").convert("RGB"))[None])[0].numpy()
    assert got == list(np.argsort(-logits, kind="stable")[:5])


def test_evaluate_takes_resize_and_crop_too(files, tmp_path):
    (tmp_path / "val" / "tench").mkdir(parents=True)
    Image.open(files / "a.png").save(tmp_path / "val" / "tench" / "a.png")
    run = npmnv3_cli("evaluate", tmp_path / "val", "--weights", files / "small.npz", "--resize", 64, "--crop", 48,
                     "--json", tmp=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["count"] == 1


# --------------------------------------------------------------------------- conventions

def test_output_cut_short_by_a_closed_pipe_ends_quietly(files, tmp_path):
    for command in ("npmnv3 summary", f"npmnv3 predict {files / 'a.png'} {files / 'b.jpg'} --weights {files / 'small.npz'}"):
        run = subprocess.run(f"{command} | head -2", shell=True, capture_output=True, text=True,
                             env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                                      NPMNV3_OFFLINE="1"))
        assert run.stderr == "" and len(run.stdout.splitlines()) == 2, run.stderr


@pytest.mark.slow
def test_version_help_texts_and_usage_errors(tmp_path):
    run = npmnv3_cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"npmnv3 {npmnv3.__version__}"
    helps = {command: npmnv3_cli(command, "--help").stdout for command in ("predict", "summary", "evaluate")}
    assert "network (default mobilenet_v3_large)" in helps["summary"]
    assert "a folder with one sub-folder of images per class" in helps["evaluate"]
    assert "images per forward pass" in helps["evaluate"] and "images per forward pass" in helps["predict"]
    for argv in (["summary", "--size", "0"], ["predict", "--batch-size", "0"], ["predict", "--topk", "-1"],
                 ["evaluate", tmp_path, "--batch-size", "x"]):
        run = npmnv3_cli(*argv)
        assert run.returncode == 2 and "expected a positive integer" in run.stderr, (argv, run.stderr)
    run = npmnv3_cli("evaluate", tmp_path / "missing_dir", tmp=tmp_path)
    one_line_error(run, f"npmnv3 evaluate: error: folder '{tmp_path / 'missing_dir'}': does not exist")


def test_summary_json_and_wide_columns():
    run = npmnv3_cli("summary", "--arch", "mobilenet_v3_small", "--json")
    data = json.loads(run.stdout)
    assert data["total_params"] == 2_542_856 and data["total_macs"] == 56_510_400
    assert data["rows"][0] == {"name": "features.0", "output_shape": [16, 112, 112], "params": 464,
                               "macs": 5_419_008}
    run = npmnv3_cli("summary", "--size", 100000)
    total = run.stdout.strip().splitlines()[-1].split()
    assert total[0] == "total" and total[1] == "5,483,032" and int(total[2].replace(",", "")) > 10**13


def test_predict_shows_progress_on_a_terminal(files, tmp_path):
    images = [files / "a.png"] * 5
    leader, follower = pty.openpty()
    run = subprocess.run([sys.executable, "-m", "npmnv3", "predict", *map(str, images), "--weights",
                          str(files / "small.npz"), "--batch-size", "2"], stdout=subprocess.PIPE, stderr=follower,
                         env=dict(os.environ, NPMNV3_OFFLINE="1"))
    os.close(follower)
    err = os.read(leader, 10000).decode()
    os.close(leader)
    assert run.returncode == 0
    assert "\r[" in err and err.rstrip().endswith("] 5/5 images")


def test_offline_and_network_failures_name_what_to_do(files, tmp_path):
    image = files / "a.png"
    run = npmnv3_cli("predict", image, "--arch", "mobilenet_v3_small", "--offline", tmp=tmp_path,
                     env={"NPMNV3_OFFLINE": ""})
    assert run.returncode == 1 and "the network is forbidden by --offline" in run.stderr
    run = npmnv3_cli("predict", image, "--arch", "mobilenet_v3_small", tmp=tmp_path)
    assert "the network is forbidden by NPMNV3_OFFLINE=1" in run.stderr and "--weights PATH" in run.stderr
    run = npmnv3_cli("predict", image, "--arch", "mobilenet_v3_small", tmp=tmp_path,
                     env={"NPMNV3_OFFLINE": "", "NPMNV3_WEIGHTS_URL": "http://host.invalid/models/"})
    assert run.returncode == 1
    assert "no network: the server's name could not be resolved" in run.stderr and "--weights PATH" in run.stderr


def test_probabilities_print_with_enough_digits_to_tell_classes_apart(files, tmp_path):
    from npmnv3.cli import probability_digits
    assert probability_digits([0.8123456, 0.1, 0.05]) == 4
    assert probability_digits([0.0010000001, 0.0010000000]) == 8
    run = npmnv3_cli("predict", files / "a.png", "--weights", files / "small.npz", "--topk", 3, tmp=tmp_path)
    shown = [row.split("%")[0].split()[-1] for row in run.stdout.splitlines()[1:]]
    values = [p["probability"] for p in npmnv3.predict(str(files / "a.png"), model=npmnv3.mobilenet_v3_small(
        weights=files / "small.npz"), topk=3)]
    assert len(set(values)) == 3 and len(set(shown)) == 3, shown      # torchvision's init: all within 1e-9 of 0.1%
    assert [float(v) for v in shown] == sorted((float(v) for v in shown), reverse=True)
    assert all(abs(float(v) - 100 * p) <= 1e-6 * 100 * p for v, p in zip(shown, values))
