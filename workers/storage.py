"""Storage at the bottom of every package: one way to open any URL, retries, atomic puts.

Everything goes through fsspec, so a local directory, ``file://``, ``s3://`` and ``gs://`` behave the
same. ``Location`` is an output (or input) URL with the storage options it is opened with, resolved
once at the edge and carried in the plan; its options may hold credentials and are never printed.
Transient errors (timeouts, dropped connections, throttling, 5xx) are retried with bounded
exponential backoff; missing objects and denied access fail at once, naming the URL and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

LOG = logging.getLogger(__name__)

READ_ATTEMPTS = 5  # tries of one remote call before a transient error is final
BACKOFF_SECONDS = 0.5  # wait before the first retry; doubles each time, capped below
BACKOFF_MAX_SECONDS = 8.0
STORAGE_FIX = ("check the URL, that the bucket exists, the endpoint (AWS_ENDPOINT_URL or storage.endpoint_url) "
               "and the credentials (AWS_* or the config's storage: section)")


class CheckpointError(ValueError):
    """An input checkpoint is unusable; the message names the file, the tensor and the fix."""


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The one entry point to storage: (filesystem, path) for any fsspec URL or local path."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:  # unknown scheme, backend not installed
        raise CheckpointError(f"{url}: cannot open this URL ({exc}); check the scheme, or install its fsspec "
                              "backend (s3fs for s3://, gcsfs for gs://)") from exc
    return fs, path


_TRANSIENT_TYPES = {  # by class name, so no backend has to be imported to recognise its errors
    "FSTimeoutError", "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteRead", "ClientPayloadError",
    "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError", "ResponseParserError",
}
_STORAGE_TYPES = _TRANSIENT_TYPES | {"BotoCoreError", "ClientError", "HttpError", "NoCredentialsError"}
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.ECONNREFUSED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EREMOTEIO}


def _type_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a storage error (botocore response, aiohttp / gcsfs status), if any."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        for attr in ("status", "code"):
            status = getattr(e, attr, None)
            if isinstance(status, int) and 100 <= status < 600:
                return status
    return None


def is_transient(exc: BaseException) -> bool:
    """A storage error worth retrying: a timeout, a dropped or refused connection, throttling, a 5xx.
    Never a missing file, denied access, a bad request or corrupt data."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, CheckpointError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)) or _type_names(exc) & _TRANSIENT_TYPES:
        return True
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def with_retries(what: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, retried on transient storage errors: READ_ATTEMPTS tries, waiting
    BACKOFF_SECONDS, then twice as long each time up to BACKOFF_MAX_SECONDS. ``what`` names the
    object in the log (a URL: never credentials)."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if attempt >= READ_ATTEMPTS or not is_transient(exc):
                raise
            wait = min(BACKOFF_MAX_SECONDS, BACKOFF_SECONDS * 2 ** (attempt - 1))
            LOG.warning("%s: %s: %s; retry %d of %d in %.1f s", what, type(exc).__name__, exc, attempt,
                        READ_ATTEMPTS - 1, wait)
            time.sleep(wait)


@contextlib.contextmanager
def storage_errors(url: str, what: str = ""):
    """Turn a storage failure inside the block into a CheckpointError naming ``url`` and the fix."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        if not (isinstance(exc, OSError) or _type_names(exc) & _STORAGE_TYPES):
            raise
        doing = f" reading {what}" if what else ""
        if isinstance(exc, FileNotFoundError):
            raise CheckpointError(f"{url}: not found{doing} ({exc}); {STORAGE_FIX}") from exc
        if isinstance(exc, PermissionError) or _http_status(exc) in (401, 403):
            raise CheckpointError(f"{url}: access denied{doing} ({exc}); check the credentials "
                                  "(AWS_* or the config's storage: section) and the bucket policy") from exc
        tries = f" after {READ_ATTEMPTS} attempts" if is_transient(exc) else ""
        unreachable = isinstance(exc, ConnectionError) or _type_names(exc) & {"EndpointConnectionError", "ConnectTimeoutError"}
        failed = "storage endpoint unreachable" if unreachable else "storage failed"
        raise CheckpointError(f"{url}: {failed}{doing}{tries} ({type(exc).__name__}: {exc}); {STORAGE_FIX}") from exc


def join_url(base: str, *parts: str) -> str:
    """Join URL segments with '/', keeping the scheme of ``base``."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (paths are real files: rename, link, pread work)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


@dataclass(frozen=True)
class Location:
    """A URL and the fsspec storage options it is opened with (never printed: they may hold credentials)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def join(self, *parts: str) -> str:
        """The URL of a path below this location."""
        return join_url(self.url, *parts)

    def fs(self, *parts: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path) of this location, or of a path below it."""
        return open_fs(self.join(*parts) if parts else self.url, self.storage_options)

    def put(self, relative: str, data: bytes, *, exclusive: bool = False) -> None:
        """``atomic_put`` of a file below this location."""
        atomic_put(self.join(relative), data, storage_options=self.storage_options, exclusive=exclusive)


class AlreadyPublishedError(FileExistsError):
    """A conditional put found the object already there: another run published first."""


def atomic_put(url: str, data: bytes, *, storage_options: dict | None = None, exclusive: bool = False) -> None:
    """Write ``data`` so a reader sees either nothing or all of it.

    Local files go to a temporary name and are renamed (hard-linked when ``exclusive``); object
    stores publish an object only when its upload completes. With ``exclusive`` the write happens
    only if ``url`` does not exist yet (local: link(2); S3: a conditional put with If-None-Match: *,
    atomic where the server enforces it, as AWS S3 and SeaweedFS do; other fsspec stores: fsspec's
    check-then-write) and AlreadyPublishedError is raised otherwise.
    """
    fs, path = open_fs(url, storage_options)
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        if not exclusive:
            fs.mv(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails if path exists: never replaces a published object
        except FileExistsError:
            raise AlreadyPublishedError(_published_message(url)) from None
        finally:
            os.unlink(tmp)
    elif exclusive:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise AlreadyPublishedError(_published_message(url)) from None
        except OSError as exc:
            if _precondition_failed(exc):  # servers that answer 412 without naming the condition (SeaweedFS)
                raise AlreadyPublishedError(_published_message(url)) from None
            raise
    else:
        fs.pipe_file(path, data)


def _published_message(url: str) -> str:
    return (f"{url} already exists: another run published this output first; nothing was replaced. "
            "Check it with `mergefleet verify`, or rerun with --overwrite to replace it")


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is a failed If-None-Match (412 PreconditionFailed, or 409 for a racing put)."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
    return False


_GENERIC_OPTIONS = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
_REMOTE_IDENTITY_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "LastModified", "mtime",
                         "updated")


def check_storage_options(url: str, storage_options: dict[str, Any]) -> None:
    """Refuse storage options the filesystem of ``url`` does not take, naming them and what it takes
    (fsspec would pass them on until a client library fails with a bare TypeError)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol == "hf":
        return  # Hub inputs resolve through the Hub cache (workers/hub.py), not through these options
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return  # open_fs names the missing backend
    if "file" in (cls.protocol if isinstance(cls.protocol, tuple) else (cls.protocol,)):
        return  # the local filesystem ignores options meant for the object store
    accepted = set(_GENERIC_OPTIONS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            accepted |= {p for p, v in inspect.signature(init).parameters.items()
                         if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p != "self"}
    unknown = sorted(set(storage_options) - accepted)
    if unknown:
        raise CheckpointError(f"storage option(s) {unknown} are not options of {cls.__module__}.{cls.__name__} "
                              f"(for {url}); it takes {sorted(accepted)}. Fix the config's storage: section")


def fingerprint(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies this version of a file without reading it: a local file's size, mtime_ns and
    inode; an object's ETag / version id / generation and modification time as the store reports them."""
    fs, path = open_fs(url, storage_options)
    if is_local(fs):
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    info = with_retries(url, fs.info, path)
    return {"size": info.get("size"), **{k: str(info[k]) for k in _REMOTE_IDENTITY_KEYS if info.get(k) is not None}}


def canonical(url: str) -> tuple[str, str]:
    """(protocol, normalised path) of a URL or local path: symlinks resolved for local paths, so two
    spellings of one location compare equal."""
    fs, path = open_fs(url)
    if is_local(fs):
        return "file", os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, path.rstrip("/")


def overlap(a: str, b: str) -> str | None:
    """How location ``a`` relates to ``b``: "is", "lies inside", "contains", or None when apart."""
    (pa, xa), (pb, xb) = canonical(a), canonical(b)
    if pa != pb:
        return None
    if xa == xb:
        return "is"
    if xa.startswith(xb.rstrip("/") + "/"):
        return "lies inside"
    if xb.startswith(xa.rstrip("/") + "/"):
        return "contains"
    return None


def check_bucket(url: str, storage_options: dict[str, Any]) -> None:
    """An object-store output's bucket must exist: writing would otherwise create it (s3fs does)."""
    fs, path = open_fs(url, storage_options)
    if is_local(fs) or "://" not in url:
        return
    bucket = path.split("/", 1)[0]
    with storage_errors(url, "the output bucket"):
        exists = with_retries(url, fs.exists, bucket)
    if not exists:
        raise CheckpointError(f"{url}: bucket {bucket!r} does not exist; create it first (mergefleet never creates "
                              "buckets) or fix the output URL")
