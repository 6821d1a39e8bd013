"""fsspec URLs for every place the pipeline reads or writes: local paths, ``file://``, ``s3://``, ``memory://``.

S3 settings come from the standard AWS environment and config files, exactly as the AWS CLI reads them
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance profiles,
...). Nothing here stores or prints a credential; only the endpoint URL may appear in messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

__all__ = ["s3_endpoint", "storage_options", "filesystem", "strip_protocol", "is_remote", "is_local",
           "local_path", "zarr_location", "BucketNotFoundError", "AccessDeniedError", "missing_bucket",
           "storage_errors"]

#: botocore retry policy for object storage: exponential backoff with jitter on throttling and 5xx.
S3_RETRIES = {"max_attempts": 8, "mode": "adaptive"}


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(url: str, **overrides: Any) -> dict[str, Any]:
    """fsspec ``storage_options`` for ``url``: retries and S3-compatible-server settings for ``s3://``.

    Credentials and the endpoint are left to botocore's own resolution so they never pass through here.
    """
    protocol = fsspec.utils.get_protocol(url)
    if protocol not in ("s3", "s3a"):
        return dict(overrides)
    config: dict[str, Any] = {"retries": dict(S3_RETRIES)}
    if s3_endpoint():
        # Servers other than AWS (MinIO, moto, Ceph, R2) may reject the checksums botocore >= 1.36 sends.
        config["request_checksum_calculation"] = "when_required"
        config["response_checksum_validation"] = "when_required"
    options: dict[str, Any] = {"config_kwargs": config}
    options.update(overrides)
    return options


def filesystem(url: str, **overrides: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url`` with :func:`storage_options` applied."""
    return fsspec.core.url_to_fs(url, **storage_options(url, **overrides))


def strip_protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[1]


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
    """Turn an object store's missing-bucket and access errors into messages that say what to do.

    Messages name the URL and endpoint, never a credential. Other errors pass through unchanged.
    """
    try:
        yield
    except (BucketNotFoundError, AccessDeniedError):
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
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise AccessDeniedError(
                f"No AWS credentials found for {url}{_where()}: set AWS_PROFILE or AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY, or run on a machine with an instance role.") from e
        raise
