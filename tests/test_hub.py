"""Tests for npmnv3.hub.fetch against a local HTTP server on 127.0.0.1.

The server serves one file of random bytes under paths whose first segment picks a
behaviour (``/ok/<name>``, ``/trunc/<name>``, ...). Every request is recorded so the
tests can tell whether the network was used.
"""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from npmnv3 import hub
from npmnv3.errors import DownloadError

DATA = random.Random(20240531).randbytes(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
SIZE = len(DATA)
NAME = "weights-0123abcd.pth"
BAD_DATA = DATA[:-1] + bytes([DATA[-1] ^ 1])  # same size, one bit flipped
BAD_SHA = hashlib.sha256(BAD_DATA).hexdigest()
CHUNK = 16 * 1024
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- server

class _Handler(BaseHTTPRequestHandler):
    """Serves DATA with the behaviour named by the first path segment."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        state = self.server.state
        with state.lock:
            state.requests.append(self.path)
        mode = self.path.split("/")[1]
        try:
            getattr(self, "mode_" + mode.replace("-", "_"), self.mode_missing)()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, interrupt, too many bytes)

    # -- helpers
    def _head(self, length=SIZE, status=200):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _body(self, data, delay=0.0):
        for start in range(0, len(data), CHUNK):
            self.wfile.write(data[start:start + CHUNK])
            self.wfile.flush()
            if delay:
                self.server.state.stop.wait(delay)

    def _redirect(self, to_mode):
        self.send_response(302)
        self.send_header("Location", f"/{to_mode}/{NAME}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # -- behaviours
    def mode_ok(self):
        self._head()
        self._body(DATA)

    mode_mirror = mode_ok

    def mode_drip(self):  # slow enough for two clients to overlap
        self._head()
        self._body(DATA, delay=0.005)

    def mode_bad(self):
        self._head()
        self._body(BAD_DATA)

    def mode_trunc(self):  # announces SIZE, sends half, closes
        self._head()
        self._body(DATA[:SIZE // 2])

    def mode_short_nolength(self):  # no Content-Length, early close
        self._head(length=None)
        self._body(DATA[:SIZE // 2])

    def mode_long_nolength(self):  # no Content-Length, too many bytes
        self._head(length=None)
        self._body(DATA + DATA[:CHUNK])

    def mode_wronglength(self):
        self._head(length=SIZE + 10)
        self._body(DATA + bytes(10))

    def mode_slow(self):  # nothing at all for 5 s
        self.server.state.stop.wait(5)
        self._head()
        self._body(DATA)

    def mode_stall(self):  # headers and one chunk, then 5 s of silence
        self._head()
        self.wfile.write(DATA[:CHUNK])
        self.wfile.flush()
        self.server.state.stop.wait(5)

    def mode_redirect(self):
        self._redirect("ok")

    def mode_redirect_bad(self):
        self._redirect("bad")

    def mode_missing(self):
        self.send_error(404, "Not Found")


class _State:
    def __init__(self):
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()


class Server:
    """A running ThreadingHTTPServer plus what it has seen."""

    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.state = _State()
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def requests(self):
        return list(self.httpd.state.requests)

    def base(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/"

    def url(self, mode: str) -> str:
        return self.base(mode) + NAME

    def close(self):
        self.httpd.state.stop.set()  # wake sleeping handlers
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Point every cache variable into tmp_path; return the npmnv3 cache folder."""
    monkeypatch.setenv("NPMNV3_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NPMNV3_WEIGHTS_URL", raising=False)
    monkeypatch.delenv("NPMNV3_OFFLINE", raising=False)
    return tmp_path / "cache"


def fetch(server, mode, **kwargs):
    """hub.fetch of the test file from the server in ``mode``."""
    kwargs.setdefault("progress", False)
    kwargs.setdefault("timeout", 5.0)
    return hub.fetch(NAME, SHA, SIZE, base_url=server.base(mode), **kwargs)


def fetch_error(server, mode, **kwargs) -> DownloadError:
    with pytest.raises(DownloadError) as info:
        fetch(server, mode, **kwargs)
    return info.value


def assert_message(err, url, path, *reasons):
    """The message names the URL, the expected path, each reason, and the manual fix."""
    msg = str(err)
    assert url in msg
    assert str(path) in msg
    for reason in reasons:
        assert reason in msg, (reason, msg)
    assert f"download {url} with a browser and save it as {path}" in msg
    assert "NPMNV3_HOME" in msg


def assert_folder(folder: Path, *names):
    """``folder`` holds exactly ``names`` (no temp files); absent counts as empty."""
    present = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert present == sorted(names)


# --------------------------------------------------------------------------- success

def test_success_then_cache_hit_without_request(server, cache):
    path = fetch(server, "ok")
    assert path == cache / NAME
    assert path.read_bytes() == DATA
    assert server.requests == [f"/ok/{NAME}"]
    assert_folder(cache, NAME)

    again = fetch(server, "ok")
    assert again == path
    assert len(server.requests) == 1  # served from the cache


def test_sha256_is_case_insensitive(server, cache):
    assert hub.fetch(NAME, SHA.upper(), SIZE, base_url=server.base("ok"),
                     progress=False).read_bytes() == DATA


def test_redirect_is_followed(server, cache):
    path = fetch(server, "redirect")
    assert path.read_bytes() == DATA
    assert server.requests == [f"/redirect/{NAME}", f"/ok/{NAME}"]
    assert_folder(cache, NAME)


def test_explicit_directory_beats_env(server, cache, tmp_path):
    explicit = tmp_path / "explicit"
    path = fetch(server, "ok", directory=explicit)
    assert path == explicit / NAME and path.read_bytes() == DATA
    assert not cache.exists()


# --------------------------------------------------------------------------- failures

def test_wrong_hash_is_refused_and_not_retried(server, cache):
    err = fetch_error(server, "bad")
    assert_message(err, server.url("bad"), cache / NAME,
                   f"has SHA-256 {BAD_SHA} instead of {SHA}", "not retried")
    assert len(server.requests) == 1
    assert_folder(cache)


def test_wrong_hash_after_redirect_names_final_url(server, cache):
    err = fetch_error(server, "redirect-bad")
    assert_message(err, server.url("redirect-bad"), cache / NAME,
                   f"redirected to {server.url('bad')}", BAD_SHA)
    assert_folder(cache)


def test_truncated_body_is_detected(server, cache):
    err = fetch_error(server, "trunc")
    assert_message(err, server.url("trunc"), cache / NAME,
                   f"closed after {SIZE // 2:,} of {SIZE:,} bytes")
    assert_folder(cache)


def test_early_close_without_content_length(server, cache):
    err = fetch_error(server, "short-nolength")
    assert_message(err, server.url("short-nolength"), cache / NAME,
                   f"closed after {SIZE // 2:,} of {SIZE:,} bytes")
    assert_folder(cache)


def test_too_many_bytes_are_refused(server, cache):
    err = fetch_error(server, "long-nolength")
    assert_message(err, server.url("long-nolength"), cache / NAME,
                   f"more than the expected {SIZE:,} bytes")
    assert_folder(cache)


def test_wrong_content_length_is_refused(server, cache):
    err = fetch_error(server, "wronglength")
    assert_message(err, server.url("wronglength"), cache / NAME,
                   f"announced {SIZE + 10:,} bytes but {SIZE:,} were expected")
    assert_folder(cache)


def test_http_404(server, cache):
    err = fetch_error(server, "missing")
    assert_message(err, server.url("missing"), cache / NAME, "HTTP 404")
    assert isinstance(err.__cause__, urllib.error.HTTPError)
    assert_folder(cache)


def test_timeout_before_headers(server, cache):
    err = fetch_error(server, "slow", timeout=0.5)
    assert_message(err, server.url("slow"), cache / NAME, "nothing for 0.5 s (timed out)")
    # urllib raises TimeoutError from getresponse() (URLError when connecting times out)
    assert isinstance(err.__cause__, (TimeoutError, urllib.error.URLError))
    assert_folder(cache)


def test_timeout_mid_body(server, cache):
    err = fetch_error(server, "stall", timeout=0.5)
    assert_message(err, server.url("stall"), cache / NAME, "nothing for 0.5 s (timed out)")
    assert isinstance(err.__cause__, TimeoutError)
    assert_folder(cache)


def test_connection_refused(cache, tmp_path):
    srv = Server()
    base = srv.base("ok")
    srv.close()  # nothing listens on that port any more
    with pytest.raises(DownloadError) as info:
        hub.fetch(NAME, SHA, SIZE, base_url=base, progress=False, timeout=2)
    assert_message(info.value, base + NAME, cache / NAME, "Connection refused")
    assert_folder(cache)


def test_unsupported_scheme(cache):
    with pytest.raises(DownloadError) as info:
        hub.fetch(NAME, SHA, SIZE, base_url="ftp://example.invalid/models")
    assert_message(info.value, f"ftp://example.invalid/models/{NAME}", cache / NAME,
                   "scheme 'ftp' is not supported")


def test_bad_arguments_raise_value_error(cache):
    for name in ("", "..", "a/b", "a\\b"):
        with pytest.raises(ValueError):
            hub.fetch(name, SHA, SIZE)
    with pytest.raises(ValueError):
        hub.fetch(NAME, SHA[:8], SIZE)
    with pytest.raises(ValueError):
        hub.fetch(NAME, SHA, -1)


# --------------------------------------------------------------------------- cache

def test_corrupt_cached_file_is_replaced(server, cache):
    cache.mkdir()
    (cache / NAME).write_bytes(BAD_DATA)  # right size, wrong hash
    path = fetch(server, "ok")
    assert path.read_bytes() == DATA
    assert len(server.requests) == 1
    assert_folder(cache, NAME)


def test_cached_file_is_rehashed_every_time(server, cache):
    path = fetch(server, "ok")
    path.write_bytes(BAD_DATA)  # corrupted after a successful fetch
    assert fetch(server, "ok").read_bytes() == DATA
    assert len(server.requests) == 2


def test_short_cached_file_is_replaced(server, cache):
    cache.mkdir()
    (cache / NAME).write_bytes(DATA[:100])
    assert fetch(server, "ok").read_bytes() == DATA
    assert_folder(cache, NAME)


def test_unremovable_bad_cache_entry(server, cache):
    (cache / NAME).mkdir(parents=True)  # a folder where the file should be
    (cache / NAME / "x").write_bytes(b"x")
    err = fetch_error(server, "ok")
    assert_message(err, server.url("ok"), cache / NAME,
                   "the cached file is unusable (it is not a regular file) "
                   "and cannot be removed")
    assert server.requests == []


def test_file_that_cannot_be_moved_into_place(server, cache, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))
    monkeypatch.setattr(hub.os, "replace", refuse)
    err = fetch_error(server, "ok")
    assert_message(err, server.url("ok"), cache / NAME, "PermissionError")
    assert isinstance(err.__cause__, PermissionError)
    assert_folder(cache)


def test_read_only_cache_folder(server, cache, tmp_path, monkeypatch):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        try:
            (readonly / "probe").touch()
        except PermissionError:
            folder = readonly  # permission bits are enforced
        else:
            # Running as root: permission bits do not stop writes. A folder that
            # would have to be created under a regular FILE cannot be created.
            (readonly / "probe").unlink()
            blocker = tmp_path / "blocker"
            blocker.write_bytes(b"a file, not a folder")
            folder = blocker / "cache"
        monkeypatch.setenv("NPMNV3_HOME", str(folder))
        err = fetch_error(server, "ok")
        assert_message(err, server.url("ok"), folder / NAME,
                       f"the cache folder {folder} cannot be created or written to")
        assert isinstance(err.__cause__, OSError)
        assert server.requests == []
        assert_folder(readonly)
    finally:
        readonly.chmod(0o755)


# --------------------------------------------------------------------------- torch hub

def test_torch_hub_copy_is_reused_in_place(server, cache, tmp_path):
    hub_dir = tmp_path / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    (hub_dir / NAME).write_bytes(DATA)
    assert fetch(server, "ok") == hub_dir / NAME
    assert server.requests == []
    assert not cache.exists()


def test_mismatching_torch_hub_copy_is_ignored(server, cache, tmp_path):
    hub_dir = tmp_path / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    (hub_dir / NAME).write_bytes(BAD_DATA)
    path = fetch(server, "ok")
    assert path == cache / NAME and path.read_bytes() == DATA
    assert len(server.requests) == 1
    assert (hub_dir / NAME).read_bytes() == BAD_DATA  # not ours: left alone


# --------------------------------------------------------------------------- env

def test_weights_url_mirror(server, cache, monkeypatch):
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", server.base("mirror").rstrip("/"))
    path = hub.fetch(NAME, SHA, SIZE, progress=False)
    assert path.read_bytes() == DATA
    assert server.requests == [f"/mirror/{NAME}"]


def test_base_url_argument_beats_mirror(server, cache, monkeypatch):
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", server.base("missing"))
    assert fetch(server, "ok").read_bytes() == DATA
    assert server.requests == [f"/ok/{NAME}"]


def test_default_url(cache, monkeypatch):
    monkeypatch.setenv("NPMNV3_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        hub.fetch(NAME, SHA, SIZE)
    assert hub.DEFAULT_BASE_URL + NAME in str(info.value)


def test_offline_env_refuses_network(server, cache, monkeypatch):
    monkeypatch.setenv("NPMNV3_OFFLINE", "1")
    err = fetch_error(server, "ok")
    assert_message(err, server.url("ok"), cache / NAME,
                   "the network is forbidden by NPMNV3_OFFLINE=1")
    assert server.requests == []
    assert_folder(cache)


def test_offline_argument_and_override(server, cache, monkeypatch):
    err = fetch_error(server, "ok", offline=True)
    assert "forbidden by offline=True" in str(err)
    monkeypatch.setenv("NPMNV3_OFFLINE", "1")
    assert fetch(server, "ok", offline=False).read_bytes() == DATA  # argument wins
    assert fetch(server, "ok").read_bytes() == DATA  # offline, but cached
    assert len(server.requests) == 1


def test_offline_reports_removed_corrupt_copy(server, cache, monkeypatch):
    monkeypatch.setenv("NPMNV3_OFFLINE", "1")
    cache.mkdir()
    (cache / NAME).write_bytes(BAD_DATA)
    err = fetch_error(server, "ok")
    assert "a cached copy was removed because its SHA-256 is" in str(err)
    assert_folder(cache)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("NPMNV3_HOME", "XDG_CACHE_HOME", "TORCH_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "npmnv3"
    assert hub.torch_hub_dir() == tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "npmnv3"
    assert hub.torch_hub_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"

    monkeypatch.setenv("NPMNV3_HOME", str(tmp_path / "mine"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert hub.cache_dir() == tmp_path / "mine"
    assert hub.torch_hub_dir() == tmp_path / "th" / "hub" / "checkpoints"

    monkeypatch.setenv("NPMNV3_HOME", "")  # empty counts as unset
    assert hub.cache_dir() == tmp_path / "xdg" / "npmnv3"
    assert not (tmp_path / "xdg").exists()  # nothing created by asking


# --------------------------------------------------------------------------- interrupts

def test_keyboard_interrupt_mid_download_leaves_nothing(server, cache):
    def interrupt(done, total):
        if done >= 2 * CHUNK:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fetch(server, "drip", progress=interrupt)
    assert_folder(cache)


def test_interrupt_in_hashing_leaves_nothing(server, cache, monkeypatch):
    real_sha256 = hashlib.sha256

    class Exploding:
        def __init__(self):
            self.inner = real_sha256()
            self.calls = 0

        def update(self, data):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            self.inner.update(data)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(hub.hashlib, "sha256", Exploding)
    with pytest.raises(KeyboardInterrupt):
        fetch(server, "ok")
    assert_folder(cache)


# --------------------------------------------------------------------------- progress

def test_progress_bar_forced_on(server, cache, capsys):
    fetch(server, "ok", progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"\rDownloading {NAME}: ")
    assert f"{SIZE / 1e6:.1f}/{SIZE / 1e6:.1f} MB 100%" in err and err.endswith("\n")


def test_progress_auto_only_on_a_terminal(server, cache, monkeypatch, capsys):
    fetch(server, "ok")  # progress=None, stderr captured: not a terminal
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    fake = Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    hub.fetch(NAME, SHA, SIZE, base_url=server.base("ok"), directory=cache / "2")
    assert "100%" in fake.getvalue()


def test_progress_callback_sees_every_byte(server, cache):
    seen = []
    fetch(server, "ok", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (SIZE, SIZE)
    assert all(total == SIZE for _, total in seen)


# --------------------------------------------------------------------------- concurrency

def test_two_threads_download_one_file(server, cache):
    barrier = threading.Barrier(2)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(fetch(server, "drip"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert results == [cache / NAME] * 2
    assert (cache / NAME).read_bytes() == DATA
    assert len(server.requests) == 2  # both really downloaded, overlapping
    assert_folder(cache, NAME)


_CHILD = r"""
import sys, types
pkg = types.ModuleType("npmnv3")          # load hub.py without the package __init__
pkg.__path__ = [sys.argv[1] + "/npmnv3"]
sys.modules["npmnv3"] = pkg
from npmnv3 import hub
print(hub.fetch(sys.argv[2], sys.argv[3], int(sys.argv[4]), base_url=sys.argv[5],
                progress=False))
"""


def test_two_processes_download_one_file(server, cache):
    args = [sys.executable, "-c", _CHILD, str(REPO), NAME, SHA, str(SIZE),
            server.base("drip")]
    children = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=20) for child in children]
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err
        assert out.strip() == str(cache / NAME)
    assert (cache / NAME).read_bytes() == DATA
    assert_folder(cache, NAME)


# --------------------------------------------------------------------------- files known only by the prefix in their name

PREFIXED = f"weights_qnnpack-{SHA[:8]}.pth"     # as torchvision names files: the hash's first 8 hex digits


def test_a_file_named_with_its_hash_prefix_is_checked_by_it(server, cache):
    path = hub.fetch(PREFIXED, None, None, base_url=server.base("ok"), subfolder="quantized/", progress=False)
    assert path == cache / PREFIXED and path.read_bytes() == DATA
    assert server.requests == [f"/ok/quantized/{PREFIXED}"]
    again = hub.fetch(PREFIXED, None, None, base_url=server.base("ok"), subfolder="quantized/", progress=False)
    assert again == path and len(server.requests) == 1       # the cached copy, checked by the prefix again


def test_a_file_whose_hash_does_not_begin_with_its_prefix_is_refused(server, cache):
    with pytest.raises(DownloadError) as info:
        hub.fetch(PREFIXED, None, None, base_url=server.base("bad"), progress=False)
    assert f"has SHA-256 {BAD_SHA} instead of one beginning with {SHA[:8]}" in str(info.value)
    assert f"(SHA-256 beginning with {SHA[:8]})" in str(info.value)
    assert not (cache / PREFIXED).exists()
    cache.mkdir(exist_ok=True)
    (cache / PREFIXED).write_bytes(BAD_DATA)            # a wrong cached copy is replaced, not used
    assert hub.fetch(PREFIXED, None, None, base_url=server.base("ok"), progress=False).read_bytes() == DATA


def test_a_name_can_carry_the_whole_digest(server, cache):
    named = f"weights-{SHA}.pth"           # 64 hex digits: the full SHA-256, the size still unpinned
    with pytest.raises(DownloadError) as info:
        hub.fetch(named, None, None, base_url=server.base("bad"), progress=False)
    assert f"has SHA-256 {BAD_SHA} instead of {SHA}" in str(info.value)
    assert f"(SHA-256 {SHA})" in str(info.value)
    assert hub.fetch(named, None, None, base_url=server.base("ok"), progress=False).read_bytes() == DATA


def test_unpinned_size_still_needs_the_announced_length(server, cache):
    with pytest.raises(DownloadError, match=r"the connection closed after 150,000 of 300,000 bytes"):
        hub.fetch(PREFIXED, None, None, base_url=server.base("trunc"), progress=False)


def test_without_a_hash_the_name_must_carry_a_prefix(cache):
    with pytest.raises(ValueError, match=r"without sha256, the file name must carry a SHA-256 prefix"):
        hub.fetch("weights.pth", None, None)
    with pytest.raises(ValueError, match=r"subfolder must be empty or a relative folder ending in '/'"):
        hub.fetch(PREFIXED, None, None, subfolder="../")
    assert hub.hash_prefix("mobilenet_v3_large_qnnpack-5bcacf28.pth") == "5bcacf28"
