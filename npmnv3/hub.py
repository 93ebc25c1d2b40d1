"""Fetch official weight files into a local cache, verified by size and SHA-256.

A file whose full SHA-256 is not on record (torchvision's quantized weights) is checked as torch
hub checks every file: its SHA-256 must begin with the hex digits after a ``-`` of its name
(``mobilenet_v3_large_qnnpack-5bcacf28.pth``: ``5bcacf28...``; the first such group), and its size is not pinned (a
download must still have the length its server announces). Pass ``sha256=None, size=None`` for that.

Only the standard library is used (``urllib``). The one public entry point is
:func:`fetch`; :func:`cache_dir` and :func:`torch_hub_dir` tell where files live.

Where a file is looked for, in order:

1. ``directory`` when given, else :func:`cache_dir` (``$NPMNV3_HOME``, else
   ``$XDG_CACHE_HOME/npmnv3``, else ``~/.cache/npmnv3``). A file there is used only if
   its size and full SHA-256 match; it is re-hashed on every call. A file that does
   not match is deleted and downloaded again; it is never used.
2. torch's own cache, :func:`torch_hub_dir`. A matching file there is used **in
   place**: its path is returned and nothing is copied (no second 20 MB copy on disk).
   A file there that does not match is ignored and left alone (it is not ours).
3. The network: ``base_url``, else ``$NPMNV3_WEIGHTS_URL``, else
   :data:`DEFAULT_BASE_URL`, joined with the file name. ``offline=True``, or
   ``$NPMNV3_OFFLINE=1`` when ``offline`` is None, forbids this step.

A download streams into a private temporary file in the cache folder, hashing as it
goes, checks the byte count (against the expected size and any Content-Length; an
early close by the server is detected) and the SHA-256, fsyncs, then moves the file
into place with the atomic ``os.replace``. The temporary file is deleted on any
exception, KeyboardInterrupt included. A hash mismatch is never retried. Two
concurrent downloads of one file (threads or processes) each write their own
temporary file; the last ``os.replace`` wins and both leave the same, correct file.

Every failure raises :class:`~npmnv3.errors.DownloadError` (an ``OSError``) whose
message gives the URL, the path where the file was expected, the reason, and how to
put the file there by hand; it is chained to the underlying exception.
"""

from __future__ import annotations

import glob
import hashlib
import re
import http.client
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

from .errors import DownloadError
from .serialization import fsync_folder

__all__ = ["DEFAULT_BASE_URL", "cache_dir", "torch_hub_dir", "fetch"]

DEFAULT_BASE_URL = "https://download.pytorch.org/models/"

_CHUNK = 1 << 16          # bytes read from the network at a time
_HASH_BLOCK = 1 << 20     # bytes read from disk at a time when hashing
_STALE_TEMP_AGE = 24 * 3600  # seconds after which a leftover *.part file is removed
_SCHEMES = ("http", "https", "file")
_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,64})\.")  # torch hub's rule: the hex digits after a "-", before a "."
_MAX_UNPINNED = 1 << 30   # bytes accepted from a server for a file whose size is not pinned

ProgressArg = Union[None, bool, Callable[[int, int], None]]


# --------------------------------------------------------------------------- folders

def _env(name: str) -> Optional[str]:
    """The environment variable ``name``, or None when unset or empty."""
    value = os.environ.get(name)
    return value if value else None


def cache_dir() -> Path:
    """The folder npmnv3 keeps downloaded files in (not created until needed).

    ``$NPMNV3_HOME``, else ``$XDG_CACHE_HOME/npmnv3``, else ``~/.cache/npmnv3``.
    """
    home = _env("NPMNV3_HOME")
    if home:
        return Path(home).expanduser()
    xdg = _env("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "npmnv3"


def torch_hub_dir() -> Path:
    """Where torch keeps downloaded checkpoints, resolved the way torch does.

    ``$TORCH_HOME/hub/checkpoints``, else ``$XDG_CACHE_HOME/torch/hub/checkpoints``,
    else ``~/.cache/torch/hub/checkpoints``.
    """
    torch_home = _env("TORCH_HOME")
    if torch_home:
        base = Path(torch_home).expanduser()
    else:
        xdg = _env("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torch"
    return base / "hub" / "checkpoints"


# --------------------------------------------------------------------------- errors

class _Target(NamedTuple):
    """What is being fetched and where it must end up."""

    filename: str
    sha256: str             # the full digest, or the prefix the file name carries
    size: Optional[int]     # None: not pinned
    url: str
    path: Path

    @property
    def described(self) -> str:
        """What the file must be, for messages."""
        if len(self.sha256) < 64:
            return f"SHA-256 beginning with {self.sha256}"
        return f"SHA-256 {self.sha256}" if self.size is None else f"{self.size:,} bytes, SHA-256 {self.sha256}"


def _error(target: _Target, reason: str) -> DownloadError:
    """A DownloadError naming the URL, the expected path, the reason and the manual fix."""
    return DownloadError(
        f"cannot fetch {target.filename} from {target.url}: {reason}. "
        f"The file was expected at {target.path}. To place it there by hand, "
        f"download {target.url} with a browser and save it as {target.path} "
        f"({target.described}), "
        f"or set NPMNV3_HOME to a folder that already holds it, "
        f"or pass the file's path (weights=PATH; on the command line --weights PATH)."
    )


def _describe(exc: BaseException, timeout: float) -> str:
    """A short, human reason for a network or file-system exception."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            return _describe(inner, timeout)
        return f"the URL could not be opened ({inner})"
    if isinstance(exc, socket.gaierror):
        return f"no network: the server's name could not be resolved ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return f"the server sent nothing for {timeout:g} s (timed out)"
    if isinstance(exc, http.client.HTTPException):
        return f"the HTTP exchange failed ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- checks

def hash_prefix(filename: str) -> Optional[str]:
    """The SHA-256 prefix a file name carries as torch hub reads it (``name-5bcacf28.pth``), or None."""
    found = _HASH_PREFIX.search(filename)
    return found.group(1) if found else None


def _check_args(filename: str, sha256: Optional[str], size: Optional[int]) -> str:
    """Validate the arguments of :func:`fetch`; return the SHA-256 (or the name's prefix) in lower case."""
    if (not isinstance(filename, str) or not filename or filename in (".", "..")
            or "/" in filename or "\\" in filename or "\0" in filename):
        raise ValueError(f"filename must be a plain file name, got {filename!r}")
    if sha256 is None and size is None:
        prefix = hash_prefix(filename)
        if prefix is None:
            raise ValueError(f"without sha256, the file name must carry a SHA-256 prefix "
                             f"(name-<8 or more hex digits>.ext), got {filename!r}")
        return prefix
    digest = sha256.lower() if isinstance(sha256, str) else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    return digest


def sha256_of(path) -> str:
    """The SHA-256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _digest_mismatch(actual: str, sha256: str) -> Optional[str]:
    """None when ``actual`` is ``sha256`` (64 hex digits) or begins with it (a name's prefix); else
    what was expected instead, for messages."""
    if actual == sha256 or (len(sha256) < 64 and actual.startswith(sha256)):
        return None
    return sha256 if len(sha256) == 64 else f"one beginning with {sha256}"


def _mismatch(path: Path, sha256: str, size: Optional[int]) -> Optional[str]:
    """None when ``path`` is a regular file of ``size`` bytes (any, when None) with digest ``sha256``
    (or one beginning with it, for a name's prefix).

    Otherwise a short reason why it is not usable. The size is checked first so a
    wrong file is rejected without hashing it.
    """
    try:
        if not path.is_file():
            return "it is not a regular file"
        actual_size = path.stat().st_size
        if size is not None and actual_size != size:
            return f"it has {actual_size:,} bytes instead of {size:,}"
        actual = sha256_of(path)
    except OSError as exc:
        return f"it cannot be read ({exc})"
    expected = _digest_mismatch(actual, sha256)
    return None if expected is None else f"its SHA-256 is {actual} instead of {expected}"


def _is_verified(path: Path, sha256: str, size: Optional[int]) -> bool:
    """True when ``path`` exists and matches; False when it is absent or wrong."""
    return os.path.lexists(path) and _mismatch(path, sha256, size) is None


def _discard_bad_cached(target: _Target, reason: str) -> None:
    """Remove a cached file that failed verification (``reason``) so it is never used."""
    try:
        if target.path.is_dir() and not target.path.is_symlink():
            raise IsADirectoryError(f"{target.path} is a directory")
        target.path.unlink(missing_ok=True)
    except OSError as exc:
        raise _error(target, f"the cached file is unusable ({reason}) and cannot be "
                             f"removed ({exc})") from exc


# --------------------------------------------------------------------------- network

def _resolve_url(base_url: Optional[str], filename: str) -> str:
    """``base_url`` (or the mirror from the environment, or the default) + filename."""
    base = base_url or _env("NPMNV3_WEIGHTS_URL") or DEFAULT_BASE_URL
    if not base.endswith("/"):
        base += "/"
    return base + urllib.parse.quote(filename)  # (a subfolder's "/" is kept: quote leaves it)


def _network_forbidden(offline: Union[None, bool, str]) -> Optional[str]:
    """Why the network may not be used (what the user set), or None when it may."""
    if offline is None:
        return "NPMNV3_OFFLINE=1" if os.environ.get("NPMNV3_OFFLINE") == "1" else None
    if isinstance(offline, str):
        return offline or None
    return "offline=True" if offline else None


class _TerminalBar:
    """A one-line ``\\r`` progress bar on stderr: name, MB done / total, percent."""

    def __init__(self, filename: str):
        self.filename = filename
        self.last_shown = -1.0
        self.shown_any = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last_shown < 0.1:
            return
        self.last_shown = now
        percent = 100.0 * done / total if total else 100.0
        sys.stderr.write(f"\rDownloading {self.filename}: {done / 1e6:.1f}/"
                         f"{total / 1e6:.1f} MB {percent:3.0f}%")
        sys.stderr.flush()
        self.shown_any = True

    def close(self) -> None:
        """End the line so later output starts on a fresh one."""
        if self.shown_any:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _make_reporter(progress: ProgressArg, filename: str):
    """A ``(done, total)`` callback (or None) for the ``progress`` argument."""
    if callable(progress) and not isinstance(progress, bool):
        return progress
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return _TerminalBar(filename) if progress else None


def _check_response(response, target: _Target) -> Optional[int]:
    """Refuse a response whose status or announced length is wrong; return the length to expect
    (the pinned size, else the announced one, else None)."""
    status = getattr(response, "status", None)
    if status is not None and status != 200:
        raise _error(target, f"the server answered HTTP {status} instead of 200")
    announced = response.headers.get("Content-Length")
    if announced is not None:
        try:
            length = int(announced)
        except ValueError:
            raise _error(target, f"the server sent an invalid Content-Length "
                                 f"{announced!r}") from None
        if target.size is not None and length != target.size:
            raise _error(target, f"the server announced {length:,} bytes "
                                 f"but {target.size:,} were expected")
        return length
    return target.size


def _stream(response, out, target: _Target, report, expected: Optional[int]) -> str:
    """Copy ``response`` into the file ``out``, hashing and counting; return the digest.

    Raises DownloadError when the body is shorter or longer than ``expected`` bytes (an early
    close makes ``read`` return b'' without raising, so counting is what detects it). With
    nothing to expect (size not pinned, no Content-Length) only ``_MAX_UNPINNED`` bytes are taken.
    """
    digest = hashlib.sha256()
    done = 0
    limit = _MAX_UNPINNED if expected is None else expected
    while chunk := response.read(_CHUNK):
        done += len(chunk)
        if done > limit:
            raise _error(target, f"the server sent more than the expected "
                                 f"{limit:,} bytes")
        digest.update(chunk)
        out.write(chunk)
        if report:
            report(done, expected or 0)
    if expected is not None and done != expected:
        raise _error(target, f"the connection closed after {done:,} of "
                             f"{expected:,} bytes (truncated download)")
    return digest.hexdigest()


def _download_into(out, target: _Target, timeout: float, report) -> None:
    """Download ``target.url`` into the open file ``out`` and verify it."""
    request = urllib.request.Request(target.url, headers={"User-Agent": "npmnv3"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        expected = _check_response(response, target)
        actual = _stream(response, out, target, report, expected)
        final_url = response.geturl()
    expected = _digest_mismatch(actual, target.sha256)
    if expected is not None:
        where = "" if final_url == target.url else f" (redirected to {final_url})"
        raise _error(target, f"the downloaded file{where} has SHA-256 {actual} instead "
                             f"of {expected}; it is not the expected file and the "
                             f"download was not retried")
    out.flush()
    os.fsync(out.fileno())


def _remove_stale_temps(folder: Path, filename: str) -> None:
    """Best effort: delete our temp files left by a process killed a day ago or more."""
    cutoff = time.time() - _STALE_TEMP_AGE
    try:
        for leftover in folder.glob(f".{glob.escape(filename)}.*.part"):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
    except OSError:
        pass


def _download(target: _Target, timeout: float, progress: ProgressArg) -> None:
    """Download ``target`` to a temp file beside ``target.path``, then move it there."""
    scheme = urllib.parse.urlsplit(target.url).scheme.lower()
    if scheme not in _SCHEMES:
        raise _error(target, f"the URL scheme {scheme!r} is not supported "
                             f"(use one of {', '.join(_SCHEMES)})")
    folder = target.path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.filename}.",
                                         suffix=".part")
    except OSError as exc:
        raise _error(target, f"the cache folder {folder} cannot be created or written "
                             f"to ({exc})") from exc
    _remove_stale_temps(folder, target.filename)
    report = _make_reporter(progress, target.filename)
    try:
        with os.fdopen(fd, "wb") as out:
            _download_into(out, target, timeout, report)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target.path)
    except BaseException as exc:
        _remove_quietly(temp_name)
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the open error response
        if isinstance(exc, DownloadError) or not isinstance(exc, Exception):
            raise  # already explained, or KeyboardInterrupt / SystemExit
        raise _error(target, _describe(exc, timeout)) from exc
    finally:
        if isinstance(report, _TerminalBar):
            report.close()
    fsync_folder(folder)


def _remove_quietly(path: str) -> None:
    """Delete ``path`` if it exists; never raise."""
    try:
        os.unlink(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- public

def fetch(filename: str, sha256: Optional[str], size: Optional[int], *,
          base_url: Optional[str] = None,
          subfolder: str = "",
          directory: Union[str, os.PathLike, None] = None,
          offline: Union[None, bool, str] = None,
          progress: ProgressArg = None,
          timeout: float = 30.0) -> Path:
    """Return the path of a local copy of ``filename`` whose size and SHA-256 match.

    Parameters
    ----------
    filename : str
        Plain file name, e.g. ``"mobilenet_v3_large-5c1a4163.pth"``.
    sha256 : str or None
        The full expected SHA-256 (64 hex digits); None (with ``size`` None): the file's SHA-256
        must begin with the hex digits its name carries after its last ``-``, as torch hub checks.
    size : int or None
        The expected size in bytes; None: not pinned.
    base_url : str, optional
        Where to download from; default ``$NPMNV3_WEIGHTS_URL``, else :data:`DEFAULT_BASE_URL`.
        ``subfolder`` (e.g. ``"quantized/"``) and the file name are appended.
    directory : path, optional
        Cache folder to use instead of :func:`cache_dir`.
    offline : bool, str or None
        True, or a non-empty string naming the setting that asked for it (e.g. ``"--offline"``,
        used in the message), forbids the network; None means ``$NPMNV3_OFFLINE == "1"``.
    progress : None, bool or callable
        None shows a bar on stderr only when stderr is a terminal; True / False force it on / off;
        a callable receives ``(done, total)`` byte counts after each chunk.
    timeout : float
        Socket timeout in seconds, for connecting and for each read (not a limit on the whole
        download).

    Returns
    -------
    path : Path
        The verified file: in the cache folder, or in torch's hub cache when a matching file is
        already there (returned in place, not copied).

    Raises
    ------
    DownloadError
        The file is not available and cannot be downloaded; the message says why and where to put
        the file by hand.
    ValueError
        The arguments are malformed.
    """
    sha256 = _check_args(filename, sha256, size)
    if not re.fullmatch(r"([A-Za-z0-9_.-]+/)*", subfolder) or ".." in subfolder.split("/"):
        raise ValueError(f"subfolder must be empty or a relative folder ending in '/', got {subfolder!r}")
    folder = Path(directory).expanduser() if directory is not None else cache_dir()
    target = _Target(filename, sha256, size, _resolve_url(base_url, subfolder + filename),
                     folder / filename)

    removed = ""
    if os.path.lexists(target.path):
        reason = _mismatch(target.path, sha256, size)
        if reason is None:
            return target.path
        _discard_bad_cached(target, reason)
        removed = f" (a cached copy was removed because {reason})"

    torch_copy = torch_hub_dir() / filename
    if _is_verified(torch_copy, sha256, size):
        return torch_copy

    forbidden_by = _network_forbidden(offline)
    if forbidden_by:
        raise _error(target, f"the network is forbidden by {forbidden_by} and no "
                             f"verified copy was found there or in torch's cache "
                             f"{torch_copy.parent}{removed}")

    _download(target, timeout, progress)
    return target.path
