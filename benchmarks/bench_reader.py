"""Time and peak memory of refusing hostile weights files, and of loading a real one.

Builds each file in a temporary folder, then loads it with ``npmnv3.load_state_dict`` in a
fresh child interpreter per run (torch blocked there: the reader never needs it), which
reports the wall time of the call and its peak resident memory (VmHWM, which includes the
~30 MB of the interpreter and NumPy; "baseline" is the resident size just before the call).
Prints a Markdown table: case, outcome, median time, peak, peak over baseline, message.

    python benchmarks/bench_reader.py [--repeats 3] [--cases name,name] [--keep DIR]

torch and torchvision are needed only to write the real MobileNetV3-Large files.
"""

import argparse
import json
import os
import pickle
import statistics
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------
# Pickles, opcode by opcode (protocol 2, as torch.save writes them)
# --------------------------------------------------------------------------

PROTO, STOP = b"\x80\x02", b"."


def op_str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(n):
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def op_tuple(items):
    return b"(" + b"".join(items) + b"t"


def op_tensor(size=(1,), stride=(1,), legacy=False):
    pid = [op_str("storage"), op_global("torch", "FloatStorage"), op_str("0"), op_str("cpu"), op_int(1)]
    storage = op_tuple(pid + [b"N"] if legacy else pid) + b"Q"
    hooks = op_global("collections", "OrderedDict") + b")R"
    size, stride = op_tuple([op_int(n) for n in size]), op_tuple([op_int(n) for n in stride])
    args = [storage, op_int(0), size, stride, b"\x89", hooks]
    return op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(args) + b"R"


def one_tensor_dict(legacy=False, **view):
    return PROTO + b"}(" + op_str("w") + op_tensor(legacy=legacy, **view) + b"u" + STOP


def torch_zip(path, pkl):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/data/0", struct.pack("<f", 1.5))
        zf.writestr("archive/version", b"3\n")


SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
LEGACY_HEAD = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)


def legacy_file(path, main, version=None, sys_info=None):
    with open(path, "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2) if version is None else version)
        f.write(pickle.dumps(SYS_INFO, protocol=2) if sys_info is None else sys_info)
        f.write(main + pickle.dumps(["0"], protocol=2) + struct.pack("<q", 1) + struct.pack("<f", 1.5))


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def deep_key(path):
    """zip, 200 KB data.pkl: {((...(),)...,): 1}, the tuple 200,000 levels deep."""
    torch_zip(path, PROTO + b"})" + b"\x85" * 200_000 + b"K\x01s" + STOP)


def deep_key_legacy(path):
    """legacy: the same tuple as a key of the system-info dict."""
    sys_info = PROTO + b"}" + op_str("little_endian") + b"\x88s)" + b"\x85" * 200_000 + b"K\x01s" + STOP
    legacy_file(path, one_tensor_dict(legacy=True), sys_info=sys_info)


def deep_key_5000(path):
    """zip: a 5,000-level tuple as a state-dict key (its refusal message once recursed in repr)."""
    torch_zip(path, PROTO + b"})" + b"\x85" * 5000 + op_tensor() + b"s" + STOP)


def deep_version_5000(path):
    """legacy: a 5,000-level tuple as the protocol version."""
    legacy_file(path, one_tensor_dict(legacy=True), version=PROTO + b")" + b"\x85" * 5000 + STOP)


def empty_tuples_150mib(path):
    """legacy, 150 MiB: the object pickle is EMPTY_TUPLE opcodes to the end of the file."""
    with open(path, "wb") as f:
        f.write(LEGACY_HEAD + pickle.dumps(SYS_INFO, protocol=2) + PROTO)
        chunk = b")" * 2**20
        for _ in range(150):
            f.write(chunk)


def data_pkl_63mib(path):
    """zip with a 63 MiB data.pkl (a dict, then one long string)."""
    torch_zip(path, PROTO + b"}" + op_str("x" * (63 * 2**20 - 9)) + STOP)


def tiny_opcodes_4mib(path):
    """zip, data.pkl of 4 MiB NONE opcodes: just under the size limit, the most opcodes it allows."""
    torch_zip(path, PROTO + b"N" * (4 * 2**20 - 3) + STOP)


def zero_stride_4gib(path):
    """zip (~600 bytes): a 1-element storage viewed as 32768 x 32768 with strides (0, 0)."""
    torch_zip(path, one_tensor_dict(size=(32768, 32768), stride=(0, 0)))


def deflate_bomb_3gib(path):
    """.npz, 3 MB: one deflated .npy entry declaring a 3 GiB uint8 array (valid stream and CRC)."""
    import io

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (3 * 2**30,)})
    header = header.getvalue()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = bytes(2**20)
    one = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # a full flush: each MiB is the same
    stream += one * 3072 + compressor.flush()
    crc = zlib.crc32(header)
    for _ in range(3072):
        crc = zlib.crc32(block, crc)
    size, name = len(header) + 3 * 2**30, b"w.npy"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(stream), size, len(name), 0) + name
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, len(stream), size, len(name),
                          0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(stream), 0)
    Path(path).write_bytes(local + stream + central + end)


def bare_tensor(path):
    """zip whose object is one tensor, not a dict of tensors."""
    torch_zip(path, PROTO + op_tensor() + STOP)


def setitem_on_function(path):
    """zip: SETITEM on the collections.OrderedDict global itself."""
    torch_zip(path, PROTO + op_global("collections", "OrderedDict") + op_str("k") + op_int(1) + b"s" + STOP)


def real_large(path, legacy=False):
    """torch.save of torchvision's mobilenet_v3_large().state_dict() (random init, 22 MB)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), path, _use_new_zipfile_serialization=not legacy)


CASES = {
    "deep_key": (deep_key, "zip, 200 KB: dict key nested 200,000 tuples deep", "SIGSEGV"),
    "deep_key_legacy": (deep_key_legacy, "legacy: same tuple as a sys_info key", "SIGSEGV"),
    "deep_key_5000": (deep_key_5000, "zip: 5,000-level tuple as a key", "RecursionError"),
    "deep_version_5000": (deep_version_5000, "legacy: 5,000-level tuple as the version", "RecursionError"),
    "empty_tuples_150mib": (empty_tuples_150mib, "legacy, 150 MiB of EMPTY_TUPLE", "41 s"),
    "data_pkl_63mib": (data_pkl_63mib, "zip with a 63 MiB data.pkl", "19 s, 600 MB"),
    "tiny_opcodes_4mib": (tiny_opcodes_4mib, "zip, 4 MiB data.pkl of NONE opcodes", "-"),
    "zero_stride_4gib": (zero_stride_4gib, "zip, ~600 B: 1 element viewed as 32768x32768, strides 0", "14 s, 4 GiB"),
    "deflate_bomb_3gib": (deflate_bomb_3gib, ".npz, 3 MB deflate declaring 3 GiB", "3 GiB"),
    "bare_tensor": (bare_tensor, "zip holding one bare tensor", "names _TensorSpec"),
    "setitem_on_function": (setitem_on_function, "zip: SETITEM on collections.OrderedDict", "names _Function"),
    "real_large": (real_large, "baseline: real MobileNetV3-Large, zip (22 MB)", "-"),
    "real_large_legacy": (lambda p: real_large(p, legacy=True), "baseline: same, legacy format", "-"),
}

CHILD = r"""
import json, sys, time
sys.modules["torch"] = None

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

from npmnv3 import load_state_dict
from npmnv3.errors import WeightsFormatError
path = sys.argv[1]
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak (VmHWM) := current resident size
start = time.perf_counter()
try:
    out = load_state_dict(path)
    outcome, message = "loaded", f"{len(out)} tensors, {sum(a.nbytes for a in out.values())} bytes"
except WeightsFormatError as exc:
    outcome, message = "refused", str(exc).split("': ", 1)[-1]
except BaseException as exc:
    outcome, message = "escaped", f"{type(exc).__name__}: {exc}"[:300]
seconds = time.perf_counter() - start
print(json.dumps(dict(outcome=outcome, message=message, seconds=seconds, peak=status("VmHWM"), baseline=baseline)))
"""


def run(path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(outcome=f"crashed ({proc.returncode})", message=proc.stderr.strip()[-200:], seconds=float("nan"),
                    peak=float("nan"), baseline=float("nan"))
    return json.loads(proc.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="child runs per case (median time, highest peak)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--keep", metavar="DIR", help="build the files in DIR and keep them")
    args = parser.parse_args()
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print("| case | file size | outcome | time ms (median) | peak RSS MB | over baseline MB | before | message |")
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            build, title, before = CASES[name]
            path = folder / (name + (".npz" if "bomb" in name else ".pth"))
            build(path)
            runs = [run(path) for _ in range(args.repeats)]
            last = runs[-1]
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = max(r["peak"] for r in runs)
            over = max(r["peak"] - r["baseline"] for r in runs)
            size = os.path.getsize(path)
            size_text = (f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB" if size >= 1024
                         else f"{size} B")
            print(f"| {title} | {size_text} | {last['outcome']} | {1000 * seconds:.1f} | {peak:.1f} | {over:.1f} "
                  f"| {before} | {last['message'].replace('|', '/')} |", flush=True)
            if not args.keep:
                path.unlink()


if __name__ == "__main__":
    main()
