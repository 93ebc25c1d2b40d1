"""Saving and loading state dicts: the project's own ``.npz`` format, plus dispatch.

The ``.npz`` written here is an ordinary uncompressed NumPy archive, one
``<name>.npy`` entry per tensor, readable with ``np.load(path,
allow_pickle=False)``. Optional metadata is stored as UTF-8 JSON in a 1-D
``uint8`` array under the key ``__metadata__`` (never an object array, so no
pickle is ever needed to read it).

``load_state_dict`` recognises a file by its first bytes, not its name, and
reads ``.npz`` archives, ``torch.save`` zip files and legacy ``torch.save``
files (the latter two through :mod:`npmnv3.torchfile`, without torch). Other
files are refused with a specific reason: empty, an HTML/XML page (an error
page saved in place of a download), an image, a TorchScript archive, a Git
LFS pointer, a gzip file, a bare pickle, or unknown.

Every read failure, including a missing file, raises
:class:`npmnv3.errors.WeightsFormatError` naming the file and the reason,
chained to the underlying exception (``FileNotFoundError`` for a missing file).

Limits
------
``.npz`` archives are checked before anything is inflated or allocated:

* the zip directory is bounded as for torch files (``MAX_ZIP_ENTRIES`` and
  ``MAX_ZIP_DIRECTORY_BYTES`` in :mod:`npmnv3.torchfile`), from its end record
  before ``zipfile`` parses it;
* entries are stored or deflated (what ``np.savez`` and ``np.savez_compressed``
  write), and their declared sizes add up to at most ``MAX_NPZ_RATIO`` (16)
  times the file's size, or ``SMALL_OUTPUT_BYTES`` (16 MiB) if that is more, and
  never more than ``MAX_OUTPUT_BYTES`` (4 GiB). Stored archives, like the ones
  written here, hold exactly their arrays' bytes, and real weights deflate
  about 1.1:1; a deflate bomb (up to 1032:1) is refused, naming the entry,
  before it is inflated;
* each ``.npy`` header's shape and dtype must account for exactly the bytes
  of its entry before NumPy allocates the array.
"""

from __future__ import annotations

import collections.abc
import contextlib
import json
import math
import os
import stat
import tempfile
import zipfile

import numpy as np

from .errors import WeightsFormatError
from .torchfile import (
    MAX_OUTPUT_BYTES,
    SMALL_OUTPUT_BYTES,
    ZIP_MAGIC,
    excerpt,
    exception_text,
    format_error,
    is_legacy_torch_file,
    looks_like_torchscript,
    output_limit,
    read_torch_file,
    shape_text,
    zip_directory_problem,
)

__all__ = ["save_state_dict", "load_state_dict", "load_metadata", "METADATA_KEY"]

#: Reserved key under which metadata JSON is stored in the .npz archive.
METADATA_KEY = "__metadata__"

# Array kinds a weights file may hold: bool, signed/unsigned int, float, complex.
_NUMERIC_KINDS = frozenset("biufc")

#: The arrays of an .npz may add up to this many times the file's size (see the module docstring).
MAX_NPZ_RATIO = 16

_SNIFF_BYTES = 1024


# --------------------------------------------------------------------------- saving


def save_state_dict(state_dict, path, metadata=None) -> None:
    """Write ``state_dict`` (str -> array) to ``path`` as an uncompressed ``.npz``, atomically.

    Parameters
    ----------
    state_dict : mapping
        Non-empty str keys to arrays (anything ``np.asarray`` accepts) of bool or numeric dtype.
    path : path
        The exact destination (no ``.npz`` is appended).
    metadata : mapping, optional
        JSON-serialisable; stored as UTF-8 JSON in a ``uint8`` array under ``"__metadata__"``.

    Raises
    ------
    TypeError
        state_dict or metadata has the wrong type.
    ValueError
        A key is empty or reserved, or an array is not numeric or bool.
    OSError
        The file cannot be written.

    Notes
    -----
    The archive is written through an open file object to a temporary file in the destination's
    folder, flushed and fsynced, then moved into place with ``os.replace``. On any failure,
    KeyboardInterrupt included, the temporary file is removed and an existing file at ``path`` is
    left untouched.
    """
    arrays = _prepare_arrays(state_dict)
    if metadata is not None:
        arrays[METADATA_KEY] = _encode_metadata(metadata)
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(target))  # mkstemp creates files readable by the owner only
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def _prepare_arrays(state_dict) -> dict[str, np.ndarray]:
    """Check keys and dtypes; return plain arrays in the mapping's order."""
    if not isinstance(state_dict, collections.abc.Mapping):
        raise TypeError(f"state_dict must be a mapping of str to arrays, got {type(state_dict).__name__}")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"state_dict keys must be non-empty strings, got {key!r}")
        if key == METADATA_KEY:
            raise ValueError(f"state_dict key {METADATA_KEY!r} is reserved for metadata")
        array = np.asarray(value)
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"state_dict[{key!r}] has dtype {array.dtype}; only bool and numeric arrays can be saved")
        arrays[key] = array
    return arrays


def _encode_metadata(metadata) -> np.ndarray:
    """Metadata as UTF-8 JSON bytes in a 1-D uint8 array."""
    if not isinstance(metadata, collections.abc.Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        text = json.dumps(dict(metadata), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be JSON-serialisable: {exc}") from exc
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` does, without its keyword-argument name clashes ('file', 'allow_pickle')."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(key + ".npy", mode="w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)


def _mode_for(target: str) -> int:
    """Permissions for the new file: keep an existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        pass
    umask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(umask)
    return 0o666 & ~umask


def fsync_folder(folder) -> None:
    """Make a rename inside ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a state dict from an ``.npz`` or ``torch.save`` file, recognised by content.

    Never unpickles anything except through :func:`npmnv3.torchfile.read_torch_file`'s allowlist.

    Returns
    -------
    arrays : dict
        C-contiguous, native-byte-order arrays in file order (the ``__metadata__`` entry excluded).

    Raises
    ------
    WeightsFormatError
        The file is missing (chained to FileNotFoundError), unreadable, not a weights file, or
        malformed; the message names the file and the reason.
    """
    source = os.fspath(path)
    if _identify(source) == "torch":
        return read_torch_file(source)
    arrays = _read_npz(source)
    arrays.pop(METADATA_KEY, None)
    return arrays


def load_metadata(path) -> dict:
    """Return the metadata stored in an ``.npz`` written by :func:`save_state_dict`.

    Returns ``{}`` when the archive has none, and for ``torch.save`` files
    (which carry no metadata; their tensors are not read or checked here).
    Raises WeightsFormatError like :func:`load_state_dict`.
    """
    source = os.fspath(path)
    if _identify(source) == "torch":
        return {}
    raw = _read_npz(source, only=METADATA_KEY).get(METADATA_KEY)
    if raw is None:
        return {}
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise WeightsFormatError(format_error(source, f"{METADATA_KEY} must be a 1-D uint8 array"))
    try:
        metadata = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsFormatError(format_error(source, f"{METADATA_KEY} is not valid UTF-8 JSON: {exc}")) from exc
    if not isinstance(metadata, dict):
        raise WeightsFormatError(format_error(source, f"{METADATA_KEY} is not a JSON object"))
    return metadata


def _identify(source: str) -> str:
    """Return "npz" or "torch" for a readable weights file, else raise WeightsFormatError."""
    try:
        with open(source, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            names = _zip_names(source, f) if head.startswith(ZIP_MAGIC) else None
    except FileNotFoundError as exc:
        raise WeightsFormatError(format_error(source, "no such file")) from exc
    except OSError as exc:
        raise WeightsFormatError(format_error(source, f"cannot read file: {exc.strerror or exc}")) from exc
    kind, reason = _classify(head, names)
    if reason:
        raise WeightsFormatError(format_error(source, reason))
    return kind


def _zip_names(source: str, f) -> list[str]:
    """Entry names of the zip archive ``f``; a broken or oversized archive raises WeightsFormatError."""
    try:
        problem = zip_directory_problem(f, os.fstat(f.fileno()).st_size)
        if problem is None:
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                return zf.namelist()
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, but also ValueError, EOFError, ...
        reason = f"corrupt zip archive: {exception_text(exc)}"
        raise WeightsFormatError(format_error(source, reason)) from exc
    raise WeightsFormatError(format_error(source, problem))


def _classify(head: bytes, names: list[str] | None) -> tuple[str, str | None]:
    """Decide what a file is from its first bytes (and zip entry names): (kind, refusal reason)."""
    if names is not None:
        if looks_like_torchscript(names):
            return "", ("this is a TorchScript archive (torch.jit.save), not a state dict; "
                        "save model.state_dict() instead")
        if any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
            return "torch", None
        if names and all(n.endswith(".npy") for n in names):
            return "npz", None
        return "", "zip archive that is neither a NumPy .npz nor a torch.save file"
    if not head:
        return "", "file is empty (0 bytes); an interrupted download?"
    if is_legacy_torch_file(head):
        return "torch", None
    return "", _describe_foreign(head)


def _describe_foreign(head: bytes) -> str:
    """Name what a non-weights file looks like, for the error message."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        text.startswith(b"<") and b"<html" in text
    ):
        return "file is an HTML page, not weights (an error or login page saved in place of the download?)"
    if text.startswith(b"<?xml"):
        return "file is an XML document, not weights (a server error response saved in place of the download?)"
    if text.startswith(b"version https://git-lfs"):
        return "file is a Git LFS pointer, not the weights (fetch the real file with `git lfs pull`)"
    if head.startswith(b"\xff\xd8\xff"):
        return "file is a JPEG image, not weights"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "file is a PNG image, not weights"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "file is a GIF image, not weights"
    if head.startswith(b"\x1f\x8b"):
        return "file is gzip-compressed; decompress it first"
    if head.startswith(b"\x93NUMPY"):
        return "file is a single NumPy .npy array, not a state dict (.npz)"
    if head[:1] == b"\x80":
        return "file is a plain pickle, not a torch.save file or .npz; refusing to unpickle it"
    return f"unrecognised file format (first bytes {head[:16]!r})"


def _read_npz(source: str, only: str | None = None) -> dict[str, np.ndarray]:
    """Read an .npz archive without pickle; ``only`` reads just that key (if present)."""
    try:
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            problem = zip_directory_problem(f, size)
            if problem:
                raise WeightsFormatError(format_error(source, problem))
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                entries = _check_npz_entries(source, zf.infolist(), size)
                return {key: _read_npy(source, zf, info, key) for key, info in entries if only in (None, key)}
    except WeightsFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser failure is a format error
        reason = f"cannot read .npz archive: {exception_text(exc)}"
        raise WeightsFormatError(format_error(source, reason)) from exc


def _check_npz_entries(source: str, infos, file_size: int) -> list:
    """Zip hygiene and sizes for .npz, before inflating anything; returns ``[(key, info)]`` in order.

    Unique ``*.npy`` names, no encryption, stored or deflated entries, and
    declared sizes that add up to at most the limit in the module docstring.
    """

    def refuse(reason):
        raise WeightsFormatError(format_error(source, reason))

    limit = output_limit(MAX_NPZ_RATIO, file_size)
    entries, seen = [], set()
    stored = inflated = 0
    for info in infos:
        name = info.filename
        if name in seen:
            refuse(f"zip has duplicate entries named {excerpt(name)}")
        seen.add(name)
        if not name.endswith(".npy"):
            refuse(f".npz entry {excerpt(name)} is not a .npy array")
        if info.flag_bits & 0x1:
            refuse(f".npz entry {excerpt(name)} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            refuse(f".npz entry {excerpt(name)} is stored but declares {info.file_size} bytes in {info.compress_size}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            refuse(f".npz entry {excerpt(name)} uses zip compression method {info.compress_type} "
                   "(np.savez stores entries, np.savez_compressed deflates them; nothing else is read)")
        stored += info.compress_size
        if stored > file_size:
            refuse(f".npz entries declare {stored} bytes but the file has only {file_size}")
        inflated += info.file_size
        if inflated > limit:
            ratio = info.file_size / max(1, info.compress_size)
            refuse(f".npz entry {excerpt(name)} would inflate {info.compress_size} bytes to {info.file_size} "
                   f"({ratio:.0f}:1), taking the arrays past {limit} bytes, the limit for a file of {file_size} "
                   f"bytes ({MAX_NPZ_RATIO}x its size, at least {SMALL_OUTPUT_BYTES} and at most {MAX_OUTPUT_BYTES}; "
                   "a decompression bomb?)")
        entries.append((name[: -len(".npy")], info))
    return entries


def _read_npy(source: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """Read one ``.npy`` entry, after checking that its header accounts for exactly the entry's bytes."""
    with zf.open(info) as entry:
        try:
            version = np.lib.format.read_magic(entry)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(entry)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(entry)
            else:  # 3.0 only exists for non-latin-1 field names: structured dtypes
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        except ValueError as exc:
            raise WeightsFormatError(format_error(source, f"array {excerpt(key)}: {exception_text(exc)}")) from exc
        if not dtype.hasobject:  # object arrays: np.lib.format.read_array refuses them below
            _check_npy_size(source, key, shape, dtype, info.file_size - entry.tell())
        entry.seek(0)
        return _checked_array(source, key, np.lib.format.read_array(entry, allow_pickle=False))


def _check_npy_size(source: str, key: str, shape: tuple, dtype: np.dtype, data_bytes: int) -> None:
    """Refuse a non-numeric dtype, or a shape and dtype that do not make up ``data_bytes``."""
    if dtype.kind not in _NUMERIC_KINDS:
        reason = f"array {excerpt(key)} has dtype {dtype}, not a numeric or bool dtype"
        raise WeightsFormatError(format_error(source, reason))
    if any(n < 0 for n in shape):
        raise WeightsFormatError(format_error(source, f"array {excerpt(key)} has a negative dimension"))
    declared = math.prod(shape) * dtype.itemsize
    if declared != data_bytes:
        raise WeightsFormatError(format_error(
            source, f"array {excerpt(key)} declares {shape_text(shape)} {dtype} ({declared} bytes) but its entry holds "
                    f"{data_bytes} bytes of data"))


def _checked_array(source: str, key: str, array: np.ndarray) -> np.ndarray:
    """Refuse non-numeric arrays; return a C-contiguous, native-order array."""
    if array.dtype.hasobject or array.dtype.kind not in _NUMERIC_KINDS:
        reason = f"array {excerpt(key)} has dtype {array.dtype}, not a numeric or bool dtype"
        raise WeightsFormatError(format_error(source, reason))
    native = array.dtype.newbyteorder("=")
    if array.dtype != native or not array.flags.c_contiguous:
        array = array.astype(native, order="C")
    return array
