"""Hostile weights files: nesting, size and memory are bounded, and every refusal is a WeightsFormatError.

Every file is crafted here, opcode by opcode. Every load of a hostile file runs
in a child interpreter (``load_in_child``): a C stack overflow kills the process,
and must fail the test with the child's exit status, not take pytest with it.
The child reports, per file, the outcome, the message, how long the load took
and its peak memory; ``benchmarks/bench_reader.py`` records the same numbers at
full size.
"""

import json
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from npmnv3 import torchfile
from npmnv3.errors import WeightsFormatError
from npmnv3.serialization import load_state_dict
from npmnv3.torchfile import MAX_DEPTH, MAX_PICKLE_BYTES, MAX_PICKLE_OPCODES, read_torch_file

ROOT = Path(__file__).resolve().parent.parent

# Generous bounds for one refusal, far below what unbounded work costs (tens of
# seconds, gigabytes); benchmarks/bench_reader.py measures the real numbers.
REFUSAL_SECONDS = 5.0
REFUSAL_PEAK_MB = 200

# --------------------------------------------------------------------------
# Pickles written opcode by opcode (protocol 2, as torch.save writes them)
# --------------------------------------------------------------------------

PROTO = b"\x80\x02"
STOP = b"."


def op_str(text):
    """BINUNICODE."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(n):
    """BININT1, BININT2, BININT or LONG1, as pickle chooses."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def op_tuple(items):
    return b"(" + b"".join(items) + b"t"


OD_CALL = op_global("collections", "OrderedDict") + b")R"  # OrderedDict(): an empty OrderedDict


def op_storage(key="0", numel=1, legacy=False, kind="FloatStorage"):
    """The persistent id of a storage, then BINPERSID."""
    pid = [op_str("storage"), op_global("torch", kind), op_str(key), op_str("cpu"), op_int(numel)]
    return op_tuple(pid + [b"N"] if legacy else pid) + b"Q"


def op_tensor(size=(1,), stride=(1,), offset=0, storage=None, hooks=OD_CALL, extra=()):
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, hooks, *extra)``; each part replaceable."""
    storage = op_storage() if storage is None else storage
    size = op_tuple([op_int(n) for n in size]) if isinstance(size, tuple) else size
    stride = op_tuple([op_int(n) for n in stride]) if isinstance(stride, tuple) else stride
    args = [storage, op_int(offset), size, stride, b"\x89", hooks, *extra]
    return op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(args) + b"R"


def op_dict(pairs):
    """EMPTY_DICT, then MARK, key, value, ..., SETITEMS."""
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def checkpoint(extra, legacy=False):
    """``{'state_dict': {'w': <1-element tensor>}, 'extra': <extra>}``: loads as {'w': ...}."""
    state = op_dict([(op_str("w"), op_tensor(storage=op_storage(legacy=legacy)))])
    return PROTO + op_dict([(op_str("state_dict"), state), (op_str("extra"), extra)]) + STOP


ONE_FLOAT = np.float32(1.5).tobytes()


def torch_zip(path, pkl, records=(("0", ONE_FLOAT),)):
    """A torch.save-style zip whose data.pkl is ``pkl``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        for key, data in records:
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
    return path


LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
LEGACY_VERSION = pickle.dumps(1001, protocol=2)
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy_file(path, main, records=(("0", 1, ONE_FLOAT),), version=LEGACY_VERSION, sys_info=None):
    """A legacy torch.save file: magic, version, system info, ``main``, key list, then the records."""
    sys_info = pickle.dumps(SYS_INFO, protocol=2) if sys_info is None else sys_info
    keys = pickle.dumps([key for key, _, _ in records], protocol=2)
    with open(path, "wb") as f:
        for part in (LEGACY_MAGIC, version, sys_info, main, keys):
            f.write(part)
        for _, numel, data in records:
            f.write(struct.pack("<q", numel) + data)
    return path


# --------------------------------------------------------------------------
# Loading in a child interpreter
# --------------------------------------------------------------------------

CHILD = r"""
import json, sys, time
sys.modules["torch"] = None  # the reader never needs torch; make sure of it

def peak_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None

def reset_peak():  # Linux: "5" resets VmHWM to the current resident size
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

import npmnv3
from npmnv3.errors import WeightsFormatError
from npmnv3.serialization import load_state_dict
from npmnv3.torchfile import read_torch_file

READERS = {
    "read_torch_file": read_torch_file,
    "load_state_dict": load_state_dict,
    "builder": lambda path: npmnv3.mobilenet_v3_large(weights=path).params,
}

for case, reader, path in json.loads(sys.argv[1]):
    print(json.dumps({"start": case}), flush=True)
    peaks = reset_peak()
    start = time.perf_counter()
    try:
        out = READERS[reader](path)
        result = {"outcome": "loaded", "keys": sorted(out)[:10],
                  "sums": {k: float(v.sum(dtype="float64")) for k, v in list(out.items())[:10]}}
    except WeightsFormatError as exc:
        result = {"outcome": "refused", "message": str(exc), "cause": type(exc.__cause__).__name__}
    except BaseException as exc:
        result = {"outcome": "escaped", "type": type(exc).__name__, "message": str(exc)[:1000]}
    result.update(case=case, seconds=time.perf_counter() - start, peak_mb=peak_mb() if peaks else None)
    print(json.dumps(result), flush=True)
"""


def load_in_child(cases, timeout=300):
    """Load each ``(case, reader, path)`` in a child interpreter; return ``{case: result}``.

    ``reader`` is "read_torch_file", "load_state_dict" or "builder"
    (``npmnv3.mobilenet_v3_large(weights=path)``). Results have "outcome"
    ("loaded", "refused", "escaped": another exception, "crashed": the child
    died, with its "returncode"), "message", "seconds" and "peak_mb". After a
    crash, a new child goes on with the cases that follow.
    """
    cases = [(case, reader, str(path)) for case, reader, path in cases]
    results = {}
    pending = cases
    while pending:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(pending)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record["case"]] = record
                started = None
        if started is not None:
            results[started] = {"case": started, "outcome": "crashed", "returncode": proc.returncode,
                                "stderr": proc.stderr[-2000:]}
        elif proc.returncode != 0:
            raise AssertionError(f"child exited with {proc.returncode} outside any case: {proc.stderr[-2000:]}")
        left = [c for c in pending if c[0] not in results]
        if len(left) == len(pending):
            raise AssertionError(f"child loaded nothing: {proc.stderr[-2000:]}")
        pending = left
    return results


def load_one(path, reader="load_state_dict"):
    return load_in_child([("file", reader, path)])["file"]


def assert_refused(result, *fragments):
    """A WeightsFormatError with every fragment, quickly and in little memory."""
    assert result["outcome"] == "refused", result
    for fragment in fragments:
        assert fragment in result["message"], result["message"]
    assert result["seconds"] < REFUSAL_SECONDS, result
    if result["peak_mb"] is not None:
        assert result["peak_mb"] < REFUSAL_PEAK_MB, result


def depth_message(depth, byte):
    return f"pickle nests containers {depth} levels deep at byte {byte}, over the limit of {MAX_DEPTH}"


OPCODES_REFUSAL = re.compile(rf"pickle has more than {MAX_PICKLE_OPCODES} opcodes \(at byte \d+\)")
DEPTH_REFUSAL = re.compile(rf"pickle nests containers {MAX_DEPTH + 1} levels deep at byte \d+, "
                           rf"over the limit of {MAX_DEPTH}")

# --------------------------------------------------------------------------
# Nesting: swept from 10 to 1,000,000 levels in both formats
# --------------------------------------------------------------------------


def nested(shape, depth):
    """Opcodes pushing one value ``depth`` containers deep."""
    if shape == "tuple (TUPLE1)":
        return b")" + b"\x85" * (depth - 1)
    if shape == "tuple (MARK ... TUPLE)":
        return b"(" * (depth - 1) + b")" + b"t" * (depth - 1)
    if shape == "dict with a nested tuple key":
        return b"}" + nested("tuple (TUPLE1)", depth - 1) + b"K\x01s"
    if shape == "list":
        return b"]" * depth + b"a" * (depth - 1)
    if shape == "dict values":
        return b"}K\x00" * (depth - 1) + b"}" + b"s" * (depth - 1)
    if shape == "OrderedDict values":
        outer = op_global("collections", "OrderedDict") + b"q\x00)R"  # BINPUT 0 here, BINGET 0 on each level
        return outer + b"K\x00h\x00)R" * (depth - 1) + b"s" * (depth - 1)
    raise ValueError(shape)


SHAPES = ["tuple (TUPLE1)", "tuple (MARK ... TUPLE)", "dict with a nested tuple key", "list", "dict values",
          "OrderedDict values"]
DEPTHS = [10, 100, 1000, 10_000, pytest.param(100_000, marks=pytest.mark.slow),
          pytest.param(1_000_000, marks=pytest.mark.slow)]


@pytest.mark.parametrize("depth", DEPTHS)
def test_nesting_is_bounded_in_both_formats(tmp_path, depth):
    """Under the limit a checkpoint with a nested extra entry loads; over it, a WeightsFormatError, never a crash."""
    cases, oversized = [], set()
    for i, shape in enumerate(SHAPES):
        pkl = checkpoint(nested(shape, depth))
        cases.append((f"zip, {shape}", "load_state_dict", torch_zip(tmp_path / f"z{i}.pth", pkl)))
        if len(pkl) > MAX_PICKLE_BYTES:
            oversized.add(f"zip, {shape}")
        main = checkpoint(nested(shape, depth), legacy=True)
        cases.append((f"legacy, {shape}", "load_state_dict", legacy_file(tmp_path / f"l{i}.pth", main)))
    # The nested value as a key of the legacy system-info dict (the third pickle).
    sys_info = PROTO + b"}" + op_str("little_endian") + b"\x88s" + nested("tuple (TUPLE1)", depth) + b"K\x01s" + STOP
    main = checkpoint(b"N", legacy=True)
    path = legacy_file(tmp_path / "s.pth", main, sys_info=sys_info)
    cases.append(("legacy, system info key", "load_state_dict", path))

    results = load_in_child(cases)
    for case, _, _ in cases:
        result = results[case]
        if depth + 1 <= MAX_DEPTH:
            assert result["outcome"] == "loaded" and result["keys"] == ["w"], (case, result)
            assert result["sums"] == {"w": 1.5}
        elif case in oversized:  # over 4 MiB at a million levels: refused by size before any scan
            assert_refused(result, f"exceeds the limit of {MAX_PICKLE_BYTES}")
        else:
            assert_refused(result)
            # Lists and dicts are pushed empty, then filled: at a million levels that is more
            # opcodes than the limit before the first level of nesting.
            limits = [DEPTH_REFUSAL] + ([OPCODES_REFUSAL] if depth >= MAX_PICKLE_OPCODES else [])
            assert any(p.search(result["message"]) for p in limits), (case, result["message"])


def test_nesting_limit_is_exact(tmp_path):
    """32 levels load, 33 are refused, naming the depth and the byte where it was reached."""
    cases, sizes = [], {}
    shapes = ("tuple (TUPLE1)", "list", "tuple (MARK ... TUPLE)")
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 2):  # plus one for the checkpoint dict around it
        for i, shape in enumerate(shapes):
            pkl = checkpoint(nested(shape, depth))
            sizes[shape, depth] = len(pkl)
            cases.append((f"{shape}, {depth}", "read_torch_file", torch_zip(tmp_path / f"{i}_{depth}.pth", pkl)))
    results = load_in_child(cases)
    for shape in shapes:
        assert results[f"{shape}, {MAX_DEPTH - 1}"]["outcome"] == "loaded"
        # 32 levels and the checkpoint: 33, reached at the checkpoint's closing SETITEMS.
        assert_refused(results[f"{shape}, {MAX_DEPTH}"], depth_message(MAX_DEPTH + 1, sizes[shape, MAX_DEPTH] - 2))
    # Open MARKs count as they open: the checkpoint's, then the nested ones, from where 'extra' starts.
    extra_at = len(checkpoint(b"")) - 2
    assert_refused(results[f"tuple (MARK ... TUPLE), {MAX_DEPTH + 2}"],
                   depth_message(MAX_DEPTH + 1, extra_at + MAX_DEPTH - 1))
    # 34 empty lists, then APPENDs: the 32nd APPEND makes 33 levels.
    assert_refused(results[f"list, {MAX_DEPTH + 2}"],
                   depth_message(MAX_DEPTH + 1, extra_at + (MAX_DEPTH + 2) + (MAX_DEPTH - 1)))


# --------------------------------------------------------------------------
# A nested tuple as a dict key: once a C stack overflow
# --------------------------------------------------------------------------

DEEP_KEY_PICKLE = PROTO + b"}" + b")" + b"\x85" * 200_000 + b"K\x01s" + STOP  # {((...(),),): 1}


def test_tuple_nested_200000_deep_as_a_dict_key_is_refused_not_a_crash(tmp_path):
    assert len(DEEP_KEY_PICKLE) < 210_000
    zip_path = torch_zip(tmp_path / "deep_key.pth", DEEP_KEY_PICKLE)
    sys_info = PROTO + b"}" + op_str("little_endian") + b"\x88s" + DEEP_KEY_PICKLE[3:]
    legacy_path = legacy_file(tmp_path / "deep_key_legacy.pth", checkpoint(b"N", legacy=True), sys_info=sys_info)
    results = load_in_child([(f"{fmt}, {reader}", reader, path)
                             for fmt, path in (("zip", zip_path), ("legacy", legacy_path))
                             for reader in ("read_torch_file", "load_state_dict", "builder")])
    # EMPTY_DICT at byte 2, EMPTY_TUPLE (depth 1) at 3, then one level per TUPLE1.
    for reader in ("read_torch_file", "load_state_dict", "builder"):
        assert_refused(results[f"zip, {reader}"], str(zip_path), depth_message(MAX_DEPTH + 1, 3 + MAX_DEPTH))
        byte = len(LEGACY_MAGIC) + len(LEGACY_VERSION) + 3 + len(op_str("little_endian")) + 2 + MAX_DEPTH
        assert_refused(results[f"legacy, {reader}"], str(legacy_path), depth_message(MAX_DEPTH + 1, byte))


def test_command_line_reports_a_hostile_file_and_exits_1(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    path = torch_zip(tmp_path / "deep_key.pth", DEEP_KEY_PICKLE)
    proc = subprocess.run([sys.executable, "-m", "npmnv3", "predict", str(image), "--weights", str(path), "--offline"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert f"cannot load weights from {str(path)!r}: {depth_message(MAX_DEPTH + 1, 35)}" in proc.stderr


# --------------------------------------------------------------------------
# Messages: never a repr of an unbounded value
# --------------------------------------------------------------------------


def test_refusals_of_deep_or_huge_values_stay_short(tmp_path):
    deep = b")" + b"\x85" * 5000
    huge = "k" * 1_000_000
    cases = {
        "5000-deep tuple as the legacy version": legacy_file(
            tmp_path / "version.pth", checkpoint(b"N", legacy=True), version=PROTO + deep + STOP),
        "5000-deep tuple as a state dict key": torch_zip(
            tmp_path / "key.pth", PROTO + b"}" + deep + op_tensor() + b"s" + STOP),
        "1 MB string as the legacy version": legacy_file(
            tmp_path / "version_str.pth", checkpoint(b"N", legacy=True), version=PROTO + op_str(huge) + STOP),
        "1 MB string as an entry name, entry not a tensor": torch_zip(
            tmp_path / "entry.pth", PROTO + b"}" + op_str(huge) + b"K\x01s" + STOP),
        "1 MB string as a storage key": torch_zip(
            tmp_path / "storage_key.pth",
            PROTO + op_dict([(op_str("w"), op_tensor(storage=op_tuple(
                [op_str("storage"), op_global("torch", "FloatStorage"), op_str(huge), op_str("cpu"), op_int(1)])
                + b"Q"))]) + STOP),
        "1 MB module name": torch_zip(tmp_path / "module.pth", PROTO + op_global(huge, "x") + STOP),
        "1 MB string as a dict key": torch_zip(
            tmp_path / "dict_key.pth", PROTO + b"}" + b"K\x01" + op_str(huge) + b"s" + STOP),
        "2031-bit int as a key": torch_zip(
            tmp_path / "int_key.pth", PROTO + b"}" + op_int(2**2030) + op_tensor() + b"s" + STOP),
        "30-deep tuple as a key": torch_zip(
            tmp_path / "key30.pth", PROTO + b"}" + b")" + b"\x85" * 29 + op_tensor() + b"s" + STOP),
    }
    results = load_in_child([(case, "load_state_dict", path) for case, path in cases.items()])
    expected = {
        "5000-deep tuple as the legacy version": DEPTH_REFUSAL.pattern,
        "5000-deep tuple as a state dict key": DEPTH_REFUSAL.pattern,
        "1 MB string as the legacy version":
            r"legacy torch protocol version is a str of 1000000 characters starting 'k{40}', expected 1001",
        "1 MB string as an entry name, entry not a tensor":
            r"entry 'k{80}'\.\.\. \(1000000 characters\) is an int, not a tensor",
        "1 MB string as a storage key": r"malformed storage key: a str of 1000000 characters starting 'k{40}'",
        "1 MB module name": r"pickle refers to k{100}\.\.\. \(1000000 characters\)\.x, which is not allowed",
        "1 MB string as a dict key": r"a key is the int 1, not a str",
        "2031-bit int as a key": r"a key is an int of 2031 bits, not a str",
        "30-deep tuple as a key": r"a key is a tuple of 1 item, not a str",
    }
    for case, pattern in expected.items():
        result = results[case]
        assert_refused(result)
        assert re.search(pattern, result["message"]), (case, result["message"])
        assert len(result["message"]) < 600, (case, len(result["message"]))


# --------------------------------------------------------------------------
# Cost: limits come before the work they bound
# --------------------------------------------------------------------------


def empty_tuples_legacy(path, size):
    """A legacy file whose object pickle is ``size`` MiB-rounded bytes of EMPTY_TUPLE opcodes (and no STOP)."""
    with open(path, "wb") as f:
        f.write(LEGACY_MAGIC + LEGACY_VERSION + pickle.dumps(SYS_INFO, protocol=2) + PROTO)
        chunk = b")" * 2**20
        for _ in range(size // 2**20):
            f.write(chunk)
    return path


def big_data_pkl_zip(path, size):
    """A zip whose data.pkl is exactly ``size`` bytes: a dict, then one long string."""
    return torch_zip(path, PROTO + b"}" + op_str("x" * (size - 9)) + STOP)


def test_large_pickles_are_refused_before_they_are_scanned(tmp_path):
    nones = PROTO + b"N" * (MAX_PICKLE_BYTES - 3) + STOP  # just under the size limit, all tiny opcodes
    cases = {
        "legacy, 16 MiB of EMPTY_TUPLE": empty_tuples_legacy(tmp_path / "tuples.pth", 16 * 2**20),
        "zip, 8 MiB data.pkl": big_data_pkl_zip(tmp_path / "big.pth", 8 * 2**20),
        "zip, 4 MiB of NONE opcodes": torch_zip(tmp_path / "nones.pth", nones),
        "legacy, 4 MiB of NONE opcodes": legacy_file(tmp_path / "nones_legacy.pth", nones),
        "legacy, 5 MiB string in the object pickle": legacy_file(
            tmp_path / "long_legacy.pth", PROTO + op_str("x" * 5 * 2**20) + STOP),
    }
    results = load_in_child([(case, "load_state_dict", path) for case, path in cases.items()])
    too_many = f"pickle has more than {MAX_PICKLE_OPCODES} opcodes (at byte"
    assert_refused(results["legacy, 16 MiB of EMPTY_TUPLE"], too_many)
    assert_refused(results["zip, 8 MiB data.pkl"],
                   f"data.pkl of {8 * 2**20} bytes exceeds the limit of {MAX_PICKLE_BYTES}")
    assert_refused(results["zip, 4 MiB of NONE opcodes"], too_many)
    assert_refused(results["legacy, 4 MiB of NONE opcodes"], too_many)
    assert_refused(results["legacy, 5 MiB string in the object pickle"],
                   f"pickle runs past {MAX_PICKLE_BYTES} bytes from the start of the file")


@pytest.mark.slow
def test_full_size_pickle_floods_are_refused_in_a_fraction_of_a_second(tmp_path):
    """The 150 MiB legacy file and the 63 MiB data.pkl: refused without reading them whole."""
    results = load_in_child([
        ("legacy, 150 MiB", "load_state_dict", empty_tuples_legacy(tmp_path / "tuples.pth", 150 * 2**20)),
        ("zip, 63 MiB", "load_state_dict", big_data_pkl_zip(tmp_path / "big.pth", 63 * 2**20)),
    ])
    assert_refused(results["legacy, 150 MiB"], f"pickle has more than {MAX_PICKLE_OPCODES} opcodes")
    assert_refused(results["zip, 63 MiB"], f"data.pkl of {63 * 2**20} bytes exceeds the limit")
    for result in results.values():
        assert result["seconds"] < 2.0, result
        if result["peak_mb"] is not None:
            assert result["peak_mb"] < 120, result


def patch_end_record(path, entries=None, directory_bytes=None):
    """Rewrite the entry count and directory size in a zip's end record (and zip64 record, if any)."""
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    if entries is not None:
        struct.pack_into("<HH", data, at + 8, min(entries, 0xFFFF), min(entries, 0xFFFF))
    if directory_bytes is not None:
        struct.pack_into("<L", data, at + 12, min(directory_bytes, 0xFFFFFFFF))
    path.write_bytes(bytes(data))
    return path


def test_zip_directory_is_bounded_before_it_is_parsed(tmp_path):
    cases = {
        "torch zip declaring 30000 entries": patch_end_record(
            torch_zip(tmp_path / "count.pth", checkpoint(b"N")), entries=30_000),
        "torch zip declaring a 3 MiB directory": patch_end_record(
            torch_zip(tmp_path / "dir.pth", checkpoint(b"N")), directory_bytes=3 * 2**20),
        "npz declaring 30000 entries": patch_end_record(npz(tmp_path / "count.npz", {"a.npy": npy(np.ones(3))}),
                                                        entries=30_000),
    }
    results = load_in_child([(case, "load_state_dict", path) for case, path in cases.items()])
    limit = torchfile.MAX_ZIP_ENTRIES
    assert_refused(results["torch zip declaring 30000 entries"],
                   f"zip archive declares 30000 entries, over the limit of {limit}")
    assert_refused(results["torch zip declaring a 3 MiB directory"],
                   f"zip archive's directory declares {3 * 2**20} bytes, "
                   f"over the limit of {torchfile.MAX_ZIP_DIRECTORY_BYTES}")
    assert_refused(results["npz declaring 30000 entries"], "zip archive declares 30000 entries")


def test_zip64_end_record_is_read_like_zipfile_reads_it(tmp_path):
    """torch writes a zip64 end record: the bound uses its counts, where zipfile does."""
    path = tmp_path / "zip64.pth"
    data = bytearray(torch_zip(path, checkpoint(b"N")).read_bytes())
    at = data.rfind(b"PK\x05\x06")
    entries, size_dir, start_dir = struct.unpack_from("<HLL", data, at + 10)
    zip64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size_dir, start_dir)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    path.write_bytes(bytes(data[:at]) + zip64 + locator + bytes(data[at:]))
    assert load_one(path)["outcome"] == "loaded"
    forged = bytearray(path.read_bytes())
    struct.pack_into("<Q", forged, at + 32, 10**6)  # the zip64 total entry count
    path.write_bytes(bytes(forged))
    assert_refused(load_one(path), "zip archive declares 1000000 entries")


# --------------------------------------------------------------------------
# Memory: outputs bounded by the bytes the file holds
# --------------------------------------------------------------------------


def test_zero_stride_view_of_one_element_to_4_gib_is_refused_naming_the_tensor(tmp_path):
    pkl = PROTO + op_dict([(op_str("w"), op_tensor(size=(32768, 32768), stride=(0, 0)))]) + STOP
    path = torch_zip(tmp_path / "expand.pth", pkl)
    assert path.stat().st_size < 700
    for reader in ("read_torch_file", "builder"):
        assert_refused(load_one(path, reader),
                       "tensor 'w' (32768x32768 float32, 4294967296 bytes, a zero-stride view of 1 stored element) "
                       f"would take the output past {torchfile.SMALL_OUTPUT_BYTES} bytes, the limit for a file "
                       "holding 4 bytes of tensor data")


def views_zip(path, count, numel, size, stride):
    """``count`` tensors all viewing one float32 storage of ``numel`` elements."""
    view = op_tensor(size=size, stride=stride, storage=op_storage(numel=numel))
    tensors = [(op_str(f"t{i}"), view) for i in range(count)]
    return torch_zip(path, PROTO + op_dict(tensors) + STOP, [("0", np.arange(numel, dtype="<f4").tobytes())])


def test_output_may_reach_four_times_the_stored_bytes_or_16_mib(tmp_path):
    small = torchfile.SMALL_OUTPUT_BYTES // 4  # float32 elements in 16 MiB
    cases = {
        "zero-stride view to exactly 16 MiB": views_zip(tmp_path / "a.pth", 1, 1, (small,), (0,)),
        "zero-stride view to 16 MiB + 4 bytes": views_zip(tmp_path / "b.pth", 1, 1, (small + 1,), (0,)),
        "4 views of a 5 MiB storage": views_zip(tmp_path / "c.pth", 4, 5 * 2**18, (5 * 2**18,), (1,)),
        "5 views of a 5 MiB storage": views_zip(tmp_path / "d.pth", 5, 5 * 2**18, (5 * 2**18,), (1,)),
    }
    results = load_in_child([(case, "read_torch_file", path) for case, path in cases.items()])
    assert results["zero-stride view to exactly 16 MiB"]["sums"] == {"t0": 0.0}
    assert_refused(results["zero-stride view to 16 MiB + 4 bytes"], "tensor 't0' (4194305 float32, 16777220 bytes")
    assert results["4 views of a 5 MiB storage"]["keys"] == ["t0", "t1", "t2", "t3"]
    assert_refused(results["5 views of a 5 MiB storage"],
                   f"tensor 't4' (1310720 float32, 5242880 bytes, a view of 1310720 stored elements) would take the "
                   f"output past {4 * 5 * 2**20} bytes, the limit for a file holding {5 * 2**20} bytes of tensor data")


def raw_zip(entries):
    """A zip written field by field: ``(name, method, crc, compressed bytes, declared size)`` per entry."""
    local, central = b"", b""
    for name, method, crc, data, size in entries:
        name = name.encode()
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), size, len(name), 0)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                               len(name), 0, 0, 0, 0, 0, len(local)) + name
        local += header + name + data
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(local), 0)
    return local + central + end


def npy_header(shape, descr="|u1"):
    """The .npy header (format 1.0) for ``shape`` and ``descr``, padded as NumPy pads it."""
    buf = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.dtype(descr)))
    buf["shape"] = shape
    import io

    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, buf)
    return out.getvalue()


def deflate_bomb(header, mebibytes):
    """``header`` then ``mebibytes`` MiB of zeros, deflated: each MiB is the same ~1 KB full-flushed block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + block * mebibytes + compressor.flush()


def npy(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npz(path, members, method=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_deflate_bomb_npz_is_refused_before_it_is_inflated(tmp_path):
    header = npy_header((3 * 2**30,))
    stream = deflate_bomb(header, 3 * 1024)
    # The CRC is left 0: a reader that inflated the entry would find out only after 3 GiB.
    path = tmp_path / "bomb.npz"
    path.write_bytes(raw_zip([("w.npy", zipfile.ZIP_DEFLATED, 0, stream, len(header) + 3 * 2**30)]))
    assert 3_000_000 < path.stat().st_size < 3_300_000
    size, inflated = path.stat().st_size, len(header) + 3 * 2**30
    for reader in ("load_state_dict", "builder"):
        assert_refused(load_one(path, reader), str(path),
                       f".npz entry 'w.npy' would inflate {len(stream)} bytes to {inflated} "
                       f"({inflated / len(stream):.0f}:1), taking the arrays past {16 * size} bytes, the limit for a "
                       f"file of {size} bytes")


def test_npy_header_must_account_for_the_entry_size(tmp_path):
    header = npy_header((32768, 32768), "<f4")
    cases = {
        "stored entry: header 4 GiB, 100 bytes": npz(tmp_path / "a.npz", {"w.npy": header + bytes(100)}),
        "deflated entry: header 4 GiB, 100 bytes": npz(tmp_path / "b.npz", {"w.npy": header + bytes(100)},
                                                       zipfile.ZIP_DEFLATED),
        "header 2 elements, 3 in the entry": npz(tmp_path / "c.npz", {"w.npy": npy(np.ones(3, "<f4"))[:-12]
                                                                      .replace(b"(3,)", b"(2,)") + bytes(12)}),
        "bzip2 entry": npz(tmp_path / "d.npz", {"w.npy": npy(np.ones(3))}, zipfile.ZIP_BZIP2),
        "stored entry with a compressed size unlike its size": patch_central_compressed_size(
            npz(tmp_path / "e.npz", {"w.npy": npy(np.ones(3))}), 10),
    }
    results = load_in_child([(case, "load_state_dict", path) for case, path in cases.items()])
    for case in ("stored entry: header 4 GiB, 100 bytes", "deflated entry: header 4 GiB, 100 bytes"):
        assert_refused(results[case], "array 'w' declares 32768x32768 float32 (4294967296 bytes) but its entry holds "
                                      "100 bytes of data")
    assert_refused(results["header 2 elements, 3 in the entry"], "array 'w' declares 2 float32 (8 bytes) but its entry "
                                                                 "holds 12 bytes of data")
    assert_refused(results["bzip2 entry"], ".npz entry 'w.npy' uses zip compression method 12")
    assert_refused(results["stored entry with a compressed size unlike its size"], ".npz entry 'w.npy' is stored but "
                                                                                   "declares 152 bytes in 10")


def patch_central_compressed_size(path, size):
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")
    struct.pack_into("<L", data, at + 20, size)
    path.write_bytes(bytes(data))
    return path


def test_compressed_npz_with_zero_filled_arrays_still_loads(tmp_path):
    """np.savez_compressed of a state dict: a zero-initialised layer deflates ~1000:1 and is fine."""
    rng = np.random.default_rng(0)
    arrays = {"features.weight": rng.standard_normal((2048, 1024)).astype(np.float32),  # 8 MiB, barely compresses
              "classifier.weight": np.zeros((3072, 1024), np.float32),  # 12 MiB of zeros: over 16 MiB in all
              "classifier.bias": np.zeros(1000, np.float32), "n": np.array(3, np.int64)}
    path = tmp_path / "compressed.npz"
    np.savez_compressed(path, **arrays)
    assert path.stat().st_size < 8 * 2**20
    loaded = load_state_dict(path)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype and loaded[key].tobytes() == value.tobytes()


# --------------------------------------------------------------------------
# Messages in the user's terms
# --------------------------------------------------------------------------

INTERNAL_NAMES = sorted(
    {name for name in vars(torchfile) if name.startswith("_") and not name.startswith("__")}
    - {"_rebuild_tensor_v2", "_rebuild_parameter"}  # also torch's names, which messages do quote
    | {"stand-in", "impl"}
)

PRODUCERS = {
    "collections.OrderedDict": op_global("collections", "OrderedDict"),
    "the tensor rebuilder": op_global("torch._utils", "_rebuild_tensor_v2"),
    "a storage type": op_global("torch", "FloatStorage"),
    "an OrderedDict": OD_CALL,
    "a tensor": op_tensor(),
    "a parameter": op_global("torch._utils", "_rebuild_parameter") + op_tuple([op_tensor(), b"\x89", OD_CALL]) + b"R",
    "a storage": op_storage(),
    "a dict": b"}",
    "a list": b"]",
    "a tuple": b")",
    "a str": op_str("s"),
    "None": b"N",
}

USES = {
    "as the file": lambda p: p,
    "stored into (SETITEM)": lambda p: p + op_str("k") + b"K\x01s",
    "stored into (SETITEMS)": lambda p: p + b"(" + op_str("k") + b"K\x01u",
    "appended to (APPEND)": lambda p: p + b"K\x01a",
    "appended to (APPENDS)": lambda p: p + b"(K\x01e",
    "given state (BUILD)": lambda p: p + op_dict([(op_str("impl"), b"K\x01")]) + b"b",
    "called (REDUCE)": lambda p: p + b")R",
    "as a dict key": lambda p: b"}" + p + b"K\x01s",
    "as a state dict entry": lambda p: b"}" + op_str("w") + p + b"s",
    "as a persistent id": lambda p: p + b"Q",
    "as the storage of a tensor": lambda p: op_tensor(storage=p),
    "as the size of a tensor": lambda p: op_tensor(size=p),
    "as the hooks of a tensor": lambda p: op_tensor(hooks=p),
    "as tensor metadata": lambda p: op_tensor(extra=[p]),
    "as OrderedDict state": lambda p: OD_CALL + op_dict([(op_str("_metadata"), p)]) + b"b" + p + b"b",
    "as a module name (STACK_GLOBAL)": lambda p: p + op_str("x") + b"\x93",
    "in a storage id": lambda p: op_tuple([op_str("storage"), p, op_str("0"), op_str("cpu"), b"K\x01"]) + b"Q",
}


def test_no_message_names_an_internal_class(tmp_path):
    """Every misuse of every kind of value: loaded or refused, never escaped, and never in private names."""
    cases = []
    for i, (what, producer) in enumerate(PRODUCERS.items()):
        for j, (use, wrap) in enumerate(USES.items()):
            path = torch_zip(tmp_path / f"{i}_{j}.pth", PROTO + wrap(producer) + STOP)
            cases.append((f"{what} {use}", "load_state_dict", path))
    results = load_in_child(cases)
    refused = 0
    for case, _, _ in cases:
        result = results[case]
        assert result["outcome"] in ("loaded", "refused"), (case, result)
        if result["outcome"] == "refused":
            refused += 1
            leaked = [n for n in INTERNAL_NAMES if re.search(rf"(?<![\w.]){re.escape(n)}\b", result["message"])]
            assert not leaked, (case, result["message"])
    assert refused > len(cases) - 10


def test_messages_say_what_the_file_holds(tmp_path):
    cases = {
        "a bare tensor": torch_zip(tmp_path / "tensor.pth", PROTO + op_tensor() + STOP),
        "OrderedDict given an item": torch_zip(tmp_path / "od.pth", PROTO + PRODUCERS["collections.OrderedDict"]
                                               + op_str("k") + b"K\x01s" + STOP),
        "a tensor given an item": torch_zip(tmp_path / "t.pth", PROTO + op_tensor() + op_str("k") + b"K\x01s" + STOP),
        "an OrderedDict appended to": torch_zip(tmp_path / "a.pth", PROTO + OD_CALL + b"K\x01a" + STOP),
        "an OrderedDict as a key": torch_zip(tmp_path / "k.pth", PROTO + b"}" + OD_CALL + b"K\x01s" + STOP),
        "an OrderedDict called": torch_zip(tmp_path / "c.pth", PROTO + OD_CALL + b")R" + STOP),
        "a storage called": torch_zip(tmp_path / "s.pth", PROTO + op_storage() + b")R" + STOP),
        "a self-referencing list": torch_zip(tmp_path / "self.pth", PROTO + b"]q\x00h\x00a" + STOP),
        "a storage id of the wrong length": torch_zip(
            tmp_path / "pid.pth", PROTO + op_tuple([op_str("storage")]) + b"Q" + STOP),
    }
    results = load_in_child([(case, "load_state_dict", path) for case, path in cases.items()])
    setitem_at = len(PROTO + PRODUCERS["collections.OrderedDict"] + op_str("k") + b"K\x01")
    expected = {
        "a bare tensor": "top-level object is a tensor, expected a dict of tensors (a state_dict)",
        "OrderedDict given an item": f"pickle opcode SETITEM at byte {setitem_at} modifies a value that is not "
                                     "a list, dict or object being built",
        "a tensor given an item": "pickle stores an item into a tensor, which is not a dict",
        "an OrderedDict appended to": "pickle appends to an OrderedDict, which is not a list",
        "an OrderedDict as a key": "pickle uses an OrderedDict as a dict key",
        "an OrderedDict called": "pickle calls an OrderedDict, which is not callable",
        "a storage called": "pickle calls storage '0', which is not callable here",
        "a self-referencing list": "pickle opcode APPEND at byte 7 modifies a container it already refers to elsewhere",
        "a storage id of the wrong length": "storage persistent id has 1 item, expected 5",
    }
    for case, fragment in expected.items():
        assert_refused(results[case], fragment)


# --------------------------------------------------------------------------
# Every failure is a WeightsFormatError, whichever stage raises it
# --------------------------------------------------------------------------


@pytest.fixture
def small_files(tmp_path):
    zip_path = torch_zip(tmp_path / "w.pth", checkpoint(b"N"))
    legacy_path = legacy_file(tmp_path / "w_legacy.pth", checkpoint(b"N", legacy=True))
    npz_path = npz(tmp_path / "w.npz", {"w.npy": npy(np.ones(3, np.float32))})
    assert list(load_state_dict(zip_path)) == list(load_state_dict(legacy_path)) == ["w"]
    return zip_path, legacy_path, npz_path


def raiser(exc_type):
    def fail(*args, **kwargs):
        raise exc_type("injected")

    return fail


@pytest.mark.parametrize("exc_type", [RecursionError, MemoryError, OverflowError, KeyError])
@pytest.mark.parametrize("stage, target", [
    ("opcode walk", "_scan_pickle"),
    ("unpickling", "_RestrictedUnpickler.load"),
    ("choosing the state dict", "_select_state_dict"),
    ("output size check", "_check_output_size"),
    ("copying a tensor", "_materialize"),
    ("formatting a message", "excerpt"),
])
def test_any_exception_in_any_stage_becomes_a_weights_format_error(small_files, monkeypatch, stage, target, exc_type):
    owner, _, name = target.rpartition(".")
    monkeypatch.setattr(getattr(torchfile, owner) if owner else torchfile, name, raiser(exc_type))
    if target == "excerpt":  # make sure a refusal is formatted (entry 'w' is not a tensor)
        monkeypatch.setattr(torchfile, "_select_state_dict", lambda obj: torchfile._check_flat({"w": 1}))
    for path in small_files[:2]:
        with pytest.raises(WeightsFormatError) as excinfo:
            read_torch_file(path)
        message = str(excinfo.value)
        assert message.startswith(f"cannot load weights from {str(path)!r}: ")
        assert f"{exc_type.__name__}: " in message and "injected" in message
        assert isinstance(excinfo.value.__cause__, exc_type)


@pytest.mark.parametrize("exc_type", [RecursionError, MemoryError, OverflowError])
def test_npz_failures_become_weights_format_errors(small_files, monkeypatch, exc_type):
    from npmnv3 import serialization

    monkeypatch.setattr(serialization, "_read_npy", raiser(exc_type))
    with pytest.raises(WeightsFormatError, match=rf"cannot read \.npz archive: {exc_type.__name__}: injected"):
        load_state_dict(small_files[2])


# --------------------------------------------------------------------------
# Real files keep loading, bit-exact
# --------------------------------------------------------------------------


def real_state_dicts():
    """State dicts of the torchvision models built on MobileNetV3, random weights, one QAT-prepared."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = tv.models.quantization.mobilenet_v3_large(weights=None, quantize=False)
        qat.train()
        qat.fuse_model(is_qat=True)
        qat.qconfig = torch.ao.quantization.get_default_qat_qconfig("qnnpack")
        torch.ao.quantization.prepare_qat(qat, inplace=True)
        qat(torch.randn(2, 3, 64, 64))  # observers record statistics
        return {
            "qat_mobilenet_v3_large": qat.state_dict(),
            "lraspp_mobilenet_v3_large": tv.models.segmentation.lraspp_mobilenet_v3_large(
                weights=None, weights_backbone=None).state_dict(),
            "deeplabv3_mobilenet_v3_large": tv.models.segmentation.deeplabv3_mobilenet_v3_large(
                weights=None, weights_backbone=None).state_dict(),
            "ssdlite320_mobilenet_v3_large": tv.models.detection.ssdlite320_mobilenet_v3_large(
                weights=None, weights_backbone=None).state_dict(),
        }


def assert_bit_exact(ours, reference):
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        expected = tensor.detach().contiguous().numpy()
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        assert ours[key].tobytes() == expected.tobytes(), key


@pytest.mark.slow
def test_torchvision_mobilenet_v3_family_loads_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")
    states = real_state_dicts()
    qat = states["qat_mobilenet_v3_large"]
    kinds = {str(t.dtype) for t in qat.values()}
    assert {"torch.int32", "torch.int64", "torch.uint8", "torch.float32"} <= kinds
    assert any(t.dim() == 0 for t in qat.values()) and any(t.shape == (1,) for t in qat.values())
    for name, state in states.items():
        for variant, options in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
            path = tmp_path / f"{name}_{variant}.pth"
            torch.save(state, path, **options)
            assert_bit_exact(load_state_dict(path), torch.load(path, weights_only=True))
        if name == "qat_mobilenet_v3_large":
            with zipfile.ZipFile(tmp_path / f"{name}_zip.pth") as zf:
                pkl = [zf.getinfo(n) for n in zf.namelist() if n.endswith("/data.pkl")][0]
                assert 100_000 < pkl.file_size < MAX_PICKLE_BYTES / 8  # the limit's headroom


def test_checkpoints_and_shared_tensors_load_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(3072, 1024, generator=g).bfloat16()  # 6 MiB stored, twice 12 MiB as float32: 4x
    state = {"embed.weight": embedding, "head.weight": embedding, "n": torch.tensor(5), "scale": torch.tensor([0.5])}
    ckpt = {"epoch": 7, "state_dict": state, "names": ["a", "b"], "best": 0.25, "shared": {"again": state}}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    ours = load_state_dict(path)
    assert list(ours) == list(state)
    assert ours["embed.weight"].dtype == np.float32
    assert ours["embed.weight"].tobytes() == embedding.float().numpy().tobytes() == ours["head.weight"].tobytes()
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    assert load_state_dict(path)["head.weight"].tobytes() == embedding.float().numpy().tobytes()
