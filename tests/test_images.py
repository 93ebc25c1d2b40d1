"""npmnv3.images (load_image, preprocess) and npmnv3.imagenet against torchvision.

Equality with torchvision's weights.transforms() is exact (np.array_equal), not approximate.
"""

import functools
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npmnv3.errors import ImageError
from npmnv3.images import DEFAULT_MAX_PIXELS, load_image, preprocess

RESIZE = {"V1-256": 256, "V2-232": 232}


@functools.lru_cache(maxsize=None)
def transforms(which):
    """torchvision's weights.transforms() of Large ``which`` ("V1-256" or "V2-232"); skips the test
    when torchvision is not installed."""
    large = pytest.importorskip("torchvision.models").MobileNet_V3_Large_Weights
    return {"V1-256": large.IMAGENET1K_V1, "V2-232": large.IMAGENET1K_V2}[which].transforms()


def tv(image, which="V2-232"):
    """torchvision's preprocessing of a PIL image, as numpy."""
    return transforms(which)(image).numpy()


def noise(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed + 7919 * h + w)
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def encode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def assert_image_error(exc_info, *parts):
    msg = str(exc_info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# --------------------------------------------------------------------------- #
# Bit-exact equality with torchvision
# --------------------------------------------------------------------------- #
SIZES = [(1, 1), (7, 5), (5, 7), (100, 37), (257, 300), (259, 259), (261, 400),
         (500, 333), (224, 224), (232, 232), (256, 256), (233, 231)]


@pytest.mark.parametrize("which", sorted(RESIZE))
@pytest.mark.parametrize("w,h", SIZES)
def test_rgb_sizes_match_torchvision(w, h, which):
    tf, resize = transforms(which), RESIZE[which]
    im = Image.fromarray(noise(h, w))
    got = preprocess(im, resize)
    assert got.dtype == np.float32 and got.shape == (3, 224, 224)
    assert got.flags.c_contiguous
    assert np.array_equal(got, tf(im).numpy())


@pytest.mark.parametrize("w,h,resize,crop", [(7, 5, 200, 225), (50, 300, 99, 224), (300, 51, 99, 224),
                                             (10, 10, 1, 2), (301, 300, 300, 301), (40, 90, 41, 64)])
def test_other_sizes_and_zero_padding_match_torchvision(w, h, resize, crop):
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    ImageClassification = pytest.importorskip("torchvision.transforms._presets").ImageClassification
    tf = ImageClassification(crop_size=crop, resize_size=resize, mean=mean, std=std)
    im = Image.fromarray(noise(h, w))
    got = preprocess(im, resize, crop, mean, std)
    assert got.shape == (3, crop, crop)
    assert np.array_equal(got, tf(im).numpy())


def _mode_image(mode, w=261, h=190):
    rgb = Image.fromarray(noise(h, w))
    if mode == "P+transparency":
        im = rgb.convert("P")
        im.info["transparency"] = bytes(range(256))  # per-entry alpha: Pillow warns on convert
        return im
    if mode == "RGBA":
        return Image.fromarray(noise(h, w, 4))
    if mode == "LA":
        return Image.fromarray(noise(h, w, 4)).convert("LA")
    if mode == "PA":
        return Image.fromarray(noise(h, w, 4)).convert("PA")
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), noise(h, w, 4).tobytes())
    if mode == "1":
        return Image.fromarray(noise(h, w, None)).convert("1")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "P+transparency", "CMYK", "RGBA", "LA", "PA", "1", "YCbCr"])
def test_modes_match_torchvision_on_convert_rgb(mode):
    im = _mode_image(mode)
    info_before = dict(im.info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency" warning
        got = preprocess(im, 232)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference convert may warn
        expected = tv(im.convert("RGB"))
    assert np.array_equal(got, expected)
    assert im.info == info_before  # the caller's image is not modified


def test_png_with_transparency_roundtrip_no_warning(tmp_path):
    im = _mode_image("P+transparency", 40, 30)
    path = tmp_path / "t.png"
    im.save(path, transparency=bytes(range(256)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = preprocess(path)
    with Image.open(path) as ref, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(got, tv(ref.convert("RGB"), "V1-256"))


def test_every_input_kind_matches_torchvision(tmp_path):
    arr = noise(333, 261)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    ref = tv(Image.fromarray(arr))

    with open(path, "rb") as f:
        from_file = preprocess(f, 232)
    kinds = {
        "str": preprocess(str(path), 232),
        "Path": preprocess(path, 232),
        "bytes": preprocess(data, 232),
        "bytearray": preprocess(bytearray(data), 232),
        "memoryview": preprocess(memoryview(data), 232),
        "file": from_file,
        "BytesIO": preprocess(io.BytesIO(data), 232),
        "PIL": preprocess(Image.open(io.BytesIO(data)), 232),
        "HWC uint8": preprocess(arr, 232),
        "HWC non-contiguous": preprocess(np.asfortranarray(arr), 232),
    }
    for kind, got in kinds.items():
        assert np.array_equal(got, ref), kind


def test_grey_and_rgba_arrays():
    grey = noise(120, 97, None)
    ref = tv(Image.fromarray(grey).convert("RGB"))
    assert np.array_equal(preprocess(grey, 232), ref)
    assert np.array_equal(preprocess(grey[:, :, None], 232), ref)
    rgba = noise(120, 97, 4)
    assert np.array_equal(preprocess(rgba, 232), tv(Image.fromarray(rgba).convert("RGB")))
    assert np.array_equal(np.asarray(load_image(rgba)), rgba[:, :, :3])  # alpha dropped, not composited


def test_jpeg_file_matches_torchvision(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(noise(300, 257)).save(path, quality=90)
    with Image.open(path) as ref:
        expected = tv(ref.convert("RGB"), "V1-256")
    assert np.array_equal(preprocess(path), expected)


def test_load_image_returns_new_rgb_image():
    src = Image.fromarray(noise(10, 12))
    out = load_image(src)
    assert out.mode == "RGB" and out.size == (12, 10) and out is not src
    assert np.array_equal(np.asarray(out), np.asarray(src))


# --------------------------------------------------------------------------- #
# 16-bit and float images: explicit scaling, never clipping
# --------------------------------------------------------------------------- #
def test_i16_scaling_is_round_v_over_257():
    v = np.array([[0, 128, 129, 257, 385, 386, 32896, 65406, 65407, 65535]], dtype=np.uint16)
    im = Image.fromarray(v)
    assert im.mode == "I;16"
    out = np.asarray(load_image(im))
    assert np.array_equal(out[..., 0], [[0, 0, 1, 1, 1, 2, 128, 254, 255, 255]])
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_i16_png_is_exact_inverse_of_8bit_widening_and_matches_torchvision(tmp_path):
    a8 = noise(150, 170, None)
    path = tmp_path / "x16.png"
    Image.fromarray(a8.astype(np.uint16) * 257).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    rgb = load_image(path)
    assert np.array_equal(np.asarray(rgb)[..., 0], a8)
    expected = tv(Image.fromarray(a8).convert("RGB"))
    assert np.array_equal(preprocess(path, 232), expected)
    # Pillow's own convert clips instead of scaling (the trap this avoids):
    with Image.open(path) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB"))[..., 0], a8)


def test_i16_big_endian_mode():
    v = np.array([[0, 257, 65535]], dtype=">u2")
    im = Image.frombytes("I;16B", (3, 1), v.tobytes())
    assert np.array_equal(np.asarray(load_image(im))[..., 0], [[0, 1, 255]])


def test_mode_I_from_16bit_pgm_and_refused_out_of_range(tmp_path):
    a8 = noise(20, 30, None)
    path = tmp_path / "x.pgm"
    Image.fromarray(a8.astype(np.uint16) * 257).save(path)
    with Image.open(path) as im:
        assert im.mode == "I"
    assert np.array_equal(np.asarray(load_image(path))[..., 0], a8)

    ok = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert np.array_equal(np.asarray(load_image(ok))[..., 0], [[0, 255]])
    for bad, shown in [([[-5, 10]], "from -5 to 10"), ([[0, 70000]], "from 0 to 70000")]:
        with pytest.raises(ImageError) as e:
            load_image(Image.fromarray(np.array(bad, dtype=np.int32)), name="image 2")
        assert_image_error(e, "image 2:", "mode 'I'", shown, "0..65535")


def test_float_images_scaled_by_255_or_refused():
    f = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)
    out = np.asarray(load_image(Image.fromarray(f)))[..., 0]
    assert np.array_equal(out, np.floor(f.astype(np.float64) * 255 + 0.5).astype(np.uint8))
    assert list(out[0]) == [0, 128, 255, 51]
    for bad, shown in [([[0.0, 1.5]], "from 0 to 1.5"), ([[-0.25, 0.5]], "from -0.25 to 0.5")]:
        with pytest.raises(ImageError) as e:
            load_image(Image.fromarray(np.array(bad, dtype=np.float32)))
        assert_image_error(e, "PIL image:", "mode 'F'", shown, "[0, 1]")
    with pytest.raises(ImageError) as e:
        load_image(Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)))
    assert_image_error(e, "NaN")


def test_preprocess_float_image_matches_torchvision_after_documented_conversion():
    f = np.random.default_rng(1).random((90, 130)).astype(np.float32)
    expected8 = np.floor(f.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    got = preprocess(Image.fromarray(f), 256)
    assert np.array_equal(got, tv(Image.fromarray(expected8).convert("RGB"), "V1-256"))


# --------------------------------------------------------------------------- #
# Frames and EXIF
# --------------------------------------------------------------------------- #
def test_multi_frame_gif_uses_frame_0(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 12), c) for c in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    out = np.asarray(load_image(path))
    assert out.shape == (12, 16, 3) and (out == (255, 0, 0)).all()
    # A PIL image is used at its current frame and left there.
    im = Image.open(path)
    im.seek(2)
    assert (np.asarray(load_image(im)) == (0, 0, 255)).all()
    assert im.tell() == 2
    im.close()


def test_exif_orientation_only_when_asked(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(noise(20, 40)), "JPEG", exif=exif)
    assert load_image(data).size == (40, 20)
    assert load_image(data, exif_transpose=True).size == (20, 40)
    assert load_image(Image.open(io.BytesIO(data)), exif_transpose=True).size == (20, 40)
    default = preprocess(data, 232)
    with Image.open(io.BytesIO(data)) as ref:
        assert np.array_equal(default, tv(ref.convert("RGB")))  # torchvision ignores EXIF
    assert not np.array_equal(preprocess(data, 232, exif_transpose=True), default)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_image_error(e, f"image file {str(path)!r}", "no such file")
    assert isinstance(e.value.__cause__, FileNotFoundError)
    with pytest.raises(ImageError) as e:
        preprocess(str(path), name="image 3")
    assert_image_error(e, f"image 3 (file {str(path)!r})", "no such file")
    with pytest.raises(ImageError) as e:
        load_image("https://example.com/cat.jpg")
    assert_image_error(e, "no such file", "URLs are not fetched")


def test_directory(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path)
    assert_image_error(e, str(tmp_path), "is a directory")
    assert isinstance(e.value.__cause__, OSError)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is text\n")
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_image_error(e, "notes.txt", "not an image Pillow can read", "b'hello, this is t'")
    assert isinstance(e.value.__cause__, Image.UnidentifiedImageError)
    with pytest.raises(ImageError) as e:
        load_image(b"<html>404</html>", name="image 0")
    assert_image_error(e, "image 0:", "not an image", "b'<html>404</html>'")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    data = encode(Image.fromarray(noise(64, 80)), fmt)
    path = tmp_path / ("cut." + fmt.lower())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_image_error(e, "cut.", f"cannot decode the image data ({fmt} 80x64)", "truncated or corrupt",
                       "image file is truncated")
    assert isinstance(e.value.__cause__, OSError)
    # A lazily opened PIL image from the same data fails the same way.
    with pytest.raises(ImageError) as e:
        load_image(Image.open(io.BytesIO(data[: len(data) // 2])))
    assert_image_error(e, "PIL image:", "truncated or corrupt")


def test_empty_inputs(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(b"")
    assert_image_error(e, "image bytes:", "bytes input is empty (0 bytes)")
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert_image_error(e, "empty.jpg", "file is empty (0 bytes)")
    f = io.BytesIO(encode(Image.new("RGB", (2, 2)), "PNG"))
    f.read()
    with pytest.raises(ImageError) as e:
        load_image(f)
    assert_image_error(e, "image file object:", "empty", "seek(0)")
    with pytest.raises(ImageError) as e:
        load_image(np.zeros((0, 5, 3), np.uint8))
    assert_image_error(e, "image array:", "empty (5x0 pixels)")


def test_text_mode_file_object(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode(Image.new("RGB", (2, 2)), "PNG"))
    with open(path, encoding="latin-1") as f, pytest.raises(ImageError) as e:
        load_image(f)
    assert_image_error(e, "x.png", "binary mode ('rb')")


@pytest.mark.parametrize("arr,shown", [
    (np.zeros((8, 8, 3), np.float64), "dtype float64 and shape (8, 8, 3)"),
    (np.zeros((8, 8, 3), np.uint16), "dtype uint16 and shape (8, 8, 3)"),
    (np.zeros((8, 8, 3), bool), "dtype bool and shape (8, 8, 3)"),
    (np.zeros((8, 8, 2), np.uint8), "dtype uint8 and shape (8, 8, 2)"),
    (np.zeros((1, 8, 8, 3), np.uint8), "dtype uint8 and shape (1, 8, 8, 3)"),
    (np.zeros((3, 8, 9), np.uint8), "channel-first"),
    (np.zeros(8, np.uint8), "shape (8,)"),
])
def test_bad_arrays(arr, shown):
    with pytest.raises(ImageError) as e:
        preprocess(arr, name="image 5")
    assert_image_error(e, "image 5:", shown, "expected dtype uint8 with shape (H, W)")


def test_unsupported_type():
    with pytest.raises(ImageError) as e:
        load_image(42)
    assert_image_error(e, "unsupported input type builtins.int")


def _png_header_only(width, height, rows=2):
    """A mode-1 PNG declaring width x height, with pixel data for only a few rows."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * rows))
            + chunk(b"IEND", b""))


def test_decompression_bomb(tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    # Our own check: after the header, before decoding (the data is short, so
    # decoding would have failed as truncated instead).
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(9000, 9000))
    with pytest.raises(ImageError) as e:
        load_image(path, max_pixels=1_000_000)
    assert_image_error(e, "bomb.png", "9000x9000 = 81,000,000 pixels exceeds the limit of 1,000,000",
                       "decompression bomb")
    # Pillow's limit (between 1x and 2x it only warns): an error, no warning leaks.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as e:
            load_image(_png_header_only(10000, 10000), name="image 1")
    assert_image_error(e, "image 1:", "decompression bomb", "MAX_IMAGE_PIXELS")
    # 20000x20000 in a few hundred bytes.
    data = _png_header_only(20000, 20000)
    assert len(data) < 1000
    for max_pixels in (DEFAULT_MAX_PIXELS, None, 10**10):
        with pytest.raises(ImageError) as e:
            load_image(data, max_pixels=max_pixels)
        assert_image_error(e, "image bytes:", "decompression bomb")
    # Arrays and PIL images are checked too.
    with pytest.raises(ImageError) as e:
        load_image(np.zeros((100, 100), np.uint8), max_pixels=5000)
    assert_image_error(e, "100x100 = 10,000 pixels exceeds the limit of 5,000")
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_absurd_resized_size_is_refused_naming_it_and_the_limit():
    with pytest.raises(ImageError) as e:
        preprocess(np.zeros((1, 100000), np.uint8), name="image 4")
    assert_image_error(e, "image 4: resizing this 100000x1 image to a short side of 256 would make it "
                       "25600000x256 = 6,553,600,000 pixels (about 24.4 GiB), more than the limit of "
                       f"{DEFAULT_MAX_PIXELS:,} (max_pixels)", "crop it first")
    # The bound is the resized pixel count, max_pixels, not the aspect ratio: a 10x3000
    # image (232x69600 after resizing) is fine, a 10x500 one is refused with a smaller limit.
    assert preprocess(np.zeros((3000, 10), np.uint8), 232).shape == (3, 224, 224)
    with pytest.raises(ImageError) as e:
        preprocess(np.zeros((10, 500), np.uint8), max_pixels=1_000_000)
    assert_image_error(e, "500x10 image", "12800x256 = 3,276,800 pixels", "limit of 1,000,000")
    assert preprocess(np.zeros((10, 500), np.uint8), max_pixels=3_276_800).shape == (3, 224, 224)


def test_bad_arguments_are_value_errors():
    img = np.zeros((4, 4, 3), np.uint8)
    for kwargs in ({"resize_size": 0}, {"crop_size": -1}, {"resize_size": True}, {"std": (1, 0, 1)},
                   {"mean": (1, 2)}):
        with pytest.raises(ValueError):
            preprocess(img, **kwargs)


def test_package_does_not_import_torch():
    code = ("import sys, npmnv3.images, npmnv3.imagenet; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --------------------------------------------------------------------------- #
# ImageNet class data (npmnv3.imagenet)
# --------------------------------------------------------------------------- #
def test_imagenet_categories_and_synsets():
    _IMAGENET_CATEGORIES = pytest.importorskip("torchvision.models._meta")._IMAGENET_CATEGORIES

    from npmnv3.imagenet import categories, class_index, synsets

    assert categories() == list(_IMAGENET_CATEGORIES)
    ids = synsets()
    assert len(ids) == 1000 and ids == sorted(set(ids)) and ids[0] == "n01440764" and ids[-1] == "n15075141"
    assert class_index("tench") == 0 and class_index("n01440764") == 0
    assert class_index("crane") == 517 and class_index("crane bird") == 134
    assert ids[134] == "n02012849" and ids[517] == "n03126707"
    assert class_index("  Golden   RETRIEVER ") == 207
    assert class_index("Cardigan") == 264 and class_index("cardigan") == 474
    with pytest.raises(KeyError, match=r"ambiguous.*264 \('Cardigan', n02113186\), 474 \('cardigan', n02963159\)"):
        class_index("CARDIGAN")
    with pytest.raises(KeyError, match="did you mean 'golden retriever'"):
        class_index("golden retriver")
    with pytest.raises(KeyError, match="not one of the 1000 ImageNet-1k synsets"):
        class_index("n00000000")
    with pytest.raises(TypeError):
        class_index(3)
    categories().append("x")  # callers get copies
    assert len(categories()) == 1000
