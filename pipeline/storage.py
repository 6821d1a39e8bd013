"""fsspec URLs for every place the pipeline reads or writes: local paths, ``file://``, ``s3://``, ``memory://``.

S3 settings come from the standard AWS environment and config files, exactly as the AWS CLI reads them
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance profiles,
...). Nothing here stores or prints a credential; only the endpoint URL may appear in messages.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

__all__ = ["s3_endpoint", "storage_options", "filesystem", "strip_protocol", "is_remote"]

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
