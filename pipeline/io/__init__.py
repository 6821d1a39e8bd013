"""Input and output primitives: storage URLs (fsspec, S3 options, error kinds), image listings and decoding.

* :mod:`.storage`: one filesystem per URL (``s3://``, ``file://``, ``memory://``, local paths), S3 endpoint and
  time bounds from the environment, and the storage errors every job reports the same way.
* :mod:`.listing`: from ``--images`` (folder, glob, prefix, URI list) to an ordered list of image URIs.
* :mod:`.decode`: bytes -> RGB image -> resized tensor, with a clear error for what cannot be decoded.

This wing is the ground floor: it imports no other wing of ``pipeline``, like ``timm.layers``.
"""

from .decode import DecodeConfig, DecodedImage, ImageDecodeError, decode_image, resize_to_tensor
from .listing import ListingError, fetch_bytes, iter_uris, list_uris, read_listing, write_listing
from .storage import (AccessDeniedError, BucketNotFoundError, StorageUnavailableError, filesystem, is_local,
                      is_remote, local_path, storage_errors, storage_options, strip_protocol, with_protocol,
                      zarr_location)

__all__ = ["DecodeConfig", "DecodedImage", "ImageDecodeError", "decode_image", "resize_to_tensor", "ListingError",
           "fetch_bytes", "iter_uris", "list_uris", "read_listing", "write_listing", "AccessDeniedError",
           "BucketNotFoundError", "StorageUnavailableError", "filesystem", "is_local", "is_remote", "local_path",
           "storage_errors", "storage_options", "strip_protocol", "with_protocol", "zarr_location"]
