"""Input and output primitives: storage URLs (fsspec, S3 options, error kinds), image listings and decoding.

* :mod:`.storage`: one filesystem per URL (``s3://``, ``file://``, ``memory://``, local paths), S3 endpoint and
  time bounds from the environment, and the storage errors every job reports the same way.
* :mod:`.listing`: from ``--images`` (folder, glob, prefix, URI list) to an ordered list of image URIs.
* :mod:`.decode`: bytes -> RGB image -> resized tensor, with a clear error for what cannot be decoded.
* :mod:`.shard_sources`, :mod:`.shards`, :mod:`.shard_reads`: WebDataset tar and Parquet shards as input: where
  they are, a columnar index of their images, and reading their members' bytes.

This wing is the ground floor: it imports no other wing of ``pipeline``, like ``timm.layers``.
"""

import importlib
from typing import Any

#: Where each public name lives. Resolved on first use, so importing ``pipeline.io.storage`` (as the store and
#: ``dvt store info`` do) does not import torch through :mod:`.decode`.
_WHERE = {
    **dict.fromkeys(["DecodeConfig", "DecodedImage", "ImageDecodeError", "decode_image", "resize_to_tensor"], "decode"),
    **dict.fromkeys(["ListingError", "fetch_bytes", "iter_uris", "list_uris", "read_listing", "write_listing"],
                    "listing"),
    **dict.fromkeys(["AccessDeniedError", "BucketNotFoundError", "StorageUnavailableError", "filesystem", "is_local",
                     "is_remote", "local_path", "storage_errors", "storage_options", "strip_protocol",
                     "with_protocol", "zarr_location"], "storage"),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["DecodeConfig", "DecodedImage", "ImageDecodeError", "decode_image", "resize_to_tensor", "ListingError",
           "fetch_bytes", "iter_uris", "list_uris", "read_listing", "write_listing", "AccessDeniedError",
           "BucketNotFoundError", "StorageUnavailableError", "filesystem", "is_local", "is_remote", "local_path",
           "storage_errors", "storage_options", "strip_protocol", "with_protocol", "zarr_location"]
