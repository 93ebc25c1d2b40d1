"""What npmnv3.images says about files Pillow cannot use, and which files it reads the same in any process.

Every file is built here, byte by byte where Pillow cannot write it.  Each
message is told apart by what Pillow raised and when: an unsupported variant of
a format Pillow knows, a format whose decoder is not installed, a decompression
bomb found while decoding, a truly corrupt file.
"""

import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, GribStubImagePlugin, Image, ImageFile, WmfImagePlugin

from npmnv3.errors import ImageError
from npmnv3.images import load_image, preprocess

ROOT = Path(__file__).resolve().parents[1]


def message(source, **kw):
    """The ImageError message load_image raises for ``source``."""
    with pytest.raises(ImageError) as e:
        load_image(source, **kw)
    return str(e.value), e.value.__cause__


def assert_parts(msg, *parts, absent=()):
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    for part in absent:
        assert part not in msg, f"{part!r} in {msg!r}"


# --------------------------------------------------------------------------- #
# Files built by hand
# --------------------------------------------------------------------------- #
def bmp(bits, compression=0, masks=None, header_size=40, width=4, height=2, colors=0):
    """A BMP file: BITMAPINFOHEADER (40) or BITMAPV4HEADER (108), with pixel data."""
    stride = ((width * bits + 31) // 32) * 4
    pixels = bytes(range(256)) * (stride * height // 256 + 1)
    pixels = pixels[: stride * height]
    info = struct.pack("<IiiHHIIiiII", header_size, width, height, 1, bits, compression,
                       len(pixels), 2835, 2835, colors, 0)
    extra = b""
    if header_size == 108:
        info += struct.pack("<4I", *(masks or (0, 0, 0, 0))) + b"\0" * (108 - 40 - 16)
    elif masks is not None:
        extra = struct.pack(f"<{len(masks)}I", *masks)  # BITFIELDS masks after a 40-byte header
    palette = b""
    if bits <= 8:
        palette = b"".join(bytes((i * 85 % 256, i * 40 % 256, i * 7 % 256, 0)) for i in range(1 << bits))
    offset = 14 + len(info) + len(extra) + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + extra + palette + pixels


def dds(pfflags, fourcc=b"\0\0\0\0", bitcount=0, masks=(0, 0, 0, 0), dxgi=None, width=8, height=8):
    """A DDS file: the 124-byte header (plus a DX10 header if ``dxgi``) and zero pixel data."""
    header = struct.pack("<7I", 124, 0x1007, height, width, width * 4, 0, 1) + b"\0" * 44
    header += struct.pack("<2I4sI4I", 32, pfflags, fourcc, bitcount, *masks)
    header += struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    assert len(header) == 124
    dx10 = struct.pack("<5I", dxgi, 3, 0, 1, 0) if dxgi is not None else b""
    return b"DDS " + header + dx10 + b"\0" * (width * height * 8)


def png_header_only(width, height):
    """An RGBA PNG declaring width x height, with a few bytes of pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def icns(png):
    """An ICNS file with one 1024x1024 ('ic10') icon holding ``png``."""
    block = b"ic10" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


# DDS pixel-format flags and a DXGI format (Microsoft's DDS_PIXELFORMAT and dxgiformat.h).
DDPF_FOURCC, DDPF_YUV, DDPF_LUMINANCE = 0x4, 0x200, 0x20000
DXGI_FORMAT_R16G16B16A16_FLOAT = 10

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 30 20\n%%EndComments\n"
       b"newpath 0 0 moveto 30 20 lineto stroke\nshowpage\n%%EOF\n")
# A placeable WMF (bounding box 0,0..1440,960 at 1440 units per inch: 72x48 at 72 dpi).
WMF = (b"\xd7\xcd\xc6\x9a\x00\x00" + struct.pack("<hhhhH", 0, 0, 1440, 960, 1440) + b"\0" * 6
       + b"\x01\x00\x09\x00\x00\x03" + b"\0" * 18 + b"\x03\x00\x00\x00\x00\x00")
# An EMF header: bounds 0,0..64,32 and a frame, then the " EMF" signature at offset 40.
EMF = (struct.pack("<II4i4i", 1, 108, 0, 0, 64, 32, 0, 0, 1693, 846) + b" EMF"
       + struct.pack("<I", 0x10000) + b"\0" * 64)
GRIB = b"GRIB\x00\x00\x1c\x01" + b"\0" * 24 + b"7777"
BUFR = b"BUFR\x00\x00\x20\x04" + b"\0" * 24 + b"7777"
HDF5 = b"\x89HDF\r\n\x1a\n" + b"\0" * 40


# --------------------------------------------------------------------------- #
# Variants of a known format that Pillow does not implement
# --------------------------------------------------------------------------- #
UNSUPPORTED_VARIANTS = {
    "BMP 16-bit bitfields 4:4:4": (bmp(16, 3, (0xF00, 0xF0, 0xF)), "BMP",
                                   "OSError: Unsupported BMP bitfields layout"),
    "BMP 16-bit bitfields 2:3:1": (bmp(16, 3, (0x30, 0xE, 0x1)), "BMP",
                                   "OSError: Unsupported BMP bitfields layout"),
    "BMP V4 32-bit 10:10:10:2": (bmp(32, 3, (0x3FF00000, 0xFFC00, 0x3FF, 0xC0000000), 108), "BMP",
                                 "OSError: Unsupported BMP bitfields layout"),
    "BMP embedded JPEG": (bmp(24, 4), "BMP", "OSError: Unsupported BMP compression (4)"),
    "BMP embedded PNG": (bmp(24, 5), "BMP", "OSError: Unsupported BMP compression (5)"),
    "BMP 2 bits per pixel": (bmp(2), "BMP", "OSError: Unsupported BMP pixel depth (2)"),
    "BMP 64 bits per pixel": (bmp(64), "BMP", "OSError: Unsupported BMP pixel depth (64)"),
    "DDS UYVY": (dds(DDPF_FOURCC, b"UYVY"), "DDS", "NotImplementedError: Unimplemented pixel format"),
    "DDS DX10 half floats": (dds(DDPF_FOURCC, b"DX10", dxgi=DXGI_FORMAT_R16G16B16A16_FLOAT), "DDS",
                             "NotImplementedError: Unimplemented DXGI format 10"),
    "DDS YUV": (dds(DDPF_YUV, bitcount=16), "DDS", "NotImplementedError: Unknown pixel format flags 512"),
    "DDS 16-bit luminance": (dds(DDPF_LUMINANCE, bitcount=16, masks=(0xFFFF, 0, 0, 0)), "DDS",
                             "OSError: Unsupported bitcount 16"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED_VARIANTS))
def test_unsupported_variant_is_named_with_pillows_reason(case):
    data, fmt, reason = UNSUPPORTED_VARIANTS[case]
    msg, cause = message(data, name="image 7")
    assert_parts(msg, "image 7: ", f"a variant of {fmt} that Pillow cannot decode: {reason}",
                 "may well be valid", absent=("corrupt", "truncated"))
    assert isinstance(cause, (OSError, NotImplementedError))


def test_unsupported_variant_from_a_path_names_the_file(tmp_path):
    path = tmp_path / "fields.bmp"
    path.write_bytes(UNSUPPORTED_VARIANTS["BMP 16-bit bitfields 4:4:4"][0])
    msg, _ = message(path)
    assert msg.startswith(f"image file {str(path)!r}: a variant of BMP that Pillow cannot decode")


def test_supported_bitfields_bmp_still_decodes():
    data = bmp(16, 3, (0xF800, 0x7E0, 0x1F))  # RGB 5:6:5, which Pillow implements
    with Image.open(io.BytesIO(data)) as ref:
        expected = np.asarray(ref.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(data)), expected)


@pytest.mark.parametrize("data,fmt,reason", [
    (bmp(24)[:30], "BMP", "OSError: Truncated File Read"),
    (b"DDS " + struct.pack("<I", 124) + b"\0" * 50, "DDS", "OSError: Incomplete header: 50 bytes"),
])
def test_truncated_header_is_still_called_truncated(data, fmt, reason):
    msg, _ = message(data)
    assert_parts(msg, f"cannot read the {fmt} header; the file is truncated or corrupt: {reason}",
                 absent=("variant",))


def test_truncated_pixels_of_a_supported_format_are_still_called_truncated():
    data = bmp(24, width=40, height=30)
    msg, cause = message(data[:-100])
    assert_parts(msg, "cannot decode the image data (BMP 40x30); the file is truncated or corrupt",
                 "image file is truncated")
    assert isinstance(cause, OSError)


def test_closed_pil_image_is_called_closed():
    im = Image.open(io.BytesIO(bmp(24)))
    im.close()
    msg, cause = message(im)
    assert_parts(msg, "PIL image: the PIL image was closed: ValueError: Operation on closed image",
                 absent=("corrupt",))
    assert isinstance(cause, ValueError)


# --------------------------------------------------------------------------- #
# Formats whose decoder is not installed
# --------------------------------------------------------------------------- #
def test_eps_without_ghostscript_names_ghostscript(monkeypatch):
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", False)  # as on a machine without Ghostscript
    with Image.open(io.BytesIO(EPS)) as im:
        assert (im.format, im.size) == ("EPS", (30, 20))
    msg, cause = message(EPS, name="figure")
    assert_parts(msg, "figure: EPS 30x20 needs Ghostscript to be rendered, and Ghostscript is not installed",
                 "Unable to locate Ghostscript", absent=("corrupt", "truncated"))
    assert isinstance(cause, OSError)


@pytest.mark.parametrize("data,size", [(WMF, "72x48"), (EMF, "64x32")])
def test_windows_metafile_without_handler_names_the_missing_decoder(monkeypatch, data, size):
    monkeypatch.setattr(WmfImagePlugin.WmfStubImageFile, "_handler", None)  # as off Windows
    msg, _ = message(data)
    assert_parts(msg, "image bytes: no decoder for WMF (Windows Metafile) files is installed: "
                 f"Pillow recognises this {size} WMF file but renders metafiles (WMF/EMF) only on Windows "
                 "or through a handler registered with PIL.WmfImagePlugin.register_handler",
                 absent=("corrupt", "truncated"))


def test_codec_missing_from_the_pillow_build_is_named(monkeypatch):
    data = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(data, "JPEG")
    monkeypatch.delattr(Image.core, "jpeg_decoder")  # as in a Pillow built without libjpeg
    msg, _ = message(data.getvalue())
    assert_parts(msg, "image bytes: JPEG 8x6 needs a decoder that this Pillow build lacks: "
                 "OSError: decoder jpeg not available", absent=("corrupt", "truncated"))


@pytest.mark.parametrize("data,fmt,module", [
    (GRIB, "GRIB", "PIL.GribStubImagePlugin"),
    (BUFR, "BUFR", "PIL.BufrStubImagePlugin"),
    (HDF5, "HDF5", "PIL.Hdf5StubImagePlugin"),
])
def test_stub_formats_say_there_is_no_decoder_not_empty(tmp_path, data, fmt, module):
    path = tmp_path / ("data." + fmt.lower())
    path.write_bytes(data)
    with Image.open(path) as im:
        assert (im.format, im.size) == (fmt, (0, 0))
    msg, _ = message(path)
    assert_parts(msg, f"{str(path)!r}: no decoder for {fmt} files is installed: Pillow recognises the "
                 f"format but reads no pixels from it without a handler registered with "
                 f"{module}.register_handler", absent=("empty", "0x0", "corrupt"))
    # A PIL image of that file, opened by the caller, gets the same answer.
    with Image.open(path) as im:
        msg, _ = message(im)
    assert_parts(msg, "PIL image: no decoder for", absent=("empty",))


def test_stub_format_with_a_registered_handler_is_decoded(monkeypatch):
    class Handler(ImageFile.StubHandler):
        def open(self, im):
            im._mode, im._size = "L", (3, 2)  # what the header says

        def load(self, im):
            return Image.new("L", (6, 5), 77)  # what decoding finds

    monkeypatch.setattr(GribStubImagePlugin.GribStubImageFile, "_handler", Handler())
    out = load_image(GRIB)
    assert out.size == (6, 5) and (np.asarray(out) == 77).all()
    msg, _ = message(GRIB, max_pixels=20)  # the size found while decoding is checked too
    assert_parts(msg, "6x5 = 30 pixels exceeds the limit of 20")


# --------------------------------------------------------------------------- #
# Decompression bombs found while decoding
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("side,kind", [(20000, "DecompressionBombError"), (10000, "DecompressionBombWarning")])
def test_bomb_inside_an_icns_is_reported_as_a_bomb(tmp_path, side, kind):
    # The ICNS header says 1024x1024; the embedded PNG is found to be side x side only in load().
    path = tmp_path / "icon.icns"
    path.write_bytes(icns(png_header_only(side, side)))
    with Image.open(path) as im:
        assert (im.format, im.size) == ("ICNS", (1024, 1024))
    limit_before = Image.MAX_IMAGE_PIXELS
    msg, cause = message(path)
    assert_parts(msg, "icon.icns", "refused as a possible decompression bomb by Pillow's limit "
                 f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}), found while decoding the "
                 f"ICNS 1024x1024 image: Image size ({side * side} pixels) exceeds limit",
                 absent=("corrupt", "truncated"))
    assert type(cause).__name__ == kind
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_icns_bomb_is_reported_alike_for_a_pil_image():
    with Image.open(io.BytesIO(icns(png_header_only(20000, 20000)))) as im:
        msg, _ = message(im)
    assert_parts(msg, "PIL image: refused as a possible decompression bomb", "ICNS 1024x1024")


# --------------------------------------------------------------------------- #
# The format of a file does not depend on what the process opened before
# --------------------------------------------------------------------------- #
def _ico_that_tga_misreads():
    """An ICO whose first directory entry also parses as a TGA header (32 x 40 pixels)."""
    rng = np.random.default_rng(0)
    icon = Image.fromarray(rng.integers(0, 256, (128, 128, 4), dtype=np.uint8))
    buf = io.BytesIO()
    icon.save(buf, "ICO", sizes=[(128, 128)], bitmap_format="bmp")
    return buf.getvalue(), icon


def _run(code, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, timeout=120,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_format_does_not_depend_on_a_tga_opened_before(tmp_path):
    ico_data, icon = _ico_that_tga_misreads()
    ico = tmp_path / "icon.ico"
    ico.write_bytes(ico_data)
    tga = tmp_path / "first.tga"
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tga)
    # Pillow's own detection, in a fresh process that opened a TGA file first, misreads
    # the ICO as TGA (so this test would catch the problem).
    pillow = _run("import sys; from PIL import Image\n"
                  "Image.open(sys.argv[1]).close()\n"
                  "with Image.open(sys.argv[2]) as im: print(im.format, im.size)", str(tga), str(ico))
    assert pillow == "TGA (32, 40)"
    # load_image reads it as the ICO it is, whatever was opened before, and whatever
    # the input kind.
    code = ("import sys, hashlib, numpy as np; from PIL import Image; from npmnv3.images import load_image\n"
            "if sys.argv[1] != '-': Image.open(sys.argv[1]).close()\n"
            "data = open(sys.argv[2], 'rb').read()\n"
            "for src in (sys.argv[2], data):\n"
            "    im = load_image(src); print(im.size, hashlib.sha256(np.asarray(im).tobytes()).hexdigest())\n")
    fresh = _run(code, "-", str(ico))
    after_tga = _run(code, str(tga), str(ico))
    expected = hashlib.sha256(np.asarray(icon.convert("RGB")).tobytes()).hexdigest()
    assert fresh == after_tga == f"(128, 128) {expected}\n(128, 128) {expected}"


def test_format_order_is_pillows_fresh_process_order():
    # Where the order can change a result, around the plugins that accept any data
    # (no accept function: TGA, IM, ...), it is the order of a fresh interpreter.
    from npmnv3.images import _format_order

    fresh = _run("from PIL import Image; Image.preinit(); Image.init(); print(' '.join(Image.ID))").split()
    ours = list(_format_order())
    assert set(ours) == set(Image.OPEN) and set(fresh) <= set(ours)
    permissive = [f for f in ours if Image.OPEN[f][1] is None]
    assert "TGA" in permissive
    for p in permissive:
        for f in fresh:
            assert (ours.index(f) < ours.index(p)) == (fresh.index(f) < fresh.index(p)), (f, p)


# --------------------------------------------------------------------------- #
# Extreme aspect ratios: bounded by the resized pixel count, bit-exact with torchvision
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def transforms():
    tvm = pytest.importorskip("torchvision.models")
    weights = tvm.MobileNet_V3_Large_Weights
    return {256: weights.IMAGENET1K_V1.transforms(), 232: weights.IMAGENET1K_V2.transforms()}


@pytest.mark.parametrize("resize", [256, 232])
@pytest.mark.parametrize("w,h", [(500, 7), (7, 500), (10, 3000)])
def test_very_wide_and_tall_images_match_torchvision(transforms, w, h, resize):
    rng = np.random.default_rng(w * 31 + h)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    got = preprocess(im, resize)
    assert np.array_equal(got, transforms[resize](im).numpy())


def test_798x20_bitmap_font_sheet_matches_torchvision(transforms, tmp_path):
    # A mode-1 PBM the size of a bitmap-font sheet (798x20): 10214x256 after resizing.
    rng = np.random.default_rng(5)
    path = tmp_path / "sheet.pbm"
    Image.fromarray(rng.integers(0, 2, (20, 798), dtype=np.uint8) * 255).convert("1").save(path)
    with Image.open(path) as ref:
        assert (ref.format, ref.mode, ref.size) == ("PPM", "1", (798, 20))
        expected = transforms[256](ref.convert("RGB")).numpy()
    assert np.array_equal(preprocess(path, 256), expected)
