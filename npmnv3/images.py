"""Loading images and turning them into MobileNetV3 input, in NumPy and Pillow only.

``preprocess`` is bit-for-bit equal to torchvision's ``weights.transforms()``
(``ImageClassification``) applied to the same image converted to RGB: resize the
short side to ``resize_size`` with Pillow's BILINEAR (which always antialiases),
the long side to ``int(resize_size * long / short)``; centre crop with
``int(round((size - crop) / 2.0))`` offsets (zero padding first where the image
is smaller than the crop, as torchvision's ``center_crop`` does); ``x / 255``
and ``(x - mean) / std`` in float32.  The result is ``(3, crop, crop)`` float32.

Accepted sources (``load_image`` and ``preprocess``)
----------------------------------------------------
* a path: ``str`` or ``os.PathLike``.  URLs are not fetched.
* ``bytes`` / ``bytearray`` / ``memoryview``: the encoded file.
* a binary file object (anything with ``.read``): read from its *current
  position* to the end; it is not closed.
* a ``PIL.Image.Image``: used as given (its current frame) and never modified.
* a ``numpy.ndarray`` of dtype ``uint8``: ``(H, W)`` or ``(H, W, 1)`` grey,
  ``(H, W, 3)`` RGB, or ``(H, W, 4)`` RGBA (alpha dropped, as below).  Every
  other dtype or shape is refused: scale float data yourself, e.g.
  ``(a * 255).round().astype(np.uint8)``, and transpose CHW data to HWC.

Anything else raises ``ImageError`` too (so a caller handling a batch needs to
catch one type).

Policies
--------
* Alpha is dropped exactly as torchvision's loader does (``convert("RGB")``):
  no compositing onto a background.  Palette images with transparency are
  converted the same way, without Pillow's "Palette images with Transparency"
  warning.
* CMYK, YCbCr, LAB, HSV, P, PA, LA, L and 1 go through ``convert("RGB")``.
  A mode Pillow cannot convert to RGB (e.g. ``La``) is refused.
* 16-bit and float images are scaled to 8 bits explicitly, because Pillow's
  ``convert`` would silently clip them to 255:

  - ``I;16`` (and ``I;16L``/``I;16B``/``I;16N``): ``v8 = round(v / 257)``,
    computed as ``(v + 128) // 257``.  This maps 0..65535 onto 0..255 and is the
    exact inverse of widening 8-bit data with ``v * 257``.
  - ``I`` (32-bit signed; Pillow uses it for 16-bit PGM/PPM and some TIFFs) is
    treated as 16-bit data: values must lie in 0..65535 and are scaled like
    ``I;16``.  A negative or larger value is refused, never clipped.  (An 8-bit
    image that was ``convert("I")``-ed would come out dark: give it as ``L``.)
  - ``F`` (32-bit float): values must be finite and in [0, 1]; they become
    ``floor(v * 255 + 0.5)``.  Anything outside is refused, never clipped.

  The scaled single-channel image is then replicated to RGB.
* EXIF orientation is applied only when ``exif_transpose=True``.  The default
  (False) matches torchvision, whose loader ignores it.
* Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) use frame 0.
  A PIL image passed in is used at whatever frame it is currently on.
* Format detection: a file's format is found from its content only (never
  from its name or extension), by trying Pillow's format plugins in one fixed
  order, ``_FORMAT_ORDER``: the order ``Image.open`` uses in a fresh
  interpreter (``Image.preinit()``'s five common formats, then the rest as
  ``Image.init()`` registers them), followed by any plugin registered by
  another package.
  Pillow's own order (``PIL.Image.ID``) changes with what the process did
  before: opening ``x.tga`` by path registers the TGA plugin first, and TGA
  accepts almost any data, e.g. an ICO file, which it then misreads.  Here
  the result for a file never depends on what the process opened before.
* Decompression bombs and memory: neither the decoded image nor the resized
  one may have more than ``max_pixels`` pixels (default
  ``DEFAULT_MAX_PIXELS`` = 89,478,485, Pillow's own default; 256 MiB as
  8-bit RGB, a third more in Pillow's 4-bytes-per-pixel layout).  One budget
  serves both because both cost the same per pixel and are what a call
  holds in memory; the aspect ratio as such costs nothing:

  - the decoded size is checked right after ``Image.open`` (which only reads
    the header) and before any pixel is decoded.  A few plugins learn the
    real size only while decoding (ICNS from its embedded PNG, EPS from
    Ghostscript); that size is checked again afterwards, so that nothing
    larger goes on to be converted and resized, and Pillow's limit (below)
    applies during that decoding;
  - ``preprocess`` checks the size after resizing (short side to
    ``resize_size``, long side to ``int(resize_size * long / short)``) before
    resizing.  That size grows with the aspect ratio, not with the input:
    ``resize_size ** 2 * long / short`` pixels, so the default allows aspect
    ratios up to about 1365:1 at ``resize_size`` 256 (1662:1 at 232).  A
    500x7 image (18285x256 after resizing) or a 798x20 line of text
    (10214x256) is fine, and bit-exact with torchvision; a 1x100000 image
    (256x25,600,000 = 6.5 Gpx, about 24 GiB) is refused.  There is no cap on
    the aspect ratio itself.

  ``max_pixels=None`` removes both of these checks; the input is then
  trusted.  Pillow's own limit, ``PIL.Image.MAX_IMAGE_PIXELS``, is never
  changed here and also applies to files, both while opening and while
  decoding (ICNS, for instance, learns the size of its embedded PNG only
  then): its ``DecompressionBombWarning`` is treated as an error and its
  ``DecompressionBombError`` is reported as an ``ImageError``.  So the
  effective limit for files is the smaller of the two.
* Truncated or corrupt files: pixels are decoded eagerly (``load()``) inside a
  ``try``, so they fail here with a clear error.  ``ImageFile.LOAD_TRUNCATED_IMAGES``
  is never set.

Error messages
--------------
Every error is an ``ImageError`` (a ``ValueError``) whose message starts with
the input's name (``name=`` if given, else the path or the kind of input) and
which is chained to the underlying exception where there is one.  What Pillow
says is quoted (clipped to ``_REASON_CHARS`` characters) with its exception
type.  A file Pillow cannot use is reported as one of:

* "not an image Pillow can read": no format plugin recognised the data (its
  first bytes are quoted);
* "a variant of FORMAT that Pillow cannot decode": the plugin for the format
  recognised the file but refuses this variant, e.g. a BMP bitfields layout
  or compression, or a DDS pixel format, that it does not implement (Pillow
  raises ``NotImplementedError``, or an error saying "unsupported",
  "unimplemented" or "unknown ... format").  The file may be valid;
* a missing decoder, named: "needs Ghostscript to be rendered, and
  Ghostscript is not installed" (EPS); "no decoder for FORMAT files is
  installed" (Windows metafiles, WMF/EMF, off Windows; GRIB, BUFR and HDF5,
  which Pillow only recognises unless an application registers a handler);
  "needs a decoder that this Pillow build lacks" (a codec left out when
  Pillow was built);
* "refused as a possible decompression bomb" (see above), whether found
  while opening or while decoding;
* "truncated or corrupt": any other failure of a format Pillow supports, e.g.
  "image file is truncated", "broken data stream" or a decoder error.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import ImageError

__all__ = [
    "check_image",
    "DEFAULT_CROP",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_RESIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_image",
    "preprocess",
]

#: Default cap on ``width * height`` of an input image (Pillow's own default
#: ``Image.MAX_IMAGE_PIXELS``: 1024 * 1024 * 1024 // 4 // 3).
DEFAULT_MAX_PIXELS = 89_478_485

# Image.Resampling exists from Pillow 9.1; the bare constants warn in 9.1-9.3.
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR

#: ImageNet's per-channel mean and standard deviation, which every torchvision recipe here normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision's classification recipe by default: resize the short side to 256, centre crop 224.
DEFAULT_RESIZE = 256
DEFAULT_CROP = 224
SEGMENTATION_RESIZE = 520       # torchvision's SemanticSegmentation(resize_size=520): no crop

# How many leading bytes of an unrecognised file to quote in the error message.
_SNIFF_BYTES = 16

# How much of what Pillow says about a failure to quote in the error message.
_REASON_CHARS = 200

#: The order in which Pillow's format plugins are tried: the order of
#: ``PIL.Image.ID`` in a fresh interpreter after ``Image.open`` has run
#: ``Image.preinit()`` and ``Image.init()`` (as of Pillow 13; FPX and MIC,
#: which need olefile, where they would come).  Pillow itself tries
#: ``Image.ID``, whose order depends on which plugins were imported first (see
#: the module docstring).  Formats this Pillow lacks are skipped; formats
#: missing here (registered by other packages) are tried afterwards.
_FORMAT_ORDER = (
    "BMP", "DIB", "GIF", "JPEG", "PPM", "PNG",
    "AVIF", "BLP", "BUFR", "CUR", "PCX", "DCX", "DDS", "EPS", "FITS", "FLI", "FPX", "FTEX",
    "GBR", "GRIB", "HDF5", "JPEG2000", "ICNS", "ICO", "IM", "IMT", "IPTC", "MCIDAS", "MPEG",
    "TIFF", "MIC", "MSP", "PCD", "PIXAR", "PSD", "QOI", "SGI", "SPIDER", "SUN", "TGA", "WEBP",
    "WMF", "XBM", "XPM", "XVTHUMB",
)

# Pillow's wording for a file it recognises but a variant it does not implement
# (BMP: "Unsupported BMP bitfields layout"; DDS: "Unimplemented pixel format
# ...", "Unknown pixel format flags ..."; BLP, SGI, SUN, ICNS, ...).
_UNSUPPORTED = re.compile(
    r"\b(unsupported|unimplemented|not supported|not implemented)\b"
    r"|\bunknown\b.*\b(format|mode|compression|encoding|pixel|organization|filter|depth|flags)\b",
    re.IGNORECASE,
)

# Pillow's wording for a codec that this build of Pillow was compiled without.
_NO_CODEC = re.compile(r"^decoder \S+ not available")


# --------------------------------------------------------------------------- #
# Labels for error messages
# --------------------------------------------------------------------------- #
def _label(source: Any, name: Optional[str]) -> str:
    """What to call the input in messages."""
    if isinstance(source, (str, os.PathLike)):
        try:
            path = os.fsdecode(os.fspath(source))
        except Exception:  # a PathLike returning something odd
            path = repr(source)
        if name is None or str(name) == path:
            return f"image file {path!r}"
        return f"{name} (file {path!r})"
    if name is not None:
        return str(name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image bytes"
    if isinstance(source, Image.Image):
        return "PIL image"
    if isinstance(source, np.ndarray):
        return "image array"
    if hasattr(source, "read"):
        fname = getattr(source, "name", None)
        if isinstance(fname, (str, bytes)):
            return f"image file object {os.fsdecode(fname)!r}"
        return "image file object"
    return "image"


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #
def _check_pixels(size: Tuple[int, int], max_pixels: Optional[int], label: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{label}: image is empty ({w}x{h} pixels)")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{label}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            f"(max_pixels); refusing it as a possible decompression bomb. "
            f"Pass a larger max_pixels if you trust this image."
        )


def _reason(e: BaseException) -> str:
    """What Pillow said, as ``Type: message``, on one line and clipped to ``_REASON_CHARS``."""
    text = " ".join(str(e).split()) or "(no message)"
    if len(text) > _REASON_CHARS:
        text = text[: _REASON_CHARS - 3] + "..."
    return f"{type(e).__name__}: {text}"


def _is_unsupported_variant(e: BaseException) -> bool:
    """Whether a plugin's exception says it does not implement this variant of its format."""
    return isinstance(e, NotImplementedError) or bool(_UNSUPPORTED.search(str(e)))


def _bomb_error(label: str, e: BaseException, while_decoding: str = "") -> ImageError:
    """The message for Pillow's DecompressionBombError/Warning, at open or (``while_decoding``) at load."""
    where = f", found while decoding the {while_decoding} image" if while_decoding else ""
    return ImageError(
        f"{label}: refused as a possible decompression bomb by Pillow's limit "
        f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}){where}: {e}"
    )


def _format_order() -> Tuple[str, ...]:
    """Every format Pillow can open, in the fixed order ``_FORMAT_ORDER``, then any others."""
    Image.init()  # registers every plugin; a no-op once done
    known = [f for f in _FORMAT_ORDER if f in Image.OPEN]
    return tuple(known + [f for f in Image.ID if f not in _FORMAT_ORDER])


def _may_accept(fmt: str, prefix: bytes) -> bool:
    """False where ``fmt``'s plugin rejects the data outright, as ``Image.open`` would find."""
    accept = Image.OPEN[fmt][1]
    try:
        return accept is None or bool(accept(prefix))
    except Exception:  # let Image.open deal with it
        return True


def _identify(fp: io.BufferedIOBase, head: bytes, label: str) -> Image.Image:
    """``Image.open`` with the plugins tried one by one in ``_format_order()``.

    Trying them one at a time (Pillow moves on to the next plugin exactly where
    ``Image.open(fp, formats=(fmt,))`` raises ``UnidentifiedImageError``) tells
    which plugin raised any other error, so that its format can be named.
    """
    order = _format_order()
    fp.seek(0)
    prefix = fp.read(16)  # what Image.open passes to each plugin's accept()
    # Pillow warns (DecompressionBombWarning) between 1x and 2x its
    # MAX_IMAGE_PIXELS and raises above 2x.  Make the warning an error;
    # Image.MAX_IMAGE_PIXELS itself is left alone.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for fmt in order:
            if not _may_accept(fmt, prefix):  # a shortcut: Image.open would skip it too
                continue
            try:
                return Image.open(fp, formats=(fmt,))
            except Image.UnidentifiedImageError:
                continue
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise _bomb_error(label, e) from e
            except MemoryError:
                raise
            except Exception as e:  # plugins raise assorted types on headers they refuse
                if _is_unsupported_variant(e):
                    raise ImageError(
                        f"{label}: a variant of {fmt} that Pillow cannot decode: {_reason(e)}. "
                        f"The file may well be valid: convert it (e.g. to PNG) with another program"
                    ) from e
                raise ImageError(
                    f"{label}: cannot read the {fmt} header; the file is truncated or corrupt: {_reason(e)}"
                ) from e
        # No plugin took the data.  Image.open over all of them, which tries only
        # the plugins tried above, says so in its own words (and warnings).
        try:
            return Image.open(fp, formats=order)
        except Image.UnidentifiedImageError as e:
            raise ImageError(
                f"{label}: not an image Pillow can read (unknown format or damaged header; "
                f"the data starts with {head!r})"
            ) from e


def _no_decoder(img: Image.Image, label: str) -> ImageError:
    """The message for a format Pillow only recognises (a stub plugin without a handler)."""
    fmt = img.format or type(img).__name__
    desc = getattr(img, "format_description", None)
    named = f"{fmt} ({desc})" if desc and desc != fmt else fmt
    w, h = img.size
    this = f"this {w}x{h} {fmt} file" if w > 0 and h > 0 else "the format"
    how = f"a handler registered with {type(img).__module__}.register_handler"
    if fmt == "WMF":
        how = f"renders metafiles (WMF/EMF) only on Windows or through {how}"
    else:
        how = f"reads no pixels from it without {how}"
    return ImageError(
        f"{label}: no decoder for {named} files is installed: Pillow recognises {this} but {how}. "
        f"Convert it to an image format such as PNG first"
    )


def _load_error(img: Image.Image, label: str, e: Exception, closed_hint: bool) -> ImageError:
    """The message for an exception from ``img.load()`` (other than a decompression bomb)."""
    fmt = img.format or "unknown"
    what = f"{fmt} {img.size[0]}x{img.size[1]}"
    text = str(e)
    if fmt == "EPS":
        from PIL import EpsImagePlugin

        if not EpsImagePlugin.has_ghostscript():
            return ImageError(
                f"{label}: {what} needs Ghostscript to be rendered, and Ghostscript is not "
                f"installed (Pillow says {_reason(e)}). Install Ghostscript (the 'gs' program), "
                f"or convert the file to PNG first"
            )
    if isinstance(e, OSError) and _NO_CODEC.search(text):
        return ImageError(
            f"{label}: {what} needs a decoder that this Pillow build lacks: {_reason(e)}. "
            f"Install a Pillow built with it, or convert the file to PNG first"
        )
    if isinstance(e, OSError) and text.startswith("cannot find loader for this"):
        return _no_decoder(img, label)
    if closed_hint and isinstance(e, ValueError) and "closed image" in text:
        return ImageError(f"{label}: the PIL image was closed: {_reason(e)}")
    if _is_unsupported_variant(e):
        return ImageError(
            f"{label}: cannot decode the image data ({what}): a variant of {fmt} that Pillow "
            f"cannot decode: {_reason(e)}. The file may well be valid: convert it (e.g. to PNG) "
            f"with another program"
        )
    return ImageError(
        f"{label}: cannot decode the image data ({what}); the file is truncated or corrupt: {_reason(e)}"
    )


def _check_header(img: Image.Image, label: str, max_pixels: Optional[int]) -> None:
    """What an opened image's header tells: that Pillow can decode it, and its size is allowed."""
    # Pillow opens a file of a format it only recognises (GRIB, BUFR, HDF5, WMF
    # off Windows) as a StubImageFile, 0x0 unless the format says otherwise;
    # one with a handler (registered by an application) decodes like any image.
    if isinstance(img, ImageFile.StubImageFile) and getattr(img, "_handler", None) is None:
        raise _no_decoder(img, label)
    _check_pixels(img.size, max_pixels, label)


def _decode(img: Image.Image, label: str, max_pixels: Optional[int], closed_hint: bool = False) -> None:
    """Check the header of an opened image, then decode its pixels (frame 0, or the current frame).

    ``closed_hint``: ``img`` came from the caller, who may have closed it.
    """
    _check_header(img, label, max_pixels)
    size = img.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(label, e, f"{img.format or 'unknown'} {size[0]}x{size[1]}") from e
    except MemoryError:
        raise
    except Exception as e:
        raise _load_error(img, label, e, closed_hint) from e
    if img.size != size:  # e.g. ICNS, EPS, a stub's handler: the size was set while decoding
        _check_pixels(img.size, max_pixels, label)


def _open_encoded(fp: io.BufferedIOBase, head: bytes, label: str, max_pixels: Optional[int],
                  decode: bool = True) -> Image.Image:
    """Open an encoded image from a seekable binary stream, check its size, decode frame 0.

    The returned image is fully loaded; the caller closes it after conversion. With ``decode``
    False only the header is read and checked, and the image is returned closed.
    """
    img = _identify(fp, head, label)
    try:
        if not decode:
            _check_header(img, label, max_pixels)
            img.close()
            return img
        # Image.open leaves a multi-frame image on frame 0: decode that one.
        _decode(img, label, max_pixels)
    except BaseException:
        img.close()
        raise
    return img


def _read_path(source: Any, label: str, max_pixels: Optional[int], decode: bool = True) -> Image.Image:
    path = os.fspath(source)
    text = os.fsdecode(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        hint = ""
        if text.startswith(("http://", "https://")):
            hint = " (URLs are not fetched: download the image and pass the bytes or a path)"
        raise ImageError(f"{label}: no such file{hint}") from e
    except IsADirectoryError as e:
        raise ImageError(f"{label}: is a directory, not an image file") from e
    except OSError as e:
        if os.path.isdir(path):  # Windows reports a directory as PermissionError
            raise ImageError(f"{label}: is a directory, not an image file") from e
        raise ImageError(f"{label}: cannot open: {e.strerror or e}") from e
    with f:
        try:
            if os.fstat(f.fileno()).st_size == 0 and not f.read(1):
                raise ImageError(f"{label}: file is empty (0 bytes)")
            f.seek(0)
            head = f.read(_SNIFF_BYTES)
            f.seek(0)
        except OSError as e:
            raise ImageError(f"{label}: cannot read: {e.strerror or e}") from e
        return _open_encoded(f, head, label, max_pixels, decode)


def _read_bytes(data: bytes, label: str, what: str, max_pixels: Optional[int], decode: bool = True) -> Image.Image:
    if len(data) == 0:
        raise ImageError(f"{label}: {what} is empty (0 bytes)")
    return _open_encoded(io.BytesIO(data), data[:_SNIFF_BYTES], label, max_pixels, decode)


def _read_fileobj(fobj: Any, label: str, max_pixels: Optional[int]) -> Image.Image:
    try:
        data = fobj.read()
    except Exception as e:
        if isinstance(e, MemoryError):
            raise
        raise ImageError(f"{label}: reading the file object failed: {type(e).__name__}: {e}") from e
    if isinstance(data, str):
        raise ImageError(f"{label}: file object returned text, not bytes; open the file in binary mode ('rb')")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{label}: file object's read() returned {type(data).__name__}, expected bytes")
    data = bytes(data)
    if not data:
        raise ImageError(
            f"{label}: file object is empty (0 bytes read from its current position; "
            f"was it already read? seek(0) first)"
        )
    return _open_encoded(io.BytesIO(data), data[:_SNIFF_BYTES], label, max_pixels)


def _from_array(arr: np.ndarray, label: str, max_pixels: Optional[int]) -> Image.Image:
    expected = (
        "expected dtype uint8 with shape (H, W) or (H, W, 1) grey, (H, W, 3) RGB "
        "or (H, W, 4) RGBA (alpha is dropped)"
    )
    if arr.dtype != np.uint8:
        hint = ""
        if arr.dtype.kind == "f":
            hint = "; for floats in [0, 1] use (a * 255).round().astype(np.uint8)"
        raise ImageError(
            f"{label}: numpy array has dtype {arr.dtype} and shape {arr.shape}; {expected}{hint}"
        )
    ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not ok:
        hint = ""
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            hint = "; channel-first (C, H, W) data must be transposed to (H, W, C)"
        raise ImageError(
            f"{label}: numpy array has dtype {arr.dtype} and shape {arr.shape}; {expected}{hint}"
        )
    h, w = arr.shape[:2]
    _check_pixels((w, h), max_pixels, label)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        return Image.fromarray(arr)  # mode L
    if arr.shape[2] == 3:
        return Image.fromarray(arr)  # mode RGB
    return Image.fromarray(arr).convert("RGB")  # RGBA: drop alpha


def _to_8bit_grey(img: Image.Image, label: str) -> Image.Image:
    """Scale an I;16*, I or F image to an 8-bit L image (never clipping)."""
    mode = img.mode
    arr = np.asarray(img)
    if mode == "F":
        a = arr.astype(np.float64)
        if a.size and not np.isfinite(a).all():
            raise ImageError(f"{label}: float image (mode 'F') contains NaN or infinity")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageError(
                f"{label}: float image (mode 'F') has values from {lo:g} to {hi:g}; "
                f"only [0, 1] is accepted (scaled by 255). Convert it to 8 bits yourself"
            )
        out = np.floor(a * 255.0 + 0.5).astype(np.uint8)
    else:  # "I" or "I;16", "I;16L", "I;16B", "I;16N"
        a = arr.astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(
                f"{label}: integer image (mode {mode!r}) has values from {lo} to {hi}; "
                f"only 0..65535 (16-bit data) is accepted, scaled by 1/257. "
                f"Convert it to 8 bits yourself"
            )
        out = ((a + 128) // 257).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out))


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert a loaded image to a new RGB image (never returns ``img`` itself)."""
    mode = img.mode
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _to_8bit_grey(img, label).convert("RGB")
    if "transparency" in img.info:
        # The pixels of convert("RGB") do not depend on info["transparency"]; it
        # only triggers a warning (bytes transparency) and output metadata.  Work
        # on a copy so that a caller's image is never modified.
        img = img.copy()
        img.info.pop("transparency", None)
    try:
        return img.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(f"{label}: cannot convert image mode {mode!r} to RGB: {e}") from e


def check_image(source: Any, *, name: Optional[str] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> None:
    """Check, without decoding pixels, that ``source`` can be read: the quick check made before work.

    For a path or bytes: it exists and can be read, Pillow recognises its format and has a decoder
    for it, and its size is within ``max_pixels``. Other inputs (file objects, PIL images, arrays)
    are checked by ``load_image`` itself, decoding them. Raises ImageError as ``load_image`` would; what only decoding reveals
    (a truncated or corrupt image) is reported when the image is loaded.
    """
    label = _label(source, name)
    if isinstance(source, (str, os.PathLike)):
        _read_path(source, label, max_pixels, decode=False)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        _read_bytes(bytes(source), label, "bytes input", max_pixels, decode=False)
    else:
        load_image(source, name=name, max_pixels=max_pixels).close()


def load_image(
    source: Any,
    *,
    name: Optional[str] = None,
    exif_transpose: bool = False,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load ``source`` as a new mode-"RGB" PIL image, following the module's policies.

    ``source`` is a path (str or os.PathLike), bytes/bytearray/memoryview, a binary
    file object, a PIL image or a uint8 ndarray (see the module docstring).
    ``name`` is used in error messages (e.g. ``"image 3"``).  ``exif_transpose``
    applies the EXIF orientation tag (default off, like torchvision).
    ``max_pixels`` caps width*height before decoding (None: no cap of ours;
    Pillow's MAX_IMAGE_PIXELS still applies to files).

    Raises ImageError (a ValueError) naming the input and the problem.
    """
    label = _label(source, name)
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")

    opened = False  # True when we own `img` and must close it
    if isinstance(source, Image.Image):
        img = source
        _decode(img, label, max_pixels, closed_hint=True)  # a lazily opened image may still be truncated
    elif isinstance(source, np.ndarray):
        img = _from_array(source, label, max_pixels)
    elif isinstance(source, (str, os.PathLike)):
        img = _read_path(source, label, max_pixels)
        opened = True
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = _read_bytes(bytes(source), label, "bytes input", max_pixels)
        opened = True
    elif hasattr(source, "read"):
        img = _read_fileobj(source, label, max_pixels)
        opened = True
    else:
        raise ImageError(
            f"{label}: unsupported input type {type(source).__module__}.{type(source).__qualname__}; "
            f"expected a path, bytes, a binary file object, a PIL image or a uint8 numpy array"
        )

    try:
        if exif_transpose:
            try:
                transposed = ImageOps.exif_transpose(img)
            except MemoryError:
                raise
            except Exception as e:
                raise ImageError(f"{label}: cannot apply the EXIF orientation: {type(e).__name__}: {e}") from e
            if transposed is not None:
                if opened:
                    img.close()
                img, opened = transposed, True
        return _to_rgb(img, label)
    finally:
        if opened:
            img.close()


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #
def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _three_floats(value: Any, what: str) -> np.ndarray:
    try:
        vals = [float(v) for v in value]
    except TypeError as e:
        raise ValueError(f"{what} must be a sequence of 3 numbers, got {value!r}") from e
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{what} must be 3 finite numbers, got {value!r}")
    return np.array(vals, dtype=np.float32)


def _resized_size(width: int, height: int, resize_size: int) -> Tuple[int, int]:
    """(new_width, new_height) with the short side ``resize_size``, as torchvision computes it."""
    w, h = width, height
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize_size, int(resize_size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _centre_crop(arr: np.ndarray, crop_size: int) -> np.ndarray:
    """Centre crop an (H, W, 3) array, zero-padding first where it is smaller than the crop
    (torchvision's center_crop: left/top get the floor half of the padding)."""
    ih, iw = arr.shape[:2]
    if crop_size > iw or crop_size > ih:
        pad_w = max(crop_size - iw, 0)
        pad_h = max(crop_size - ih, 0)
        arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        ih, iw = arr.shape[:2]
    top = int(round((ih - crop_size) / 2.0))
    left = int(round((iw - crop_size) / 2.0))
    return arr[top : top + crop_size, left : left + crop_size]


def preprocess(
    image: Any,
    resize_size: int = DEFAULT_RESIZE,
    crop_size: Optional[int] = DEFAULT_CROP,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    exif_transpose: bool = False,
    name: Optional[str] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Turn one image into a ``(3, crop_size, crop_size)`` float32 array (``(3, H', W')`` without a crop).

    Bit-for-bit equal to torchvision's ``ImageClassification(crop_size=crop_size,
    resize_size=resize_size, mean=mean, std=std)`` on ``load_image(image)``
    (MobileNetV3-Large IMAGENET1K_V2 uses resize_size=232; V1 and Small use 256). With
    ``crop_size=None`` there is no crop: the short side is ``resize_size`` and the long side
    follows the aspect ratio, as torchvision's ``SemanticSegmentation(resize_size=resize_size)``
    (the segmentation weights use 520).
    ``image`` is anything ``load_image`` accepts; ``name``, ``exif_transpose`` and
    ``max_pixels`` are passed on to it.

    Raises ImageError for an unusable image (including one whose resized size
    would exceed ``max_pixels``, as a 1x100000 image would: 256x25,600,000),
    ValueError for bad arguments.
    """
    resize_size = _positive_int(resize_size, "resize_size")
    crop_size = None if crop_size is None else _positive_int(crop_size, "crop_size")
    mean32 = _three_floats(mean, "mean")
    std32 = _three_floats(std, "std")
    if (std32 == 0).any():
        raise ValueError(f"std must not contain zero, got {std!r}")

    img = load_image(image, name=name, exif_transpose=exif_transpose, max_pixels=max_pixels)
    label = _label(image, name)
    try:
        w, h = img.size
        new_w, new_h = _resized_size(w, h, resize_size)
        if max_pixels is not None and new_w * new_h > max_pixels:
            gib = new_w * new_h * 4 / 2**30  # Pillow keeps RGB as 4 bytes per pixel
            raise ImageError(
                f"{label}: resizing this {w}x{h} image to a short side of {resize_size} would make it "
                f"{new_w}x{new_h} = {new_w * new_h:,} pixels (about {gib:,.1f} GiB), more than the "
                f"limit of {max_pixels:,} (max_pixels); crop it first, or pass a larger max_pixels "
                f"if you have the memory"
            )
        if (new_w, new_h) != (w, h):
            resized = img.resize((new_w, new_h), _BILINEAR)
            img.close()
            img = resized
        arr = np.asarray(img)  # (H, W, 3) uint8
    finally:
        img.close()

    if crop_size is not None:
        arr = _centre_crop(arr, crop_size)

    x = arr.astype(np.float32) / np.float32(255)
    x = (x - mean32) / std32
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
