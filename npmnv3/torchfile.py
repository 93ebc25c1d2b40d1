"""Read ``torch.save`` files without torch and without executing anything.

A ``torch.save`` file is a pickle plus raw storage bytes. Unpickling an
untrusted pickle can run arbitrary code, so this module never calls
``pickle.load`` on one. Instead every pickle goes through two gates:

1. ``pickletools.genops`` walks the opcodes (it decodes, it never executes)
   and refuses any opcode outside a small allowlist and any ``GLOBAL`` outside
   the allowlist of names. The walk also follows the unpickler's stack, so it
   knows how deeply containers will nest before anything is built.
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
  the raw bytes. The file is read piece by piece, never whole.

Limits
------
Each limit is checked before the work it bounds, so refusing a file costs
little whatever its size, and each has wide headroom over real files. For
scale: torchvision's MobileNetV3, LR-ASPP, DeepLabV3 and SSDLite state dicts
(10-45 MB) have pickles of 36-80 KB with 9,000-18,000 opcodes and 250-480 zip
entries; a quantization-aware-trained MobileNetV3-Large (observer buffers on
every layer) has 1,571 tensors, a 258 KB pickle of 51,000 opcodes, 1,561 zip
entries and a 91 KB zip directory.

``MAX_PICKLE_BYTES`` (4 MiB)
    The zip's ``data.pkl`` (its declared size is checked before it is read),
    or the five pickles at the start of a legacy file together (no more of
    the file is read to find them).
``MAX_PICKLE_OPCODES`` (500,000)
    Opcodes in one file's pickles. The opcode walk is pure Python (0.3-0.6
    microseconds per opcode), so this bounds its time to a fraction of a second.
``MAX_DEPTH`` (32)
    Nesting of containers: tuples, lists, dicts, objects and open MARKs. The
    state dicts above need 3 levels, a checkpoint holding one next to an
    optimizer's state 5. CPython hashes nested tuples recursively in C with no
    depth check, so a dict key nested 200,000 tuples deep would overflow the C
    stack and kill the process; the walk refuses such a pickle, naming the
    depth and byte, before any of it is built.
``MAX_RANK`` (8)
    Tensor rank.
``MAX_ZIP_ENTRIES`` (20,000) and ``MAX_ZIP_DIRECTORY_BYTES`` (2 MiB)
    The zip's central directory, as its end record declares it: ``zipfile``
    parses every entry up front (about 5 microseconds and 1 KB each).
``MAX_OUTPUT_RATIO`` (4), ``SMALL_OUTPUT_BYTES`` (16 MiB), ``MAX_OUTPUT_BYTES`` (4 GiB)
    The returned arrays may add up to 4 times the storage bytes the file
    holds (bfloat16 widens to float32, twice the bytes; a tensor saved under
    two names counts twice), or to 16 MiB if that is more, and never to more
    than 4 GiB. Zero-stride views (``expand``) can describe far more elements
    than a storage holds; one that would break the limit is refused, naming
    the tensor, before anything is allocated.

Every failure raises :class:`npmnv3.errors.WeightsFormatError` naming the file
and the reason, chained to the underlying exception when there is one. Whatever
the stage (RecursionError, MemoryError and OverflowError included), the
message describes values by type and a bounded excerpt, never by a full repr.
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

# --------------------------------------------------------------------------- limits (see the module docstring)

#: Largest pickle accepted: data.pkl, or a legacy file's five pickles together.
MAX_PICKLE_BYTES = 4 * 2**20
#: Most opcodes accepted in one file's pickles (this bounds the opcode walk's time).
MAX_PICKLE_OPCODES = 500_000
#: Deepest nesting of containers (tuples, lists, dicts, objects, open MARKs).
MAX_DEPTH = 32
#: Highest tensor rank accepted.
MAX_RANK = 8
#: Most entries, and largest central directory, of a zip archive.
MAX_ZIP_ENTRIES = 20_000
MAX_ZIP_DIRECTORY_BYTES = 2 * 2**20
#: The returned arrays may take this many times the storage bytes in the file ...
MAX_OUTPUT_RATIO = 4
#: ... or this many bytes if that is more ...
SMALL_OUTPUT_BYTES = 16 * 2**20
#: ... and never more than this.
MAX_OUTPUT_BYTES = 4 * 2**30
#: Sizes, strides, offsets and element counts are int64 in torch.
_INT64_MAX = 2**63 - 1

# --------------------------------------------------------------------------- recognising the layouts

#: First bytes of a zip archive: a local file header, or the end record of an empty archive.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# ``pickle.dump(0x1950A86A20F9469CFC6C)`` stores these 10 bytes after LONG1.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
#: The legacy format's magic number as it appears in the file's first pickle.
LEGACY_MAGIC = _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_PROTOCOL_VERSION = 1001


def is_legacy_torch_file(head: bytes) -> bool:
    """True if ``head`` (a file's first 32 bytes or more) starts a legacy ``torch.save`` file."""
    return head[:1] == b"\x80" and LEGACY_MAGIC in head[:32]


# Storage keys are decimal strings in every torch version; allow a little more.
_STORAGE_KEY_RE = re.compile(r"[0-9A-Za-z_]{1,64}", re.ASCII)

# Opcodes torch.save emits (protocol 2 by default, 4 if asked), and nothing
# more. Notably absent: INST, OBJ, NEWOBJ(_EX) (build arbitrary classes), EXT1/2/4
# (extension registry), PERSID (text persistent ids), byte strings, buffers,
# POP (which would let the stack model below lose track of a container),
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


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, marked when cut (for messages built from file content)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def excerpt(text: str, limit: int = 60) -> str:
    """The repr of a string from a file, cut to ``limit`` characters first (a repr of all of it may be huge)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def exception_text(exc: BaseException) -> str:
    """``"<Type>: <message>"`` with the message clipped; safe even if ``str(exc)`` fails."""
    try:
        text = clip(str(exc))
    except Exception:  # noqa: BLE001 - a message that cannot be rendered is left out
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _stage(what: str):
    """Turn any unexpected exception inside the block into ``_Refused("<what>: ...")``."""
    try:
        yield
    except _Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser failure is a format error
        raise _Refused(f"{what}: {exception_text(exc)}") from exc


def _is_int(value) -> bool:
    """True for Python ints that are not bools (``True`` would pass isinstance(int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    """What an unpickled value is, in the user's terms ("tensor", "OrderedDict", "int", ...)."""
    if value is None:
        return "None"
    if isinstance(value, _StandIn):
        return value.kind
    if isinstance(value, _PickledDict):
        return "OrderedDict"
    return type(value).__name__


def _a_kind(value) -> str:
    """``_kind`` with its article: "a tensor", "an int", "None"."""
    kind = _kind(value)
    if value is None:
        return kind
    return f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}"


def _count(n: int, noun: str) -> str:
    """``"1 item"``, ``"3 items"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _int_text(value: int) -> str:
    """An int for a message: its digits, unless it is too long to be useful (LONG1 holds up to 2040 bits)."""
    return str(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"


def _describe(value) -> str:
    """A noun phrase for an unpickled value ("the int 3", "a tuple of 2 items", "a tensor").

    Never a full repr: a value from a hostile pickle may be megabytes long,
    and repr of deeply nested containers recurses.
    """
    if value is None or isinstance(value, bool):
        return repr(value)
    if _is_int(value):
        return f"the int {value}" if value.bit_length() <= 64 else _int_text(value)
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        if len(value) <= 60:
            return f"the str {value!r}"
        return f"a str of {len(value)} characters starting {value[:40]!r}"
    if isinstance(value, (tuple, list, dict)):
        return f"{_a_kind(value)} of {_count(len(value), 'item')}"
    if isinstance(value, _StandIn):
        return value.what
    return _a_kind(value)


def _check_count(value, what: str) -> int:
    """Require an int64-range non-negative int (sizes, strides, offsets, counts)."""
    if not _is_int(value):
        raise _Refused(f"{what} must be an int, got {_kind(value)}")
    if not 0 <= value <= _INT64_MAX:
        raise _Refused(f"{what} must be in [0, 2**63), got {_int_text(value)}")
    return value


# --------------------------------------------------------------------------- stand-ins handed out by find_class


class _StandIn:
    """Base of every object the unpickler can obtain by name.

    ``__slots__`` leaves no ``__dict__``, and ``__setstate__`` refuses, so a
    hostile BUILD opcode cannot set attributes on (and so reprogram) a stand-in.
    Every other use a pickle can make of one (call it, store into it, append
    to it) is refused too, with a message naming what it stands for.

    ``what`` names the object ("torch.FloatStorage", "storage '3'", "a tensor"),
    ``kind`` says what sort of thing it is ("storage type", "storage", "tensor").
    """

    __slots__ = ("what",)
    kind = "object"

    def __init__(self, what: str):
        self.what = what

    def __setstate__(self, state):
        raise _Refused(f"pickle tries to set state on {self.what}")

    def __call__(self, *args):
        raise _Refused(f"pickle calls {self.what}, which is not callable here")

    def __setitem__(self, key, value):
        raise _Refused(f"pickle stores an item into {self.what}, which is not a dict")

    def append(self, item):
        raise _Refused(f"pickle appends to {self.what}, which is not a list")

    def __repr__(self):
        return f"<{self.what}>"


class _StorageType(_StandIn):
    """Stand-in for ``torch.<X>Storage``: how to decode that storage's bytes.

    ``raw`` is the little-endian element dtype as stored; ``decoding`` says how
    to turn it into the returned dtype ("plain": as is, "bfloat16": widen u2 to
    float32 by ``<< 16``, "bool": any non-zero byte is True).
    """

    __slots__ = ("raw", "decoding")
    kind = "storage type"

    def __init__(self, name: str, raw: str, decoding: str = "plain"):
        super().__init__(f"torch.{name}")
        self.raw = np.dtype(raw)
        self.decoding = decoding

    @property
    def output_dtype(self) -> np.dtype:
        if self.decoding == "bfloat16":
            return np.dtype(np.float32)
        if self.decoding == "bool":
            return np.dtype(np.bool_)
        return self.raw.newbyteorder("=")


_STORAGE_TYPES = {
    st.what.split(".", 1)[1]: st
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
    kind = "storage"

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        super().__init__(f"storage {key!r}")
        self.key = key
        self.storage_type = storage_type
        self.numel = numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage_type.raw.itemsize


class _TensorSpec(_StandIn):
    """A validated tensor description: a strided view into one storage."""

    __slots__ = ("storage", "offset", "size", "stride", "negate")
    kind = "tensor"

    def __init__(self, storage, offset, size, stride, negate=False):
        super().__init__("a tensor")
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
    Like the stand-ins, it refuses the other uses a pickle could make of it.
    """

    def __setstate__(self, state):
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise _Refused("pickle sets unexpected state on an OrderedDict")

    def __call__(self, *args):
        raise _Refused("pickle calls an OrderedDict, which is not callable")

    def append(self, item):
        raise _Refused("pickle appends to an OrderedDict, which is not a list")

    def __hash__(self):
        raise _Refused("pickle uses an OrderedDict as a dict key")


class _Function(_StandIn):
    """Stand-in for an allowed callable; calls our own checked implementation."""

    __slots__ = ("impl",)
    kind = "function"

    def __init__(self, what: str, impl):
        super().__init__(what)
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
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise _Refused(f"tensor metadata is {_describe(metadata)}, expected a dict of str keys")
    unknown = [k for k in metadata if k not in ("neg", "conj")]
    if unknown:
        raise _Refused(f"unsupported tensor metadata {excerpt(unknown[0])} (only 'neg' and 'conj' are known)")
    if any(not isinstance(v, bool) for v in metadata.values()):
        raise _Refused("unsupported tensor metadata: 'neg' and 'conj' must be bools")
    if metadata.get("conj"):
        raise _Refused("tensor has the conjugate bit set (complex tensors are not supported)")
    return bool(metadata.get("neg"))


def _check_shape(values, what: str) -> tuple:
    if not isinstance(values, (tuple, list)):
        raise _Refused(f"tensor {what} must be a tuple, got {_kind(values)}")
    if len(values) > MAX_RANK:
        raise _Refused(f"tensor rank {len(values)} exceeds the limit of {MAX_RANK}")
    return tuple(_check_count(v, f"tensor {what} entry") for v in values)


def _make_tensor_spec(storage, offset, size, stride, negate=False) -> _TensorSpec:
    """Validate a strided view completely before anything reads through it."""
    if not isinstance(storage, _StorageRef):
        raise _Refused(f"tensor storage must be a storage reference, got {_a_kind(storage)}")
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
    if negate and storage.storage_type.decoding == "bool":
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
        module, name = clip(str(module), 100), clip(str(name), 100)
        if module == "torch" and name.endswith("Storage"):
            raise _Refused(f"unsupported storage type torch.{name}")
        raise _Refused(
            f"pickle refers to {module}.{name}, which is not allowed (only OrderedDict, "
            "torch tensor rebuilders and torch storage types may appear in a state dict)"
        )
    return standin


# --------------------------------------------------------------------------- scanning and unpickling

# Opcodes that push one value holding no container (a stand-in, for GLOBAL).
_PUSH_LEAF = frozenset(
    {"NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
     "BINUNICODE", "SHORT_BINUNICODE", "GLOBAL"}
)  # fmt: skip
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _depth(entry) -> int:
    return entry if entry.__class__ is int else entry[0]


def _scan_pickle(data: bytes, start: int = 0, max_opcodes: int = MAX_PICKLE_OPCODES, cut: bool = False):
    """Check the opcodes of the pickle at ``data[start:]``; return (offset after its STOP, opcodes).

    Nothing is executed: ``genops`` only decodes. The first offence in file
    order is reported: a disallowed opcode, or a GLOBAL naming something off
    the allowlist (STACK_GLOBAL names are only known when unpickling, where
    ``find_class`` checks them), and the limits on opcodes and nesting.
    ``cut`` says that ``data`` stops at MAX_PICKLE_BYTES before the file does.

    Memo indices must be sequential, as pickle writes them: the C unpickler
    grows (and zero-fills) its memo table up to the largest index it sees, so
    one ``LONG_BINPUT 2**31`` would cost gigabytes.

    Nesting is followed on a model of the unpickler's stack (same pops, same
    MARK boundaries): each entry is the depth of the value it stands for, an
    int, or, for a list, dict or object still open to SETITEM(S)/APPEND(S), a
    mutable ``[depth, referred_to]`` shared with the memo. A depth only grows
    while the value sits on the stack, so it is final once the value is stored
    into another. Only such open values may be filled, and not once BINGET has
    handed out a second reference to them (which only self-referencing data
    does): then no container can grow after it has been stored, and every
    recorded depth is at least the real one.
    """
    stream = io.BytesIO(data)
    stream.seek(start)
    stack: list = []
    marks: list[int] = []  # stack heights at each open MARK
    fence = 0  # the unpickler never pops below the last MARK
    memo: dict = {}
    index = -1

    def refuse_depth(depth, pos):
        raise _Refused(
            f"pickle nests containers {depth} levels deep at byte {pos}, over the limit of {MAX_DEPTH} "
            "(a state dict needs fewer than 10)"
        )

    def underflow(name, pos):
        raise _Refused(f"pickle opcode {name} at byte {pos} takes more values than the stack holds")

    def fill(name, pos, target, depth):
        """Items of nesting ``depth`` go into the container ``target``: it must be open, and it is now
        at least that deep."""
        if target.__class__ is int:
            raise _Refused(
                f"pickle opcode {name} at byte {pos} modifies a value that is not a list, dict or object being built"
            )
        if target[1]:
            raise _Refused(
                f"pickle opcode {name} at byte {pos} modifies a container it already refers to elsewhere "
                "(a self-referencing structure, which no state dict has)"
            )
        if depth > target[0]:
            if depth > MAX_DEPTH:
                refuse_depth(depth, pos)
            target[0] = depth

    try:
        with _stage("corrupt pickle"):
            for index, (opcode, arg, pos) in enumerate(pickletools.genops(stream)):
                name = opcode.name
                if name not in _ALLOWED_OPCODES:
                    raise _Refused(f"pickle opcode {name} at byte {pos} is not allowed")
                if index == 0 and name != "PROTO":
                    raise _Refused("data is not a binary pickle (no PROTO opcode)")
                if index >= max_opcodes:
                    raise _Refused(
                        f"pickle has more than {MAX_PICKLE_OPCODES} opcodes (at byte {pos}), the limit for a state dict"
                    )
                if name in _PUSH_LEAF:
                    if name == "GLOBAL":
                        _lookup_global(*arg.split(" ", 1))
                    stack.append(0)
                elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    if name == "MEMOIZE":
                        arg = len(memo)
                    elif arg > len(memo):
                        raise _Refused(f"pickle memo index {arg} at byte {pos} is out of sequence")
                    if len(stack) <= fence:
                        underflow(name, pos)
                    memo[arg] = stack[-1]
                elif name in ("BINGET", "LONG_BINGET"):
                    entry = memo.get(arg)
                    if entry is None:
                        raise _Refused(f"pickle opcode {name} at byte {pos} reads memo index {arg}, never stored")
                    if entry.__class__ is not int:
                        entry[1] = True  # a second reference: the container may not grow any more
                        entry = entry[0]
                    stack.append(entry)
                elif name == "MARK":
                    marks.append(len(stack))
                    fence = len(stack)
                    if len(marks) > MAX_DEPTH:
                        refuse_depth(len(marks), pos)
                elif name in ("TUPLE", "SETITEMS", "APPENDS"):
                    if not marks:
                        raise _Refused(f"pickle opcode {name} at byte {pos} has no MARK to close")
                    mark = marks.pop()
                    fence = marks[-1] if marks else 0
                    items = stack[mark:]
                    del stack[mark:]
                    depth = 1 + max(map(_depth, items), default=0)
                    if name == "TUPLE":
                        if depth > MAX_DEPTH:
                            refuse_depth(depth, pos)
                        stack.append(depth)
                        continue
                    if len(stack) <= fence:
                        underflow(name, pos)
                    if name == "SETITEMS" and len(items) % 2:
                        raise _Refused(f"pickle opcode SETITEMS at byte {pos} has an odd number of items")
                    fill(name, pos, stack[-1], depth)
                elif name in _TUPLE_SIZES:
                    n = _TUPLE_SIZES[name]
                    if len(stack) - fence < n:
                        underflow(name, pos)
                    depth = 1 + max(map(_depth, stack[-n:]))
                    del stack[-n:]
                    if depth > MAX_DEPTH:
                        refuse_depth(depth, pos)
                    stack.append(depth)
                elif name == "EMPTY_TUPLE":
                    stack.append(1)
                elif name in ("EMPTY_LIST", "EMPTY_DICT"):
                    stack.append([1, False])
                elif name in ("SETITEM", "APPEND"):
                    n = 2 if name == "SETITEM" else 1
                    if len(stack) - fence < n + 1:
                        underflow(name, pos)
                    depth = 1 + max(map(_depth, stack[-n:]))
                    del stack[-n:]
                    fill(name, pos, stack[-1], depth)
                elif name in ("REDUCE", "STACK_GLOBAL", "BUILD"):
                    # REDUCE: callable and arguments become a new object, open to SETITEMS
                    # (OrderedDict() is filled that way). STACK_GLOBAL: two names become a
                    # stand-in. BUILD: every __setstate__ here refuses or drops its state.
                    if len(stack) - fence < 2:
                        underflow(name, pos)
                    if name == "BUILD":
                        stack.pop()
                    else:
                        del stack[-2:]
                        stack.append([1, False] if name == "REDUCE" else 0)
                elif name == "BINPERSID":
                    if len(stack) <= fence:
                        underflow(name, pos)
                    stack[-1] = 0  # the persistent id becomes a storage reference
                elif name == "PROTO":
                    if arg not in _ALLOWED_PROTOCOLS:
                        raise _Refused(f"pickle protocol {arg} is not supported")
                # FRAME and STOP change nothing here.
    except _Refused as exc:
        if cut and exc.__cause__ is not None and stream.tell() >= len(data):  # genops ran out of bytes
            raise _Refused(
                f"pickle runs past {MAX_PICKLE_BYTES} bytes from the start of the file, the limit for a state dict"
            ) from None
        raise
    return stream.tell(), index + 1


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


def _unpickle(data: bytes, start: int = 0, on_persistent_id=None, max_opcodes=MAX_PICKLE_OPCODES, cut=False):
    """Scan, then unpickle the pickle at ``data[start:]``. Returns (object, end offset, opcodes)."""
    end, opcodes = _scan_pickle(data, start, max_opcodes, cut)
    with _stage("unpickling failed"):
        obj = _RestrictedUnpickler(data[start:end], on_persistent_id).load()
    return obj, end, opcodes


class _StorageTable:
    """Storages seen in persistent ids, checked for consistency across references."""

    def __init__(self, pid_length: int):
        self.pid_length = pid_length  # 5 in the zip format, 6 in the legacy one
        self.refs: dict[str, _StorageRef] = {}

    def resolve(self, pid) -> _StorageRef:
        """Check one persistent id ``('storage', type, key, location, numel[, view])``."""
        if not isinstance(pid, tuple) or not pid:
            raise _Refused(f"persistent id is {_describe(pid)}, expected a tuple")
        if pid[0] == "module":
            raise _Refused("file contains a pickled nn.Module; save model.state_dict() instead")
        if pid[0] != "storage":
            raise _Refused(f"persistent id of unknown kind: {_describe(pid[0])}")
        if len(pid) != self.pid_length:
            raise _Refused(f"storage persistent id has {_count(len(pid), 'item')}, expected {self.pid_length}")
        _, storage_type, key, location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"storage type is {_describe(storage_type)}, not a torch storage class")
        if not isinstance(key, str) or not _STORAGE_KEY_RE.fullmatch(key):
            raise _Refused(f"malformed storage key: {_describe(key)}")
        if not isinstance(location, str):
            raise _Refused(f"storage location is {_describe(location)}, not a str")
        numel = _check_count(numel, f"element count of storage {key!r}")
        if self.pid_length == 6 and pid[5] is not None:
            raise _Refused(f"storage {key!r} is a legacy storage view, which is not supported")
        ref = self.refs.get(key)
        if ref is None:
            ref = self.refs[key] = _StorageRef(key, storage_type, numel)
        elif ref.storage_type is not storage_type or ref.numel != numel:
            raise _Refused(f"storage {key!r} is declared twice with different types or sizes")
        return ref


# --------------------------------------------------------------------------- the state dict and its arrays


def _select_state_dict(obj) -> dict:
    """Return the flat ``str -> tensor`` mapping, possibly nested once under state_dict/model."""
    if not isinstance(obj, dict):
        raise _Refused(f"top-level object is {_a_kind(obj)}, expected a dict of tensors (a state_dict)")
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
            raise _Refused(f"a key{where} is {_describe(key)}, not a str")
        if not isinstance(value, _TensorSpec):
            raise _Refused(
                f"entry {excerpt(key, 80)}{where} is {_a_kind(value)}, not a tensor "
                "(expected a flat mapping of names to tensors, optionally under 'state_dict' or 'model')"
            )
    return mapping


def shape_text(size: tuple) -> str:
    """A shape for messages: "3x4", or "0-d"."""
    return "x".join(map(str, size)) if size else "0-d"


def output_limit(ratio: int, stored_bytes: int) -> int:
    """Bytes of arrays a file may produce: ``ratio`` times what it stores, within the fixed bounds."""
    return min(MAX_OUTPUT_BYTES, max(SMALL_OUTPUT_BYTES, ratio * stored_bytes))


def _check_output_size(state: dict) -> None:
    """Refuse, before allocating anything, tensors that would add up to far more than the file holds."""
    stored = {spec.storage.key: spec.storage for spec in state.values()}
    present = sum(ref.nbytes for ref in stored.values())
    limit = output_limit(MAX_OUTPUT_RATIO, present)
    total = 0
    for key, spec in state.items():
        dtype = spec.storage.storage_type.output_dtype
        nbytes = spec.numel * dtype.itemsize
        total += nbytes
        if total > limit:
            zero_stride = " zero-stride" if spec.numel > spec.storage.numel else ""
            raise _Refused(
                f"tensor {excerpt(key)} ({shape_text(spec.size)} {dtype}, {nbytes} bytes, a{zero_stride} view of "
                f"{_count(spec.storage.numel, 'stored element')}) would take the output past {limit} bytes, "
                f"the limit for a file holding {present} bytes of tensor data ({MAX_OUTPUT_RATIO}x that, "
                f"at least {SMALL_OUTPUT_BYTES} and at most {MAX_OUTPUT_BYTES})"
            )


def _materialize(spec: _TensorSpec, data, big_endian: bool) -> np.ndarray:
    """Copy the view ``spec`` out of the storage bytes ``data`` into a new C-contiguous array."""
    st = spec.storage.storage_type
    raw = st.raw.newbyteorder(">" if big_endian else "<")
    itemsize = raw.itemsize
    if len(data) != spec.storage.nbytes:  # checked earlier; never read past it
        raise _Refused(f"{spec.storage.what} has {len(data)} bytes, expected {spec.storage.nbytes}")
    if spec.numel == 0:
        view = np.empty(spec.size, dtype=raw)
    else:
        # np.ndarray re-checks that the strided view fits in the buffer.
        view = np.ndarray(
            spec.size, dtype=raw, buffer=data, offset=spec.offset * itemsize,
            strides=tuple(s * itemsize for s in spec.stride),
        )  # fmt: skip
    out = np.empty(spec.size, dtype=st.output_dtype)
    if st.decoding == "bfloat16":
        # bfloat16 is the top half of a float32: widen exactly by shifting.
        np.left_shift(view, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif st.decoding == "bool":
        np.not_equal(view, 0, out=out)
    else:
        np.copyto(out, view)  # also byte-swaps big-endian data
    if spec.negate:
        np.negative(out, out=out)
    return out


def _materialize_all(state: dict, storage_bytes, big_endian: bool) -> dict[str, np.ndarray]:
    """Check the output size of every tensor, then materialise each in file order."""
    _check_output_size(state)
    out = {}
    for key, spec in state.items():
        with _stage(f"cannot decode tensor {excerpt(key)}"):
            out[key] = _materialize(spec, storage_bytes(spec.storage.key), big_endian)
    return out


# --------------------------------------------------------------------------- zip format

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def zip_directory_problem(f, file_size: int) -> str | None:
    """Why the zip archive in ``f`` is refused before ``zipfile`` parses its directory; None if it is not.

    ``zipfile.ZipFile`` reads and parses the whole central directory at once
    (about 5 microseconds and 1 KB per entry), however many entries the end
    record declares. This reads only the end record, finding it where zipfile
    does (the last 22 bytes, else the last signature within 64 KiB of the
    end, then a zip64 record just before it), and bounds the directory's size
    and entry count. A file without a readable end record is left for zipfile
    to reject.
    """
    tail_size = min(file_size, _EOCD.size + 2**16)  # as far back as zipfile searches (the longest comment, and more)
    f.seek(file_size - tail_size)
    tail = f.read(tail_size)
    at = len(tail) - _EOCD.size
    if not (at >= 0 and tail[at : at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            return None
    entries, directory_bytes = _EOCD.unpack_from(tail, at)[4:6]
    locator_at = file_size - tail_size + at - _ZIP64_LOCATOR.size
    if locator_at - _ZIP64_EOCD.size >= 0:
        f.seek(locator_at - _ZIP64_EOCD.size)
        record = f.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
        if record[-_ZIP64_LOCATOR.size :][:4] == b"PK\x06\x07" and record[:4] == b"PK\x06\x06":
            entries, directory_bytes = _ZIP64_EOCD.unpack_from(record)[7:9]
    if entries > MAX_ZIP_ENTRIES:
        return f"zip archive declares {entries} entries, over the limit of {MAX_ZIP_ENTRIES}"
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        return f"zip archive's directory declares {directory_bytes} bytes, over the limit of {MAX_ZIP_DIRECTORY_BYTES}"
    return None


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
            raise _Refused(f"zip has duplicate entries named {excerpt(name)}")
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
        raise _Refused(f"zip entries lie outside the folder {excerpt(prefix)}: {excerpt(stray[0])}")
    total = 0
    for info in infos:
        if info.flag_bits & 0x1:
            raise _Refused(f"zip entry {excerpt(info.filename)} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise _Refused(f"zip entry {excerpt(info.filename)} is compressed (torch.save stores entries uncompressed)")
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
    with _stage(f"cannot read zip entry {excerpt(info.filename)}"):
        data = zf.read(info)
    if len(data) != info.file_size:
        raise _Refused(f"zip entry {excerpt(info.filename)} is truncated")
    return data


def _read_zip(f, source_size: int) -> dict[str, np.ndarray]:
    """Read a torch >= 1.6 zip-format file from the open binary file ``f``."""
    with _stage("not a readable zip archive"):
        problem = zip_directory_problem(f, source_size)
        if problem is None:
            f.seek(0)
            zf = zipfile.ZipFile(f)
    if problem:
        raise _Refused(problem)
    with zf:
        prefix = _zip_layout(zf, source_size)
        infos = {info.filename: info for info in zf.infolist()}

        big_endian = False
        if f"{prefix}/byteorder" in infos:  # absent in files older than torch 1.10 or so
            order_info = infos[f"{prefix}/byteorder"]
            if order_info.file_size > len(b"little"):
                raise _Refused(f"byteorder record has {order_info.file_size} bytes, expected b'little' or b'big'")
            order = _read_member(zf, order_info)
            if order not in (b"little", b"big"):
                raise _Refused(f"byteorder record is {order!r}, expected b'little' or b'big'")
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
            if record.file_size != ref.nbytes:
                raise _Refused(
                    f"storage record data/{ref.key} has {record.file_size} bytes, expected {ref.nbytes} "
                    f"({ref.numel} x {ref.storage_type.what})"
                )
            return ref

        obj, end, _ = _unpickle(pkl, 0, on_persistent_id)
        if end != len(pkl):
            raise _Refused(f"data.pkl has {len(pkl) - end} unexpected bytes after the pickle")
        state = _select_state_dict(obj)

        cache: dict[str, bytes] = {}

        def storage_bytes(key: str) -> bytes:
            if key not in cache:
                cache[key] = _read_member(zf, infos[f"{prefix}/data/{key}"])
            return cache[key]

        return _materialize_all(state, storage_bytes, big_endian)


# --------------------------------------------------------------------------- legacy format


def _read_legacy(f, file_size: int) -> dict[str, np.ndarray]:
    """Read a pre-1.6 / ``_use_new_zipfile_serialization=False`` file from the open binary file ``f``.

    The storage records follow the pickles one by one, each size checked
    against what is left of the file before it is read.
    """
    state, storages, keys, pos = _read_legacy_pickles(f, file_size)
    records = {}
    with _stage("cannot read file"):
        f.seek(pos)
        for key in keys:  # in list order: an int64 element count, then the raw bytes
            ref = storages.refs[key]
            if pos + 8 > file_size:
                raise _Refused(f"file is truncated: storage {key!r} is missing")
            (count,) = struct.unpack("<q", f.read(8))
            if count != ref.numel:
                raise _Refused(f"storage {key!r} record holds {count} elements, the pickle declares {ref.numel}")
            pos += 8
            if pos + ref.nbytes > file_size:
                raise _Refused(f"file is truncated: storage {key!r} has {file_size - pos} of {ref.nbytes} bytes")
            records[key] = f.read(ref.nbytes)
            if len(records[key]) != ref.nbytes:
                raise _Refused(f"file is truncated: storage {key!r} has {len(records[key])} of {ref.nbytes} bytes")
            pos += ref.nbytes
    if pos != file_size:
        raise _Refused(f"{file_size - pos} unexpected bytes after the last storage")
    return _materialize_all(state, records.__getitem__, big_endian=False)


def _read_legacy_pickles(f, file_size: int):
    """The five pickles of a legacy file: returns (state dict, storage table, storage keys, offset after them).

    They must lie within the first MAX_PICKLE_BYTES of the file, and only
    that much is read to find them.
    """
    with _stage("cannot read file"):
        head = f.read(min(file_size, MAX_PICKLE_BYTES))
    cut = len(head) < file_size
    budget = MAX_PICKLE_OPCODES

    def next_pickle(pos, on_persistent_id=None):
        nonlocal budget
        obj, end, opcodes = _unpickle(head, pos, on_persistent_id, budget, cut)
        budget -= opcodes
        return obj, end

    magic, pos = next_pickle(0)
    if not _is_int(magic) or magic != _LEGACY_MAGIC_NUMBER:
        raise _Refused("bad magic number for a legacy torch file")
    version, pos = next_pickle(pos)
    if not _is_int(version) or version != _LEGACY_PROTOCOL_VERSION:
        raise _Refused(f"legacy torch protocol version is {_describe(version)}, expected {_LEGACY_PROTOCOL_VERSION}")
    sys_info, pos = next_pickle(pos)
    if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian"), bool):
        raise _Refused("legacy system info is malformed")
    if not sys_info["little_endian"]:
        raise _Refused("legacy file written on a big-endian machine is not supported (re-save it in the zip format)")

    storages = _StorageTable(pid_length=6)
    obj, pos = next_pickle(pos, storages.resolve)
    keys, pos = next_pickle(pos)
    state = _select_state_dict(obj)

    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Refused("legacy storage key list is malformed")
    if len(set(keys)) != len(keys) or set(keys) != set(storages.refs):
        raise _Refused("legacy storage key list does not match the storages the pickle refers to")
    return state, storages, keys, pos


# --------------------------------------------------------------------------- entry point


def read_torch_file(path) -> dict[str, np.ndarray]:
    """Read the tensors of a ``torch.save`` file as NumPy arrays, without torch.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``torch.save`` in the zip format or the legacy format. The saved object
        must be a flat mapping of ``str`` to tensors (a ``state_dict()``), or a dict holding one
        under ``'state_dict'`` or ``'model'``.

    Returns
    -------
    arrays : dict
        In file order, new C-contiguous arrays that own their data. dtypes follow the storage:
        float32/64/16, int64/32/16/8, uint8, bool; bfloat16 is widened exactly to float32.
        Big-endian zip files are byte-swapped to native order.

    Raises
    ------
    WeightsFormatError
        The file is missing, unreadable, malformed, hostile, beyond the limits in the module
        docstring, or not a torch.save file; the message names the file and the reason.
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
            if head.startswith(ZIP_MAGIC):
                return _read_zip(f, size)
            if is_legacy_torch_file(head):
                return _read_legacy(f, size)
            raise _Refused("not a torch.save file (neither a zip archive nor a legacy torch pickle)")
    except _Refused as exc:
        raise WeightsFormatError(format_error(source, str(exc))) from exc.__cause__
    except Exception as exc:  # noqa: BLE001 - a failure outside every stage is still the file's fault
        raise WeightsFormatError(format_error(source, f"cannot read file: {exception_text(exc)}")) from exc
