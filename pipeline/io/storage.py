"""fsspec URLs for every place the pipeline reads or writes: local paths, ``file://``, ``s3://``, ``memory://``.

S3 settings come from the standard AWS environment and config files, exactly as the AWS CLI reads them
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance profiles,
...). Nothing here stores or prints a credential; only the endpoint URL may appear in messages.

Every S3 request is bounded in time, so a stalled or lost endpoint fails a job instead of hanging it: a connect
timeout, a read timeout (no byte from the server for that long), a few botocore attempts and two s3fs tries.
The worst case for one call is about ``2 x attempts x (read timeout + backoff)``, 95 s by default. Settings
(environment, read by every process, so Ray workers follow the driver): ``DVT_S3_CONNECT_TIMEOUT`` (seconds,
default 5), ``DVT_S3_READ_TIMEOUT`` (default 15), ``DVT_S3_ATTEMPTS`` (botocore attempts per try, default 3).
PUTs are sent without ``Expect: 100-continue``: aiohttp starts its read timeout only once the body is sent,
and waits for the server's ``100 Continue`` with no timeout at all, so a frozen server would hang every
upload (Hadoop's S3A offers the same switch, ``fs.s3a.connection.expect.continue``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

__all__ = ["s3_endpoint", "s3_limits", "storage_options", "filesystem", "strip_protocol", "with_protocol", "is_remote", "is_local",
           "local_path", "zarr_location", "BucketNotFoundError", "AccessDeniedError", "StorageUnavailableError",
           "missing_bucket", "storage_errors", "is_unavailable", "unavailable"]

#: s3fs's own tries around botocore's (it also retries a body cut off mid-read, which botocore does not).
S3FS_TRIES = 2


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds or attempts") from None
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return number


def s3_limits() -> dict[str, float]:
    """``connect_timeout``, ``read_timeout`` (seconds) and ``attempts`` for S3 requests, from the environment."""
    return {"connect_timeout": _env_number("DVT_S3_CONNECT_TIMEOUT", 5.0),
            "read_timeout": _env_number("DVT_S3_READ_TIMEOUT", 15.0),
            "attempts": int(_env_number("DVT_S3_ATTEMPTS", 3))}


def _without_expect_continue() -> None:
    """Stop botocore from sending ``Expect: 100-continue`` (see the module docstring) in this process."""
    if os.environ.get("DVT_S3_EXPECT_CONTINUE") == "1":
        return
    try:
        from botocore import handlers
    except ImportError:  # no S3 support installed: nothing to change
        return
    handlers.BUILTIN_HANDLERS[:] = [h for h in handlers.BUILTIN_HANDLERS if h[1] is not handlers.add_expect_header]


def _limit_s3fs_tries() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.retries = S3FS_TRIES  # a class attribute: s3fs takes no per-instance setting


_without_expect_continue()
_limit_s3fs_tries()


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(url: str, **overrides: Any) -> dict[str, Any]:
    """fsspec ``storage_options`` for ``url``: retries and S3-compatible-server settings for ``s3://``.

    Credentials are left to botocore's own resolution so they never pass through here.
    """
    protocol = fsspec.utils.get_protocol(url)
    if protocol not in ("s3", "s3a"):
        return dict(overrides)
    limits = s3_limits()
    # Adaptive retries: exponential backoff with jitter on throttling, 5xx and timeouts, plus client-side rate
    # limiting when the server throttles.
    config: dict[str, Any] = {"connect_timeout": limits["connect_timeout"], "read_timeout": limits["read_timeout"],
                              "retries": {"total_max_attempts": limits["attempts"], "mode": "adaptive"}}
    if s3_endpoint():
        # Servers other than AWS (MinIO, moto, Ceph, R2) may reject the checksums botocore >= 1.36 sends.
        config["request_checksum_calculation"] = "when_required"
        config["response_checksum_validation"] = "when_required"
    options: dict[str, Any] = {"config_kwargs": config}
    if s3_endpoint():
        # Named here although botocore would find it too: s3fs caches filesystems by their arguments, and one
        # made for another endpoint earlier in the process must not be reused.
        options["endpoint_url"] = s3_endpoint()
    options.update(overrides)
    return options


def filesystem(url: str, **overrides: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url`` with :func:`storage_options` applied."""
    return fsspec.core.url_to_fs(url, **storage_options(url, **overrides))


def strip_protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[1]


def with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path ``fs`` returned (``bucket/key``), as a URL again (``s3://bucket/key``); local paths stay plain."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def is_remote(url: str) -> bool:
    return fsspec.utils.get_protocol(url) not in ("file", "local")


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return fsspec.utils.get_protocol(url) in ("file", "local")


def local_path(url: str) -> str:
    """``file:///a/b`` or ``/a/b`` -> ``/a/b`` (absolute)."""
    return os.path.abspath(os.path.expanduser(strip_protocol(url)))


def zarr_location(url: str, **overrides: Any) -> tuple[str, dict[str, Any] | None]:
    """``(store, storage_options)`` to hand to ``zarr.open_*``.

    zarr builds its own filesystem from a URL plus options; handing it ours can bind it to another event loop
    (zarr #3487). Local paths go to zarr's ``LocalStore`` (atomic writes), which takes no options.
    """
    if is_local(url):
        return local_path(url), None
    return url, storage_options(url, **overrides)


class BucketNotFoundError(FileNotFoundError):
    """The bucket named in a URL does not exist at the endpoint in use."""


class AccessDeniedError(PermissionError):
    """Object storage refused the request, or no credentials were found."""


class StorageUnavailableError(OSError):
    """Object storage did not answer (connection refused, timed out, or cut off) within the retry budget."""


#: Exception class names (anywhere in an error's chain) that mean "the endpoint did not answer in time".
_UNAVAILABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ServerDisconnectedError", "ClientConnectorError", "ServerTimeoutError", "SocketTimeoutError",
                "FSTimeoutError", "ClientOSError", "TimeoutError", "ConnectionRefusedError", "ConnectionResetError"}


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_unavailable(error: BaseException) -> bool:
    """Is ``error`` (or anything in its chain) a connection failure or a timeout talking to storage?"""
    return any(isinstance(e, StorageUnavailableError) or type(e).__name__ in _UNAVAILABLE
               or getattr(e, "storage_unavailable", False) for e in _chain(error))


def unavailable(url: str, error: BaseException) -> StorageUnavailableError:
    """The error for storage at ``url`` that did not answer; names the endpoint and the limits in force."""
    if isinstance(error, StorageUnavailableError):
        return error
    limits = s3_limits()
    cause = next((e for e in _chain(error) if type(e).__name__ in _UNAVAILABLE), error)
    reason = "timed out" if "Timeout" in type(cause).__name__ else "could not connect"
    budget = (f" ({S3FS_TRIES} x {limits['attempts']} attempts, read timeout {limits['read_timeout']:g} s, connect "
              f"timeout {limits['connect_timeout']:g} s)") if fsspec.utils.get_protocol(url) in ("s3", "s3a") else ""
    return StorageUnavailableError(
        f"Storage for {url}{_where()} did not answer: {reason}{budget}. Check that the endpoint is up and "
        f"reachable; finished work is kept, so re-run the same command once it is (limits: DVT_S3_READ_TIMEOUT, "
        f"DVT_S3_CONNECT_TIMEOUT, DVT_S3_ATTEMPTS).")


def _bucket(url: str) -> str:
    return strip_protocol(url).lstrip("/").split("/", 1)[0]


def _where() -> str:
    endpoint = s3_endpoint()
    return f" at endpoint {endpoint}" if endpoint else ""


def _error_code(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    response = getattr(cause, "response", None) or getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def missing_bucket(url: str) -> BucketNotFoundError:
    """The error for an ``s3://`` URL whose bucket does not exist."""
    bucket = _bucket(url)
    return BucketNotFoundError(f"S3 bucket '{bucket}' does not exist{_where()} (URL {url}): create it first "
                               f"(aws s3 mb s3://{bucket}) or fix the URL.")


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn an object store's missing-bucket, access and availability errors into messages that say what to do.

    Messages name the URL and endpoint, never a credential. Other errors pass through unchanged.
    """
    try:
        yield
    except (BucketNotFoundError, AccessDeniedError, StorageUnavailableError):
        raise
    except FileNotFoundError as e:
        text = str(e).lower()
        if fsspec.utils.get_protocol(url) in ("s3", "s3a") and (
                _error_code(e) == "NoSuchBucket" or "bucket does not exist" in text):
            raise missing_bucket(url) from e
        raise
    except PermissionError as e:
        code = _error_code(e) or str(e).splitlines()[0][:200]
        raise AccessDeniedError(
            f"Access denied to {url}{_where()} ({code}): check the credentials botocore finds (AWS_PROFILE, "
            f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, instance role) and the bucket policy.") from e
    except Exception as e:
        if is_unavailable(e):
            raise unavailable(url, e) from e
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise AccessDeniedError(
                f"No AWS credentials found for {url}{_where()}: set AWS_PROFILE or AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY, or run on a machine with an instance role.") from e
        raise
