"""Read ``torch.save`` files without torch and without executing anything.

A ``torch.save`` file is a pickle plus raw storage bytes. Unpickling an
untrusted pickle can run arbitrary code, so this module never calls
``pickle.load`` on one. Instead every pickle goes through two gates:

1. ``pickletools.genops`` walks the opcodes (it decodes, it never executes) and
   refuses any opcode outside a small allowlist, and any ``GLOBAL`` outside the
   allowlist of names.
2. A ``pickle.Unpickler`` subclass whose ``find_class`` hands out inert
   stand-ins from a fixed table (it never imports anything) and whose
   ``persistent_load`` checks every storage reference.

Tensors come out of the unpickler as plain descriptions (storage, offset,
size, stride); after validation they are copied out of the storage bytes into
new, contiguous, owned NumPy arrays.

Two layouts are supported:

* the zip format (torch >= 1.6, the default): ``<prefix>/data.pkl``,
  ``<prefix>/data/<key>`` (raw storage bytes), ``<prefix>/byteorder``, ...
* the legacy format (``_use_new_zipfile_serialization=False``): five pickles
  back to back (magic number, protocol version, system info, the object,
  the sorted list of storage keys), then per key an int64 element count and
  the raw bytes.

Every failure raises :class:`npmnv3.errors.WeightsFormatError` naming the file
and the reason, chained to the underlying exception when there is one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import pickletools
import re
import struct
import zipfile

import numpy as np

from .errors import WeightsFormatError

__all__ = ["read_torch_file"]

# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------

#: Largest pickle accepted (a MobileNetV3 state dict pickle is ~30 KB).
MAX_PICKLE_BYTES = 64 * 2**20
#: Largest total size of the arrays returned. Stride-0 (``expand``) views
#: can describe far more elements than the file holds; this bounds the copy.
MAX_OUTPUT_BYTES = 4 * 2**30
#: Highest tensor rank accepted.
MAX_RANK = 8
#: Sizes, strides, offsets and element counts are int64 in torch.
_INT64_MAX = 2**63 - 1

# ``pickle.dump(0x1950A86A20F9469CFC6C)`` stores these 10 bytes after LONG1.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC_BYTES = _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# Storage keys are decimal strings in every torch version; allow a little more.
_STORAGE_KEY_RE = re.compile(r"[0-9A-Za-z_]{1,64}", re.ASCII)

# Opcodes torch.save emits (protocol 2 by default, 4 if asked), and nothing
# more. Notably absent: INST, OBJ, NEWOBJ(_EX) (build arbitrary classes), EXT1/2/4
# (extension registry), PERSID (text persistent ids), byte strings, buffers,
# and all text-mode (protocol 0) opcodes.
_ALLOWED_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK",
        "NONE", "NEWTRUE", "NEWFALSE",
        "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
        "BINUNICODE", "SHORT_BINUNICODE",
        "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
        "EMPTY_LIST", "APPEND", "APPENDS",
        "EMPTY_DICT", "SETITEM", "SETITEMS",
        "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
        "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
    }
)  # fmt: skip
_ALLOWED_PROTOCOLS = frozenset({2, 3, 4, 5})


class _Refused(Exception):
    """Internal: a check failed. ``read_torch_file`` turns it into WeightsFormatError."""


def format_error(source: str, reason: str) -> str:
    """The one message shape for unreadable weight files (shared with serialization)."""
    return f"cannot load weights from {source!r}: {reason}"


@contextlib.contextmanager
def _stage(what: str):
    """Turn any unexpected exception inside the block into ``_Refused("<what>: ...")``."""
    try:
        yield
    except _Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser failure is a format error
        raise _Refused(f"{what}: {type(exc).__name__}: {exc}") from exc


def _is_int(value) -> bool:
    """True for Python ints that are not bools (``True`` would pass isinstance(int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(value, what: str) -> int:
    """Require an int64-range non-negative int (sizes, strides, offsets, counts)."""
    if not _is_int(value):
        raise _Refused(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _INT64_MAX:
        raise _Refused(f"{what} must be in [0, 2**63), got {value}")
    return value


# --------------------------------------------------------------------------
# Stand-ins handed out by find_class
# --------------------------------------------------------------------------


class _StandIn:
    """Base of every object the unpickler can obtain by name.

    ``__slots__`` leaves no ``__dict__``, and ``__setstate__`` refuses, so a
    hostile BUILD opcode cannot set attributes on (and so reprogram) a stand-in.
    """

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __setstate__(self, state):
        raise _Refused(f"pickle tries to set state on {self.qualname}")

    def __call__(self, *args):
        raise _Refused(f"pickle calls {self.qualname}, which is not callable here")

    def __repr__(self):
        return f"<stand-in for {self.qualname}>"


class _StorageType(_StandIn):
    """Stand-in for ``torch.<X>Storage``: how to decode that storage's bytes.

    ``raw`` is the little-endian element dtype as stored; ``kind`` says how to
    turn it into the returned dtype ("plain": as is, "bfloat16": widen u2 to
    float32 by ``<< 16``, "bool": any non-zero byte is True).
    """

    __slots__ = ("raw", "kind")

    def __init__(self, name: str, raw: str, kind: str = "plain"):
        super().__init__(f"torch.{name}")
        self.raw = np.dtype(raw)
        self.kind = kind

    @property
    def output_dtype(self) -> np.dtype:
        if self.kind == "bfloat16":
            return np.dtype(np.float32)
        if self.kind == "bool":
            return np.dtype(np.bool_)
        return self.raw.newbyteorder("=")


_STORAGE_TYPES = {
    st.qualname.split(".", 1)[1]: st
    for st in (
        _StorageType("FloatStorage", "<f4"),
        _StorageType("DoubleStorage", "<f8"),
        _StorageType("HalfStorage", "<f2"),
        _StorageType("BFloat16Storage", "<u2", "bfloat16"),
        _StorageType("LongStorage", "<i8"),
        _StorageType("IntStorage", "<i4"),
        _StorageType("ShortStorage", "<i2"),
        _StorageType("CharStorage", "i1"),
        _StorageType("ByteStorage", "u1"),
        _StorageType("BoolStorage", "u1", "bool"),
    )
}


class _StorageRef(_StandIn):
    """What a storage persistent id resolves to: the key, type and element count."""

    __slots__ = ("key", "storage_type", "numel")

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        super().__init__(f"storage {key!r}")
        self.key = key
        self.storage_type = storage_type
        self.numel = numel


class _TensorSpec(_StandIn):
    """A validated tensor description: a strided view into one storage."""

    __slots__ = ("storage", "offset", "size", "stride", "negate")

    def __init__(self, storage, offset, size, stride, negate=False):
        super().__init__("tensor")
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.negate = negate

    @property
    def numel(self) -> int:
        n = 1
        for s in self.size:
            n *= s
        return n


class _PickledDict(dict):
    """Stand-in for ``collections.OrderedDict`` (a plain dict keeps order too).

    torch's state dicts carry a ``_metadata`` attribute, pickled as a BUILD
    with ``{'_metadata': ...}``; it is accepted and dropped. Nothing else is.
    """

    def __setstate__(self, state):
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise _Refused("pickle sets unexpected state on an OrderedDict")


class _Function(_StandIn):
    """Stand-in for an allowed callable; calls our own checked implementation."""

    __slots__ = ("impl",)

    def __init__(self, qualname: str, impl):
        super().__init__(qualname)
        self.impl = impl

    def __call__(self, *args):
        return self.impl(*args)


def _new_ordered_dict(*args):
    """``OrderedDict()``: torch always pickles it empty and fills it with SETITEMS."""
    if args:
        raise _Refused("OrderedDict is called with arguments")
    return _PickledDict()


def _check_hooks(hooks) -> None:
    """Backward hooks are never serialised: torch writes an empty OrderedDict."""
    if not isinstance(hooks, dict) or hooks:
        raise _Refused("tensor has backward hooks (expected an empty OrderedDict)")


def _check_tensor_metadata(metadata) -> bool:
    """Decode ``get_tensor_metadata``: returns True if the negative bit is set."""
    if metadata is None:
        return False
    if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
        raise _Refused(f"unsupported tensor metadata {metadata!r}")
    if any(not isinstance(v, bool) for v in metadata.values()):
        raise _Refused(f"unsupported tensor metadata {metadata!r}")
    if metadata.get("conj"):
        raise _Refused("tensor has the conjugate bit set (complex tensors are not supported)")
    return bool(metadata.get("neg"))


def _check_shape(values, what: str) -> tuple:
    if not isinstance(values, (tuple, list)):
        raise _Refused(f"tensor {what} must be a tuple, got {type(values).__name__}")
    if len(values) > MAX_RANK:
        raise _Refused(f"tensor rank {len(values)} exceeds the limit of {MAX_RANK}")
    return tuple(_check_count(v, f"tensor {what} entry") for v in values)


def _make_tensor_spec(storage, offset, size, stride, negate=False) -> _TensorSpec:
    """Validate a strided view completely before anything reads through it."""
    if not isinstance(storage, _StorageRef):
        raise _Refused(f"tensor storage must be a storage reference, got {type(storage).__name__}")
    offset = _check_count(offset, "tensor storage offset")
    size = _check_shape(size, "size")
    stride = _check_shape(stride, "stride")
    if len(size) != len(stride):
        raise _Refused(f"tensor size {size} and stride {stride} differ in rank")
    spec = _TensorSpec(storage, offset, size, stride, negate)
    if spec.numel == 0:
        last_needed = offset  # an empty view may sit at the very end
        if last_needed > storage.numel:
            raise _Refused(f"empty tensor offset {offset} is beyond its storage of {storage.numel} elements")
    else:
        # Strides are >= 0, so the highest element read is this one.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise _Refused(
                f"tensor view (offset {offset}, size {size}, stride {stride}) reads element {last} "
                f"of a storage with only {storage.numel} elements"
            )
    if negate and storage.storage_type.kind == "bool":
        raise _Refused("negative bit set on a bool tensor")
    return spec


def _rebuild_tensor_v2(*args) -> _TensorSpec:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``."""
    if len(args) not in (6, 7):
        raise _Refused(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    if not isinstance(requires_grad, bool):
        raise _Refused("tensor requires_grad must be a bool")
    _check_hooks(hooks)
    negate = _check_tensor_metadata(args[6] if len(args) == 7 else None)
    return _make_tensor_spec(storage, offset, size, stride, negate)


def _rebuild_parameter(*args) -> _TensorSpec:
    """``torch._utils._rebuild_parameter(data, requires_grad, hooks)``: an nn.Parameter."""
    if len(args) != 3:
        raise _Refused(f"_rebuild_parameter takes 3 arguments, got {len(args)}")
    data, requires_grad, hooks = args
    if not isinstance(data, _TensorSpec) or not isinstance(requires_grad, bool):
        raise _Refused("malformed nn.Parameter")
    _check_hooks(hooks)
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Function("collections.OrderedDict", _new_ordered_dict),
    ("torch._utils", "_rebuild_tensor_v2"): _Function("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function("torch._utils._rebuild_parameter", _rebuild_parameter),
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


def _lookup_global(module, name) -> _StandIn:
    """The allowlist itself: a stand-in for an allowed name, else refuse. Imports nothing."""
    standin = _ALLOWED_GLOBALS.get((module, name))
    if standin is None:
        if module == "torch" and isinstance(name, str) and name.endswith("Storage"):
            raise _Refused(f"unsupported storage type torch.{name}")
        raise _Refused(
            f"pickle refers to {module}.{name}, which is not allowed (only OrderedDict, "
            "torch tensor rebuilders and torch storage types may appear in a state dict)"
        )
    return standin


# --------------------------------------------------------------------------
# Pickle scanning and restricted unpickling
# --------------------------------------------------------------------------


def _scan_pickle(data: bytes, start: int = 0) -> int:
    """Check the opcodes of the pickle starting at ``data[start]``; return the offset after its STOP.

    Nothing is executed: ``genops`` only decodes. The first offence in file
    order is reported: a disallowed opcode, or a GLOBAL naming something off
    the allowlist (STACK_GLOBAL names are only known when unpickling, where
    ``find_class`` checks them).

    Memo indices must be sequential, as pickle writes them: the C unpickler
    grows (and zero-fills) its memo table up to the largest index it sees, so
    one ``LONG_BINPUT 2**31`` would cost gigabytes.
    """
    stream = io.BytesIO(data)
    stream.seek(start)
    memo_size = 0
    with _stage("corrupt pickle"):
        for index, (opcode, arg, pos) in enumerate(pickletools.genops(stream)):
            if opcode.name not in _ALLOWED_OPCODES:
                raise _Refused(f"pickle opcode {opcode.name} at byte {pos} is not allowed")
            if index == 0 and opcode.name != "PROTO":
                raise _Refused("data is not a binary pickle (no PROTO opcode)")
            if opcode.name == "PROTO" and arg not in _ALLOWED_PROTOCOLS:
                raise _Refused(f"pickle protocol {arg} is not supported")
            if opcode.name == "GLOBAL":
                _lookup_global(*arg.split(" ", 1))
            if opcode.name in ("BINPUT", "LONG_BINPUT") and arg > memo_size:
                raise _Refused(f"pickle memo index {arg} at byte {pos} is out of sequence")
            if opcode.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo_size += 1
    return stream.tell()


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that can only produce stand-ins and storage references."""

    def __init__(self, data: bytes, on_persistent_id=None):
        super().__init__(io.BytesIO(data))
        self._on_persistent_id = on_persistent_id

    def find_class(self, module, name):
        # Called for GLOBAL, STACK_GLOBAL, INST, OBJ and EXT*; never imports.
        return _lookup_global(module, name)

    def persistent_load(self, pid):
        if self._on_persistent_id is None:
            raise _Refused("unexpected persistent id in pickle")
        return self._on_persistent_id(pid)


def _unpickle(data: bytes, start: int = 0, on_persistent_id=None):
    """Scan, then unpickle the pickle at ``data[start:]``. Returns (object, end offset)."""
    end = _scan_pickle(data, start)
    if end - start > MAX_PICKLE_BYTES:
        raise _Refused(f"pickle of {end - start} bytes exceeds the limit of {MAX_PICKLE_BYTES}")
    with _stage("unpickling failed"):
        obj = _RestrictedUnpickler(data[start:end], on_persistent_id).load()
    return obj, end


class _StorageTable:
    """Storages seen in persistent ids, checked for consistency across references."""

    def __init__(self, pid_length: int):
        self.pid_length = pid_length  # 5 in the zip format, 6 in the legacy one
        self.refs: dict[str, _StorageRef] = {}

    def resolve(self, pid) -> _StorageRef:
        """Check one persistent id ``('storage', type, key, location, numel[, view])``."""
        if not isinstance(pid, tuple) or not pid:
            raise _Refused(f"persistent id {pid!r:.80} is not a tuple")
        if pid[0] == "module":
            raise _Refused("file contains a pickled nn.Module; save model.state_dict() instead")
        if pid[0] != "storage":
            raise _Refused(f"unknown persistent id kind {pid[0]!r:.40}")
        if len(pid) != self.pid_length:
            raise _Refused(f"storage persistent id {pid!r:.80} is not a {self.pid_length}-tuple")
        _, storage_type, key, location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"storage type {storage_type!r:.60} is not a torch storage class")
        if not isinstance(key, str) or not _STORAGE_KEY_RE.fullmatch(key):
            raise _Refused(f"storage key {key!r:.60} is malformed")
        if not isinstance(location, str):
            raise _Refused(f"storage location {location!r:.60} is not a string")
        numel = _check_count(numel, f"element count of storage {key!r}")
        if self.pid_length == 6 and pid[5] is not None:
            raise _Refused(f"storage {key!r} is a legacy storage view, which is not supported")
        ref = self.refs.get(key)
        if ref is None:
            ref = self.refs[key] = _StorageRef(key, storage_type, numel)
        elif ref.storage_type is not storage_type or ref.numel != numel:
            raise _Refused(f"storage {key!r} is declared twice with different types or sizes")
        return ref


# --------------------------------------------------------------------------
# Choosing the state dict and materialising arrays
# --------------------------------------------------------------------------


def _select_state_dict(obj) -> dict:
    """Return the flat ``str -> tensor`` mapping, possibly nested once under state_dict/model."""
    if not isinstance(obj, dict):
        raise _Refused(f"top-level object is a {type(obj).__name__}, expected a dict of tensors")
    if all(isinstance(v, _TensorSpec) for v in obj.values()):
        return _check_flat(obj)
    wrapped = [k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)]
    if len(wrapped) == 1:
        return _check_flat(obj[wrapped[0]], within=wrapped[0])
    if len(wrapped) == 2:
        raise _Refused("both 'state_dict' and 'model' entries are present; cannot tell which to use")
    return _check_flat(obj)  # raises, naming the first entry that is not a tensor


def _check_flat(mapping: dict, within: str | None = None) -> dict:
    where = f" in {within!r}" if within else ""
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise _Refused(f"key {key!r:.60}{where} is a {type(key).__name__}, not a str")
        if not isinstance(value, _TensorSpec):
            raise _Refused(
                f"entry {key!r:.80}{where} is a {type(value).__name__}, not a tensor "
                "(expected a flat mapping of names to tensors, optionally under 'state_dict' or 'model')"
            )
    return mapping


def _materialize(spec: _TensorSpec, data, big_endian: bool) -> np.ndarray:
    """Copy the view ``spec`` out of the storage bytes ``data`` into a new C-contiguous array."""
    st = spec.storage.storage_type
    raw = st.raw.newbyteorder(">" if big_endian else "<")
    itemsize = raw.itemsize
    if len(data) != spec.storage.numel * itemsize:  # checked earlier; never read past it
        raise _Refused(f"storage {spec.storage.key!r} has {len(data)} bytes, expected {spec.storage.numel * itemsize}")
    if spec.numel == 0:
        view = np.empty(spec.size, dtype=raw)
    else:
        # np.ndarray re-checks that the strided view fits in the buffer.
        view = np.ndarray(
            spec.size, dtype=raw, buffer=data, offset=spec.offset * itemsize,
            strides=tuple(s * itemsize for s in spec.stride),
        )  # fmt: skip
    out = np.empty(spec.size, dtype=st.output_dtype)
    if st.kind == "bfloat16":
        # bfloat16 is the top half of a float32: widen exactly by shifting.
        np.left_shift(view, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif st.kind == "bool":
        np.not_equal(view, 0, out=out)
    else:
        np.copyto(out, view)  # also byte-swaps big-endian data
    if spec.negate:
        np.negative(out, out=out)
    return out


# --------------------------------------------------------------------------
# Zip format
# --------------------------------------------------------------------------


def looks_like_torchscript(names) -> bool:
    """True if zip entry names look like a TorchScript archive (``<folder>/code/``, ``constants.pkl``)."""
    for name in names:
        parts = name.split("/")
        if (len(parts) >= 3 and parts[1] == "code") or parts[1:] == ["constants.pkl"]:
            return True
    return False


def _zip_layout(zf: zipfile.ZipFile, file_size: int) -> str:
    """Check zip hygiene and return the single top-level folder name."""
    infos = zf.infolist()
    names = [info.filename for info in infos]
    seen = set()
    for name in names:
        if name in seen:
            raise _Refused(f"zip has duplicate entries named {name!r}")
        seen.add(name)
    if looks_like_torchscript(names):
        raise _Refused("this is a TorchScript archive (torch.jit.save), not a state dict saved with torch.save")
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        if not pickles and names and all(n.endswith(".npy") for n in names):
            raise _Refused("zip has no data.pkl: this is a NumPy .npz archive, not a torch.save file")
        raise _Refused(f"zip must contain exactly one <folder>/data.pkl, found {len(pickles)}")
    prefix = pickles[0].split("/", 1)[0]
    if not prefix:
        raise _Refused("zip entry '/data.pkl' has an empty folder name")
    stray = [n for n in names if not n.startswith(prefix + "/")]
    if stray:
        raise _Refused(f"zip entries lie outside the folder {prefix!r}: {stray[0]!r}")
    total = 0
    for info in infos:
        if info.flag_bits & 0x1:
            raise _Refused(f"zip entry {info.filename!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise _Refused(f"zip entry {info.filename!r} is compressed (torch.save stores entries uncompressed)")
        total += info.file_size
    if total > file_size:
        raise _Refused(f"zip entries declare {total} bytes but the file has only {file_size}")
    return prefix


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """Read one stored entry, verifying its CRC-32.

    torch.save with ``set_crc32_options(False)`` writes CRC 0 and torch.load
    skips the check; do the same, but only for entries whose CRC is exactly 0.
    """
    if info.CRC == 0 and info.file_size:
        info = copy.copy(info)
        del info.CRC  # zipfile skips the check when the attribute is absent
    with _stage(f"cannot read zip entry {info.filename!r}"):
        data = zf.read(info)
    if len(data) != info.file_size:
        raise _Refused(f"zip entry {info.filename!r} is truncated")
    return data


def _read_zip(f, source_size: int) -> dict[str, np.ndarray]:
    """Read a torch >= 1.6 zip-format file from the open binary file ``f``."""
    with _stage("not a readable zip archive"):
        zf = zipfile.ZipFile(f)
    with zf:
        prefix = _zip_layout(zf, source_size)
        infos = {info.filename: info for info in zf.infolist()}

        big_endian = False
        if f"{prefix}/byteorder" in infos:  # absent in files older than torch 1.10 or so
            order = _read_member(zf, infos[f"{prefix}/byteorder"])
            if order not in (b"little", b"big"):
                raise _Refused(f"byteorder record is {order[:20]!r}, expected b'little' or b'big'")
            big_endian = order == b"big"

        pkl_info = infos[f"{prefix}/data.pkl"]
        if pkl_info.file_size > MAX_PICKLE_BYTES:
            raise _Refused(f"data.pkl of {pkl_info.file_size} bytes exceeds the limit of {MAX_PICKLE_BYTES}")
        pkl = _read_member(zf, pkl_info)

        storages = _StorageTable(pid_length=5)

        def on_persistent_id(pid):
            ref = storages.resolve(pid)
            record = infos.get(f"{prefix}/data/{ref.key}")
            if record is None:
                raise _Refused(f"storage record data/{ref.key} is missing")
            expected = ref.numel * ref.storage_type.raw.itemsize
            if record.file_size != expected:
                raise _Refused(
                    f"storage record data/{ref.key} has {record.file_size} bytes, expected {expected} "
                    f"({ref.numel} x {ref.storage_type.qualname})"
                )
            return ref

        obj, end = _unpickle(pkl, 0, on_persistent_id)
        if end != len(pkl):
            raise _Refused(f"data.pkl has {len(pkl) - end} unexpected bytes after the pickle")
        state = _select_state_dict(obj)

        cache: dict[str, bytes] = {}

        def storage_bytes(key: str) -> bytes:
            if key not in cache:
                cache[key] = _read_member(zf, infos[f"{prefix}/data/{key}"])
            return cache[key]

        return _materialize_all(state, storage_bytes, big_endian)


def _materialize_all(state: dict, storage_bytes, big_endian: bool) -> dict[str, np.ndarray]:
    """Materialise every tensor, keeping the total output under MAX_OUTPUT_BYTES."""
    budget = MAX_OUTPUT_BYTES
    out = {}
    for key, spec in state.items():
        nbytes = spec.numel * spec.storage.storage_type.output_dtype.itemsize
        if nbytes > budget:
            raise _Refused(f"tensor {key!r} would take the output past {MAX_OUTPUT_BYTES} bytes")
        budget -= nbytes
        with _stage(f"cannot decode tensor {key!r}"):
            out[key] = _materialize(spec, storage_bytes(spec.storage.key), big_endian)
    return out


# --------------------------------------------------------------------------
# Legacy format
# --------------------------------------------------------------------------


def _read_legacy(data: bytes) -> dict[str, np.ndarray]:
    """Read a pre-1.6 / ``_use_new_zipfile_serialization=False`` file held in memory."""
    magic, pos = _unpickle(data, 0)
    if not _is_int(magic) or magic != _LEGACY_MAGIC_NUMBER:
        raise _Refused("bad magic number for a legacy torch file")
    version, pos = _unpickle(data, pos)
    if not _is_int(version) or version != _LEGACY_PROTOCOL_VERSION:
        raise _Refused(f"legacy torch protocol version {version!r:.40} is not supported")
    sys_info, pos = _unpickle(data, pos)
    if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian"), bool):
        raise _Refused("legacy system info is malformed")
    if not sys_info["little_endian"]:
        raise _Refused("legacy file written on a big-endian machine is not supported (re-save it in the zip format)")

    storages = _StorageTable(pid_length=6)
    obj, pos = _unpickle(data, pos, storages.resolve)
    keys, pos = _unpickle(data, pos)
    state = _select_state_dict(obj)

    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Refused("legacy storage key list is malformed")
    if len(set(keys)) != len(keys) or set(keys) != set(storages.refs):
        raise _Refused("legacy storage key list does not match the storages the pickle refers to")

    # The records follow in list order: int64 element count, then the raw bytes.
    records = {}
    view = memoryview(data)
    for key in keys:
        ref = storages.refs[key]
        if pos + 8 > len(data):
            raise _Refused(f"file is truncated: storage {key!r} is missing")
        (count,) = struct.unpack_from("<q", data, pos)
        if count != ref.numel:
            raise _Refused(f"storage {key!r} record holds {count} elements, the pickle declares {ref.numel}")
        nbytes = count * ref.storage_type.raw.itemsize
        pos += 8
        if pos + nbytes > len(data):
            raise _Refused(f"file is truncated: storage {key!r} has {len(data) - pos} of {nbytes} bytes")
        records[key] = view[pos : pos + nbytes]
        pos += nbytes
    if pos != len(data):
        raise _Refused(f"{len(data) - pos} unexpected bytes after the last storage")
    return _materialize_all(state, records.__getitem__, big_endian=False)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def read_torch_file(path) -> dict[str, np.ndarray]:
    """Read the tensors of a ``torch.save`` file as NumPy arrays, without torch.

    Args:
        path: a path (str or ``os.PathLike``) to a file written by ``torch.save``
            in the zip format or the legacy format. The saved object must be a
            flat mapping of ``str`` to tensors (a ``state_dict()``), or a dict
            holding one under ``'state_dict'`` or ``'model'``.

    Returns:
        A dict, in file order, of new C-contiguous arrays that own their data.
        dtypes follow the storage: float32/64/16, int64/32/16/8, uint8, bool;
        bfloat16 is widened exactly to float32. Big-endian zip files are
        byte-swapped to native order.

    Raises:
        WeightsFormatError: the file is missing, unreadable, malformed, hostile
            or not a torch.save file; the message names the file and the reason.
    """
    source = os.fspath(path)
    try:
        try:
            f = open(source, "rb")
        except OSError as exc:
            raise _Refused(f"cannot open file: {exc.strerror or exc}") from exc
        with f:
            with _stage("cannot read file"):
                size = os.fstat(f.fileno()).st_size
                head = f.read(32)
                f.seek(0)
            if not head:
                raise _Refused("file is empty")
            if head.startswith(_ZIP_MAGIC):
                return _read_zip(f, size)
            if head[:1] == b"\x80" and _LEGACY_MAGIC_BYTES in head:
                with _stage("cannot read file"):
                    data = f.read()
                return _read_legacy(data)
            raise _Refused("not a torch.save file (neither a zip archive nor a legacy torch pickle)")
    except _Refused as exc:
        raise WeightsFormatError(format_error(source, str(exc))) from exc.__cause__
